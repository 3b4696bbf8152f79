"""Commit or hold one optimizer update, in-graph.

A held update leaves the state as it was before the step: the rollback
variables (the model's non-trainable ones: BatchNorm statistics, seed generator
states) get their saved values back and the optimizer's ``apply`` never runs,
so the weights, the optimizer's slots and ``iterations`` are untouched. Under a
strategy every replica takes the same branch (:meth:`gradtrace.distribute.Replicas.gate`).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from gradtrace import distribute


def applied(original, grads, variables):
    original(grads, variables)
    return tf.constant(True)


def restored(variables, saved):
    for v, old in zip(variables, saved):
        v.assign(old)
    return tf.constant(False)


def all_finite(grads):
    """True when every gradient (an IndexedSlices' values) is free of NaN/Inf."""
    checks = [tf.reduce_all(tf.math.is_finite(g.values if isinstance(g, tf.IndexedSlices) else g))
              for g in grads if g is not None]
    return tf.reduce_all(tf.stack(checks)) if checks else tf.constant(True)


def gated(hold_if, original, grads, variables, rollback, saved):
    """Apply the update unless ``hold_if`` (a boolean tensor, the same on every replica); returns whether
    it was committed."""
    replicas = distribute.current()
    if replicas is not None:
        return replicas.gate(hold_if, lambda g: applied(original, g, variables), (grads,),
                             lambda s: restored(rollback, s), saved)
    return tf.cond(hold_if, lambda: restored(rollback, saved), lambda: applied(original, grads, variables))


def redo(ctx, optimizer, original, grads, variables, changed):
    """The redo of a snapshotted step (plan mode ``force``): committed unless an update would put a NaN/Inf
    into a weight or an optimizer slot (then skipped, as LossScaleOptimizer skips such a step; a
    LossScaleOptimizer is left to skip it itself, and lower its scale), or ids or labels were replaced."""
    scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    replicas = distribute.current()
    skip = tf.constant(False) if scaled else tf.logical_not(all_finite(grads))
    if replicas is not None:  # skipped on every replica when one replica's gradients are non-finite
        skip = replicas.sum(tf.cast(skip, tf.float32)) > 0.0
    if changed is not None:
        skip = skip | changed
    return gated(skip | ctx.held, original, grads, variables, ctx.rollback, ctx.saved)


def gate(ctx, update, original, grads, variables, changed):
    """The update of a detecting step: held when a blocking detector fired on it, ids or labels were
    replaced, an earlier update of this step was held, or a stop earlier in this execution; committed
    otherwise. A step that commits nothing (a held step measured in full, a replay) is always held."""
    if not ctx.plan.commits:
        return restored(ctx.rollback, ctx.saved)
    if not ctx.blocking and changed is None:
        return applied(original, grads, variables)
    block = tf.reduce_any(tf.gather(update.per_detector, ctx.blocking)) if ctx.blocking else tf.constant(False)
    if changed is not None:
        block = tf.logical_or(block, changed)
    block = tf.logical_or(tf.logical_or(block, ctx.held), update.record.blocked)
    # (the statistics, and so block, are the same on every replica)
    return gated(block, original, grads, variables, ctx.rollback, ctx.saved)
