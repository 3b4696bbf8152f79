"""``loss_plateau``: the loss has not improved over a window of steps. Off by default."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from gradtrace.detectors.base import Detector
from gradtrace.stats import COL


class LossPlateau(Detector):
    """Fires when a running average of the loss (decay 0.9) has not improved on its best value by
    more than ``min_delta`` (relative, default 1e-3) for ``window`` (default 200) traced steps.

    Off by default (a plateau is often a schedule question, not a fault);
    enable with ``detectors=[..., "loss_plateau"]``. Fires once per plateau.

    Blame rule: the loss (no layer: a plateau is the whole model's).
    """

    name = "loss_plateau"
    default_action = "warn"
    needs = ("mean",)

    def __init__(self, window=200, min_delta=1e-3, action=None):
        super().__init__(action)
        self.window = self.check_int("window", window, 2)
        self.min_delta = self.check_range("min_delta", min_delta, 0.0, 1.0)

    def check(self, view):
        mask = view.mask(kinds=("loss",))
        loss = view["mean"]
        ema = self.state(view, "ema", np.nan)
        best = self.state(view, "best", np.inf)
        since = self.state(view, "since")
        new_ema = tf.where(tf.math.is_nan(ema), loss, 0.9 * ema + 0.1 * loss)
        improved = tf.math.is_inf(best) | (new_ema < best - self.min_delta * tf.abs(best))
        self.update(best, tf.where(mask & improved, new_ema, best))
        new_since = tf.where(mask & ~improved, since + 1.0, 0.0)
        self.update(since, new_since)
        self.update(ema, tf.where(mask, new_ema, ema))
        return mask & tf.equal(new_since, float(self.window)), new_ema

    def explain(self, rows, fired, values, matrix, table):
        for i in np.flatnonzero(fired):
            row = table.rows[i]
            yield row, float(values[i]), (
                f"the loss (running average {float(values[i]):.4g}, this step {float(matrix[i][COL['mean']]):.4g}) "
                f"has not improved by {self.min_delta:g} (relative) for {self.window} steps (loss plateau)."
            ), ("try a larger learning rate or a schedule (ReduceLROnPlateau); check that the targets can be "
                "learnt from the inputs (shuffled labels, a leak in preprocessing).")
