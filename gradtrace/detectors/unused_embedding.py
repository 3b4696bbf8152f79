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
    """

    name = "unused_embedding"
    default_action = "warn"
    needs = ("size",)
    every_step = True
    wants_ids = True
    reports_at = ("epoch_end",)

    def __init__(self, max_unused=0.75, coverage=3.0, action=None):
        super().__init__(action)
        self.max_unused = self._check_range("max_unused", max_unused, 0.0, 1.0, high_open=True)
        self.coverage = self._check_range("coverage", coverage, 0.0, float("inf"), low_open=True)

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
            unused = 1.0 - n_used / dim
            if n_lookups >= self.coverage * dim and unused > self.max_unused:
                yield path, "weight", unused, (
                    f"{path} ({cls}): only {n_used} of its {dim} rows were looked up this epoch "
                    f"({unused:.0%} unused) in {int(n_lookups)} lookups; highest id seen {int(max_id.numpy())}. "
                    f"If the ids only go up to {int(max_id.numpy())}, input_dim={int(max_id.numpy()) + 1} would do."
                ), (f"size {path} for the vocabulary the data really has (input_dim={int(max_id.numpy()) + 1}), or "
                    "check that the vocabulary and the ids were built from the same split.")
