"""Commit or hold one optimizer update, in-graph.

How an update waits for the checks is the ``guard`` (``gradtrace.fit(..., guard=)``):

- ``"step"`` (the default): all or nothing. A held update leaves the state as it
  was before the step: the rollback variables (the model's non-trainable ones:
  BatchNorm statistics, seed generator states) get their saved values back and
  the optimizer's ``apply`` never runs, so the weights, the optimizer's slots and
  ``iterations`` are untouched. Every variable's update waits for every check.
  Under a strategy every replica takes the same branch
  (:meth:`gradtrace.distribute.Replicas.gate`).
- ``"variable"``: each variable's ``update_step`` (its slots included) runs only
  if the gradient it receives is free of NaN/Inf (and the step's ids and labels
  were not replaced), so it waits for its own gradient's check only. No
  non-finite value ever enters a weight or a slot, but a step that holds one
  variable updates the others; ``iterations`` advances; detectors that halt
  stop training after the step. Where the optimizer does not update one
  variable at a time (see :func:`gradtrace._keras_compat.updates_one_variable_at_a_time`),
  or under a strategy, the step gate is used, with a warning.
- ``None``: nothing waits; findings are reported at their step and detectors
  that halt stop training after it (a step whose ids or labels were replaced is
  still held: it did not train on your data).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from gradtrace import _keras_compat as compat
from gradtrace import distribute
from gradtrace import hooks


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


GUARDS = ("step", "variable", None)


def check_guard(guard):
    if guard not in GUARDS:
        raise ValueError(f"guard={guard!r} is not allowed: pass 'step' (the default: a step with a finding is "
                         "held whole), 'variable' (each variable's update is held only if its own gradient has "
                         "NaN/Inf: cheaper, but the other variables of such a step are updated) or None (nothing "
                         "held: findings are reported, halting detectors stop training after the step).")
    return guard


def guard_for(guard, optimizer, warn_once):
    """The guard ``optimizer``'s update gets: ``"variable"`` falls back to the step gate (said once through
    ``warn_once(key, message)``) where the optimizer does not update one variable at a time, or under a
    strategy."""
    if guard != "variable" or (distribute.current() is None and compat.updates_one_variable_at_a_time(optimizer)):
        return guard
    warn_once(f"guard:{id(optimizer)}", f"guard='variable' needs an optimizer that updates one variable at a time, "
              f"outside a distribution strategy; {type(optimizer).__name__} here does not, so its updates are held "
              "whole (guard='step').")
    return "step"


def per_variable(ctx, optimizer, original, grads, variables, hold):
    """``guard="variable"``: the optimizer's ``update_step`` of each variable runs only if the gradient it is
    given (after Keras' clipping) has a finite sum (no NaN/Inf) and ``hold`` is False; returns whether every variable
    was updated. When one was not, the rollback variables (BatchNorm statistics) get their saved values
    back: the forward pass that made them is the one that went wrong."""
    inner = optimizer.update_step
    oks = []

    def update_step(gradient, variable, learning_rate):
        # one reduction: a tensor holding a NaN or an Inf always has a non-finite sum
        values = gradient.values if isinstance(gradient, tf.IndexedSlices) else gradient
        ok = tf.logical_and(tf.math.is_finite(tf.reduce_sum(values)), tf.logical_not(hold))
        oks.append(ok)

        def update():
            inner(gradient, variable, learning_rate)
            return tf.constant(True)

        return tf.cond(ok, update, lambda: tf.constant(False))

    restore = hooks.set_on_instance(optimizer, "update_step", update_step)
    try:
        original(grads, variables)
    finally:
        restore()
    committed = tf.reduce_all(tf.stack(oks)) if oks else tf.logical_not(hold)
    if ctx.rollback:
        tf.cond(committed, lambda: tf.constant(True), lambda: restored(ctx.rollback, ctx.saved))
    return committed


def gate(ctx, update, original, grads, variables, changed, guard="step", optimizer=None):
    """The update of a detecting step: held when a blocking detector fired on it, ids or labels were
    replaced, an earlier update of this step was held, or a stop earlier in this execution; committed
    otherwise. A step that commits nothing (a held step measured in full, a replay) is always held."""
    if not ctx.plan.commits:
        return restored(ctx.rollback, ctx.saved)
    blocking = ctx.blocking if guard == "step" else []
    if not blocking and changed is None and guard != "variable":
        # (a stop earlier in this execution still holds the rest of it: a variable read, nothing waits)
        if guard is None and ctx.blocking:
            return gated(tf.logical_or(ctx.held, update.record.blocked), original, grads, variables,
                         ctx.rollback, ctx.saved)
        return applied(original, grads, variables)
    hold = tf.logical_or(ctx.held, update.record.blocked)
    if changed is not None:
        hold = tf.logical_or(hold, changed)
    if guard == "variable":
        return per_variable(ctx, optimizer, original, grads, variables, hold)
    block = tf.logical_or(update.blocks, hold) if blocking else hold
    # (the statistics, and so block, are the same on every replica)
    return gated(block, original, grads, variables, ctx.rollback, ctx.saved)
