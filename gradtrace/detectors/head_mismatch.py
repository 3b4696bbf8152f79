"""``head_mismatch``: the output layer, the loss and the targets do not fit together."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from gradtrace.detectors.base import Detector
from gradtrace.graph import base_path
from gradtrace.heads import CROSSENTROPY

# what was found, by code (the anomaly's value)
SOFTMAX_ONE_UNIT, TARGETS_OUT_OF_RANGE, RELU_NEGATIVE_TARGETS, RELU_BEFORE_CROSSENTROPY, UNBOUNDED_CROSSENTROPY = \
    1, 2, 3, 4, 5
TANH_TARGETS_OUT_OF_RANGE = 6
_BOUNDED = ("sigmoid", "softmax", "hard_sigmoid")


class HeadMismatch(Detector):
    """Fires, once per fit, when the model's output layer (the layer whose output is the prediction)
    cannot produce what the loss and the targets ask of it:

    1. a softmax over a single unit: its output is the constant 1.0 and no gradient flows;
    2. a sigmoid or softmax output fed targets outside [0, 1] (by more than ``tolerance``): the
       output saturates trying to reach them (a regression target on a classifier's head);
    3. a ReLU output with negative targets: it can never produce them, and its units die trying;
    4. a ReLU output feeding a crossentropy: a ReLU on logits (or on probabilities) cuts every
       negative score to 0;
    5. a crossentropy with ``from_logits=False`` on a linear (unbounded) output: Keras clips the
       "probabilities" into [1e-7, 1 - 1e-7], so most gradients are zero;
    6. a tanh output with regression targets outside [-1, 1].

    The targets include integer labels (class indices); a sparse crossentropy's labels are indices,
    not values, and are ``labels_out_of_range``'s to check.

    Blame rule: always the output layer; the data is never blamed, since the mismatch is between
    the targets and the layer. Cases 1, 4 and 5 are read off the model and the compiled loss, and
    fire at the first traced step; 2, 3 and 6 read the batch's targets (minimum and maximum over the
    whole batch, under a strategy too), at the first traced step whose targets show it. Only one
    output and one target are compared (with several outputs, only cases 1, 4 and 5). A custom
    ``train_step`` with no compiled loss is checked against the Keras loss object it calls under each
    update's tape (that call's ``y_pred`` is the head; cases 1, 4 and 5: the labels such a step makes,
    noised or smoothed on purpose, are not targets), once per layer.
    ``tolerance=1e-6`` leaves room for rounding of targets already in range.
    """

    name = "head_mismatch"
    default_action = "warn"
    needs = ()

    def __init__(self, tolerance=1e-6, action=None):
        super().__init__(action)
        self.tolerance = self.check_range("tolerance", tolerance, 0.0, float("inf"))

    @staticmethod
    def _static_code(row, loss):
        units = row.shape[-1] if row.shape else None
        if row.activation == "softmax" and units == 1:
            return SOFTMAX_ONE_UNIT
        if loss is not None and loss.loss_kind in CROSSENTROPY:
            if row.activation in ("relu", "relu6"):
                return RELU_BEFORE_CROSSENTROPY
            if row.activation == "linear" and not loss.from_logits:
                return UNBOUNDED_CROSSENTROPY
        return 0

    def check(self, view):
        rows = view.table.rows
        n = len(rows)
        heads = [r for r in rows if r.kind == "output" and r.head]
        targets = [r for r in rows if r.kind == "target"]
        loss = next((r for r in rows if r.kind == "loss"), None)
        codes = [tf.zeros([n])]
        static = np.zeros(n, np.float32)
        for r in heads:
            static[r.index] = self._static_code(r, loss)
        codes.append(tf.constant(static))
        if len(heads) == 1 and len(targets) == 1:
            head, target = heads[0], targets[0]
            lo, hi = view["min"][target.index], view["max"][target.index]
            code = 0.0
            sparse = loss is not None and loss.loss_kind == "sparse_categorical_crossentropy"
            if head.activation in _BOUNDED and not sparse:  # sparse labels are indices: labels_out_of_range's
                code = tf.where((lo < -self.tolerance) | (hi > 1.0 + self.tolerance), float(TARGETS_OUT_OF_RANGE), 0.0)
            elif head.activation in ("relu", "relu6") and (loss is None or loss.loss_kind not in CROSSENTROPY):
                code = tf.where(lo < -self.tolerance, float(RELU_NEGATIVE_TARGETS), 0.0)
            elif head.activation == "tanh" and (loss is None or loss.loss_kind not in CROSSENTROPY):
                code = tf.where((lo < -1.0 - self.tolerance) | (hi > 1.0 + self.tolerance),
                                float(TANH_TARGETS_OUT_OF_RANGE), 0.0)
            if static[head.index] == 0:
                codes.append(tf.scatter_nd([[head.index]], tf.reshape(tf.cast(code, tf.float32), [1]), [n]))
        code = tf.reduce_max(tf.stack(codes), axis=0)
        done = self.state(view, "done")  # once per fit
        fired = (code > 0) & (done == 0)
        self.update(done, tf.maximum(done, tf.cast(code > 0, tf.float32)))
        return fired, code

    def explain(self, rows, fired, values, matrix, table):
        loss = next((r for r in table.rows if r.kind == "loss"), None)
        target = next((r for r in table.rows if r.kind == "target"), None)
        from gradtrace.stats import COL

        reported = self._state.setdefault("reported", set())  # host side: (layer, code) said this fit
        for i in np.flatnonzero(fired):
            row, code = table.rows[i], int(values[i])
            layer = base_path(row.path)  # the layer, not its call (a GAN calls its discriminator twice)
            if (layer, code) in reported:
                continue  # the same head under a second update of the step (a GAN's generator loss)
            reported.add((layer, code))
            units = row.shape[-1] if row.shape else "?"
            what = f"{layer} ({row.layer_class}, {row.activation}, {units} unit{'s' if units != 1 else ''})"
            loss_name = loss.loss_kind if loss is not None else "the loss"
            if code == SOFTMAX_ONE_UNIT:
                msg = (f"{what} is the output layer: a softmax over one unit always outputs 1.0, so its output "
                       "never changes and no gradient flows through it.")
                hint = ("for a yes/no target use Dense(1, activation='sigmoid') with binary_crossentropy, "
                        "or give the softmax one unit per class (2 or more).")
            elif code == TARGETS_OUT_OF_RANGE:
                lo, hi = float(matrix[target.index][COL["min"]]), float(matrix[target.index][COL["max"]])
                msg = (f"{what} is the output layer and can only produce values in [0, 1], but the targets "
                       f"range over [{lo:.4g}, {hi:.4g}]: it saturates trying to reach them.")
                hint = (f"for a regression target use a linear output (activation=None) on {layer}, or scale "
                        "the targets into [0, 1]; for classes, one-hot or integer labels with a matching loss.")
            elif code == TANH_TARGETS_OUT_OF_RANGE:
                lo, hi = float(matrix[target.index][COL["min"]]), float(matrix[target.index][COL["max"]])
                msg = (f"{what} is the output layer and can only produce values in [-1, 1], but the targets "
                       f"range over [{lo:.4g}, {hi:.4g}]: it saturates trying to reach them.")
                hint = (f"use a linear output (activation=None) on {layer}, or scale the targets into [-1, 1] "
                        "(and undo it on the predictions).")
            elif code == RELU_NEGATIVE_TARGETS:
                lo = float(matrix[target.index][COL["min"]])
                msg = (f"{what} is the output layer and can never produce a negative value, but the targets go "
                       f"down to {lo:.4g}: its units get stuck at 0 for those examples.")
                hint = f"use a linear output (activation=None) on {layer}."
            elif code == RELU_BEFORE_CROSSENTROPY:
                msg = (f"{what} is the output layer and feeds {loss_name}: a ReLU cuts every negative score "
                       "to 0 before the loss sees it.")
                hint = (f"use activation=None on {layer} with from_logits=True, or 'sigmoid'/'softmax' "
                        "with from_logits=False.")
            else:
                msg = (f"{what} is the output layer and its unbounded output goes into {loss_name} with "
                       "from_logits=False, which clips it into [1e-7, 1 - 1e-7] as if it were a probability: "
                       "most gradients are then 0.")
                hint = (f"pass from_logits=True to the loss (keras.losses.{_loss_class(loss_name)}(from_logits=True)), "
                        f"or give {layer} a sigmoid/softmax activation.")
            yield row, float(code), msg, hint


def _loss_class(kind):
    """``"binary_crossentropy"`` -> ``"BinaryCrossentropy"`` (the Keras loss class)."""
    return "".join(p.capitalize() for p in kind.split("_"))
