"""``labels_out_of_range``: a class label outside ``[0, units)`` reaching a sparse crossentropy."""

from __future__ import annotations

import numpy as np

from gradtrace.detectors.base import Detector
from gradtrace.detectors.embedding_out_of_range import where_in_batch
from gradtrace.stats import COL


class LabelsOutOfRange(Detector):
    """Fires at the exact step where a sparse categorical crossentropy gets a label outside ``[0,
    units)`` of the model's output (labels that count from 1, or more classes in the data than units
    in the output layer).

    The labels are checked in-graph before the loss and replaced by 0 for the loss itself, so the
    step completes: on CPU TensorFlow would abort it ("Received a label value of 3 which is outside
    the valid range of [0, 3)"), on GPU it would silently give a NaN loss. Needs the output's number
    of units, read from a functional model's output shape. Default action: halt.

    Blame rule: the targets (the data), naming the label, its position and the output layer's units.
    """

    name = "labels_out_of_range"
    default_action = "halt"
    needs = ("bad", "bad_value", "bad_index")
    every_step = True
    wants_labels = True

    def check(self, view):
        mask = view.mask(kinds=("labels",))
        return mask & (view["bad"] > 0), view["bad_value"]

    def explain(self, rows, fired, values, matrix, table):
        for i in np.flatnonzero(fired):
            row = table.rows[i]
            st = matrix[i]
            label, units = int(st[COL["bad_value"]]), row.input_dim
            lo, hi = int(st[COL["min"]]), int(st[COL["max"]])
            shifted = lo >= 1 and hi == units
            why = (f"the labels run from {lo} to {hi}: they count from 1" if shifted else
                   f"the labels seen run from {lo} to {hi}")
            yield row, float(label), (
                f"the targets hold class label {label} at {where_in_batch(int(st[COL['bad_index']]), row.shape)}, "
                f"outside [0, {units}) of the output layer's {units} units ({int(st[COL['bad']])} such label(s) in "
                f"this batch); {why}."
            ), (f"subtract 1 from the labels (y - 1) so that they run over [0, {units})" if shifted else
                f"give the output layer one unit per class ({max(hi, label) + 1} or more), or map the labels into "
                f"[0, {units})")
