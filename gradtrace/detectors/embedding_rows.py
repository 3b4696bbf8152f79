"""``embedding_rows``: Embedding rows that explode (and, for the report, the rows that learned)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from gradtrace import _keras_compat as compat
from gradtrace.detectors.base import Detector
from gradtrace.graph import base_path

WORST = 3  # ids named per table


class EmbeddingRows(Detector):
    """Two row-level checks of every Embedding table, from the rows each step already gathered (the
    layer's output) and their gradients: O(looked-up rows) per step, never the whole table.

    - **Exploding rows** (every traced step): the largest norm among the rows looked up in the
      batch is above ``factor`` (default 100) times the table's reference norm (the mean looked-up
      row's at its first traced step: the initialisation's scale) and above ``min_norm`` (default 10),
      for ``patience`` (default 5) steps in a row. Hot ids under a learning rate too high for them
      (plain SGD adds every lookup's gradient to their row) run away, then the loss follows.
      Measured: a two-table recommender under SGD at 15 took its item rows from 0.12 to 100 in 8 steps
      and 1e10 in 32 while its user rows stayed at 0.2; healthy tables (Adam up to 0.05, Zipf ids)
      stayed below 20x their initial norm and below 2 in absolute terms. (The same batch is no
      reference: when the hot ids explode, most lookups are of hot ids too.)
    - **Rows that learned** (kept per epoch, for :func:`gradtrace.embedding_tables` and the report):
      the rows a lookup gave a non-zero gradient. A table none of whose lookups gets a gradient (a
      ``stop_gradient``, a cast to int, an ``argmax`` or a ``round`` after it) is ``gradient_cut``'s
      finding, made at the first step and naming the op; some rows without one is normal (measured:
      behind ``GlobalMaxPooling1D``, which passes each channel's gradient to one position, 58-81% of a
      healthy text model's looked-up rows got none in an epoch).

    Blame rule: the table itself (its path), naming its worst ids.
    """

    name = "embedding_rows"
    default_action = "warn"
    needs = ()
    reports_at = ("step",)

    def __init__(self, factor=100.0, min_norm=10.0, patience=5, action=None):
        super().__init__(action)
        self.factor = self.check_range("factor", factor, 1.0, float("inf"), low_open=True)
        self.min_norm = self.check_range("min_norm", min_norm, 0.0, float("inf"))
        self.patience = self.check_int("patience", patience, 1)
        self._groups = {}

    def reset(self):
        super().reset()
        # per set of tables looked up together: LookupBatch key -> dict of state variables
        self._groups = {}

    def _vars(self, batch, layers):
        entry = self._groups.get(batch.key)
        if entry is None:
            tables = len(batch.dims)
            with tf.init_scope():
                zeros, last = tf.zeros([batch.total], tf.float32), tf.fill([tables, WORST + 2], -1.0)
                counts = tf.zeros([tables])
            entry = {
                # this epoch: the lookups made per table (ids in range, padding left out), and the rows a
                # lookup gave a non-zero gradient (which ids were looked up, unused_embedding keeps)
                "lookups": compat.detector_variable(counts, "gradtrace_rows_lookups"),
                "moved": compat.detector_variable(zeros, "gradtrace_rows_moved"),
                # per table, at its last firing: the worst ids, the largest norm, the reference norm
                "last": compat.detector_variable(last, "gradtrace_rows_last"),
                "batch": batch,
                "layers": layers,
            }
            self._groups[batch.key] = entry
        return entry

    def check(self, view):
        n = len(view.table)
        if not view.lookups:
            return tf.zeros([n], tf.bool), tf.zeros([n])
        index = sorted(view.lookups)
        k = len(index)
        looks = [view.lookups[i] for i in index]
        paths = [base_path(view.table.rows[i].path) for i in index]
        batch = view.lookup_batch(index)
        entry = self._vars(batch, {p: lk.layer for p, lk in zip(paths, looks)})
        tables = len(batch.dims)
        # per ids row: [streak, reported, reference norm (NaN until the first traced step)]
        state = self.state(view, "rows", np.nan, size=3 * k)
        streak, reported, ref = state[:k], state[k:2 * k], state[2 * k:]
        streak, reported = tf.where(tf.math.is_nan(streak), 0.0, streak), tf.where(tf.math.is_nan(reported), 0.0,
                                                                                   reported)
        ok = batch.in_range & tf.logical_not(batch.padding([getattr(lk.layer, "mask_zero", False) for lk in looks]))
        okf = tf.cast(ok, tf.float32)
        entry["lookups"].assign_add(tf.math.unsorted_segment_sum(okf, batch.table, tables))

        def flat(t, lk):
            d = int(lk.rows.shape[-1]) if lk.rows.shape[-1] is not None else -1
            return tf.reshape(tf.cast(t, tf.float32), [-1, d])

        if any(lk.grad is not None for lk in looks):
            got = tf.concat([tf.reduce_any(tf.not_equal(flat(lk.grad, lk), 0.0), axis=1) if lk.grad is not None
                             else tf.zeros(tf.shape(flat(lk.rows, lk))[:1], tf.bool) for lk in looks], 0)
            entry["moved"].scatter_max(tf.IndexedSlices(tf.cast(got, tf.float32) * okf, batch.row))
        # exploding rows: the largest looked-up row of each lookup against the table's reference norm
        norm = tf.concat([tf.norm(flat(lk.rows, lk), axis=1) for lk in looks], 0)
        count = tf.math.unsorted_segment_sum(okf, batch.lookup, k)
        mean = tf.math.unsorted_segment_sum(norm * okf, batch.lookup, k) / tf.maximum(count, 1.0)
        masked = tf.where(ok, norm, -1.0)
        top = tf.maximum(tf.math.unsorted_segment_max(masked, batch.lookup, k), -1.0)
        r = tf.where(tf.math.is_nan(ref) & (count > 0), mean, ref)
        ratio = tf.where(count > 0, top / tf.maximum(r, 1e-12), 0.0)
        new_streak = tf.where((ratio > self.factor) & (top > self.min_norm), streak + 1.0, 0.0)
        hit = new_streak >= float(self.patience)
        fire = hit & tf.equal(reported, 0.0)

        def note_worst():
            # only on a firing step: each firing lookup's worst ids, its top norm and reference, per table
            last = tf.convert_to_tensor(entry["last"])
            for j in range(k):
                padded = tf.concat([tf.where(tf.equal(batch.lookup, j), masked, -2.0), -tf.ones([WORST])], 0)
                worst = tf.math.top_k(padded, k=WORST)
                ids = tf.cast(tf.gather(tf.concat([batch.ids, -tf.ones([WORST], tf.int32)], 0), worst.indices),
                              tf.float32)
                ids = tf.where(worst.values >= 0, ids, -1.0)
                t = batch.paths.index(paths[j])
                row = tf.where(fire[j], tf.concat([ids, [top[j], r[j]]], 0), last[t])
                last = tf.tensor_scatter_nd_update(last, [[t]], [row])
            entry["last"].assign(last)
            return tf.constant(True)

        tf.cond(tf.reduce_any(fire), note_worst, lambda: tf.constant(False))
        self.update(state, tf.concat([new_streak, tf.cast(hit, tf.float32), r], 0))
        at = tf.constant([[i] for i in index], tf.int32)
        return tf.scatter_nd(at, tf.cast(fire, tf.int32), [n]) > 0, tf.scatter_nd(at, ratio, [n])

    def explain(self, rows, fired, values, matrix, table):
        last_of = self._last()
        for i in np.flatnonzero(fired):
            row = table.rows[i]
            last = last_of.get(base_path(row.path), np.full(WORST + 2, -1.0))
            worst = [int(v) for v in last[:WORST] if v >= 0]
            top, ref = float(last[WORST]), float(last[WORST + 1])
            ids = ", ".join(map(str, worst)) or "?"
            yield row, float(values[i]), (
                f"{row.path} (Embedding): exploding rows: the largest row looked up has norm {top:.3g}, "
                f"{float(values[i]):.3g}x the table's rows at the start ({ref:.3g}), for {self.patience} steps "
                f"in a row (factor={self.factor:g}); worst ids: {ids}."
            ), (f"lower the learning rate of {row.path} (hot ids are updated at every lookup), clip gradients, or add "
                "an embeddings_regularizer / max-norm constraint (keras.constraints.MaxNorm) on the table.")

    def _last(self):
        """``{table path: [WORST ids, top norm, reference norm]}`` of the table's last firing (the largest top
        norm where the table is in several sets of tables)."""
        out = {}
        for entry in self._groups.values():
            for t, path in enumerate(entry["batch"].paths):
                last = entry["last"].numpy()[t]
                if path not in out or last[WORST] > out[path][WORST]:
                    out[path] = last
        return out

    def _per_table(self):
        """``{path: (layer, lookups this epoch, moved [input_dim] bool)}``, merged over the sets of tables."""
        out = {}
        for entry in self._groups.values():
            batch = entry["batch"]
            lookups = entry["lookups"].numpy()
            for t, (path, moved) in enumerate(batch.per_table(entry["moved"].numpy() > 0).items()):
                if path in out:
                    layer, n, m = out[path]
                    out[path] = (layer, n + float(lookups[t]), m | moved)
                else:
                    out[path] = (entry["layers"][path], float(lookups[t]), moved)
        return out

    def moved(self):
        """``{table path: [input_dim] bool}``: the rows a lookup gave a non-zero gradient this epoch."""
        return {path: moved for path, (_, _, moved) in self._per_table().items()}

    def epoch_begin(self, ctx):
        for entry in self._groups.values():
            entry["lookups"].assign(tf.zeros_like(entry["lookups"]))
            entry["moved"].assign(tf.zeros_like(entry["moved"]))
