"""``unused_embedding``: most rows of an Embedding table are never looked up in an epoch."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from gradtrace import _keras_compat as compat
from gradtrace.detectors.base import Detector
from gradtrace.graph import base_path


_EXACT = 2_000_000  # ranks summed term by term; beyond, the tail is integrated


def harmonic(n, s):
    """``sum(r ** -s for r in 1..n)`` (the Zipf normaliser)."""
    n = int(n)
    if n <= 0:
        return 0.0
    if n <= _EXACT:
        return float(np.sum(np.arange(1, n + 1, dtype=np.float64) ** -s))
    m = float(_EXACT)
    tail = np.log(n / m) if s == 1 else (n ** (1 - s) - m ** (1 - s)) / (1 - s)
    return harmonic(_EXACT, s) + float(tail)


def expected_distinct(rows, lookups, s=None):
    """Distinct ids expected in ``lookups`` draws over ``rows`` ids: uniform (``s=None``), or Zipf with
    exponent ``s`` over ids sorted by frequency (id 0 the most frequent, as a vocabulary built by
    counting is)."""
    if lookups <= 0:
        return 0.0
    if s is None:
        return float(rows * -np.expm1(lookups * np.log1p(-1.0 / rows)))
    head = min(rows, _EXACT)
    p = np.arange(1, head + 1, dtype=np.float64) ** -s / harmonic(rows, s)
    out = float(np.sum(-np.expm1(lookups * np.log1p(-p))))
    if rows > head:  # ranks so rare that each is drawn at most about once: their mass times the draws
        out += min(rows - head, lookups * (1.0 - harmonic(head, s) / harmonic(rows, s)))
    return out


class UnusedEmbedding(Detector):
    """Per Embedding table, the ids an epoch looked up, against what that many lookups would show.

    Two rules, at each epoch's end (and every ``every`` steps when set), each against a *Zipf-like*
    draw (exponent ``zipf_s``, default 1.5, over ids sorted by frequency: steeper than word
    frequencies, ~1, and most item popularity curves, 0.6-1.2), so that a real frequency-sorted
    vocabulary, whose rare ids are rarely seen, is not flagged:

    - **distinct ids**: more than ``max_unused`` (default 0.75) of the table was never looked up, and
      the distinct ids seen are fewer than ``margin`` (default 0.5) times those expected from that many
      lookups under the Zipf-like draw (a uniform draw would show more still; both are reported). The
      rows are there, the data never reaches them: a vocabulary built on another split, ids hashed
      into a few buckets;
    - **id range**: the highest id seen is below ``max_reach`` (default 0.5) of ``input_dim``,
      although under the Zipf-like draw so many lookups would all have stayed that low with
      probability below 1e-6. A table sized for 50,000 ids fed ids below 500 is caught after about
      400 lookups, at any dataset size.

    When the distinct-ids rule fires on ids spread over the whole range (the highest id seen at or
    above ``max_reach`` of ``input_dim``) and each id used was looked up ``raw_repeats`` (default 10)
    times or more on average (the data's vocabulary is exhausted: more lookups would bring few new
    ids), the ids are raw (record numbers, hashes, codes), not re-indexed: the finding says so, with
    the vocabulary size that would do and ``IntegerLookup``/``StringLookup`` as the fix.

    Blame rule: the table, with rows used, the highest id seen and the ``input_dim`` that would do.
    """

    name = "unused_embedding"
    default_action = "warn"
    needs = ("size",)
    every_step = True
    wants_ids = True
    reports_at = ("epoch_end", "periodic")

    def __init__(self, max_unused=0.75, margin=0.5, zipf_s=1.5, max_reach=0.5, raw_repeats=10.0, every=None,
                 action=None):
        super().__init__(action)
        self.raw_repeats = self.check_range("raw_repeats", raw_repeats, 1.0, float("inf"))
        self.max_unused = self.check_range("max_unused", max_unused, 0.0, 1.0, high_open=True)
        self.margin = self.check_range("margin", margin, 0.0, 1.0, low_open=True)
        self.zipf_s = self.check_range("zipf_s", zipf_s, 0.0, 10.0, low_open=True)
        self.max_reach = self.check_range("max_reach", max_reach, 0.0, 1.0, low_open=True, high_open=True)
        self.every = None if every is None else self.check_int("every", every, 1)
        self._groups = {}
        self._reported = set()

    def reset(self):
        super().reset()
        # per set of tables looked up together: LookupBatch key -> (used [rows of all tables], lookups
        # [tables], id range [tables, 2], layer class per table)
        self._groups = {}
        self._reported = set()

    def _vars(self, batch, classes):
        entry = self._groups.get(batch.key)
        if entry is None:
            with tf.init_scope():
                zeros, counts = tf.zeros([batch.total], tf.float32), tf.zeros([len(batch.dims)])
                span = tf.constant([[float(d), -1.0] for d in batch.dims])
            entry = (
                compat.detector_variable(zeros, "gradtrace_used"),
                compat.detector_variable(counts, "gradtrace_lookups"),
                compat.detector_variable(span, "gradtrace_id_range"),
                batch,
                classes,
            )
            self._groups[batch.key] = entry
        return entry

    def check(self, view):
        n = len(view.table)
        if view.ids:
            batch = view.lookup_batch()  # a table called twice: one table, its lookups together
            classes = {base_path(view.table.rows[i].path): view.table.rows[i].layer_class for i in view.ids}
            used, lookups, id_range, _, _ = self._vars(batch, classes)
            tables = len(batch.dims)
            ok = tf.cast(batch.in_range, tf.float32)
            # out-of-range ids are clipped and carry 0, so they mark nothing (static shapes: XLA-friendly)
            used.scatter_max(tf.IndexedSlices(ok, batch.row))
            lookups.assign_add(tf.math.unsorted_segment_sum(ok, batch.table, tables))
            # the id range seen, among ids in range (a table with no id this step: int32's extremes)
            low = tf.math.unsorted_segment_min(tf.where(batch.in_range, batch.ids, 2 ** 31 - 1), batch.table, tables)
            high = tf.math.unsorted_segment_max(batch.ids, batch.table, tables)
            id_range.assign(tf.stack([tf.minimum(id_range[:, 0], tf.cast(low, tf.float32)),
                                      tf.maximum(id_range[:, 1], tf.cast(high, tf.float32))], 1))
        return tf.zeros([n], tf.bool), tf.zeros([n])

    def _per_table(self):
        """``{path: (used [input_dim] bool, lookups, min id, max id, input_dim, layer class)}``, merged over
        the sets of tables the step's updates looked up (a table in two sets counts in both)."""
        out = {}
        for used, lookups, id_range, batch, classes in self._groups.values():
            used_v, lookups_v, range_v = used.numpy() > 0, lookups.numpy(), id_range.numpy()
            for t, (path, rows) in enumerate(batch.per_table(used_v).items()):
                low, high = float(range_v[t, 0]), float(range_v[t, 1])
                if path in out:
                    u, n, lo, hi, dim, cls = out[path]
                    out[path] = (u | rows, n + float(lookups_v[t]), min(lo, low), max(hi, high), dim, cls)
                else:
                    out[path] = (rows, float(lookups_v[t]), low, high, batch.dims[t], classes[path])
        return out

    def seen(self):
        """``{table path: (lookups, min id, max id, rows used)}`` of the epoch so far (ids in range)."""
        return {path: (int(n), int(low), int(high), int(np.count_nonzero(used)))
                for path, (used, n, low, high, _, _) in self._per_table().items()}

    def used(self):
        """``{table path: [input_dim] bool}``: the rows looked up this epoch so far."""
        return {path: v[0] for path, v in self._per_table().items()}

    def epoch_begin(self, ctx):
        self._reported = set()
        for used, lookups, id_range, batch, _ in self._groups.values():
            used.assign(tf.zeros_like(used))
            lookups.assign(tf.zeros_like(lookups))
            id_range.assign([[float(d), -1.0] for d in batch.dims])

    def epoch_end(self, ctx):
        return self._findings("this epoch")

    def periodic(self, ctx):
        return self._findings("so far this epoch")

    def _findings(self, when):
        for path, (used, n_lookups, _, top, dim, cls) in self._per_table().items():
            if path in self._reported:
                continue
            n_used = int(np.count_nonzero(used))
            top = int(top)
            if n_lookups <= 0:
                continue
            unused = 1.0 - n_used / dim
            zipf = expected_distinct(dim, n_lookups, self.zipf_s)
            uniform = expected_distinct(dim, n_lookups)
            few = unused > self.max_unused and n_used < self.margin * zipf
            reach = min(top + 1, dim) / dim
            # under the Zipf-like draw, every lookup stays <= top with probability H(top + 1) / H(dim)
            p_low = harmonic(top + 1, self.zipf_s) / harmonic(dim, self.zipf_s)
            low_range = reach < self.max_reach and n_lookups * np.log(max(p_low, 1e-300)) < np.log(1e-6)
            if not (few or low_range):
                continue
            self._reported.add(path)
            if few:
                what = (f"only {n_used} of its {dim} rows were looked up {when} ({unused:.0%} unused) in "
                        f"{int(n_lookups)} lookups, where a uniform draw would reach about {uniform:.0f} distinct "
                        f"ids and a Zipf-like one (frequency-sorted ids, s={self.zipf_s:g}) about {zipf:.0f}; "
                        f"highest id seen {top}.")
            else:
                what = (f"the highest id seen in {int(n_lookups)} lookups {when} is {top}, but input_dim={dim}: "
                        f"{1 - reach:.0%} of the table is never reached by this data ({n_used} rows used; even "
                        f"frequency-sorted ids with a Zipf-like draw would have gone above {top} with probability "
                        f"1 - {p_low:.3g}^{int(n_lookups)}).")
            if few and reach >= self.max_reach and n_lookups >= self.raw_repeats * n_used:
                # raw ids: few distinct ids, each seen many times (the data's vocabulary is exhausted), spread
                # over the whole range; re-indexed ids would run 0..n_used
                yield path, "weight", unused, (
                    f"{path} ({cls}): {what} Each id used was looked up {n_lookups / max(n_used, 1):.0f} times on "
                    f"average, so the data has about {n_used} distinct ids, spread up to {top}: the ids are raw "
                    f"(record numbers, hashes, codes), not re-indexed. A vocabulary of {n_used + 1} rows would do."
                ), (f"map the raw ids to 0..{n_used} before {path}, with keras.layers.IntegerLookup (or StringLookup) "
                    f"adapted on the training ids, and size the table input_dim={n_used + 1} (the extra row for "
                    "ids not seen in training).")
                continue
            yield path, "weight", unused, (
                f"{path} ({cls}): {what} If the ids only go up to {top}, input_dim={top + 1} would do."
            ), (f"size {path} for the vocabulary the data really has (input_dim={top + 1}), or "
                "check that the vocabulary and the ids were built from the same split.")
