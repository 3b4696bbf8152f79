"""``saturation``: sigmoid/tanh outputs pinned near their limits for most units. Off by default."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from gradtrace.detectors.base import Detector


class Saturation(Detector):
    """Fires when over ``threshold`` (default 0.9) of a sigmoid/tanh layer's outputs are within 1% of
    the activation's limits for ``patience`` (default 20) traced steps in a row.

    Off by default: a confident sigmoid output layer of a well-trained
    classifier saturates by design. Enable it with ``detectors=[..., "saturation"]``.
    """

    name = "saturation"
    default_action = "warn"
    needs = ("saturated",)

    def __init__(self, threshold=0.9, patience=20, action=None):
        super().__init__(action)
        self.threshold = self._check_range("threshold", threshold, 0.0, 1.0, high_open=True)
        self.patience = self._check_int("patience", patience, 1)

    def check(self, view):
        mask = view.mask(kinds=("output",), predicate=lambda r: r.activation in ("sigmoid", "tanh", "hard_sigmoid"))
        sat = view["saturated"]
        count = self.state(view, "count")
        new = tf.where(mask & (sat > self.threshold), count + 1.0, 0.0)
        self.update(count, new)
        return tf.equal(new, float(self.patience)), sat

    def explain(self, rows, fired, values, matrix, table):
        for i in np.flatnonzero(fired):
            row = table.rows[i]
            yield row, float(values[i]), (
                f"{row.path} ({row.layer_class}, {row.activation}): {float(values[i]):.0%} of its outputs are "
                f"pinned within 1% of the activation's limits, for {self.patience} steps in a row (saturation)."
            ), (f"standardise the inputs of {row.path}, lower the learning rate, or use a ReLU-family activation; "
                "a saturated unit passes almost no gradient.")
