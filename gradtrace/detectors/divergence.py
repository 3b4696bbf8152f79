"""``divergence``: the loss runs away, and no layer is to blame."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from gradtrace.detectors.culprit import INPUT_SCALE, TARGET_SCALE, outside_the_network
from gradtrace.detectors.base import Detector
from gradtrace.stats import COL


class Divergence(Detector):
    """Fires when the loss runs away: for ``patience`` traced steps in a row it is above ``factor`` times
    both its first value and its recent floor, or it turns non-finite right after such a step.

    - The first loss, of the untrained model, is about the largest a healthy run sees: a loss
      ``factor`` (default 10) times above it is not noise.
    - The recent floor keeps a slow rise from counting: ``floor = min(loss, floor * factor ** (1 /
      window))``, so the loss must also grow more than ``factor``-fold within about ``window``
      (default 10) steps. A GAN generator whose loss climbs as its discriminator learns, or a loss
      with a growing penalty, climbs far slower.
    - ``patience`` (default 2) steps in a row: one bad batch (four hard examples at batch 4) is not
      a run-away. Measured on the healthy suite: the largest ratio to the first loss was below 3.
    - A loss that overflows right after one such step (a run-away that reached float32's limit in
      two updates) fires at once, before the ``nan`` detector's finding of the same step.

    Only a loss that stays positive is watched: a cosine similarity (bounded, around 0 at the start)
    and a loss that has been negative (a custom log-likelihood) have no scale a factor could mean.

    Blame rule: no layer; :mod:`gradtrace.detectors.culprit` names the inputs (on a large scale),
    the regression targets (on a large scale), or else the learning rate, with its value.
    """

    name = "divergence"
    default_action = "halt"
    needs = ("mean", "norm", "size", "nan", "inf")

    def __init__(self, factor=10.0, window=10, patience=2, input_scale=INPUT_SCALE,
                 target_scale=TARGET_SCALE, action=None):
        super().__init__(action)
        self.factor = self.check_range("factor", factor, 1.0, float("inf"), low_open=True)
        self.window = self.check_int("window", window, 1)
        self.patience = self.check_int("patience", patience, 1)
        self.input_scale = self.check_range("input_scale", input_scale, 0.0, float("inf"), low_open=True)
        self.target_scale = self.check_range("target_scale", target_scale, 0.0, float("inf"), low_open=True)

    def check(self, view):
        rows = view.table.mask(kinds=("loss",), predicate=lambda r: r.loss_kind != "bounded")
        if not rows.any():  # no loss row (an untraced step) or a bounded loss: nothing to add to the step
            n = len(view.table)
            return tf.zeros([n], tf.bool), tf.zeros([n])
        mask = tf.constant(rows)
        loss = view["mean"]
        finite = tf.math.is_finite(loss) & tf.equal(view["nan"] + view["inf"], 0.0)
        first = self.state(view, "first", np.nan)
        floor = self.state(view, "floor", np.nan)
        streak = self.state(view, "streak")
        # a factor means something only for a positive loss: one that has been negative (a custom
        # log-likelihood) is left alone for the rest of the fit
        negative = self.state(view, "negative")
        seen_negative = tf.maximum(negative, tf.cast(mask & (loss < 0.0), tf.float32))
        self.update(negative, seen_negative)
        started = ~tf.math.is_nan(first) & (first > 0.0) & tf.equal(seen_negative, 0.0)
        away = started & finite & (loss > self.factor * first) & (loss > self.factor * floor)
        overflow = started & ~finite & (streak >= 1.0)
        new_streak = tf.where(mask & away, streak + 1.0, tf.where(mask & overflow, float(self.patience), 0.0))
        self.update(streak, new_streak)
        self.update(first, tf.where(mask & ~started & finite, loss, first))
        grow = self.factor ** (1.0 / self.window)
        self.update(floor, tf.where(mask & finite, tf.where(started, tf.minimum(loss, floor * grow), loss), floor))
        fired = mask & tf.equal(new_streak, float(self.patience))  # once per run-away
        return fired, tf.where(started, loss / tf.maximum(first, 1e-30), 0.0)

    def explain(self, rows, fired, values, matrix, table):
        for i in np.flatnonzero(fired):
            loss = table.rows[i]
            row, why, hint = outside_the_network(table, matrix, loss, self.input_scale, self.target_scale)
            value = float(matrix[i][COL["mean"]])
            now = f"{value:.4g}" if np.isfinite(value) else "non-finite"
            yield row, float(values[i]), (
                f"the loss is running away: {now} at this step, {float(values[i]):.3g}x its first value, after "
                f"growing more than {self.factor:g}-fold within {self.window} steps; {why}."), hint
