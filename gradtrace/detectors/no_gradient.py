"""``no_gradient``: every gradient of the step is (near) exactly zero while the loss is not."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from gradtrace.detectors.base import Detector
from gradtrace.stats import COL


class NoGradient(Detector):
    """Fires when, for ``patience`` traced steps in a row, every output gradient and every weight
    gradient has an RMS at or below ``tolerance`` (default 1e-12: exactly zero up to rounding)
    while the loss is above ``min_loss`` (default 1e-4: far from a minimum of 0). The model then
    cannot learn at all. ``vanishing`` cannot see it, since it compares layers with each other
    and here every layer is zero.

    Blame rule: the first layer, in execution order, whose output is constant over the whole batch
    (minimum equal to maximum): no gradient passes a constant, so the layers below it get none; a
    softmax over one unit, a ReLU layer that outputs only zeros, a layer multiplied by 0. When no
    layer output is constant, the loss is blamed (its gradient is zero where it was computed, e.g.
    a loss on clipped probabilities). The default action is ``halt``: the update would be zero
    anyway, and the held step is then measured in full for the blame.
    """

    name = "no_gradient"
    default_action = "halt"
    needs = ("norm", "size", "mean")

    def __init__(self, tolerance=1e-12, min_loss=1e-4, patience=1, action=None):
        super().__init__(action)
        self.tolerance = self.check_range("tolerance", tolerance, 0.0, float("inf"))
        self.min_loss = self.check_range("min_loss", min_loss, 0.0, float("inf"))
        self.patience = self.check_int("patience", patience, 1)

    def check(self, view):
        n = len(view.table)
        loss_row = view.table.index("loss", "loss")
        grads = view.mask(kinds=("gradient", "weight_gradient")) & (view["size"] > 0)
        if loss_row is None:
            return tf.zeros([n], tf.bool), tf.zeros([n])
        rms = view["norm"] / tf.sqrt(tf.maximum(view["size"], 1.0))
        zero = tf.reduce_all(tf.where(grads, rms <= self.tolerance, True)) & tf.reduce_any(grads)
        loss = view["mean"][loss_row]
        stuck = zero & (loss > self.min_loss) & tf.math.is_finite(loss)
        streak = self.state(view, "streak")
        new = tf.where(stuck, streak + 1.0, 0.0)
        self.update(streak, new)
        fired = tf.equal(new, float(self.patience)) & (tf.range(n) == loss_row)  # once per episode
        return fired, tf.where(fired, loss, 0.0)

    def explain(self, rows, fired, values, matrix, table):
        loss_row = table.index("loss", "loss")
        loss = float(values[loss_row])
        def is_constant(r):
            m = matrix[r.index]
            if m[COL["size"]] <= 0 or r.kind != "output":
                return False
            if m[COL["norm"]] == 0:  # all zeros (the norm is always measured here)
                return True
            # min == max, where they were measured (always on the output layer; on every row of a held step)
            return bool(m[COL["min"]] == m[COL["max"]] and np.isfinite(m[COL["min"]]) and (r.head or m[COL["min"]] != 0))

        measured = [r for r in table.rows if is_constant(r)]
        when = f"for {self.patience} step{'s' if self.patience > 1 else ''}" if self.patience > 1 else ""
        head = f"every gradient of the step is zero {when}".rstrip() + f" while the loss is {loss:.4g}"
        if measured:
            row = min(measured, key=lambda r: r.order)
            value = float(matrix[row.index][COL["min"]])
            units = row.shape[-1] if row.shape else "?"
            if row.activation == "softmax" and units == 1:
                why = "a softmax over one unit always outputs 1.0"
                hint = ("use Dense(1, activation='sigmoid') with binary_crossentropy, or a softmax over 2 or more "
                        "units with one unit per class.")
            elif row.relu and value == 0.0:
                why = "every one of its ReLU units outputs 0 for the whole batch (the layer is dead)"
                hint = (f"lower the learning rate, or use he_normal initialisation or LeakyReLU in {row.path}; "
                        "check for a large negative bias.")
            else:
                why = f"its output is the constant {value:.4g} for every example"
                hint = f"check what makes {row.path} ignore its input (a zero weight, a multiplication by 0, a cut)."
            msg = f"{row.path} ({row.layer_class}): {why}, so no gradient passes it: {head}."
            yield row, loss, msg, hint
            return
        row = table.rows[loss_row]
        yield row, loss, (f"{head}, and no layer output is constant: the loss itself passes no gradient "
                          "(probabilities clipped at 0 or 1, or a loss that does not depend on the weights)."), (
            "check the loss: with unbounded outputs pass from_logits=True; make sure the loss is computed from "
            "the model's output.")
