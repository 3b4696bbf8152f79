"""``dead_relu``: most units of a ReLU-family layer output 0 for every example over a long window."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from gradtrace.detectors.base import Detector


class DeadReLU(Detector):
    """Fires when a ReLU layer's units are dead: zero for every example (and position) of every batch
    over a window counted in examples, so that the rule means the same at batch size 4 and 512.

    Per unit it keeps one number (O(units) state): how many examples in a row it has been 0 for.
    A unit is dead once that reaches ``window`` examples (default 2048, about one epoch of a small
    dataset). A healthy ReLU unit is active for a fair share of examples (a unit active for even
    1% of them is zero for 2048 in a row with probability 1e-9), so a dead unit has stopped
    learning. The layer fires when more than ``threshold`` of its units are dead (default 0.7,
    AUTOTRAINER's dying-ReLU share; a layer with some dead units still learns) or, sooner, when
    every one of its units has been 0 for ``quick`` examples in a row (default 64: a healthy layer
    of even 2 units, each active half the time, is all zero for 64 examples with probability
    2^-128): a layer that outputs only zeros passes no gradient to anything below it. Once per episode: a layer that
    recovers and dies again fires again. At the end of training, a layer that has been mostly dead
    for every example the run showed it (at least ``min_examples``, default 32) but that the run
    was too short to report is reported then (``stage="fit_end"``).

    Blame rule: the first dead layer in execution order; later dead ReLU layers are named in the
    message (they usually die of its zeros). The message says whether the layer's input killed it
    (an earlier ReLU layer is dead too) or its own weights and bias did.
    """

    name = "dead_relu"
    default_action = "warn"
    needs = ("dead_frac", "nan", "inf")
    reports_at = ("step", "fit_end")

    def __init__(self, threshold=0.7, window=2048, quick=64, min_examples=32, action=None):
        super().__init__(action)
        self.threshold = self.check_range("threshold", threshold, 0.0, 1.0, high_open=True)
        self.window = self.check_int("window", window, 1)
        self.quick = self.check_int("quick", quick, 1)
        self.min_examples = self.check_int("min_examples", min_examples, 1)

    def reset(self):
        super().reset()
        self._layout = None  # (table, unit_rows, inactive variable, reported variable, examples-seen variable)

    def check(self, view):
        n = len(view.table)
        if view.alive is None or not view.unit_rows:
            return tf.zeros([n], tf.bool), tf.zeros([n])
        sizes = [int(u) for _, u in view.unit_rows]
        rows = [i for i, _ in view.unit_rows]
        seg = tf.constant(np.repeat(np.arange(len(sizes), dtype=np.int32), sizes))
        inactive = self.state(view, "inactive_examples", size=sum(sizes))
        seen = self.state(view, "examples_seen", size=1)  # the examples of this fit
        reported = self.state(view, "reported")
        examples = tf.cast(view.examples, tf.float32)
        # a step with a NaN/Inf anywhere is the nan detector's: ReLU maps NaN to 0, so its units would look
        # dead; they are neither alive nor dead on such a step
        skip = tf.reduce_any(view["nan"] + view["inf"] > 0)
        new = tf.where(skip, inactive, tf.where(view.alive > 0, 0.0, inactive + examples))
        self.update(inactive, new)
        self.update(seen, seen + tf.where(skip, 0.0, examples))
        k = len(sizes)
        dead_share = tf.math.unsorted_segment_mean(tf.cast(new >= self.window, tf.float32), seg, k)
        wholly = tf.math.unsorted_segment_min(new, seg, k) >= self.quick
        layer_dead = (dead_share > self.threshold) | wholly
        idx = tf.constant([[i] for i in rows], tf.int32)
        dead_rows = tf.scatter_nd(idx, tf.cast(layer_dead, tf.float32), [n]) > 0
        fired = dead_rows & (reported == 0)
        self.update(reported, tf.cast(dead_rows, tf.float32))
        self._layout = (view.table, view.unit_rows, inactive, reported, seen)
        value = tf.scatter_nd(idx, tf.where(wholly, 1.0, dead_share), [n])
        return fired, value

    # -- host side ---------------------------------------------------------------------------------
    def _describe(self, table, dead_rows):
        dead_rows = sorted(dead_rows, key=lambda i: table.rows[i].order)
        row = table.rows[dead_rows[0]]
        # dead now (reported earlier in its episode, or in this one) and before it in execution order
        dead_now = self._layout[3].numpy() if self._layout is not None else np.zeros(len(table))
        by_input = any(dead_now[r.index] > 0 for r in table.rows
                       if r.kind == "output" and r.relu and r.order < row.order)
        units = row.shape[-1] if row.shape else "?"
        later = [table.rows[i].path for i in dead_rows[1:]]
        tail = f"; ReLU layer(s) after it also dead: {', '.join(later)}" if later else ""
        if by_input:
            cause = "its input comes from a dead ReLU layer before it, which outputs only zeros"
            hint = "fix the first dead layer above it; this one should recover with it."
        else:
            cause = "its own weights and bias push every pre-activation below 0 (a too-high learning rate or a " \
                    "large negative bias usually does this)"
            hint = (f"lower the learning rate, use kernel_initializer='he_normal' in {row.path}, or use "
                    "LeakyReLU/ELU there; check that its inputs are scaled.")
        return row, units, cause, tail, hint

    def explain(self, rows, fired, values, matrix, table):
        idx = list(np.flatnonzero(fired))
        row, units, cause, tail, hint = self._describe(table, idx)
        v = float(values[row.index])
        how = (f"all of its {units} units output 0 for at least {self.quick} examples in a row" if v >= 1.0 else
               f"{v:.0%} of its {units} units output 0 for every one of at least {self.window} examples in a row "
               f"(threshold {self.threshold:.0%})")
        yield row, v, f"{row.path} ({row.layer_class}): {how}: dead ReLU; {cause}{tail}.", hint

    def fit_end(self, ctx):
        """Layers mostly dead for every example this fit showed them, too few examples to have fired."""
        if self._layout is None:
            return []
        table, unit_rows, inactive, reported, seen = self._layout
        inact, rep, total = inactive.numpy(), reported.numpy(), float(seen.numpy()[0])
        if total < self.min_examples:
            return []
        start, dead = 0, []
        for i, u in unit_rows:
            u = int(u)
            share = float(np.mean(inact[start:start + u] >= min(total, self.window)))
            start += u
            if share > self.threshold and rep[i] == 0:
                dead.append((i, share))
        if not dead:
            return []
        values = {i: share for i, share in dead}
        row, units, cause, tail, hint = self._describe(table, [i for i, _ in dead])
        share = values[row.index]
        return [(row.path, "output", share, (
            f"{row.path} ({row.layer_class}): {share:.0%} of its {units} units output 0 for every one of the "
            f"{int(total)} examples of this run, which ended before the {self.window}-example window: dead ReLU; "
            f"{cause}{tail}."), hint)]
