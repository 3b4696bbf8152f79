"""``unused_embedding``: most rows of an Embedding table are never looked up in an epoch."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from gradtrace import _keras_compat as compat
from gradtrace.detectors.base import Detector


class UnusedEmbedding(Detector):
    """At each epoch's end, per Embedding layer, counts the rows looked up (and so given a gradient).

    Fires when more than ``max_unused`` (default 0.75) of the table went
    unused although the epoch made at least ``coverage`` (default 3) times as
    many lookups as the table has rows: with uniformly drawn ids that many
    lookups leave only about 5% of rows unused, so a large unused share means
    the table is far bigger than the ids the data holds (a vocabulary-size
    mismatch) rather than bad luck. The message gives rows used, rows in the
    table and the highest id seen.

    A small dataset makes fewer lookups than the table has rows, so it also
    fires on the id range: when the highest id seen is below ``max_reach``
    (default 0.5) of ``input_dim`` although, had the ids been spread over the
    whole table, so many lookups would all have stayed that low with
    probability below ``1e-6`` (``reach ** lookups``). A table sized for
    50,000 ids fed ids below 500 is caught after 3 lookups, not 150,000.
    """

    name = "unused_embedding"
    default_action = "warn"
    needs = ("size",)
    every_step = True
    wants_ids = True
    reports_at = ("epoch_end",)

    def __init__(self, max_unused=0.75, coverage=3.0, max_reach=0.5, action=None):
        super().__init__(action)
        self.max_unused = self._check_range("max_unused", max_unused, 0.0, 1.0, high_open=True)
        self.coverage = self._check_range("coverage", coverage, 0.0, float("inf"), low_open=True)
        self.max_reach = self._check_range("max_reach", max_reach, 0.0, 1.0, low_open=True, high_open=True)

    def reset(self):
        super().reset()
        self._tables = {}  # path -> (used [input_dim], lookups, max id, input_dim, layer class)

    def _vars(self, row):
        entry = self._tables.get(row.path)
        if entry is None:
            with tf.init_scope():
                zeros = tf.zeros([row.input_dim], tf.float32)
            entry = (
                compat.detector_variable(zeros, "gradtrace_used"),
                compat.detector_variable(0.0, "gradtrace_lookups"),
                compat.detector_variable(-1.0, "gradtrace_max_id"),
                row.input_dim,
                row.layer_class,
            )
            self._tables[row.path] = entry
        return entry

    def check(self, view):
        for i, ids in view.ids.items():
            row = view.table.rows[i]
            used, lookups, max_id, dim, _ = self._vars(row)
            flat = tf.reshape(tf.cast(ids, tf.int32), [-1])
            ok = tf.cast((flat >= 0) & (flat < dim), tf.float32)
            # out-of-range ids are clipped and carry 0, so they mark nothing (XLA-friendly: static shapes)
            used.scatter_max(tf.IndexedSlices(ok, tf.clip_by_value(flat, 0, dim - 1)))
            lookups.assign_add(tf.reduce_sum(ok))
            max_id.assign(tf.maximum(max_id, tf.cast(tf.reduce_max(tf.concat([flat, [-1]], 0)), tf.float32)))
        n = len(view.table)
        return tf.zeros([n], tf.bool), tf.zeros([n])

    def epoch_begin(self, ctx):
        for used, lookups, max_id, _, _ in self._tables.values():
            used.assign(tf.zeros_like(used))
            lookups.assign(0.0)
            max_id.assign(-1.0)

    def epoch_end(self, ctx):
        for path, (used, lookups, max_id, dim, cls) in self._tables.items():
            n_used = int(np.count_nonzero(used.numpy()))
            n_lookups = float(lookups.numpy())
            top = int(max_id.numpy())
            unused = 1.0 - n_used / dim
            reach = min(top + 1, dim) / dim
            # had the ids been spread over the whole table, all of them stay <= top with probability reach**n
            low_range = n_lookups > 0 and reach < self.max_reach and n_lookups * np.log(reach) < np.log(1e-6)
            coverage = n_lookups >= self.coverage * dim and unused > self.max_unused
            if not (coverage or low_range):
                continue
            if coverage:
                what = (f"only {n_used} of its {dim} rows were looked up this epoch ({unused:.0%} unused) in "
                        f"{int(n_lookups)} lookups; highest id seen {top}.")
            else:
                what = (f"the highest id seen in {int(n_lookups)} lookups this epoch is {top}, but input_dim={dim}: "
                        f"{1 - reach:.0%} of the table is never reached by this data ({n_used} rows used; ids spread "
                        f"over the table would have gone above {top} with probability 1 - {reach:.3g}^"
                        f"{int(n_lookups)}).")
            yield path, "weight", unused, (
                f"{path} ({cls}): {what} If the ids only go up to {top}, input_dim={top + 1} would do."
            ), (f"size {path} for the vocabulary the data really has (input_dim={top + 1}), or "
                "check that the vocabulary and the ids were built from the same split.")
