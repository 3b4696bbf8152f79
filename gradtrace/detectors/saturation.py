"""``saturation``: a hidden sigmoid/tanh layer's outputs pinned near their limits."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from gradtrace.detectors.base import Detector
from gradtrace.stats import SATURATION_LIMITS



class Saturation(Detector):
    """Fires when over ``threshold`` (default 0.9) of a hidden sigmoid/tanh layer's outputs are within
    1% of the activation's limits for ``patience`` (default 20) traced steps in a row; or, sooner, when
    over ``quick_threshold`` (default 0.95) of them are, for ``quick`` (default 3) steps: a layer that
    is all but wholly saturated passes almost no gradient (inputs on a large scale, e.g. raw pixel
    values 0..255 into a sigmoid layer, do this from the first step).

    The output layer is left out: a confident classifier's sigmoid or softmax head saturates by
    design, and a head that cannot reach its targets is ``head_mismatch``'s. Measured on the healthy
    suite (sigmoid and tanh networks, an LSTM, trained 3+ epochs): silent.

    Blame rule: the saturated hidden layer itself, the first in execution order when several are
    (a saturated layer's outputs are nearly constant, so the layers after it see little signal).
    """

    name = "saturation"
    default_action = "warn"
    needs = ("saturated",)

    def __init__(self, threshold=0.9, patience=20, quick_threshold=0.95, quick=3, action=None):
        super().__init__(action)
        self.threshold = self.check_range("threshold", threshold, 0.0, 1.0, high_open=True)
        self.patience = self.check_int("patience", patience, 1)
        self.quick_threshold = self.check_range("quick_threshold", quick_threshold, 0.0, 1.0)
        self.quick = self.check_int("quick", quick, 1)

    def check(self, view):
        rows = view.table.mask(kinds=("output",), predicate=lambda r: r.activation in SATURATION_LIMITS and not r.head)
        if not rows.any():  # no hidden sigmoid/tanh layer: nothing to add to the step
            n = len(view.table)
            return tf.zeros([n], tf.bool), tf.zeros([n])
        mask = tf.constant(rows)
        sat = view["saturated"]
        count = self.state(view, "count")
        fast = self.state(view, "fast")
        new = tf.where(mask & (sat > self.threshold), count + 1.0, 0.0)
        new_fast = tf.where(mask & (sat > self.quick_threshold), fast + 1.0, 0.0)
        self.update(count, new)
        self.update(fast, new_fast)
        reported = self.state(view, "reported")
        hit = (new >= float(self.patience)) | (new_fast >= float(self.quick))
        fired = hit & tf.equal(reported, 0.0)  # once per episode
        self.update(reported, tf.cast(hit, tf.float32))
        return fired, sat

    def explain(self, rows, fired, values, matrix, table):
        idx = sorted(np.flatnonzero(fired), key=lambda i: table.rows[i].order)
        row = table.rows[idx[0]]
        v = float(values[row.index])
        later = [table.rows[i].path for i in idx[1:]]
        tail = f"; also saturated: {', '.join(later)}" if later else ""
        yield row, v, (
            f"{row.path} ({row.layer_class}, {row.activation}): {v:.0%} of its outputs are pinned within 1% of "
            f"the activation's limits, step after step (saturation): its units pass almost no gradient{tail}."
        ), (f"standardise or rescale the inputs of {row.path} (raw pixel values: divide by 255), lower the "
            f"learning rate, or use a ReLU-family activation there.")
