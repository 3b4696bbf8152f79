"""``identical_units``: a layer's units compute the same thing, and training never tells them apart."""

from __future__ import annotations

from gradtrace.detectors.base import Detector, describe


class IdenticalUnits(Detector):
    """What every healthy run keeps: a layer's units differ. At each epoch's end, fires for a trainable
    layer whose kernel's columns (one per unit, the last axis) hold the same values, and whose biases
    are equal too, after the epoch's updates: its units give the same value for every example, get the
    same gradient and so stay identical for ever (the symmetry a constant or zero initialiser makes,
    which training never breaks). Only layers of more than one unit; checked on the weights themselves
    (two reductions per kernel on the device, once per epoch: nothing in the compiled step). An output
    layer initialised to zero is healthy: its units get different targets, so they part at the first
    update, and are not reported after an epoch.

    Blame rule: the layer itself, with its initialiser.
    """

    name = "identical_units"
    default_action = "warn"
    needs = ()
    reports_at = ("epoch_end",)

    def __init__(self, action=None):
        super().__init__(action)
        self._reported = set()

    def reset(self):
        super().reset()
        self._reported = set()

    def epoch_end(self, ctx):
        import tensorflow as tf

        import numpy as np

        from gradtrace import _keras_compat as compat

        model = ctx.model
        optimizer = getattr(model, "optimizer", None)
        # the count of updates (a MirroredVariable under a strategy: read its value)
        updates = int(np.asarray(tf.convert_to_tensor(compat.iterations(optimizer)))) if optimizer is not None else None
        if updates == 0:
            return
        tap = ctx.tap
        for lid, layer in sorted(tap.layers.items(), key=lambda t: tap.paths.get(t[0], t[1].name)):
            path = tap.paths.get(lid, layer.name)
            kernel = getattr(layer, "kernel", None)
            if path in self._reported or not layer.trainable or kernel is None or not hasattr(kernel, "shape"):
                continue
            if not getattr(kernel, "trainable", True) or len(kernel.shape) < 2 or int(kernel.shape[-1]) < 2:
                continue
            units = int(kernel.shape[-1])
            k = tf.reshape(tf.convert_to_tensor(kernel), [-1, units])
            same = bool(tf.reduce_all(tf.equal(tf.reduce_max(k, -1), tf.reduce_min(k, -1))))
            bias = getattr(layer, "bias", None)
            if same and bias is not None and hasattr(bias, "shape") and bias.shape and int(bias.shape[-1]) == units:
                b = tf.convert_to_tensor(bias)
                same = bool(tf.equal(tf.reduce_max(b), tf.reduce_min(b)))
            if not same:
                continue
            self._reported.add(path)
            value = float(tf.reduce_max(tf.abs(k)))
            init = describe(layer.kernel_initializer) if getattr(layer, "kernel_initializer", None) else "unknown"
            yield path, "weight", value, (
                f"{path} ({type(layer).__name__}): its {units} units are identical: every column of its kernel "
                f"holds the same values after {updates if updates is not None else '?'} updates "
                f"(kernel_initializer {init}). Identical units get identical gradients, so training never tells "
                f"them apart: the layer works as one unit."
            ), ("use a random kernel_initializer (the Keras default 'glorot_uniform', or 'he_normal' before ReLU) "
                f"in {path}; a constant or zero initialiser makes every unit the same.")
