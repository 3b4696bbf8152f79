"""``no_progress``: the loss has not left its starting level, or the level of a model that ignores its inputs."""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from gradtrace.detectors.base import Detector
from gradtrace.stats import COL

ADAPTIVE = ("Adam", "AdamW", "Adamax", "Nadam", "RMSprop", "Adagrad", "Adadelta", "Adafactor", "Lion", "Ftrl",
            "Lamb", "Muon")
RECURRENT = ("LSTM", "GRU", "SimpleRNN", "RNN", "Bidirectional", "ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D")


class NoProgress(Detector):
    """What every healthy run keeps: training makes progress. Fires once per fit when, after ``window``
    examples (default 8192) and at least ``min_steps`` traced steps (default 1000), the running loss (an
    average over about the last 50 steps) has never gone ``min_drop`` (default 2%) below its reference:

    - the loss of the first ``start_steps`` (default 10) steps (the model has learned nothing), or
    - the loss of a model that ignores its inputs, where the loss says what that is: ``log K`` for a
      K-class crossentropy (a uniform prior), the entropy of the label mean for a binary crossentropy (the
      prior, from the labels seen), the targets' variance for a squared error (predicting their mean).

    The lower of the two is the reference: a model that learned only the prior (or the mean) has not
    learned from its inputs. The window is long because slow but real learning is hard to tell from a
    stuck run early on: the soak model of ``benchmarks/soak.py`` (ids whose sum mod 3 is the label, Adam
    at 1e-3, batch 32) sits within 1% of the prior's loss for its first 200 steps, 1.3% below it over its
    first 500 and 4% below by step 1000; a trend test does not help there (at batch 8-32, 100 steps of
    a 0.4% trend are within the noise of their mean).

    Blame rule: the loss; the message says why, from the statistics of the step it fires at: weight
    gradients cut (``gradient_cut``), updates too small for the weights (the learning rate, with a
    better value), or, when those look healthy, the data (labels that do not belong to their inputs; a
    recurrent layer reading padding last). Penalties that outweigh the data are ``penalties``'s.
    """

    name = "no_progress"
    default_action = "warn"
    needs = ("mean", "norm", "size", "nan", "inf")  # no std: a second pass over every tensor

    def __init__(self, window=8192, min_steps=1000, start_steps=10, min_drop=0.02, action=None):
        super().__init__(action)
        self.window = self.check_int("window", window, 1)
        self.min_steps = self.check_int("min_steps", min_steps, 1)
        self.start_steps = self.check_int("start_steps", start_steps, 1)
        self.min_drop = self.check_range("min_drop", min_drop, 0.0, 1.0, low_open=True, high_open=True)

    @staticmethod
    def _chance(table):
        """The loss of a model that ignores its inputs, in-graph (NaN when the loss kind does not say)."""
        loss_row = table.index("loss", "loss")
        kind = table.rows[loss_row].loss_kind
        head = [r for r in table.rows if r.kind == "output" and r.head]
        target = table.index("target", "targets")
        if kind in ("categorical_crossentropy", "sparse_categorical_crossentropy") and head and head[0].shape:
            k = head[0].shape[-1]
            return None if not k or k < 2 else ("uniform", tf.constant(math.log(k), tf.float32))
        if kind == "binary_crossentropy" and target is not None:
            return ("prior", target)
        if kind == "regression" and target is not None:
            return ("variance", target)
        return None

    def check(self, view):
        n = len(view.table)
        table = view.table
        loss_row = table.index("loss", "loss")
        if loss_row is None:
            return tf.zeros([n], tf.bool), tf.zeros([n])
        loss = view["mean"][loss_row]
        finite = tf.math.is_finite(loss) & tf.equal(view["nan"][loss_row] + view["inf"][loss_row], 0.0)
        # [steps, examples, start sum, ema, best, target sum, target square sum, target batches, said]
        s = self.state(view, "state", size=9)
        steps, examples, start_sum, ema, best = s[0], s[1], s[2], s[3], s[4]
        steps1 = steps + tf.cast(finite, tf.float32)
        examples1 = examples + tf.cast(view.examples if view.examples is not None else 0.0, tf.float32)
        start1 = start_sum + tf.where(finite & (steps < self.start_steps), loss, 0.0)
        ema1 = tf.where(finite, tf.where(steps > 0, 0.98 * ema + 0.02 * loss, loss), ema)
        chance = self._chance(table)
        t_sum, t_sq, t_n = s[5], s[6], s[7]
        if chance is not None and chance[0] != "uniform":
            t = chance[1]
            mean = view["mean"][t]
            square = tf.square(view["norm"][t]) / tf.maximum(view["size"][t], 1.0)  # the batch's mean of y^2
            t_sum, t_sq, t_n = t_sum + mean, t_sq + square, t_n + 1.0
        start = start1 / tf.maximum(tf.minimum(steps1, float(self.start_steps)), 1.0)
        if chance is None:
            ref = start
        else:
            if chance[0] == "uniform":
                level = chance[1]
            else:
                m = t_sum / tf.maximum(t_n, 1.0)
                if chance[0] == "prior":
                    p = tf.clip_by_value(m, 1e-7, 1.0 - 1e-7)
                    level = -(p * tf.math.log(p) + (1.0 - p) * tf.math.log(1.0 - p))
                else:
                    level = tf.maximum(t_sq / tf.maximum(t_n, 1.0) - m * m, 0.0)
            ref = tf.minimum(start, level)
        # the running loss is compared once it has averaged ~50 steps; "best" is its lowest since
        best1 = tf.where(steps1 >= 50.0, tf.minimum(best, ema1), best)
        best1 = tf.where(tf.equal(steps, 49.0), ema1, best1)
        stuck = (steps1 >= self.min_steps) & (examples1 >= self.window) & (best1 >= (1.0 - self.min_drop) * ref) \
            & (ref > 0.0) & tf.equal(s[8], 0.0)
        self.update(s, tf.stack([steps1, examples1, start1, ema1, best1, t_sum, t_sq, t_n,
                                 tf.maximum(s[8], tf.cast(stuck, tf.float32))]))
        fired = stuck & (tf.range(n) == loss_row)
        value = tf.where(tf.range(n) == loss_row, ema1 / tf.maximum(ref, 1e-30), 0.0)
        return fired, value

    # -- why, on the host ---------------------------------------------------------------------------------
    def explain(self, rows, fired, values, matrix, table):
        loss_row = table.index("loss", "loss")
        if loss_row is None or not fired[loss_row]:
            return
        row = table.rows[loss_row]
        ratio = float(values[loss_row])
        loss = float(matrix[loss_row][COL["mean"]])
        head = (f"the loss ({loss:.4g} at this step) has not gone {self.min_drop:.0%} below its starting level "
                f"or the level of a model that ignores its inputs (running loss at {ratio:.3g}x it) after "
                f"{self.min_steps}+ steps and {self.window}+ examples: training makes no progress")
        grads = {}
        for r in table.rows:
            if r.kind == "weight_gradient" and matrix[r.index][COL["size"]] > 0:
                grads[r.path] = grads.get(r.path, 0.0) + float(matrix[r.index][COL["norm"]]) ** 2
        cut = sorted(p for p, g in grads.items() if g == 0.0)
        if grads and len(cut) == len(grads):
            yield row, ratio, f"{head}: no weight gets a gradient.", "see no_gradient's finding for where it stops."
            return
        if cut:
            yield row, ratio, (f"{head}: {len(cut)} of {len(grads)} layers get no gradient ({', '.join(cut[:3])}"
                               f"{', ...' if len(cut) > 3 else ''})."), "see gradient_cut's finding for what cuts it."
            return
        small = self._update_size(table, matrix, grads)
        if small is not None:
            size, lr, name, better = small
            yield row, ratio, (f"{head}: the updates are too small: at learning rate {lr:.3g} ({name}) a step moves "
                               f"the weights by about {size:.2g} of their size, against about 1e-3 in a healthy run."), (
                f"raise the learning rate, to about {better:.2g}.")
            return
        rnn = [r.path for r in table.rows if r.kind == "output" and r.layer_class in RECURRENT]
        kind = row.loss_kind
        if kind in ("binary_crossentropy", "categorical_crossentropy", "sparse_categorical_crossentropy"):
            what = "predicting the class prior"
        elif kind == "regression":
            what = "predicting the targets' mean"
        else:
            what = "its start"
        msg = (f"{head}: the gradients reach every layer and the updates have a healthy size, yet the loss sits "
               f"at the level of {what}: the model finds nothing in the inputs that tells the targets apart.")
        hint = ("check that the labels belong to their inputs (x and y shuffled or sorted separately, a join on the "
                "wrong key), and that the inputs carry the signal (normalised, not all padding).")
        if rnn:
            hint = (f"check what {rnn[0]} reads last: with sequences padded at the end ('post') and no mask, its "
                    "last time steps are padding; pad at the start ('pre') or mask the padding. " + hint)
        yield row, ratio, msg + "", hint

    @staticmethod
    def _update_size(table, matrix, grads):
        """``(typical update / weight, lr, optimizer, better lr)`` when a step moves the weights far below
        about 1e-3 of their size (None otherwise, or when unknown). Over all the weights together: an
        adaptive optimizer (Adam, RMSprop, ...) moves each weight by about the learning rate, so the
        ratio is ``lr / rms(w)``; plain SGD by ``lr * |g| / |w|``."""
        from gradtrace import _keras_compat as compat

        optimizer = getattr(table, "optimizer", None)
        lr = compat.current_learning_rate(optimizer) if optimizer is not None else None
        try:
            lr = float(lr)
            variables = list(compat.optimizer_trainable_variables(optimizer) or ())
        except Exception:
            return None
        if not variables or not lr > 0:
            return None
        w2 = sum(float(tf.reduce_sum(tf.square(tf.cast(v, tf.float32)))) for v in variables)
        n = sum(int(np.prod(v.shape)) for v in variables)
        if w2 <= 0 or n <= 0:
            return None
        name = compat.optimizer_kind(optimizer)
        if name in ADAPTIVE:
            typical = lr / math.sqrt(w2 / n)
        else:
            typical = lr * math.sqrt(sum(grads.values())) / math.sqrt(w2)
        if typical >= 1e-5:
            return None
        return typical, lr, name, lr * min(1e-3 / max(typical, 1e-30), 1e4)
