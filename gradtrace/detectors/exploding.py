"""``exploding``: a gradient norm far above its threshold, or jumping against its own history."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from gradtrace.detectors.base import Detector
from gradtrace.stats import COL


class Exploding(Detector):
    """Fires when a layer's output-gradient or weight-gradient norm explodes.

    - ``max_norm`` (default 1e6, as TheDeepChecker): any gradient norm above it.
    - ``factor`` (default 100) with ``warmup`` (default 10 steps) and ``floor``
      (default 1.0): a norm above ``floor`` that is more than ``factor`` times
      its own running average (decay ``decay``, default 0.9) once the row has
      been seen ``warmup`` times. Measured here: on the healthy models of the
      test suite the largest step-to-average ratio was below 10; an injected
      explosion crossed 100 at its first step, long before float32 overflow.

    Blame rule: the layer whose gradient exploded first in backward order (the
    one nearest the loss, by the traced graph), where the growth starts on its
    way down; the others are counted in the message.
    """

    name = "exploding"
    default_action = "halt"
    needs = ("norm", "size", "nan", "inf")

    def __init__(self, max_norm=1e6, factor=100.0, warmup=10, floor=1.0, decay=0.9, action=None):
        super().__init__(action)
        self.max_norm = self._check_range("max_norm", max_norm, 0.0, float("inf"), low_open=True)
        self.factor = self._check_range("factor", factor, 1.0, float("inf"), low_open=True)
        self.warmup = self._check_int("warmup", warmup, 1)
        self.floor = self._check_range("floor", floor, 0.0, float("inf"))
        self.decay = self._check_range("decay", decay, 0.0, 1.0, high_open=True)

    def check(self, view):
        mask = view.mask(kinds=("gradient", "weight_gradient")) & (view["size"] > 0)
        norm = view["norm"]
        # values finite (NaN/Inf values are the nan detector's); a norm that overflowed
        # from finite values (above ~1e19) still counts as exploded
        finite = tf.equal(view["nan"] + view["inf"], 0.0)
        ema = self.state(view, "ema")
        seen = self.state(view, "seen")
        jump = (seen >= self.warmup) & (norm > self.floor) & (norm > self.factor * ema)
        fired = mask & finite & ((norm > self.max_norm) | jump)
        ok = mask & finite & ~fired & tf.math.is_finite(norm)
        self.update(ema, tf.where(ok, tf.where(seen > 0, self.decay * ema + (1 - self.decay) * norm, norm), ema))
        self.update(seen, seen + tf.cast(ok, tf.float32))
        ratio = norm / tf.maximum(ema, 1e-30)
        return fired, tf.where(norm > self.max_norm, norm, ratio)

    def explain(self, rows, fired, values, matrix, table):
        idx = np.flatnonzero(fired)
        first = min(idx, key=lambda i: (table.nearness(table.rows[i]), table.rows[i].kind != "gradient"))
        row = table.rows[first]
        norm = float(matrix[first][COL["norm"]])
        what = "output gradient" if row.kind == "gradient" else f"gradient of weight {row.name}"
        if norm > self.max_norm:
            why = f"norm {norm:.4g} is above max_norm={self.max_norm:.4g}"
        else:
            why = f"norm {norm:.4g} is {float(values[first]):.4g}x its running average (factor={self.factor:g})"
        tail = f"; {len(idx) - 1} more gradient(s) below it exploded too" if len(idx) > 1 else ""
        yield row, norm, f"{row.path} ({row.layer_class}): {what} {why}{tail}.", (
            "lower the learning rate or clip gradients (clipnorm=1.0 on the optimizer); if it fires at step 0, "
            f"check the scale of {row.path}'s inputs and initialisation.")
