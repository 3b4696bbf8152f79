"""Running the step under ``tf.distribute``: one small all-reduce, and a gated commit.

Under a strategy with several replicas each replica runs the step on its
shard of the batch. gradtrace then

- gathers every replica's per-row base quantities into every replica with one
  ``all_reduce(SUM)`` of a ``[replicas, rows, k]`` tensor in which each replica
  fills only its own slice (``ReduceOp`` has no MAX or MIN, and this also
  keeps each replica's own numbers for the report), and combines them into
  global statistics (:func:`gradtrace.stats.combine`): sums and counts
  summed, maxima maxed, minima min'd, spreads pooled, a unit dead only if it
  is dead on every replica. Every replica then holds the same statistics, so
  the detectors make the same decision (and keep the same state) everywhere;
- commits or holds the step. ``MirroredStrategy`` cannot put a
  synchronisation point (the optimizer's gradient all-reduce) inside a
  ``tf.cond`` in replica context, so the decision is taken in cross-replica
  context through ``merge_call``, the way Keras' ``LossScaleOptimizer`` skips
  a step. Strategies that need no ``merge_call`` (``MultiWorkerMirrored``)
  take the ``tf.cond`` in replica context.
"""

from __future__ import annotations

import tensorflow as tf


class Replicas:
    """The replica context of the step being traced (``None`` from :func:`current` on one replica)."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.n = int(ctx.num_replicas_in_sync)
        self.id = tf.cast(ctx.replica_id_in_sync_group, tf.int32)

    def gather(self, t):
        """``[n, *t.shape]``: every replica's ``t``, in replica order, on every replica."""
        t = tf.convert_to_tensor(t)
        mine = tf.reshape(tf.equal(tf.range(self.n), self.id), [self.n] + [1] * t.shape.rank)
        # where, not a product with a one-hot mask: 0 * inf would put NaN in the other slots
        spread = tf.where(mine, t[None], tf.zeros_like(t)[None])
        return self.ctx.all_reduce(tf.distribute.ReduceOp.SUM, spread)

    def sum(self, t):
        return self.ctx.all_reduce(tf.distribute.ReduceOp.SUM, t)

    def gate(self, block, commit, commit_args, hold, hold_args):
        """``tf.cond(block, hold, commit)`` across replicas; ``block`` must agree on every replica.

        ``commit(*commit_args)`` runs in replica context on each replica's own
        arguments; ``hold(hold_args)`` runs with the first replica's (values
        that are the same on every replica), in cross-replica context where
        the strategy needs ``merge_call``.
        """
        if tf.__internal__.distribute.strategy_supports_no_merge_call():
            return tf.cond(block, lambda: hold(hold_args), lambda: commit(*commit_args))

        def cross(distribution, block, commit_args, hold_args):
            first = lambda v: distribution.experimental_local_results(v)[0]  # noqa: E731

            def do_commit():
                distribution.extended.call_for_each_replica(commit, args=commit_args)
                return tf.constant(True)

            def do_hold():
                hold(tf.nest.map_structure(first, hold_args))
                return tf.constant(False)

            return tf.cond(first(block), do_hold, do_commit)

        return self.ctx.merge_call(cross, args=(block, commit_args, hold_args))


def current():
    """:class:`Replicas` when the step runs under a strategy with more than one replica."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or int(ctx.num_replicas_in_sync) <= 1:
        return None
    return Replicas(ctx)


def host_batch(data):
    """The batch as host arrays: a distributed batch's per-replica shards concatenated (this worker's)."""
    strategy = tf.distribute.get_strategy()

    def one(v):
        if isinstance(v, tf.distribute.DistributedValues):
            parts = strategy.experimental_local_results(v)
            return tf.concat(list(parts), 0) if len(parts) > 1 else parts[0]
        return v

    return tf.nest.map_structure(one, data)


def built_in_current_scope(model) -> bool:
    """False when a strategy with several replicas is in scope but the model's variables are not its own."""
    strategy = tf.distribute.get_strategy()
    if not tf.distribute.has_strategy() or strategy.num_replicas_in_sync <= 1 or not model.variables:
        return True
    value = model.variables[0].value
    return isinstance(value, tf.distribute.DistributedValues)


def is_chief(strategy) -> bool:
    """True except on the non-chief workers of a multi-worker job (which then write no files)."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return bool(strategy.extended.should_checkpoint)
    return True
