"""``nan``: any NaN or Inf in the batch, a layer output, a gradient, a weight or the loss."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from gradtrace.detectors.base import Detector
from gradtrace.graph import base_path
from gradtrace.stats import COL, count

# Where to look for the origin, in order: the data, the forward pass in execution
# order, the loss, the backward pass in backward order, and the weights.
# A weight already non-finite (measured on a reported step) comes right after the data: it is read
# before its layer's output is made, and poisons everything downstream.
_ORIGIN_ORDER = ("input", "target", "weight", "output", "loss", "gradient", "weight_gradient")
_DATA_NAMES = {"input": "inputs", "target": "targets"}


class NaN(Detector):
    """Fires on the first non-finite value of a step and blames where it came from.

    Forward values: the first layer in execution order whose output is
    non-finite (all layers before it were finite, so its inputs were).
    Non-finite inputs or targets blame the data, not a layer. Backward values
    (the forward pass finite): the first non-finite output gradient nearest the
    loss (by the traced graph), when it holds NaN, was made by the backward
    pass of a layer that reads that output, and whose own output gradient is
    finite: that layer is blamed (a sqrt of 0 has a finite value and an
    infinite derivative); when the loss alone reads it, the loss. An overflow
    (Inf only, or under a loss scale), no graph, or no such reader: the first
    layer in backward order.

    A weight that already holds a NaN/Inf (an earlier step's non-finite update, applied under ``warn``)
    poisons every output after it: from the second finding of a fit on, the weights are read (on the
    host, only then) and such a weight is blamed, with the step that let it in, not the first layer
    whose output it spoiled.
    """

    name = "nan"
    default_action = "halt"
    needs = ("nan", "inf")
    every_step = True

    def __init__(self, loss_scale_patience=20, action=None):
        super().__init__(action)
        self.loss_scale_patience = self.check_int("loss_scale_patience", loss_scale_patience, 1)

    def reset(self):
        super().reset()
        self._earlier = None  # the step of this fit's first finding (host side)

    def check(self, view):
        bad = view["nan"] + view["inf"]
        fired = bad > 0
        self._loss_scaled = view.loss_scaled
        if view.loss_scaled:
            # Mixed precision: non-finite gradients after a finite forward pass are a loss-scale
            # overflow, which the LossScaleOptimizer skips on purpose (and lowers the scale).
            # Only a run of `loss_scale_patience` such steps in a row is a fault.
            backward = view.mask(kinds=("gradient", "weight_gradient"))
            overflow = tf.reduce_any(fired & backward) & ~tf.reduce_any(fired & ~backward)
            streak = self.state(view, "overflow_streak")
            new = self.update(streak, tf.where(overflow, streak + 1.0, 0.0))
            fired = fired & ~(overflow & (new < self.loss_scale_patience))
        return fired, bad

    def explain(self, rows, fired, values, matrix, table):
        idx = np.flatnonzero(fired)
        if not len(idx):
            return

        def rank(i):
            r = table.rows[i]
            k = _ORIGIN_ORDER.index(r.kind) if r.kind in _ORIGIN_ORDER else len(_ORIGIN_ORDER)
            # backward order: nearest the loss first (by the traced graph)
            order = table.nearness(r) if r.kind in ("gradient", "weight_gradient") else (r.order,)
            return (k, order, i)

        origin = min(idx, key=rank)
        row = table.rows[origin]
        earlier, self._earlier = getattr(self, "_earlier", None), True
        poisoned = self._poisoned_weight(table) if earlier and row.kind != "weight" else None
        if poisoned is not None:
            w_row, count = poisoned
            yield w_row, float(count), (
                f"weight {w_row.name} of {w_row.path} ({w_row.layer_class}) already holds {count} NaN/Inf, let in "
                f"by the update of an earlier step with a non-finite finding (applied under 'warn'): every output "
                f"computed from it is non-finite, so the layers after it are not to blame."), (
                "look at this fit's first nan finding for where the NaN came from; under the default "
                "on_anomaly='halt' (or 'snapshot') a non-finite update never reaches the weights. Reload the "
                "weights from before it (a checkpoint) to go on.")
            return
        made_nan = matrix[origin][COL["nan"]] != 0  # an overflow makes Inf; 0 * Inf of a derivative makes NaN
        overflow = getattr(self, "_loss_scaled", False)
        if row.kind == "gradient" and table.graph is not None and made_nan and not overflow:
            # The first non-finite output gradient (nearest the loss) holds NaN made by the backward
            # pass of a layer reading that output whose own output gradient is finite: a sqrt or a
            # division at 0 there (a distance layer's sqrt of 0) has a finite value and an
            # infinite derivative, times 0. Blame that layer. (Only Inf, or mixed precision: an
            # overflow, blamed where it happened.)
            fired_rows = set(int(i) for i in idx)
            readers = table.graph.consumers(row.path)
            finite = [r for r in table.rows if r.kind == "gradient" and r.index not in fired_rows
                      and base_path(r.path) in readers]
            if not finite and table.graph.depth(row.path) == 0:
                # read by the loss alone: the loss's own backward pass (a sqrt or log in a custom loss)
                finite = [r for r in table.rows if r.kind == "loss" and r.index not in fired_rows]
            if finite:
                made_by = min(finite, key=table.nearness)
                yield made_by, float(values[origin]), self.backward_message(made_by, row, matrix[origin]), (
                    f"look in {made_by.path} for a sqrt, log, pow or division whose input can be 0 (the value is "
                    "finite, its derivative is not): add a small epsilon, e.g. sqrt(maximum(x, 1e-12)).")
                return
        others = len(idx) - 1
        yield row, float(values[origin]), self.message(row, float(values[origin]), matrix[origin], others), \
            self.hint(row)

    @staticmethod
    def _poisoned_weight(table):
        """``(weight row, NaN/Inf count)`` of the first weight (in execution order) whose variable holds a
        non-finite value now, or None. Read on the host, on a finding's step only."""
        from gradtrace import _keras_compat as compat

        try:
            variables = list(compat.optimizer_trainable_variables(table.optimizer))
        except Exception:
            return None
        by_key = {}
        for v in variables:
            by_key.setdefault((v.name, tuple(v.shape)), []).append(v)
        for r in sorted((r for r in table.rows if r.kind == "weight"), key=lambda r: (r.order, r.index)):
            for v in by_key.get((r.name, tuple(r.shape)), ()):
                count = int(tf.reduce_sum(tf.cast(~tf.math.is_finite(tf.convert_to_tensor(v)), tf.int32)))
                if count:
                    return r, count
        return None

    def hint(self, row):
        if row.kind in _DATA_NAMES:
            return (f"find the NaN/Inf in the {_DATA_NAMES[row.kind]} (np.isnan, np.isinf) and clean or drop those "
                    "examples before training.")
        if row.kind == "output":
            return (f"look in {row.path} for a log, sqrt, division or exp of a value out of range (log of 0 gives "
                    "-inf); on_anomaly='snapshot' and `gradtrace replay` name the op and source line.")
        if row.kind == "weight":
            return ("an earlier update let the NaN/Inf into this weight (an update applied under 'warn'); look at "
                    "this fit's first nan finding, and reload the weights from before it.")
        if row.kind == "loss":
            return ("the loss turned finite outputs into NaN/Inf: a crossentropy on probabilities of exactly 0 or 1, "
                    "or a division by 0 in a custom loss; use from_logits=True or clip.")
        if getattr(self, "_loss_scaled", False):
            return "the loss scale cannot keep the gradients finite: lower the learning rate or clip gradients."
        return (f"the backward pass overflowed at {row.path}: lower the learning rate, or clip gradients "
                "(clipnorm=1.0 on the optimizer).")

    def backward_message(self, layer_row, grad_row, stats_row):
        counts = [count(stats_row[COL[c]]) for c in ("nan", "inf")]
        n = "" if None in counts else f"{sum(counts)} "
        if layer_row.kind == "loss":
            return (f"the loss is finite, but its backward pass produced {n}NaN/Inf in the gradient of the model's "
                    f"output ({grad_row.path}): a function with an infinite derivative at the values it got.")
        return (f"{layer_row.path} ({layer_row.layer_class}): its forward output and output gradient are finite, "
                f"but its backward pass produced {n}NaN/Inf in the gradient of its input ({grad_row.path}'s output): "
                "a function with an infinite derivative at the values it got.")

    def message(self, row, value, stats_row, others=0):
        n_nan, n_inf = (stats_row[COL[c]] for c in ("nan", "inf"))

        def said(n, what):  # a count, or (flagged on a step that was applied, not counted) the word alone
            return "" if n == 0 else what if count(n) is None else f"{int(n)} {what}"

        what = " and ".join(p for p in (said(n_nan, "NaN"), said(n_inf, "Inf")) if p)
        size = int(stats_row[COL["size"]])
        of = "of"
        if count(n_nan) is None or count(n_inf) is None:  # the word alone: "NaN among 384 values"
            what, of = f"{what} (not counted: the step was applied)", "among"
        tail = f"; {others} other tensor(s) of this step are non-finite downstream of it" if others else ""
        if row.kind in _DATA_NAMES:
            src = f"the batch's {_DATA_NAMES[row.kind]}" + (f" ({row.name})" if row.name else "")
            return f"{what} {of} {size} values in {src}: the data is to blame, not a layer{tail}."
        if row.kind == "loss":
            return f"the loss is {'Inf' if n_inf else 'NaN'} while every layer output was finite{tail}."
        part = {
            "output": "output",
            "gradient": "output gradient",
            "weight_gradient": f"gradient of weight {row.name}",
            "weight": f"weight {row.name}",
        }[row.kind]
        first = " first" if row.kind == "output" else ""
        scaled = ""
        if getattr(self, "_loss_scaled", False) and row.kind in ("gradient", "weight_gradient"):
            scaled = (f"; the gradients overflowed on {self.loss_scale_patience} steps in a row although the "
                      "loss-scale optimizer kept lowering the scale, so this is not an occasional skipped step")
        return (f"{row.path} ({row.layer_class}){first} produced {what} {of} {size} values in its {part}{tail}"
                f"{scaled}.")
