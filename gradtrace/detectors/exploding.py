"""``exploding``: a gradient norm far above its threshold, or jumping against its own history."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from gradtrace.detectors.culprit import outside_the_network, rms
from gradtrace.detectors.base import Detector
from gradtrace.graph import base_path
from gradtrace.stats import COL


# A layer's output this many times larger (RMS) than its input is where a forward pass blew up
# (Glorot/He initialisation keeps the scale within ~2x per layer; N(0,1) kernels grow it ~6x at 64 units).
GROWTH = 10.0
# ... and only a large output counts (healthy activations are O(1); a sigmoid's 0.5 over tiny inputs is
# growth but not a blow-up).
LARGE = 100.0


class Exploding(Detector):
    """Fires when a layer's output-gradient or weight-gradient norm explodes.

    - ``max_norm`` (default 1e6, as TheDeepChecker): any gradient norm above it.
    - ``factor`` (default 100) with ``warmup`` (default 10 steps) and ``floor``
      (default 1.0): a norm above ``floor`` that is more than ``factor`` times
      its own running average (decay ``decay``, default 0.9) once the row has
      been seen ``warmup`` times. Measured here: on the healthy models of the
      test suite the largest step-to-average ratio was below 10; an injected
      explosion crossed 100 at its first step, long before float32 overflow.

    Blame rule: the gradient that exploded first in backward order (nearest the
    loss, by the traced graph), where the growth starts on its way down; the
    others are counted. Two exceptions name the origin instead. A weight
    gradient that exploded while its layer's output gradient did not is large
    because the layer's input is: the layer feeding it is blamed (a ReLU
    recurrence whose output grows), or the inputs when they are on a large
    scale. An explosion at the output layer itself blames the data's scale or,
    once an update has been applied, the learning rate
    (:mod:`gradtrace.detectors.culprit`).
    """

    name = "exploding"
    default_action = "halt"
    needs = ("norm", "size", "nan", "inf")

    def __init__(self, max_norm=1e6, factor=100.0, warmup=10, floor=1.0, decay=0.9, action=None):
        super().__init__(action)
        self.max_norm = self.check_range("max_norm", max_norm, 0.0, float("inf"), low_open=True)
        self.factor = self.check_range("factor", factor, 1.0, float("inf"), low_open=True)
        self.warmup = self.check_int("warmup", warmup, 1)
        self.floor = self.check_range("floor", floor, 0.0, float("inf"))
        self.decay = self.check_range("decay", decay, 0.0, 1.0, high_open=True)

    def check(self, view):
        mask = view.mask(kinds=("gradient", "weight_gradient")) & (view["size"] > 0)
        norm = view["norm"]
        # values finite (NaN/Inf values are the nan detector's); a norm that overflowed
        # from finite values (above ~1e19) still counts as exploded
        finite = tf.equal(view["nan"] + view["inf"], 0.0)
        ema = self.state(view, "ema")
        seen = self.state(view, "seen")
        jump = (seen >= self.warmup) & (norm > self.floor) & (norm > self.factor * ema)
        fired = mask & finite & ((norm > self.max_norm) | jump)
        ok = mask & finite & ~fired & tf.math.is_finite(norm)
        self.update(ema, tf.where(ok, tf.where(seen > 0, self.decay * ema + (1 - self.decay) * norm, norm), ema))
        self.update(seen, seen + tf.cast(ok, tf.float32))
        self._seen = seen
        ratio = norm / tf.maximum(ema, 1e-30)
        return fired, tf.where(norm > self.max_norm, norm, ratio)

    def explain(self, rows, fired, values, matrix, table):
        idx = np.flatnonzero(fired)
        first = min(idx, key=lambda i: (table.nearness(table.rows[i]), table.rows[i].kind != "gradient"))
        row = table.rows[first]
        norm = float(matrix[first][COL["norm"]])
        what = "output gradient" if row.kind == "gradient" else f"gradient of weight {row.name}"
        if norm > self.max_norm:
            why = f"norm {norm:.4g} is above max_norm={self.max_norm:.4g}"
        else:
            why = f"norm {norm:.4g} is {float(values[first]):.4g}x its running average (factor={self.factor:g})"
        tail = f"; {len(idx) - 1} more gradient(s) below it exploded too" if len(idx) > 1 else ""
        found = f"{row.path} ({row.layer_class}): {what} {why}{tail}"
        origin = self._origin(row, set(int(i) for i in idx), matrix, table)
        if origin is not None:
            blamed, because, hint = origin
            yield blamed, norm, f"{found}; {because}.", hint
            return
        yield row, norm, f"{found}.", (
            "lower the learning rate or clip gradients (clipnorm=1.0 on the optimizer); if it fires at step 0, "
            f"check the scale of {row.path}'s inputs and initialisation.")

    def _origin(self, row, fired, matrix, table):
        """Where the explosion comes from when it is not ``row``'s own doing: ``(row, why, hint)`` or None.

        In order, on the step's own statistics and the traced graph:

        1. the inputs, or a regression's targets, on a large scale (:mod:`gradtrace.detectors.culprit`);
        2. a hidden layer whose output is large (RMS above ``LARGE``) and more than ``GROWTH`` times its
           input's, the largest such growth: the forward pass blew up there (a ReLU recurrence), and
           every gradient computed from its output (the weights above it, the loss) is large with it;
        3. at the output layer (nothing between it and the loss), once an update has been applied:
           the learning rate.
        """
        if table.graph is None:
            return None
        blamed, why, hint = outside_the_network(table, matrix, row)
        if blamed.kind in ("input", "target"):
            return blamed, why, hint
        grown = self._largest_growth(matrix, table)
        if grown is not None:
            src, growth, scale = grown
            return src, (f"the forward pass blew up at {src.path} ({src.layer_class}): its output (RMS {scale:.4g}) is "
                         f"{growth:.3g}x its input's, and the gradients computed from it are large with it"), (
                f"keep {src.path}'s output in range: a bounded activation (tanh) or normalisation after it, a lower "
                "learning rate, or clipnorm=1.0 on the optimizer; a ReLU recurrence (an RNN/LSTM with "
                "activation='relu') grows without bound.")
        if table.graph.depth(row.path) == 0 and not self._first_step():
            return blamed, why, hint
        return None

    @staticmethod
    def _largest_growth(matrix, table):
        """``(output row, growth, its RMS)`` of the layer whose output grew most over its input, when that
        growth is above ``GROWTH``; None otherwise."""
        graph = table.graph
        out_rms = {}
        for r in table.rows:
            if r.kind == "output":
                out_rms.setdefault(base_path(r.path), []).append((rms(matrix[r.index]), r))
        inputs = [rms(matrix[r.index]) for r in table.rows if r.kind == "input"]
        best = None
        for path, outs in out_rms.items():
            scale, row = max(outs, key=lambda p: p[0])
            feeders = graph.feeders(path)
            if feeders is None or not scale > LARGE or graph.depth(path) == 0:
                continue  # the output layer's scale is the targets' (culprit's), not a blow-up
            if feeders:
                ins = [v for f in feeders for v, _ in out_rms.get(f, ())]
            else:
                ins = inputs
            if not ins or not np.isfinite(scale):
                continue
            growth = scale / max(max(ins), 1e-30)
            key = (growth, path.count("/"))
            if growth > GROWTH and (best is None or key > best[0]):
                best = (key, row, growth, scale)
        return None if best is None else best[1:]
    def _first_step(self):
        """No update applied yet in this fit (the learning rate cannot be to blame)."""
        seen = getattr(self, "_seen", None)
        return seen is None or not bool(np.any(seen.numpy() > 0))
