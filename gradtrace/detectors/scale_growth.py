"""``scale_growth``: activations grow layer over layer from the first step (a bad initialisation)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from gradtrace.detectors.base import Detector


class ScaleGrowth(Detector):
    """Fires, once per fit, when the activation scale grows through the depth of the network at
    initialisation: the RMS of the output of the deepest hidden layer with weights is more than
    ``max_growth`` (default 100) times that of the first layer with weights, over at least
    ``min_layers`` (default 3) such layers, and above ``min_scale`` (default 10). Then the
    gradients are huge from step 0 and grow toward the input too, so ``exploding`` never sees a
    jump against a running average. A weight matrix of N(0, 1) entries multiplies the scale by
    about sqrt(fan_in / 2) per ReLU layer (5.7x at 64 units: 100x in three layers); Glorot and He
    initialisations keep it near 1 per layer, and so do normalisation layers and residual sums of
    a few dozen blocks, which stay below 100x.

    What is judged is the initialisation, so only the weights as they stand before the first
    update: the fit's first traced step, and only while the step's optimizer has made no update
    (its ``iterations`` are 0). A scale that grows later was grown by the updates (a learning rate
    too large, targets on a large scale, a WGAN critic's unbounded output), which ``exploding`` and
    ``divergence`` judge with the right cause. The layers compared are one chain: those the first
    layer with weights feeds (by the traced graph), so a second network beside it (a distillation
    teacher, trained elsewhere) is not measured against the first; and hidden layers only: a layer
    whose output feeds no other layer with weights (the model's head, a teacher's logits) is an
    output, whose scale is the task's, not the initialisation's.

    Blame rule: the layer with weights whose output scale grew the most from its input's (the first
    one on ties): its initialisation scale is the origin; the RMS ratio from the first to the last
    layer, and of the weight gradients from the last to the first, are in the message.
    """

    name = "scale_growth"
    default_action = "warn"
    needs = ("norm", "size")

    def __init__(self, max_growth=100.0, min_layers=3, min_scale=10.0, action=None):
        super().__init__(action)
        self.max_growth = self.check_range("max_growth", max_growth, 1.0, float("inf"), low_open=True)
        self.min_layers = self.check_int("min_layers", min_layers, 2)
        self.min_scale = self.check_range("min_scale", min_scale, 0.0, float("inf"))

    @staticmethod
    def _weighted_outputs(table):
        """Output rows of the hidden layers with weight gradients on the first one's chain, in execution
        order: the first layer with weights and the layers it feeds that feed another layer with weights."""
        weighted = {r.path for r in table.rows if r.kind == "weight_gradient"}
        rows = sorted((r for r in table.rows if r.kind == "output" and r.path in weighted
                       and r.layer_class != "Embedding"), key=lambda r: r.order)
        if not rows:
            return []
        first = rows[0]
        chain = [r for r in rows if r is first or table.feeds(first.path, r.path)]
        paths = {r.path for r in rows}
        return [r for r in chain if not r.head and any(table.feeds(r.path, p) for p in paths if p != r.path)]

    def check(self, view):
        n = len(view.table)
        rows = self._weighted_outputs(view.table)
        if len(rows) < self.min_layers:
            return tf.zeros([n], tf.bool), tf.zeros([n])
        rms = view["norm"] / tf.sqrt(tf.maximum(view["size"], 1.0))
        first, last = rms[rows[0].index], rms[rows[-1].index]
        growth = last / tf.maximum(first, 1e-30)
        bad = (growth > self.max_growth) & (last > self.min_scale) & tf.math.is_finite(growth)
        done = self.state(view, "done")  # 1 once the fit's first traced step was judged
        initial = tf.equal(tf.reduce_max(done), 0.0)
        if view.step is not None:  # no update made yet by the step's optimizer: the weights as initialised
            initial &= tf.equal(tf.cast(view.step, tf.int64), 0)
        fire_now = bad & initial
        self.update(done, tf.ones_like(done))
        fired = fire_now & (tf.range(n) == rows[0].index)
        return fired, tf.where(tf.range(n) == rows[0].index, growth, 0.0)

    def explain(self, rows, fired, values, matrix, table):
        from gradtrace.stats import COL

        out = self._weighted_outputs(table)
        rms = {r.index: float(matrix[r.index][COL["norm"]]) / max(float(matrix[r.index][COL["size"]]), 1.0) ** 0.5
               for r in out}
        growth = float(values[out[0].index])
        # the layer that multiplied its input's scale the most (the first layer: against 1, its input's RMS
        # is not known here, so against the second layer's own growth)
        steps = [(rms[b.index] / max(rms[a.index], 1e-30), b) for a, b in zip(out, out[1:])]
        blamed = max(steps, key=lambda s: (round(np.log10(max(s[0], 1e-30)), 1), -s[1].order))[1] if steps else out[0]
        if steps and all(abs(np.log10(max(s[0], 1e-30)) - np.log10(max(steps[0][0], 1e-30))) < 0.5 for s in steps):
            blamed = out[0]  # every layer grows the scale alike: the initialisation of them all, from the first
        wg = {r.path: float(matrix[r.index][COL["norm"]]) for r in table.rows if r.kind == "weight_gradient"}
        g_first, g_last = wg.get(out[0].path), wg.get(out[-1].path)
        grad = (f"; the weight-gradient norm grows {g_first / g_last:.3g}x from {out[-1].path} back to {out[0].path}"
                if g_first and g_last and g_last > 0 else "")
        per = growth ** (1.0 / max(len(out) - 1, 1))
        msg = (f"{blamed.path} ({blamed.layer_class}): the activation scale grows {growth:.3g}x from {out[0].path} "
               f"(RMS {rms[out[0].index]:.3g}) to {out[-1].path} (RMS {rms[out[-1].index]:.3g}) over {len(out)} layers "
               f"with weights, about {per:.3g}x per layer{grad}: the weights are initialised at too large a scale.")
        hint = ("use the Keras defaults (kernel_initializer='glorot_uniform'), or 'he_normal' before ReLU, instead "
                "of a unit-variance initialiser; or add BatchNormalization between the layers.")
        yield blamed, growth, msg, hint
