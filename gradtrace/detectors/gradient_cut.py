"""``gradient_cut``: the gradient does not reach a layer's trainable weights, while it reaches others."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from gradtrace.detectors.base import Detector
from gradtrace.stats import COL

NORMALISATIONS = ("BatchNormalization", "LayerNormalization", "GroupNormalization", "UnitNormalization",
                  "SyncBatchNormalization", "RMSNormalization")


class GradientCut(Detector):
    """What every healthy run keeps: the gradient reaches every trainable weight. Fires when it does not,
    while the loss is above ``min_loss`` and other weights do get a gradient (when none does, that is
    ``no_gradient``'s). Two ways:

    - the gradient of a weight is None: the traced step's graph has no route from the weight to the loss
      (known when the step is traced, so said at the first step, once per fit);
    - every weight gradient of a layer is exactly zero for ``patience`` traced steps in a row (default 5:
      a zero-initialised gate, ReZero's or LoRA's, opens at the first update).

    The cause is named from the graph and the statistics: an op on every route from the layer to the loss
    that passes no gradient (``StopGradient``, ``Sign``, ``Round``, ``Floor``, a cast to an integer type,
    ``ArgMax``, a comparison: :func:`gradtrace.graph.LayerGraph.cut`); a layer above whose output does not
    depend on its input (a normalisation over a single value: BatchNormalization over one example gives
    only its offset); a weight the step never reads (its value taken once, in ``build()``); an output that
    reaches no loss. A layer below a dead ReLU layer is ``dead_relu``'s, which names that layer.

    Blame rule: the layer whose weights get no gradient (the one nearest the loss, when several share the
    cause; the others are counted).
    """

    name = "gradient_cut"
    default_action = "warn"
    needs = ("norm", "size", "mean", "nan", "inf")

    def __init__(self, patience=5, min_loss=1e-4, action=None):
        super().__init__(action)
        self.patience = self.check_int("patience", patience, 1)
        self.min_loss = self.check_range("min_loss", min_loss, 0.0, float("inf"))

    @staticmethod
    def _layout(table):
        """Per layer with weight rows: its weight-gradient rows; and the weight rows that have none."""
        grads = {}
        for r in table.rows:
            if r.kind == "weight_gradient":
                grads.setdefault(r.path, []).append(r)
        missing = [r for r in table.rows if r.kind == "weight" and not any(g.name == r.name for g in grads.get(r.path, ()))]
        return grads, missing

    def check(self, view):
        n = len(view.table)
        loss_row = view.table.index("loss", "loss")
        grads, missing = self._layout(view.table)
        if loss_row is None or not grads:
            return tf.zeros([n], tf.bool), tf.zeros([n])
        loss = view["mean"][loss_row]
        rms = view["norm"] / tf.sqrt(tf.maximum(view["size"], 1.0))
        paths = sorted(grads)
        seg = np.full([n], len(paths), np.int32)
        for k, p in enumerate(paths):
            for r in grads[p]:
                seg[r.index] = k
        layer_norm = tf.math.unsorted_segment_max(tf.where(view["size"] > 0, rms, 0.0), seg, len(paths) + 1)[:-1]
        some = tf.reduce_any(layer_norm > 0.0)
        # a step with a NaN/Inf anywhere is nan's (statistics skip non-finite values: a poisoned layer's
        # finite remainder can read as zero)
        finite = tf.equal(tf.reduce_sum(view["nan"] + view["inf"]), 0.0)
        live = (loss > self.min_loss) & tf.math.is_finite(loss) & some & finite
        zero = tf.equal(layer_norm, 0.0) & live
        streak = self.state(view, "streak", size=len(paths))
        new = tf.where(zero, streak + 1.0, 0.0)
        self.update(streak, new)
        first_rows = np.array([min(r.index for r in grads[p]) for p in paths], np.int32)
        now = tf.equal(new, float(self.patience))  # once per episode
        fired = tf.scatter_nd(first_rows[:, None], now, [n])
        values = tf.scatter_nd(first_rows[:, None], new, [n])
        if missing:  # no route at all: known from the trace, said at the first step
            said = self.state(view, "said_missing")
            once = live & tf.equal(tf.reduce_max(said), 0.0)
            self.update(said, tf.maximum(said, tf.cast(live, tf.float32)))
            idx = np.array([r.index for r in missing], np.int32)
            fired = fired | tf.scatter_nd(idx[:, None], tf.fill([len(idx)], once), [n])
        return fired, values

    # -- the cause, on the host -------------------------------------------------------------------------
    @staticmethod
    def _grad_norm(table, matrix, path):
        rows = [r for r in table.rows if r.kind == "gradient" and r.path.split(":", 1)[0] == path]
        if not rows:
            return None  # no gradient at all reaches the output
        return max(float(matrix[r.index][COL["norm"]]) for r in rows)

    def _cutter(self, table, matrix, path):
        """The layer above ``path`` that passes no gradient to its input: its output gets one, what it
        reads does not (None when not found)."""
        graph = table.graph
        if graph is None:
            return None
        queue, seen = [path], {path}
        while queue:
            node = queue.pop(0)
            for above in sorted(graph.consumers(node)):
                g = self._grad_norm(table, matrix, above)
                if g is not None and g > 0:
                    return above
                if above not in seen:
                    seen.add(above)
                    queue.append(above)
        return None

    @staticmethod
    def _single_value(row):
        """Why a normalisation layer's output does not depend on its input, from its output's shape."""
        shape = row.shape or ()
        if row.layer_class.endswith("BatchNormalization") and shape and shape[0] == 1:
            return " (a batch of 1 example: BatchNormalization over it outputs only its offset, beta)"
        if not row.layer_class.endswith("BatchNormalization") and shape and shape[-1] == 1:
            return " (one feature: normalised over it, every value becomes the offset, beta)"
        return ""

    @staticmethod
    def _normalisation_hint(row):
        return ("train with batches of more than one example, or normalise over an axis with more than one value "
                "(LayerNormalization over the features).")

    def _zero_input(self, table, matrix, path):
        """``(row, why)`` when every layer ``path`` reads outputs only zeros (None otherwise)."""
        graph = table.graph
        feeders = graph.feeders(path) if graph is not None else None
        if not feeders:
            return None
        outs = [r for r in table.rows if r.kind == "output" and r.path.split(":", 1)[0] in feeders]
        if not outs or any(matrix[r.index][COL["size"]] <= 0 or float(matrix[r.index][COL["norm"]]) != 0.0
                           for r in outs):
            return None
        row = outs[0]
        return row, (self._single_value(row) if row.layer_class in NORMALISATIONS else "")

    def _why(self, table, matrix, row):
        path = row.path
        graph = table.graph
        cut = graph.cut(path) if graph is not None else None
        if cut is not None:
            op, above = cut
            where = "the loss" if above == "loss" else above
            return (f"every route from its output to the loss passes {op}, which has no gradient (before {where})",
                    "replace the op on the way with a differentiable one (a sigmoid/softmax instead of a rounding, "
                    "a comparison or an argmax; no stop_gradient), or apply it only outside the training step.")
        if row.kind == "weight":
            g = self._grad_norm(table, matrix, path)
            if g is not None:
                return (f"the step never reads {row.name}: the loss does not depend on it (its value was taken once, "
                        "in build() or __init__, or the variable is read as a constant)",
                        f"use self.{row.name.split('/')[-1]} itself inside call() (not a tensor computed from it "
                        "once), so that each step reads the variable.")
            return ("its output reaches no loss (an output of the model without a loss, or a result the step "
                    "does not use)",
                    "give that output a loss (or a loss weight), or remove the layer from the trained model.")
        g = self._grad_norm(table, matrix, path)
        if g is not None and g > 0:
            zero_in = self._zero_input(table, matrix, path)
            if zero_in is not None:
                frow, why_zero = zero_in
                return (f"its output gets a gradient but its weights do not: what it reads, the output of "
                        f"{frow.path} ({frow.layer_class}), is 0 for every example{why_zero}",
                        self._normalisation_hint(frow) if frow.layer_class in NORMALISATIONS
                        else f"check what makes {frow.path} output only zeros.")
            return ("its output gets a gradient but its weights do not: the output does not depend on them "
                    "(a weight multiplied by 0, or a constant or zero initialiser that training never breaks)",
                    f"check how {path} uses its weights, and its initialisers.")
        cutter = self._cutter(table, matrix, path)
        if cutter is not None:
            crow = next((r for r in table.rows if r.kind == "output" and r.path.split(":", 1)[0] == cutter), None)
            cls = crow.layer_class if crow is not None else ""
            if crow is not None and crow.relu:
                m = matrix[crow.index]
                if m[COL["size"]] > 0 and float(m[COL["norm"]]) == 0.0:
                    return None  # a dead ReLU layer above: dead_relu names it
            if cls in NORMALISATIONS:
                return (f"{cutter} ({cls}) above it passes it no gradient: its output does not depend on its input, "
                        f"it normalises over a single value{self._single_value(crow)}", self._normalisation_hint(crow))
            return (f"{cutter} ({cls}) above it passes it no gradient: its output does not depend on its input "
                    "(a multiplication by 0, a constant output, an op with no gradient)",
                    f"check what {cutter} does with its input.")
        return ("no gradient reaches its output", f"check the ops between {path} and the loss.")

    def explain(self, rows, fired, values, matrix, table):
        idx = np.flatnonzero(fired)
        if not len(idx):
            return
        by_layer = {}
        for i in idx:
            by_layer.setdefault(table.rows[i].path, []).append(table.rows[i])
        # the layer nearest the loss first: the one the cause is closest to
        order = sorted(by_layer, key=lambda p: table.nearness(by_layer[p][0]))
        whys = {p: self._why(table, matrix, by_layer[p][0]) for p in order}  # once per layer
        said = set()
        for path in order:
            row, why = by_layer[path][0], whys[path]
            if why is None or (why[0], row.kind) in said:
                continue
            said.add((why[0], row.kind))
            same = sum(1 for p in order if p != path and whys[p] is not None and whys[p][0] == why[0])
            tail = f"; {same} more layer(s) cut alike" if same else ""
            if row.kind == "weight":
                names = ", ".join(r.name for r in by_layer[path])
                what = f"{path} ({row.layer_class}): no gradient reaches {names}"
            else:
                what = (f"{path} ({row.layer_class}): its weight gradients are exactly 0 for {self.patience} steps in "
                        f"a row while other layers learn")
            yield row, float(values[row.index]), f"{what}: {why[0]}{tail}.", why[1]
