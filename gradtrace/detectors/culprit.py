"""When no layer is to blame: the data's scale or the learning rate.

A loss that runs away, or gradients that grow in every layer at once, did not
start in one layer. The origin is then one of three things outside the
network, checked in this order on the statistics the step already has:

1. **the inputs** are on a large scale (float features whose RMS is above
   ``input_scale``, default 10: standardised features are ~1, images in [0, 1]
   ~0.5, raw pixels ~100, square feet ~1000), and reach the network so: the
   layers reading them put out values on a large scale too (a model whose
   first layer rescales or normalises its inputs is not to blame on them).
   The first layer's gradient, and so a plain SGD step, grows with the square
   of the input scale;
2. **the targets** of a regression are on a large scale (RMS above
   ``target_scale``, default 10): the error, and every gradient, grows with it;
3. **the learning rate**: the data is in range, and the updates still make the
   loss grow.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from gradtrace import _keras_compat as compat
from gradtrace.stats import COL

INPUT_SCALE = 10.0
TARGET_SCALE = 10.0
LEARNING_RATE = "learning rate"


def rms(stats_row) -> float:
    size = float(stats_row[COL["size"]])
    return float(stats_row[COL["norm"]]) / np.sqrt(size) if size > 0 else 0.0


def _unscaled_inside(table, matrix, input_scale):
    """The large inputs reach the network as they are: the layers reading the model's inputs directly
    (by the traced graph) put out values on a large scale too. A model that rescales or normalises its
    inputs itself (a first Rescaling, Normalization or BatchNormalization layer) is not to blame on
    its inputs. Without a graph, the inputs' own scale decides."""
    graph = table.graph
    if graph is None:
        return True
    first = [rms(matrix[r.index]) for r in table.rows
             if r.kind == "output" and r.layer_class != "Embedding" and graph.feeders(r.path) == frozenset()]
    return not first or max(first) > input_scale


def learning_rate(table):
    """The learning rate of the update this table is about, as a float (None when unknown)."""
    lr = compat.current_learning_rate(getattr(table, "optimizer", None))
    try:
        return None if lr is None else float(np.asarray(lr))
    except (TypeError, ValueError):
        return None


def outside_the_network(table, matrix, anchor, input_scale=INPUT_SCALE, target_scale=TARGET_SCALE):
    """``(row, why, hint)``: the inputs, the targets or the learning rate, as a row to report (a copy of
    ``anchor``, the row whose statistics it carries, named ``inputs``/``targets``/``learning rate``)."""
    inputs = [(rms(matrix[r.index]), r) for r in table.rows if r.kind == "input"]
    big = max(inputs, key=lambda p: p[0], default=(0.0, None))
    if big[0] > input_scale and _unscaled_inside(table, matrix, input_scale):
        name = f" ({big[1].name})" if big[1].name else ""
        return big[1], (f"the inputs{name} are on a large scale (RMS {big[0]:.3g}): a gradient step on the first "
                        "layer's weights grows with the square of the input scale"), (
            "standardise the inputs (subtract the mean, divide by the standard deviation, e.g. "
            "keras.layers.Normalization adapted on the training data), or scale them into [0, 1].")
    loss = next((r for r in table.rows if r.kind == "loss"), None)
    if loss is not None and loss.loss_kind == "regression":
        targets = [(rms(matrix[r.index]), r) for r in table.rows if r.kind == "target"]
        big = max(targets, key=lambda p: p[0], default=(0.0, None))
        if big[0] > target_scale:
            return big[1], (f"the regression targets are on a large scale (RMS {big[0]:.3g}): the error, and "
                            "every gradient, grows with it"), (
                "standardise the targets (and undo it on the predictions), or lower the learning rate.")
    lr = learning_rate(table)
    opt = type(getattr(table, "optimizer", None)).__name__ if getattr(table, "optimizer", None) is not None else ""
    value = f" ({lr:.3g}{', ' + opt if opt else ''})" if lr is not None else ""
    lower = f", e.g. {lr / 10:.3g}" if lr is not None else ""
    return dataclasses.replace(anchor, path=LEARNING_RATE), (
        f"the inputs and targets are in range, so the learning rate{value} is too high for this model: each "
        "update overshoots"), (
        f"lower the learning rate 10x{lower}, or clip gradients (clipnorm=1.0 on the optimizer); Adam is more "
        "forgiving than plain SGD.")

