"""``embedding_rows``: Embedding rows that explode, and rows that are looked up but never learn."""

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
    - **Rows that never learn** (epoch end): none of a trainable table's lookups this epoch (at least
      ``min_lookups`` of them) gave its rows a non-zero gradient. The table is looked up, but
      its output does not reach the loss with a gradient: a ``stop_gradient``, a cast to int, an
      ``argmax`` or a ``round`` after it. The padding row of a ``mask_zero=True`` table is left out; a
      frozen table (``trainable=False``) is frozen on purpose. Only a table cut off whole is a
      finding: some rows without a gradient is normal (measured: behind ``GlobalMaxPooling1D``, which
      passes each channel's gradient to one position, 58-81% of a healthy text model's looked-up rows
      got none in an epoch).

    Blame rule: the table itself (its path), naming its worst ids.
    """

    name = "embedding_rows"
    default_action = "warn"
    needs = ()
    reports_at = ("step", "epoch_end")

    def __init__(self, factor=100.0, min_norm=10.0, patience=5, min_lookups=32, action=None):
        super().__init__(action)
        self.factor = self._check_range("factor", factor, 1.0, float("inf"), low_open=True)
        self.min_norm = self._check_range("min_norm", min_norm, 0.0, float("inf"))
        self.patience = self._check_int("patience", patience, 1)
        self.min_lookups = self._check_int("min_lookups", min_lookups, 1)
        self._tables = {}

    def reset(self):
        super().reset()
        self._tables = {}  # table path -> dict of state variables, the layer

    def _vars(self, path, layer):
        entry = self._tables.get(path)
        if entry is None:
            dim = int(layer.input_dim)
            with tf.init_scope():
                zeros, last = tf.zeros([dim], tf.float32), tf.fill([WORST + 2], -1.0)
            entry = {
                # this epoch: the lookups made (ids in range, padding left out), and the rows a
                # lookup gave a non-zero gradient (which ids were looked up, unused_embedding keeps)
                "lookups": compat.detector_variable(0.0, "gradtrace_rows_lookups"),
                "moved": compat.detector_variable(zeros, "gradtrace_rows_moved"),
                # at the last firing: the worst ids, the largest norm, the reference norm
                "last": compat.detector_variable(last, "gradtrace_rows_last"),
                "layer": layer,
            }
            self._tables[path] = entry
        return entry

    def check(self, view):
        n = len(view.table)
        if not view.lookups:
            return tf.zeros([n], tf.bool), tf.zeros([n])
        index = sorted(view.lookups)
        k = len(index)
        # per ids row: [streak, reported, reference norm (NaN until the first traced step)]
        state = self.state(view, "rows", np.nan, size=3 * k)
        streak, reported, ref = state[:k], state[k:2 * k], state[2 * k:]
        streak, reported = tf.where(tf.math.is_nan(streak), 0.0, streak), tf.where(tf.math.is_nan(reported), 0.0,
                                                                                   reported)
        new_streak, new_reported, new_ref, fired, ratios = [], [], [], [], []
        for j, i in enumerate(index):
            look = view.lookups[i]
            layer = look.layer
            entry = self._vars(base_path(view.table.rows[i].path), layer)
            dim = int(layer.input_dim)
            ids = tf.reshape(tf.cast(look.ids, tf.int32), [-1])
            d = int(look.rows.shape[-1]) if look.rows.shape[-1] is not None else -1
            rows = tf.reshape(tf.cast(look.rows, tf.float32), [-1, d])
            ok = (ids >= 0) & (ids < dim)
            if getattr(layer, "mask_zero", False):
                ok = ok & (ids != 0)  # the padding row
            okf = tf.cast(ok, tf.float32)
            safe = tf.clip_by_value(ids, 0, dim - 1)
            entry["lookups"].assign_add(tf.reduce_sum(okf))
            if look.grad is not None:
                g = tf.reshape(tf.cast(look.grad, tf.float32), [-1, d])
                got = tf.cast(tf.reduce_any(tf.not_equal(g, 0.0), axis=1), tf.float32) * okf
                entry["moved"].scatter_max(tf.IndexedSlices(got, safe))
            # exploding rows: the largest looked-up rows against the table's reference norm (padded so
            # that an empty batch has a top too)
            norm = tf.norm(rows, axis=1)
            count = tf.reduce_sum(okf)
            mean = tf.reduce_sum(norm * okf) / tf.maximum(count, 1.0)
            worst = tf.math.top_k(tf.concat([tf.where(ok, norm, -1.0), -tf.ones([WORST])], 0), k=WORST)
            top = worst.values[0]
            r_j = tf.where(tf.math.is_nan(ref[j]) & (count > 0), mean, ref[j])
            ratio = tf.where(count > 0, top / tf.maximum(r_j, 1e-12), 0.0)
            s_j = tf.where((ratio > self.factor) & (top > self.min_norm), streak[j] + 1.0, 0.0)
            hit = s_j >= float(self.patience)
            fire = hit & tf.equal(reported[j], 0.0)
            ids_worst = tf.cast(tf.gather(tf.concat([ids, -tf.ones([WORST], tf.int32)], 0), worst.indices), tf.float32)
            entry["last"].assign(tf.where(fire, tf.concat([ids_worst, [top, r_j]], 0), entry["last"]))
            new_streak.append(s_j)
            new_reported.append(tf.cast(hit, tf.float32))
            new_ref.append(r_j)
            fired.append(fire)
            ratios.append(ratio)
        self.update(state, tf.stack(new_streak + new_reported + new_ref))
        at = tf.constant([[i] for i in index], tf.int32)
        return (tf.scatter_nd(at, tf.cast(tf.stack(fired), tf.int32), [n]) > 0,
                tf.scatter_nd(at, tf.stack(ratios), [n]))

    def explain(self, rows, fired, values, matrix, table):
        for i in np.flatnonzero(fired):
            row = table.rows[i]
            entry = self._tables.get(base_path(row.path))
            last = entry["last"].numpy() if entry else np.full(WORST + 2, -1.0)
            worst = [int(v) for v in last[:WORST] if v >= 0]
            top, ref = float(last[WORST]), float(last[WORST + 1])
            ids = ", ".join(map(str, worst)) or "?"
            yield row, float(values[i]), (
                f"{row.path} (Embedding): exploding rows: the largest row looked up has norm {top:.3g}, "
                f"{float(values[i]):.3g}x the table's rows at the start ({ref:.3g}), for {self.patience} steps "
                f"in a row (factor={self.factor:g}); worst ids: {ids}."
            ), (f"lower the learning rate of {row.path} (hot ids are updated at every lookup), clip gradients, or add "
                "an embeddings_regularizer / max-norm constraint (keras.constraints.MaxNorm) on the table.")

    def moved(self):
        """``{table path: [input_dim] bool}``: the rows a lookup gave a non-zero gradient this epoch."""
        return {path: e["moved"].numpy() > 0 for path, e in self._tables.items()}

    def epoch_begin(self, ctx):
        for entry in self._tables.values():
            entry["lookups"].assign(0.0)
            entry["moved"].assign(tf.zeros_like(entry["moved"]))

    def epoch_end(self, ctx):
        for path, entry in self._tables.items():
            layer = entry["layer"]
            if not layer.trainable:
                continue
            lookups = int(entry["lookups"].numpy())
            if lookups < self.min_lookups or np.any(entry["moved"].numpy() > 0):
                continue
            yield path, "weight", 1.0, (
                f"{path} (Embedding): rows that never learn: none of its {lookups} lookups this epoch gave its "
                "rows a gradient: its output does not reach the loss with a gradient."
            ), (f"look after {path} for a stop_gradient, a cast to int, argmax or round, or a Lambda that leaves "
                "the graph; if the table is meant to stay fixed, set trainable=False on it.")
