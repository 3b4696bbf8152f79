"""``dead_relu``: most units of a ReLU-family layer output 0 for the whole batch."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from gradtrace.detectors.base import Detector


class DeadReLU(Detector):
    """Fires when a ReLU layer's dead fraction exceeds ``threshold`` for ``patience`` steps.

    A unit (last axis) is dead in a step when it is 0 for every example and
    position of the batch. When several ReLU layers die at the same step, the
    first in execution order is blamed and the later ones are named in the
    message (they usually die of its zeros). ``threshold=0.5`` follows SageMaker Debugger's
    DeadRelu rule (over 50% of units dead); ``patience=20`` traced steps in a
    row, so that a small batch that happens to miss a unit does not count.
    """

    name = "dead_relu"
    default_action = "warn"
    needs = ("dead_frac",)

    def __init__(self, threshold=0.5, patience=20, action=None):
        super().__init__(action)
        self.threshold = self._check_range("threshold", threshold, 0.0, 1.0, high_open=True)
        self.patience = self._check_int("patience", patience, 1)

    def check(self, view):
        mask = view.mask(kinds=("output",), relu=True)
        dead = view["dead_frac"]
        count = self.state(view, "count")
        new = tf.where(mask & (dead > self.threshold), count + 1.0, 0.0)
        self.update(count, new)
        return tf.equal(new, float(self.patience)), dead  # once per episode, not every step after

    def explain(self, rows, fired, values, matrix, table):
        # ReLU layers after a dead one often die of it (their input is all zeros):
        # blame the first in execution order and name the others.
        idx = sorted(np.flatnonzero(fired), key=lambda i: table.rows[i].order)
        row = table.rows[idx[0]]
        units = row.shape[-1] if row.shape else "?"
        later = [table.rows[i].path for i in idx[1:]]
        tail = f"; ReLU layer(s) after it also dead: {', '.join(later)}" if later else ""
        yield row, float(values[idx[0]]), (
            f"{row.path} ({row.layer_class}): {float(values[idx[0]]):.0%} of its {units} units output 0 for the "
            f"whole batch, for {self.patience} steps in a row (threshold {self.threshold:.0%}: dead ReLU){tail}."
        )
