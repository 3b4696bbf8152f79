"""``update_size``: each update moves the weights by a sane share of their size."""

from __future__ import annotations

import numpy as np

from gradtrace.detectors.base import Detector

SAMPLE = 4096  # weights read per variable at each check (fixed positions: the ratio of a sample)


class UpdateSize(Detector):
    """What every healthy run keeps: a step moves each weight matrix by a small but real share of its
    size, the update-to-weight ratio ``|w_after - w_before| / |w_before|``, about 1e-3 by the common
    rule of thumb. Measured per layer and per step with plain Keras on the fixed programs of the fault
    corpus (``benchmarks/update_band.py``, 33 programs): the fastest layer's median ratio lies between
    2e-3 and 3.6e-2, and no layer keeps a ratio above 0.14 for five steps in a row.

    Every ``every`` steps (default 10) it reads a fixed sample of each trainable weight matrix (kernels
    and tables, up to 4096 values each: nothing in the compiled step) and measures how far it moved per
    step since the last read. Fires:

    - **too large**: a layer moved by more than ``high`` (default 1.0: the whole size of its weights)
      per step, at ``patience`` (default 2) checks in a row. Seven times above the healthiest run's
      largest; a weight rewritten at every step is not being fitted. Blame: that layer.
    - **too small**: at the start of training (an optimizer that had made no update when the fit
      began), while the learning rate is not rising (a warm-up is left alone), every layer that moves
      at all moved by less than ``low`` (default 1e-5, a hundred times under the rule of thumb, two
      hundred times under the slowest healthy run's fastest layer) per step, at ``patience`` checks in
      a row: a thousand such steps change the weights by less than 1%, so the loss cannot move. Blame:
      the learning rate, with its value and a better one.

    Layers whose weights get no update at all (a cut gradient) are ``gradient_cut``'s; a non-finite
    weight is ``nan``'s.
    """

    name = "update_size"
    default_action = "warn"
    needs = ()
    reports_at = ("periodic",)

    def __init__(self, low=1e-5, high=1.0, every=10, patience=2, action=None):
        super().__init__(action)
        self.low = self.check_range("low", low, 0.0, 1.0, low_open=True, high_open=True)
        self.high = self.check_range("high", high, 0.0, float("inf"), low_open=True)
        if not self.low < self.high:
            raise ValueError(f"low={low!r} must be below high={high!r}.")
        self.every = self.check_int("every", every, 1)
        self.patience = self.check_int("patience", patience, 1)
        self.reset()

    def reset(self):
        """Forget this fit's findings and baseline; the compiled read of a model's weights is kept for the
        next fit of the same model (a loop of one-epoch fits neither traces it again nor piles up variables)."""
        super().reset()
        if not hasattr(self, "_read"):
            self._groups = None  # [(layer path, [(variable, positions)])]
            self._read = None  # the compiled read of every sample
            self._tap = None  # the layer tap (one per model) they were made for
        self._last = None  # the step of the last read (its samples are kept on the device)
        self._fresh = None  # the optimizer had made no update when the fit began
        self._lr0 = None
        self._large = {}  # layer path -> checks in a row above high
        self._small = 0  # checks in a row with every moving layer below low
        self._said = set()

    # -- reading the weights -------------------------------------------------------------------------------
    def _build(self, ctx):
        """Group the trainable weight matrices by the innermost layer that holds them, and compile one read:
        each group's sample, its distance to the sample kept from the last read and that sample's norm,
        computed on the device (one small tensor comes back)."""
        import tensorflow as tf

        from gradtrace import _keras_compat as compat

        tap = ctx.tap
        owner = {}
        for lid, layer in tap.layers.items():
            if not layer.trainable:
                continue
            for w in layer.trainable_weights:
                if len(w.shape) < 2 or not int(np.prod(w.shape)):
                    continue
                best = owner.get(id(w))
                if best is None or len(layer.trainable_weights) < best[2]:
                    owner[id(w)] = (w, tap.paths.get(lid, layer.name), len(layer.trainable_weights))
        groups = {}
        rng = np.random.default_rng(0)  # its own generator: Keras' random streams are left as they are
        for w, path, _ in owner.values():
            n = int(np.prod(w.shape))
            positions = np.sort(rng.choice(n, SAMPLE, replace=False)) if n > SAMPLE else np.arange(n)
            groups.setdefault(path, []).append((w, tf.constant(positions, tf.int64)))
        self._groups = sorted(groups.items())
        with tf.init_scope():
            kept = [compat.detector_variable(tf.zeros([sum(int(p.shape[0]) for _, p in ws)]),
                                             f"gradtrace_update_size_{i}") for i, (_, ws) in enumerate(self._groups)]

        @tf.function(autograph=False)
        def read():
            rows = []
            for (_, ws), last in zip(self._groups, kept):
                now = tf.concat([tf.gather(tf.reshape(tf.cast(tf.convert_to_tensor(w), tf.float32), [-1]), p)
                                 for w, p in ws], 0)
                finite = tf.reduce_all(tf.math.is_finite(now)) & tf.reduce_all(tf.math.is_finite(last))
                rows.append(tf.stack([tf.norm(now - last), tf.norm(last), tf.cast(finite, tf.float32)]))
                last.assign(now)
            return tf.stack(rows)

        self._read = read

    @staticmethod
    def _lr(ctx):
        from gradtrace import _keras_compat as compat

        # the optimizer whose updates count the steps (the model's, or the one your loop applies)
        optimizer = ctx.optimizers[0] if ctx.optimizers else None
        try:
            return float(compat.current_learning_rate(optimizer)), compat.optimizer_kind(optimizer)
        except (TypeError, ValueError):
            return None, compat.optimizer_kind(optimizer)

    def _baseline(self, ctx):
        if self._groups is None or self._tap is not ctx.tap:
            self._tap = ctx.tap
            self._build(ctx)
        if self._last is None and self._groups:
            step = ctx.current_step()
            self._fresh = step == 0
            self._lr0 = self._lr(ctx)[0]
            self._read()  # keeps the samples: the next read measures from here
            self._last = step

    def epoch_begin(self, ctx):
        self._baseline(ctx)  # the weights before the first update of the fit

    # -- the check -----------------------------------------------------------------------------------------
    def periodic(self, ctx):
        if self._last is None:
            self._baseline(ctx)
            return []
        step = ctx.current_step()
        if step <= self._last:
            return []
        steps, self._last = step - self._last, step
        ratios = {}
        for (path, _), (moved, size, finite) in zip(self._groups, self._read().numpy()):
            if not finite or size == 0.0:
                continue  # a non-finite weight is nan's; a weight that was all zero has no size to compare
            ratios[path] = float(moved) / float(size) / steps
        lr, opt = self._lr(ctx)
        yield from self._too_large(ratios, lr, opt, step)
        yield from self._too_small(ratios, lr, opt, step)

    def _too_large(self, ratios, lr, opt, step):
        for path, r in ratios.items():
            self._large[path] = self._large.get(path, 0) + 1 if r > self.high else 0
            if self._large[path] < self.patience or ("large", path) in self._said:
                continue
            self._said.add(("large", path))
            at = f"at learning rate {lr:.3g} ({opt})" if lr else f"with {opt}"
            better = f", to about {lr * min(1e-2 / r, 0.1):.2g}" if lr else ""
            yield path, "update", r, (
                f"{path}: each update moves its weights by {r:.3g} of their size per step (over the last "
                f"{self.patience * self.every} steps, to step {step}) {at}, against about 1e-3 in a healthy run and "
                f"never over 0.14 in the healthy programs measured: the weights are rewritten at every step, "
                f"not fitted."), (
                f"lower the learning rate{better}, or clip the updates (clipnorm); if only this layer runs away, "
                f"check the scale of what feeds it.")

    def _too_small(self, ratios, lr, opt, step):
        moving = {p: r for p, r in ratios.items() if r > 0.0}
        warming = lr is not None and self._lr0 is not None and lr > self._lr0
        slow = bool(moving) and self._fresh and not warming and max(moving.values()) < self.low
        self._small = self._small + 1 if slow else 0
        if self._small < self.patience or "small" in self._said:
            return
        self._said.add("small")
        fastest = max(moving, key=moving.get)
        r = moving[fastest]
        at = f"at learning rate {lr:.3g} ({opt})" if lr else f"with {opt}"
        hint = (f"raise the learning rate, to about {lr * min(1e-3 / r, 1e4):.2g}." if lr else
                "raise the learning rate.")
        yield "learning rate", "update", r, (
            f"the updates are too small {at}: by step {step} the fastest layer ({fastest}) moves by {r:.2g} of its "
            f"weights' size per step, every other by less, against about 1e-3 in a healthy run: a thousand such "
            f"steps change the weights by at most {min(1000 * r, 1.0):.2%}, so the loss cannot move."), hint
