"""The variables a watched step writes for the host (:class:`Record`), and what writes them.

On the first step of an execution at which a detector fired, the step writes
its flags, values, statistics and logs (and, for a snapshot, its batch) into
a handful of variables, in-graph; the host reads one boolean per call. At every
traced step it also writes a few columns of its statistics into the per-layer
history's device buffer (:mod:`gradtrace.history`).
"""

from __future__ import annotations

import tensorflow as tf

from gradtrace import _keras_compat as compat
from gradtrace import history
from gradtrace import stats as st

_HISTORY_COLUMNS = [st.COL[c] for c in history.COLUMNS]


def slot(t, name, shape=None):
    """A variable (outside any strategy, one per replica trace) that can hold ``t``."""
    t = tf.convert_to_tensor(t)
    static = t.shape if shape is None else shape
    dtype = t.dtype
    if static.is_fully_defined():
        return compat.plain_variable(lambda: tf.zeros(static, dtype), name=name)
    rank = static.rank if static.rank else 1
    return compat.plain_variable(lambda: tf.zeros([0] * rank, dtype), name=name, shape=tf.TensorShape(None))


def batch_leaves(data):
    """The tensors of a batch (composite tensors expanded), without the ``None`` of an optional input left out."""
    return [t for t in tf.nest.flatten(data, expand_composites=True) if t is not None]


def replica_id():
    ctx = tf.distribute.get_replica_context()
    if ctx is None:
        return 0
    value = tf.get_static_value(ctx.replica_id_in_sync_group)
    return int(value) if value is not None else 0


class Record:
    """The variables one replica's step writes for the host (see the module docstring)."""

    def __init__(self, update, step, batch=None):
        self.any = compat.plain_variable(False, name="gradtrace_any")
        self.blocked = compat.plain_variable(False, name="gradtrace_blocked")
        self.fired = slot(update.fired, "gradtrace_fired")
        self.values = slot(update.values, "gradtrace_values")
        self.stats = slot(update.matrix, "gradtrace_stats")
        self.last = slot(update.matrix, "gradtrace_last_stats")
        self.step = slot(step, "gradtrace_step")
        self.last_step = slot(step, "gradtrace_last_step")
        self.committed = compat.plain_variable(True, name="gradtrace_committed")
        self.faults = None if update.faults is None else slot(update.faults, "gradtrace_faults")
        self.histograms = None if update.histograms is None else slot(update.histograms, "gradtrace_histograms")
        # the failing batch's components (composite tensors expanded), any shape
        self.batch = None if batch is None else [slot(t, "gradtrace_batch", tf.TensorShape(None)) for t in batch]
        self.batch_kept = None  # under XLA: the batch was kept outside the XLA cluster in this execution
        self.logs = {}  # the failing step's own logs (scalars), as its train_step returned them
        # the per-layer history's device buffer: a few columns of every traced step, drained by the host
        # every history.BUFFER traced steps (gradtrace.history.Drain)
        self.hist = history.DeviceBuffer(int(update.matrix.shape[0]))

    def keep_logs(self, logs):
        """Slots for the step's scalar logs (made at the first trace)."""
        if not self.logs and isinstance(logs, dict):
            for k, v in logs.items():
                if isinstance(v, (tf.Tensor, tf.Variable)) and v.shape.rank == 0 and (
                        v.dtype.is_floating or v.dtype.is_integer):
                    self.logs[k] = slot(tf.cast(v, tf.float32), f"gradtrace_log_{len(self.logs)}")
        return {k: logs[k] for k in self.logs}

    def reset(self):
        self.any.assign(False)
        self.blocked.assign(False)
        if self.batch_kept is not None:
            self.batch_kept.assign(False)

    def write(self, update, step, logs, data, stopping, every_statistic, traced, keep_history=True):
        """In-graph, after the update's gate: the first firing step of the execution fills the record
        (``stopping``: the indices of the detectors whose action stops training; such a finding holds the
        rest of the execution too); every traced step writes the last statistics and the history buffer."""
        kept = self.keep_logs(logs)
        first = tf.logical_and(tf.reduce_any(update.per_detector), tf.logical_not(self.any))

        def fill():
            self.fired.assign(update.fired)
            self.values.assign(update.values)
            # nan/inf: exact in the batch and the loss, flags in a layer's tensors (see gradtrace.stats)
            self.stats.assign(update.matrix if every_statistic else update.exact_counts(update.matrix))
            self.step.assign(step)
            self.committed.assign(update.committed)
            if self.faults is not None:
                self.faults.assign(update.faults)
            for k, v in kept.items():
                self.logs[k].assign(tf.cast(v, tf.float32))
            if self.batch is not None:
                for v, t in zip(self.batch, batch_leaves(data)):
                    v.assign(t)
            if stopping:
                stops = tf.reduce_any(tf.gather(update.per_detector, stopping))
                self.blocked.assign(tf.logical_and(stops, tf.logical_not(update.committed)))
            self.any.assign(True)
            return tf.constant(True)

        tf.cond(first, fill, lambda: tf.constant(False))
        if traced:
            self.last.assign(update.matrix)
            self.last_step.assign(step)
            if keep_history:
                self.hist.write(tf.gather(update.matrix, _HISTORY_COLUMNS, axis=1), step)
        if self.histograms is not None:
            self.histograms.assign(update.histograms)


def record_for(segment, update, ctx, keep_batch=True):
    """This replica's record of ``segment`` (made at its first trace; with the failing batch's variables
    unless the batch is kept outside the step, under XLA, or ``keep_batch`` is False)."""
    rid = replica_id()
    if rid not in segment.records:
        batch = None
        if keep_batch and not ctx.variant.batch_outside:
            batch = batch_leaves(ctx.data)
            if ctx.variant.batch_structure is None:
                ctx.variant.batch_structure = ctx.data
        segment.records[rid] = Record(update, ctx.step, batch)
    return segment.records[rid]


def keep_batch(variant, data):
    """Under XLA, outside the XLA cluster: this replica's batch into its records, on the first firing step
    of the execution (in-graph). The batch's variables are made at the first call."""
    rid = replica_id()
    leaves = batch_leaves(data)
    if variant.batch_structure is None:
        variant.batch_structure = data
    for segment in variant.segments:
        rec = segment.records.get(rid)
        if rec is None:
            continue
        if rec.batch is None:
            rec.batch = [slot(t, "gradtrace_batch", tf.TensorShape(None)) for t in leaves]
            rec.batch_kept = compat.plain_variable(False, name="gradtrace_batch_kept")

        def keep(rec=rec):
            for v, t in zip(rec.batch, leaves):
                v.assign(t)
            rec.batch_kept.assign(True)
            return tf.constant(True)

        tf.cond(rec.any.read_value() & tf.logical_not(rec.batch_kept.read_value()), keep,
                lambda: tf.constant(False))
    return tf.constant(True)
