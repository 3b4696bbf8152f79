"""``vanishing``: the gradient reaching a layer's weights is (near) zero relative to the layers above it."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from gradtrace.detectors.base import Detector


class Vanishing(Detector):
    """Fires when a layer's weight gradients vanish for ``patience`` traced steps in a row.

    Per layer, all its weight gradients together: ``rms = |g| / sqrt(n)``. The
    layer's gradient has vanished when ``rms < ratio * max(rms of the layers
    above it)`` and ``rms < max_rms``. "Above it" comes from the traced graph
    (:mod:`gradtrace.graph`): the layers on its way to the loss, not the layers
    that ran after it. Defaults follow AUTOTRAINER (ICSE 2021: first/last-layer
    norm ratio < 1e-3 with first-layer norm < 1e-4), made stricter
    (``ratio=1e-4``, ``max_rms=1e-5``) because it is checked per layer and at
    every step; ``patience=5``. Taking a layer's weights together keeps a Dense
    bias before BatchNorm (whose gradient is 0 by construction) from firing.

    Vanishing starts at the bottom of the network: a layer counts only when
    every layer with weights below it (feeding it, by the graph) has vanished
    too. A single small layer between healthy ones (measured: an attention key
    projection of a Transformer at initialisation, 4e-6x the layers above) is
    not a fault, and an encoder that reaches the loss through cross-attention
    is compared with the layers it feeds, not with the decoder beside it. A
    gradient that is exactly zero is cut off, not vanishing (a dead ReLU layer
    or a constant output above it, which ``dead_relu`` and ``no_gradient``
    name): such layers neither count nor break the run, and a run of only such
    layers does not fire.

    Blame rule: the vanished layer farthest from the loss (the bottom, where
    the fix goes: its activation, initialisation or normalisation); the others
    are counted.
    """

    name = "vanishing"
    default_action = "warn"
    needs = ("norm", "size")

    def __init__(self, ratio=1e-4, max_rms=1e-5, patience=5, action=None):
        super().__init__(action)
        self.ratio = self.check_range("ratio", ratio, 0.0, 1.0, low_open=True)
        self.max_rms = self.check_range("max_rms", max_rms, 0.0, float("inf"), low_open=True)
        self.patience = self.check_int("patience", patience, 1)

    def _layers(self, table):
        rows = [r for r in table.rows if r.kind == "weight_gradient"]
        paths = sorted({r.path for r in rows}, key=lambda p: min(r.order for r in rows if r.path == p))
        seg = np.array([paths.index(r.path) if r.kind == "weight_gradient" and r.path in paths else len(paths)
                        for r in table.rows], dtype=np.int32)
        k = len(paths)
        # above[i, j]: layer j is on layer i's way to the loss; the padding column k is above nothing
        above = np.zeros([k + 1, k + 1], np.float32)
        for i, a in enumerate(paths):
            for j, b in enumerate(paths):
                above[i, j] = float(i != j and table.feeds(a, b))
        return k, seg, above

    def check(self, view):
        n_layers, seg, above = self._layers(view.table)
        if n_layers < 2:
            z = tf.zeros([len(view.table)], tf.bool)
            return z, tf.zeros([len(view.table)])
        k = n_layers + 1
        norm2 = tf.math.unsorted_segment_sum(tf.square(view["norm"]), seg, k)
        size = tf.math.unsorted_segment_sum(view["size"], seg, k)
        rms = tf.sqrt(norm2 / tf.maximum(size, 1.0))
        top = tf.reduce_max(above * rms[None, :], axis=1)
        small = (rms < self.ratio * top) & (rms < self.max_rms) & (size > 0)
        # An exactly-zero gradient is cut, not vanished (a dead ReLU layer or a constant output
        # above it: dead_relu and no_gradient say which); it neither counts nor breaks the run.
        zero = tf.equal(rms, 0.0) & (size > 0)
        # Vanishing is a property of the bottom of the network: a layer counts only when every
        # layer feeding it has vanished (or is cut) too. A single small layer between healthy
        # ones (an attention key projection at initialisation, a bias before a norm) does not.
        gone = tf.cast(small | zero, tf.float32)
        below = tf.constant(above.T)  # below[i, j]: layer j feeds layer i
        closed = (small | zero) & tf.equal(tf.linalg.matvec(below, 1.0 - gone), 0.0)
        real = tf.reduce_any(closed[:-1] & ~zero[:-1])  # at least one layer truly small, not only cut
        vanished = tf.concat([closed[:-1] & real, [False]], 0)
        count = self.state(view, "count")  # per row; rows of one layer move together
        per_row = tf.gather(vanished, seg)
        new = tf.where(per_row, count + 1.0, 0.0)
        self.update(count, new)
        rel = tf.gather(rms / tf.maximum(top, 1e-30), seg)
        return per_row & tf.equal(new, float(self.patience)), rel  # once per episode

    def explain(self, rows, fired, values, matrix, table):
        idx = np.flatnonzero(fired)
        layers = {}
        for i in idx:
            layers.setdefault(table.rows[i].path, i)
        first = max(layers.values(), key=lambda i: table.nearness(table.rows[i]))  # the bottom
        row = table.rows[first]
        others = len(layers) - 1
        tail = f"; {others} more layer(s) affected" if others else ""
        yield row, float(values[first]), (
            f"{row.path} ({row.layer_class}): its weight gradients are {float(values[first]):.3g}x "
            f"the largest of the layers above it, for {self.patience} steps in a row (vanishing gradient){tail}."
        ), (f"use ReLU-family activations with he_normal initialisation above {row.path}, or add "
            "BatchNormalization or residual connections; sigmoid/tanh stacks shrink the gradient at every layer.")
