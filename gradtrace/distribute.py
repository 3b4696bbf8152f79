"""Running the step under ``tf.distribute``: one small all-reduce, and a gated commit.

Under a strategy with several replicas each replica runs the step on its
shard of the batch. gradtrace then

- gathers every replica's per-row base quantities into every replica as one
  ``[replicas, rows, k]`` tensor (this also keeps each replica's own numbers
  for the report), and combines them into
  global statistics (:func:`gradtrace.stats.combine`): sums and counts
  summed, maxima maxed, minima min'd, spreads pooled, a unit dead only if it
  is dead on every replica. Every replica then holds the same statistics, so
  the detectors make the same decision (and keep the same state) everywhere;
- commits or holds the step. ``MirroredStrategy`` cannot put a
  synchronisation point (the optimizer's gradient all-reduce) inside a
  ``tf.cond`` in replica context, so the decision is taken in cross-replica
  context through ``merge_call``, the way Keras' ``LossScaleOptimizer`` skips
  a step (``MultiWorkerMirroredStrategy`` on CPUs too). Where the strategy
  takes no ``merge_call`` (XLA on GPUs) the ``tf.cond`` runs in replica context.

How the statistics travel matters beyond the step. On one host
(``MirroredStrategy``) every replica is a thread of this process, so the
gather is a ``merge_call`` that stacks the replicas' local tensors: no
collective op at all. Collective ops are keyed by (group, instance) numbers
that every new strategy object restarts from the same values (group 1,
instance 100), while TensorFlow's runtime remembers, for the life of the
process, the shape that each key first carried. An all-reduce of gradtrace's
own at instance 100 would therefore make the first gradient all-reduce of any
*later* strategy in the process fail with "Shape mismatch in the collective
instance 100" (the bug a sweep of fits in one process used to hit). With the
merge_call gather, gradtrace's step issues exactly the collectives Keras' own
step issues, in the same order, so it leaves the process's collective state
exactly as ``model.fit`` leaves it. Across workers
(``MultiWorkerMirroredStrategy``) a collective is the only way: there the
gather is one ``all_reduce(SUM)`` in which each replica fills only its own
slice (``ReduceOp`` has no MAX or MIN).
"""

from __future__ import annotations

import tensorflow as tf

from gradtrace import _keras_compat as compat


class Replicas:
    """The replica context of the step being traced (``None`` from :func:`current` on one replica)."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.n = int(ctx.num_replicas_in_sync)
        self.id = tf.cast(ctx.replica_id_in_sync_group, tf.int32)
        # every replica in this process (one host) and merge_call available: exchange through
        # merge_call, with no collective op (see the module docstring). Across workers, merge_call
        # only sees this worker's replicas, so the exchange must be a collective.
        strategy = tf.distribute.get_strategy()
        self.local = compat.uses_merge_call() and len(strategy.extended.worker_devices) == self.n

    def gather(self, t, *summed):
        """``[n, *t.shape]``: every replica's ``t``, in replica order, on every replica;
        followed by the sum over replicas of each tensor of ``summed``."""
        t = tf.convert_to_tensor(t)
        if self.local:
            def merge(distribution, t, *summed):
                local = distribution.experimental_local_results
                return (tf.stack(local(t)),) + tuple(tf.add_n(local(s)) for s in summed)

            out = self.ctx.merge_call(merge, args=(t,) + tuple(summed))
            return out[0] if not summed else out
        mine = tf.reshape(tf.equal(tf.range(self.n), self.id), [self.n] + [1] * t.shape.rank)
        # where, not a product with a one-hot mask: 0 * inf would put NaN in the other slots
        spread = tf.where(mine, t[None], tf.zeros_like(t)[None])
        out = (self.ctx.all_reduce(tf.distribute.ReduceOp.SUM, spread),) + tuple(self.sum(s) for s in summed)
        return out[0] if not summed else out

    def sum(self, t):
        """The sum of ``t`` over replicas, on every replica."""
        if self.local:
            return self.ctx.merge_call(lambda distribution, t: tf.add_n(distribution.experimental_local_results(t)),
                                       args=(t,))
        return self.ctx.all_reduce(tf.distribute.ReduceOp.SUM, t)

    def gate(self, block, commit, commit_args, hold, hold_args):
        """``tf.cond(block, hold, commit)`` across replicas; ``block`` must agree on every replica.

        ``commit(*commit_args)`` runs in replica context on each replica's own
        arguments; ``hold(hold_args)`` runs with the first replica's (values
        that are the same on every replica), in cross-replica context where
        the strategy needs ``merge_call``.
        """
        if not compat.uses_merge_call():
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


def replicas_of(model) -> int:
    """How many replicas ``model``'s strategy runs the step on (1 without a strategy)."""
    strategy = getattr(model, "distribute_strategy", None)
    return int(getattr(strategy, "num_replicas_in_sync", 1) or 1)


def current():
    """:class:`Replicas` when the step runs under a strategy with more than one replica."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or int(ctx.num_replicas_in_sync) <= 1:
        return None
    return Replicas(ctx)


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
