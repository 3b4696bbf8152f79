"""The watched step: Keras' own step, with capture -> statistics -> detectors -> commit or hold.

gradtrace does not replace the step that ``model.fit`` runs. It wraps it:
the model's own ``train_step`` runs unchanged, inside the train function that
Keras' own ``make_train_function`` builds (its ``steps_per_execution`` loop,
its iterator, its replica reduction), and :mod:`gradtrace.hooks` adds three
things while it is traced:

- every nested layer's outputs are recorded (:mod:`gradtrace.capture`);
- the step's ``tape.gradient`` call also returns the gradients of those
  outputs, from the same backward pass;
- the optimizer's ``apply`` becomes :meth:`Engine.on_apply`: the statistics
  the detectors read are packed into one ``[rows, columns]`` tensor, each
  detector's check reads it, and one ``tf.cond`` commits the update or holds it.

A held step leaves the state as it was before the step: the weights, the
optimizer (``iterations`` included), the non-trainable variables (BatchNorm
statistics, seed generator states) and the metric accumulators (Keras feeds
the loss tracker before the gradient; they are restored after the step's logs
are read, so the logs carry the held step's real loss, as under ``model.fit``).

Each step variant is a :class:`Plan` (a small frozen value: does it detect,
commit, measure every statistic, keep tensors) compiled once into a
:class:`Variant`, which holds its own table, detectors and :class:`Record`.
The record is a handful of variables the step writes in-graph on the first
step of an execution at which a detector fired (and the failing batch, for
a snapshot), so nothing extra crosses the replica reduction and the host
reads one boolean per call.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import keras
import tensorflow as tf

from gradtrace import _keras_compat as compat
from gradtrace import distribute
from gradtrace import graph as layer_graph
from gradtrace import history
from gradtrace import hooks
from gradtrace import stats as st
from gradtrace.anomaly import BLOCKING, DetectorError
from gradtrace.capture import Recorder
from gradtrace.heads import loss_kind, loss_object_kind

KEY = "__gradtrace__"
# a step Keras' fit calls returns, with its logs, whether a detector has fired and not yet been handled (one
# boolean the host reads off the step's outputs, instead of one variable read per update)
FIRED = "__gradtrace_fired__"
_HISTORY_COLUMNS = [st.COL[c] for c in history.COLUMNS]
# the targets' and the model outputs' minimum and maximum are measured at every traced step
# (small tensors) so that the head/loss checks can read them under any strategy
RANGE = ("min", "max")
# every detector's in-graph check runs under this name scope, so a failing op names its detector
DETECTOR_SCOPE = "gradtrace_detector_"
STOPPING = ("halt", "raise")


@dataclass(frozen=True)
class Plan:
    """One step variant.

    - ``traced``: capture every layer (False: the weight gradients' sums only, for ``trace_every``);
    - ``mode``: ``"train"`` (detect; commit unless a blocking detector fired), ``"force"``
      (commit, detect nothing: the redo of a snapshotted step), ``"report"`` (measure every
      statistic, commit nothing: a held step, measured in full), ``"inspect"`` (measure every
      statistic, run the detectors, commit nothing, keep every tensor: replay);
    - ``summary_bins``: also measure every statistic and histograms (TensorBoard).
    """

    traced: bool = True
    mode: str = "train"
    summary_bins: int = 0

    @property
    def detects(self) -> bool:
        return self.mode in ("train", "inspect")

    @property
    def commits(self) -> bool:
        return self.mode in ("train", "force")

    @property
    def every_statistic(self) -> bool:
        return bool(self.summary_bins) or self.mode in ("report", "inspect")

    @property
    def returns_result(self) -> bool:
        """The step returns its statistics with its logs (it runs on a batch the host holds)."""
        return self.mode in ("report", "inspect")


TRACED = Plan(True)
UNTRACED = Plan(False)
INSPECT = Plan(True, "inspect")


@dataclass
class StepResult:
    """What the gated update of one traced step computed."""

    table: object
    matrix: object
    fired: object
    values: object
    per_detector: object
    committed: object
    faults: object
    collector: object
    histograms: object = None
    record: object = None


def _slot(t, name, shape=None):
    """A variable (outside any strategy, one per replica trace) that can hold ``t``."""
    t = tf.convert_to_tensor(t)
    static = t.shape if shape is None else shape
    dtype = t.dtype
    if static.is_fully_defined():
        return compat.plain_variable(lambda: tf.zeros(static, dtype), name=name)
    rank = static.rank if static.rank else 1
    return compat.plain_variable(lambda: tf.zeros([0] * rank, dtype), name=name, shape=tf.TensorShape(None))


class Record:
    """The variables one replica's step writes for the host (see the module docstring)."""

    def __init__(self, result, step, histograms=None, batch=None):
        self.any = compat.plain_variable(False, name="gradtrace_any")
        self.blocked = compat.plain_variable(False, name="gradtrace_blocked")
        self.fired = _slot(result.fired, "gradtrace_fired")
        self.values = _slot(result.values, "gradtrace_values")
        self.stats = _slot(result.matrix, "gradtrace_stats")
        self.last = _slot(result.matrix, "gradtrace_last_stats")
        self.step = _slot(step, "gradtrace_step")
        self.last_step = _slot(step, "gradtrace_last_step")
        self.committed = compat.plain_variable(True, name="gradtrace_committed")
        self.faults = None if result.faults is None else _slot(result.faults, "gradtrace_faults")
        self.histograms = None if histograms is None else _slot(histograms, "gradtrace_histograms")
        # the failing batch's components (composite tensors expanded), any shape
        self.batch = None if batch is None else [_slot(t, "gradtrace_batch", tf.TensorShape(None)) for t in batch]
        self.batch_kept = None  # under XLA: the batch was kept outside the XLA cluster in this execution
        self.logs = {}  # the failing step's own logs (scalars), as its train_step returned them
        # the per-layer history's device buffer (gradtrace.history): a few columns of every traced
        # step, drained by the host every history.BUFFER traced steps
        rows = int(result.matrix.shape[0])
        self.hist = compat.plain_variable(
            lambda: tf.zeros([history.BUFFER, rows, len(history.COLUMNS)], tf.float32), name="gradtrace_hist")
        self.hist_steps = compat.plain_variable(lambda: tf.zeros([history.BUFFER], tf.int64), name="gradtrace_hsteps")
        self.hist_count = compat.plain_variable(lambda: tf.zeros([], tf.int64), name="gradtrace_hcount")

    def keep_logs(self, logs):
        """Slots for the step's scalar logs (made at the first trace)."""
        if not self.logs and isinstance(logs, dict):
            for k, v in logs.items():
                if isinstance(v, (tf.Tensor, tf.Variable)) and v.shape.rank == 0 and (
                        v.dtype.is_floating or v.dtype.is_integer):
                    self.logs[k] = _slot(tf.cast(v, tf.float32), f"gradtrace_log_{len(self.logs)}")
        return {k: logs[k] for k in self.logs}

    def reset(self):
        self.any.assign(False)
        self.blocked.assign(False)
        if self.batch_kept is not None:
            self.batch_kept.assign(False)


class Segment:
    """One gated optimizer update of a step: its table, its detectors, its record per replica.

    Keras' own step applies one update; a custom step may apply several (a GAN's
    discriminator and generator updates), each watched on its own."""

    def __init__(self, index):
        self.index = index
        self.table = None
        self.detectors = []
        self.columns = None  # the statistics its matrix really holds (None: every one)
        self.histogram_rows = None
        self.records = {}  # replica id -> Record
        self.optimizer = ""  # the name the model knows the optimizer by ("optimizer", "d_optimizer")

    def record(self):
        """The record of the first replica (every replica decides alike), or ``None``."""
        return self.records[min(self.records)] if self.records else None

    def reset(self):
        for r in self.records.values():
            r.reset()


class Variant:
    """A :class:`Plan` compiled for one model: one :class:`Segment` per optimizer update of its step."""

    def __init__(self, plan):
        self.plan = plan
        self.segments: list[Segment] = []
        self.batch_structure = None  # the step's data, symbolic: how to rebuild the captured batch
        self.batch_outside = False  # the batch is kept outside the step (XLA): see Engine.keeping_the_batch
        self.inspected = None
        self.function = None
        self.traces = 0  # how many times the step was traced (Python ran it)

    def segment(self, index) -> Segment:
        while len(self.segments) <= index:
            self.segments.append(Segment(len(self.segments)))
        return self.segments[index]

    # the first update's table, detectors and record (Keras' own step has exactly one)
    @property
    def table(self):
        return self.segments[0].table if self.segments else None

    @property
    def detectors(self):
        return self.segments[0].detectors if self.segments else []

    @property
    def columns(self):
        return self.segments[0].columns if self.segments else None

    @property
    def histogram_rows(self):
        return self.segments[0].histogram_rows if self.segments else None

    @property
    def records(self):
        return self.segments[0].records if self.segments else {}

    def record(self):
        return self.segments[0].record() if self.segments else None

    def reset(self):
        for seg in self.segments:
            seg.reset()

    def captured_batch(self, segment=None, strategy=None):
        """The failing batch the step kept (in ``segment``'s record): host tensors (concatenated over
        this worker's replicas), and the same batch distributed as the step took it; ``(None, None)``
        when the step could not keep it."""
        records = (segment or self.segments[0]).records if self.segments else {}
        if not records or any(r.batch is None for r in records.values()):
            return None, None
        shards = []
        for rid in sorted(records):
            values = iter([tf.convert_to_tensor(v) for v in records[rid].batch])
            leaves = [None if leaf is None else next(values)
                      for leaf in tf.nest.flatten(self.batch_structure, expand_composites=True)]
            shards.append(tf.nest.pack_sequence_as(self.batch_structure, leaves, expand_composites=True))
        host = shards[0] if len(shards) == 1 else tf.nest.map_structure(
            lambda *p: tf.concat(list(p), 0), *shards)
        if len(shards) == 1 or strategy is None:
            return host, host
        ids = sorted(records)
        dist = strategy.experimental_distribute_values_from_function(
            lambda c: tf.nest.map_structure(tf.identity, shards[ids.index(int(c.replica_id_in_sync_group))]))
        return host, dist


def _label_units(model):
    """``(units, ignore_class)`` of a sparse crossentropy's labels: the last dimension of the model's
    single output (when the loss is a sparse categorical crossentropy and the shape is known), and the
    label the loss is told to ignore (``ignore_class``, a valid label whatever its value)."""
    if loss_kind(model)[0] != "sparse_categorical_crossentropy":
        return None
    loss = getattr(model, "loss", None)
    loss = loss[0] if isinstance(loss, (list, tuple)) and len(loss) == 1 else loss
    try:
        ignored = loss.get_config().get("ignore_class") if isinstance(loss, keras.losses.Loss) else None
    except Exception:  # a custom Loss without a config
        ignored = None
    outputs = getattr(model, "outputs", None)
    try:
        if outputs and len(outputs) == 1:
            units = outputs[0].shape[-1]
            return (int(units), ignored) if units is not None and int(units) > 1 else None
    except (AttributeError, TypeError, ValueError):
        return None
    return None


def _float_tensors(structure, prefix, integers=False):
    """Flatten a data structure into ``[(name, tensor)]`` of float tensors (and integer ones, as float,
    with ``integers``: class labels are targets too)."""
    out = []
    if isinstance(structure, dict):
        items = sorted(structure.items())
    elif isinstance(structure, (list, tuple)):
        items = [(str(i), v) for i, v in enumerate(structure)]
    else:
        items = [("", structure)]
    for name, value in items:
        if value is None:
            continue
        if isinstance(value, (dict, list, tuple)):
            out.extend(_float_tensors(value, f"{prefix}{name}/", integers))
            continue
        if isinstance(value, (tf.Tensor, tf.Variable)) and value.dtype.is_floating:
            out.append((f"{prefix}{name}".rstrip("/"), value))
        elif integers and isinstance(value, (tf.Tensor, tf.Variable)) and value.dtype.is_integer:
            out.append((f"{prefix}{name}".rstrip("/"), tf.cast(value, tf.float32)))
    return out


def _batch_leaves(data):
    """The tensors of a batch (composite tensors expanded), without the ``None`` of an optional input left out."""
    return [t for t in tf.nest.flatten(data, expand_composites=True) if t is not None]


def _batch_size(x):
    first = next(t for t in tf.nest.flatten(x) if t is not None)
    return tf.shape(first)[0]


def _replica_id():
    ctx = tf.distribute.get_replica_context()
    if ctx is None:
        return 0
    value = tf.get_static_value(ctx.replica_id_in_sync_group)
    return int(value) if value is not None else 0


class Engine:
    """Everything gradtrace adds to one ``fit`` call, on the graph side."""

    # the per-layer history's device buffer is written at every traced step (benchmarks/overhead.py
    # turns it off to measure what it costs)
    keep_history = True

    def __init__(self, model, detectors, actions, tap, optimizers=()):
        self.model = model
        self.detectors = list(detectors)
        for d in self.detectors:
            d.reset()  # a new engine traces anew: its detectors start with fresh state
        self.actions = dict(actions)  # detector name -> action
        self.tap = tap
        # ids are made safe before the lookup only where a detector reports the bad ones (the step is then
        # held); otherwise a bad id fails the lookup exactly as under model.fit
        self.sanitize_ids = any(d.wants_ids and "bad" in d.needs for d in self.detectors)
        # class labels of a sparse crossentropy, checked against the output's units before the loss
        self.label_units = _label_units(model) if any(d.wants_labels for d in self.detectors) else None
        # the statistics the detectors read (each variant computes what its own detectors need)
        self.columns = {c for d in self.detectors for c in d.needs}
        self.variants = {}  # Plan -> Variant
        self.budgets = {}  # (overhead, trace_at_least_every) -> gradtrace.budget.Budget timing these variants
        # the step the model would have run: its own train_step (Keras' unless overridden)
        self.model_train_step = model.train_step
        optimizers = compat.model_optimizers(model, optimizers)
        self.optimizer_names = [name for name, _ in optimizers]
        self.optimizers = [o for _, o in optimizers]
        self._optimizer_label = {id(o): name for name, o in optimizers}
        self._optimizer_hooks = [hooks.OptimizerHook(o, self.on_apply, self.outside_step) for _, o in optimizers]
        self.keep_batch = not bool(getattr(model, "jit_compile", False))
        self._warned = set()

    # -- variants ---------------------------------------------------------------------
    def variant(self, plan) -> Variant:
        if plan not in self.variants:
            self.variants[plan] = Variant(plan)
        return self.variants[plan]

    @property
    def tables(self):
        """``traced -> table`` (of the first update) of the train variants traced so far."""
        return {p.traced: v.table for p, v in self.variants.items()
                if p.mode == "train" and not p.summary_bins and v.table is not None}

    def step_function(self, plan, reports_fired=False):
        """``train_step(data)`` for ``plan``: the model's own step, watched (``reports_fired``: its logs
        carry :data:`FIRED`, for the caller to take out)."""
        variant = self.variant(plan)

        def train_step(data):
            return self._run_step(variant, data, reports_fired=reports_fired)

        return train_step

    def custom_step(self, plan, fn):
        """``fn(*args)`` (a hand-written step) watched under ``plan``: its args are the batch. It returns
        ``(fn's outputs, fired)``: whether a detector has fired (a boolean tensor), or None where the host
        must read the records (under a strategy)."""
        variant = self.variant(plan)

        def step(*args, **kwargs):
            return self._run_step(variant, args, body=lambda: fn(*args, **kwargs), reports_fired=True)

        return step

    def train_function(self, plan):
        """The train function Keras builds around the watched step (iterator in, logs out), made once."""
        variant = self.variant(plan)
        if variant.function is None:
            step = self.step_function(plan, reports_fired=True)
            if self.keep_batch or self.model.run_eagerly or distribute.replicas_of(self.model) > 1:
                # (under a strategy, XLA is Keras' own: a nested XLA function would cross the replicas'
                # synchronisation; Keras resolves jit_compile="auto" to False under any strategy)
                variant.function = compat.make_train_function(self.model, step)
            else:
                compiled = tf.function(step, jit_compile=True, reduce_retracing=True)
                variant.function = compat.make_train_function(self.model, self.keeping_the_batch(variant, compiled),
                                                              jit_compile=False)
        return variant.function

    def keeping_the_batch(self, variant, compiled, custom=False):
        """Under XLA: ``compiled`` (the watched step, compiled with ``jit_compile=True`` as Keras compiles its
        own) and around it, outside the XLA cluster, the failing batch kept for a snapshot (a variable whose
        shape changes cannot live inside an XLA cluster). The batch is Keras' one argument, or (``custom``)
        the arguments of your own step."""
        variant.batch_outside = True

        def step_keeping_the_batch(*data):
            out = compiled(*data)
            self._keep_batch(variant, data if custom else data[0])
            return out

        return step_keeping_the_batch

    def _keep_batch(self, variant, data):
        """This replica's batch into its records, on the first firing step of the execution (in-graph)."""
        rid = _replica_id()
        leaves = _batch_leaves(data)
        if variant.batch_structure is None:
            variant.batch_structure = data
        for segment in variant.segments:
            rec = segment.records.get(rid)
            if rec is None:
                continue
            if rec.batch is None:
                rec.batch = [_slot(t, "gradtrace_batch", tf.TensorShape(None)) for t in leaves]
                rec.batch_kept = compat.plain_variable(False, name="gradtrace_batch_kept")

            def keep(rec=rec):
                for v, t in zip(rec.batch, leaves):
                    v.assign(t)
                rec.batch_kept.assign(True)
                return tf.constant(True)

            tf.cond(rec.any.read_value() & tf.logical_not(rec.batch_kept.read_value()), keep,
                    lambda: tf.constant(False))
        return tf.constant(True)

    def batch_function(self, plan):
        """The watched step compiled as Keras compiles its step, on a batch the host holds."""
        variant = self.variant(plan)
        if variant.function is None:
            variant.function = compat.compile_step(self.model, self.step_function(plan), (KEY,))
        return variant.function

    @contextlib.contextmanager
    def installed(self):
        """The layer tap, the tape hooks and the optimizer hook, for one fit (or one replay)."""
        hooks.install_tape_hooks()
        try:
            self.tap.install()
            for hook in self._optimizer_hooks:
                hook.install()
            yield self
        finally:
            try:
                for hook in self._optimizer_hooks:
                    hook.uninstall()
                self.tap.uninstall()
            finally:
                hooks.uninstall_tape_hooks()

    # -- the step ----------------------------------------------------------------------
    def _detectors_for(self, plan):
        if not plan.detects:
            return []
        return [d for d in self.detectors
                if d.checks_in_step and (plan.traced or d.every_step or d.wants_ids or d.wants_labels)]

    def _run_step(self, variant, data, body=None, reports_fired=False):
        plan = variant.plan
        model = self.model
        variant.traces += 1
        detectors = self._detectors_for(plan)
        blocking = [i for i, d in enumerate(detectors) if self.actions[d.name] in BLOCKING]
        # a step whose ids or labels were made safe (a changed value) is held whatever the action
        sanitizes = self.sanitize_ids or plan.mode in ("force", "report") or (
            body is None and self.label_units is not None)
        restores = bool(blocking) or plan.mode in ("report", "inspect") or sanitizes
        rollback = list(model.non_trainable_variables) if restores else []
        metric_vars = list(getattr(model, "metrics_variables", [])) if restores else []
        saved = [tf.identity(v.value) for v in rollback]
        saved_metrics = [tf.identity(v.value) for v in metric_vars]

        recorder = Recorder(sanitize_ids=self.sanitize_ids or plan.mode in ("force", "report"), keep=plan.traced)
        ctx = hooks.StepContext(plan, recorder)
        recorder.tapes = ctx.open_tapes
        ctx.variant, ctx.detectors, ctx.blocking = variant, detectors, blocking
        ctx.rollback, ctx.saved = rollback, saved
        # under a strategy the per-replica outputs are reduced by Keras: the host reads the records instead
        ctx.reports_fired = reports_fired and not tf.distribute.has_strategy()
        ctx.pairs = body is not None and reports_fired  # a hand-written step returns (outputs, fired)
        ctx.data = data
        unpacked = data if isinstance(data, tuple) and 1 <= len(data) <= 3 else (data,)
        ctx.x, ctx.y, ctx.sample_weight = (tuple(unpacked) + (None, None))[:3]
        ctx.step = None  # the iterations of the step's first optimizer, read before its update
        ctx.labels = None
        if body is None and self.label_units and isinstance(ctx.y, tf.Tensor) and ctx.y.dtype.is_integer:
            # a label outside [0, units) aborts the loss on CPU and gives NaN on GPU: check it first,
            # and let the step complete on label 0 (the detector holds it)
            units, ignored = self.label_units
            ctx.labels = ctx.y if ignored is None else tf.where(tf.equal(ctx.y, ignored), tf.zeros_like(ctx.y), ctx.y)
            bad = (ctx.labels < 0) | (ctx.labels >= units)
            recorder.changed.append(tf.reduce_any(bad))
            data = (ctx.x, tf.where(bad, tf.zeros_like(ctx.y), ctx.y)) + tuple(unpacked[2:])
        with ctx.active():
            logs = self.model_train_step(data) if body is None else body()
        return self._finish(ctx, logs, metric_vars, saved_metrics)

    def _finish(self, ctx, logs, metric_vars, saved_metrics):
        logs = self._finish_logs(ctx, logs, metric_vars, saved_metrics)
        fired = None
        if ctx.reports_fired and ctx.results and ctx.plan.mode == "train":
            fired = tf.reduce_any(tf.stack([res.record.any.read_value() for res in ctx.results]))
        if ctx.pairs:
            return logs, fired
        if fired is not None and isinstance(logs, dict):
            logs = dict(logs)
            logs[FIRED] = fired
        return logs

    def _finish_logs(self, ctx, logs, metric_vars, saved_metrics):
        results, plan = ctx.results, ctx.plan

        def restore_metrics():
            for v, old in zip(metric_vars, saved_metrics):
                v.assign(old)
            return tf.constant(True)

        if not results:  # the step applied no update gradtrace could see: nothing was watched
            if metric_vars and plan.mode == "force":  # a redo held for its replaced ids
                tf.cond(ctx.held, restore_metrics, lambda: tf.constant(False))
            if model_has_weights(self.model) and plan.mode == "train":
                self.warn_once("no_update", f"{type(self.model).__name__}.train_step applied no update through an "
                               f"optimizer gradtrace sees ({', '.join(self.optimizer_names) or 'none'}), so nothing "
                               "in it was checked; it trains exactly as under model.fit. Use the model's optimizers "
                               "(attributes of the model) with apply_gradients or apply to have it watched.")
            return logs
        if plan.returns_result:
            restore_metrics()
            logs = dict(logs) if isinstance(logs, dict) else {"outputs": logs}  # your own step's outputs
            logs[KEY] = [self._result_logs(ctx, res) for res in results]
            return logs
        if metric_vars:  # a held step leaves the metric accumulators as they were (after its logs were read)
            tf.cond(ctx.held, restore_metrics, lambda: tf.constant(False))
        if plan.mode == "train":
            for res in results:
                self._write_record(ctx, res, logs)
        return logs

    @staticmethod
    def _result_logs(ctx, res):
        out = {"fired": res.fired, "values": res.values, "stats": res.matrix, "step": ctx.step,
               "committed": res.committed}
        if res.faults is not None:
            out["replica_faults"] = res.faults
        return out

    def warn_once(self, key, message):
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"gradtrace: {message}", stacklevel=2)

    def _write_record(self, ctx, res, logs):
        rec = res.record
        kept = rec.keep_logs(logs)
        stopping = [i for i, d in enumerate(ctx.detectors) if self.actions[d.name] in STOPPING]
        first = tf.logical_and(tf.reduce_any(res.per_detector), tf.logical_not(rec.any))

        def write():
            rec.fired.assign(res.fired)
            rec.values.assign(res.values)
            rec.stats.assign(res.matrix if ctx.plan.every_statistic else res.collector.exact_counts(res.matrix))
            rec.step.assign(ctx.step)
            rec.committed.assign(res.committed)
            if rec.faults is not None:
                rec.faults.assign(res.faults)
            for k, v in kept.items():
                rec.logs[k].assign(tf.cast(v, tf.float32))
            if rec.batch is not None:
                for v, t in zip(rec.batch, _batch_leaves(ctx.data)):
                    v.assign(t)
            if stopping:  # halt and raise hold the rest of this execution too
                stops = tf.reduce_any(tf.gather(res.per_detector, stopping))
                rec.blocked.assign(tf.logical_and(stops, tf.logical_not(res.committed)))
            rec.any.assign(True)
            return tf.constant(True)

        tf.cond(first, write, lambda: tf.constant(False))
        if ctx.plan.traced:
            rec.last.assign(res.matrix)
            rec.last_step.assign(ctx.step)
        if ctx.plan.traced and self.keep_history:
            slot = tf.math.floormod(rec.hist_count, history.BUFFER)
            rec.hist.scatter_nd_update([[slot]], [tf.gather(res.matrix, _HISTORY_COLUMNS, axis=1)])
            rec.hist_steps.scatter_nd_update([[slot]], [tf.cast(ctx.step, tf.int64)])
            rec.hist_count.assign_add(1)
        if rec.histograms is not None:
            rec.histograms.assign(res.histograms)

    def _make_record(self, ctx, segment, res):
        rid = _replica_id()
        if rid not in segment.records:
            batch = None
            if self.keep_batch and not ctx.variant.batch_outside:
                batch = _batch_leaves(ctx.data)
                if ctx.variant.batch_structure is None:
                    ctx.variant.batch_structure = ctx.data
            segment.records[rid] = Record(res, ctx.step, res.histograms, batch)
        return segment.records[rid]

    # -- the hooked optimizer update -------------------------------------------------------
    def outside_step(self, optimizer):
        """An optimizer update applied outside the watched step (a callback, a second loop)."""
        name = self._optimizer_label.get(id(optimizer), getattr(optimizer, "name", "optimizer"))
        self.warn_once(f"outside:{id(optimizer)}", f"an update of {name} was applied outside the training step "
                       "(from a callback or another loop?); gradtrace does not watch it and applies it as it is.")

    def on_apply(self, ctx, optimizer, original, grads, trainable_variables):
        """``optimizer.apply(grads, trainable_variables)`` inside a watched step: one :class:`Segment`.

        Its rows are the outputs recorded under the tape that computed ``grads`` (and those
        recorded under no tape, not yet part of an earlier update), their gradients, the
        weight gradients the optimizer receives, and that tape's target (the loss). A blocking
        detector holds this update and every later update of the step."""
        grads = list(grads)
        tvars = list(trainable_variables) if trainable_variables is not None \
            else compat.optimizer_trainable_variables(optimizer)
        index = ctx.applies
        ctx.applies += 1
        if ctx.step is None:
            ctx.step = tf.identity(compat.iterations(optimizer))
        plan = ctx.plan
        # ids or labels replaced to let the step complete: such a step is never committed
        changed = tf.reduce_any(tf.stack(ctx.recorder.changed)) if ctx.recorder.changed else None
        if plan.mode == "force":
            # the redo of a snapshotted step: committed unless an update would put a NaN/Inf into a
            # weight or an optimizer slot (then skipped, as LossScaleOptimizer skips such a step; a
            # LossScaleOptimizer is left to skip it itself, and lower its scale)
            scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
            replicas = distribute.current()
            skip = tf.constant(False) if scaled else tf.logical_not(_all_finite(grads))
            if replicas is not None:  # skipped on every replica when one replica's gradients are non-finite
                skip = replicas.sum(tf.cast(skip, tf.float32)) > 0.0
            if changed is not None:
                skip = skip | changed
            skip = skip | ctx.held
            if replicas is not None:
                committed = replicas.gate(skip, lambda g: _applied(original, g, tvars), (grads,),
                                          lambda saved: _restored(ctx.rollback, saved), ctx.saved)
            else:
                committed = tf.cond(skip, lambda: _restored(ctx.rollback, ctx.saved),
                                    lambda: _applied(original, grads, tvars))
            ctx.held = tf.logical_or(ctx.held, tf.logical_not(committed))
            return committed
        variant = ctx.variant
        segment = variant.segment(index)
        segment.optimizer = self._optimizer_label.get(id(optimizer), getattr(optimizer, "name", "optimizer"))
        replicas = distribute.current()
        gradient = ctx.gradient_for(grads)
        if gradient is None and plan.traced:
            self.warn_once(f"no_tape:{segment.optimizer}", f"the gradients applied by {segment.optimizer} were not "
                           "computed by a tf.GradientTape inside the step (no tape), so the layer outputs and their "
                           "gradients cannot be followed; its weight gradients are still checked.")
        calls = ctx.calls_for(gradient)
        outputs = [t for c in calls for t in c.outputs]
        if gradient is not None:
            by_call = dict(zip(map(id, ctx.recorder.calls), ctx.output_gradients(gradient)))
            ograds = [g for c in calls for g in by_call[id(c)]]
        else:
            ograds = [None] * len(outputs)
        # statistics are of the true gradients: undo the loss scaling (mixed precision)
        loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        unscale = None
        if loss_scaled:
            scale = optimizer.dynamic_scale if optimizer.built else optimizer.initial_scale
            unscale = 1.0 / tf.cast(tf.convert_to_tensor(scale), tf.float32)
        elif getattr(optimizer, "loss_scale_factor", None) is not None:
            unscale = tf.constant(1.0 / float(optimizer.loss_scale_factor), tf.float32)
        loss = None
        if gradient is not None and gradient.target.shape.rank == 0:
            loss = tf.cast(gradient.target, tf.float32)
            if unscale is not None:
                loss = loss * unscale

        detectors = ctx.detectors
        # only what this variant's detectors read (an untraced step: the sums of its rows)
        needs = st.ALL_BASE if plan.every_statistic else st.base_needs({c for d in detectors for c in d.needs})
        # no loss compiled (a custom train_step): the last Keras loss of a known kind called under this tape
        loss_call = ctx.loss_call_for(gradient) if loss_kind(self.model)[0] == "other" else None
        if loss_call is not None and loss_object_kind(loss_call.loss)[0] in ("other", "several"):
            loss_call = None
        table, matrix, collector, ids = self._rows(ctx, calls, outputs, loss, tvars, grads, ograds, unscale,
                                                   replicas, needs, optimizer, loss_call)
        if plan.mode == "train" and not plan.summary_bins:
            segment.columns = st.computed_columns(needs, self.columns)
        examples = _batch_size(ctx.x) * (replicas.n if replicas is not None else 1)
        view = st.StatsView(table, matrix, ctx.step, ids, loss_scaled=loss_scaled, lookups=collector.lookups,
                            alive=getattr(collector, "alive", None), unit_rows=collector.unit_rows(),
                            examples=tf.cast(examples, tf.float32))
        fired, values = [], []
        for d in detectors:
            try:
                with tf.name_scope(f"{DETECTOR_SCOPE}{d.name}"):
                    f, v = d.check(view)
            except Exception as e:  # traced: the step has not run, nothing was applied
                raise DetectorError(d.name, "check", e) from e
            fired.append(tf.cast(tf.reshape(f, [len(table)]), tf.bool))
            values.append(tf.cast(tf.reshape(v, [len(table)]), tf.float32))
        if detectors and len(table):
            fired_m, values_m = tf.stack(fired), tf.stack(values)
            per_detector = tf.reduce_any(fired_m, axis=1)
        else:
            fired_m = tf.zeros([len(detectors), len(table)], tf.bool)
            values_m = tf.zeros([len(detectors), len(table)], tf.float32)
            per_detector = tf.zeros([len(detectors)], tf.bool)
        segment.table, segment.detectors = table, detectors
        histograms = None
        if plan.summary_bins:
            segment.histogram_rows, histograms = collector.histograms(matrix, ("output", "gradient"),
                                                                      plan.summary_bins)
        rollback = ctx.rollback

        def commit(grads):
            return _applied(original, grads, tvars)

        def hold(saved):
            for v, old in zip(rollback, saved):
                v.assign(old)
            return tf.constant(False)

        result = StepResult(table, matrix, fired_m, values_m, per_detector, None, collector.faults, collector,
                            histograms)
        if plan.mode == "train":
            result.record = self._make_record(ctx, segment, result)
        if plan.mode == "inspect" and index == 0:
            paths = [p for c in calls for p in c.output_paths]
            variant.inspected = {
                "loss": loss, "y_pred": ctx.recorder.y_pred,
                "outputs": dict(zip(paths, outputs)),
                "gradients": dict(zip(paths, ograds)),
                "weight_gradients": list(zip(tvars, grads)),
            }
        if not plan.commits:
            committed = hold(ctx.saved)
        elif ctx.blocking or changed is not None:
            block = tf.reduce_any(tf.gather(per_detector, ctx.blocking)) if ctx.blocking else tf.constant(False)
            if changed is not None:
                block = tf.logical_or(block, changed)
            # an earlier update of this step was held, or a stop earlier in this execution
            block = tf.logical_or(tf.logical_or(block, ctx.held), result.record.blocked)
            if replicas is not None:  # the statistics, and so block, are the same on every replica
                committed = replicas.gate(block, commit, (grads,), hold, ctx.saved)
            else:
                committed = tf.cond(block, lambda: hold(ctx.saved), lambda: commit(grads))
        else:
            committed = commit(grads)
        result.committed = committed
        ctx.held = tf.logical_or(ctx.held, tf.logical_not(committed))
        ctx.results.append(result)
        return committed

    def _rows(self, ctx, calls, outputs, loss, tvars, wgrads, ograds, unscale, replicas=None, needs=None,
              optimizer=None, loss_call=None):
        """Register every captured tensor of the step with a stats Collector (in a fixed order).
        The model's output (head) rows and the targets also get their minimum and maximum."""
        traced = ctx.plan.traced
        recorder = ctx.recorder
        n_calls = len(recorder.calls)
        c = st.Collector()
        ids, heads = {}, []
        # the model's predictions are what the compiled loss reads; a custom step's own Keras loss (no loss
        # compiled) reads its y_pred (its y_true are the step's own making, label noise included: not checked)
        y_pred = recorder.y_pred if loss_call is None else loss_call.y_pred
        predictions = [t for t in tf.nest.flatten(y_pred) if t is not None] if traced else []
        if traced:
            for name, t in _float_tensors(ctx.x, ""):
                c.add("input", "inputs", t, name=name, shape=tuple(t.shape))
            for name, t in _float_tensors(ctx.y, "", integers=True):
                c.add("target", "targets", t, name=name, shape=tuple(t.shape), always=RANGE)
        if getattr(ctx, "labels", None) is not None:
            units = self.label_units[0]
            c.add("labels", "targets", ids=(ctx.labels, units),
                  layer_class="labels", name="labels", input_dim=units, shape=tuple(ctx.labels.shape))
        order = {}
        for i, call in enumerate(calls):
            order.setdefault(id(call.layer), i)
            cls = type(call.layer).__name__
            if call.ids is not None:
                dim = int(call.layer.input_dim)
                ids[c.add("ids", call.path, ids=(call.ids, dim), layer_class=cls,
                          order=i, input_dim=dim, shape=tuple(call.ids.shape))] = call.ids
            for p, t in zip(call.output_paths, call.outputs):
                # the layer that produced a prediction (the innermost: a nested model's call, recorded
                # after its own layers, returns its last layer's tensor)
                head = any(t is q for q in predictions) and not any(t is q for q in heads)
                c.add("output", p, t, relu=call.relu, activation=call.activation, layer_class=cls,
                      shape=tuple(t.shape), order=i, head=head, always=RANGE if head else ())
                if head:
                    heads.append(t)
        if loss is not None:
            kind, from_logits = loss_kind(self.model) if loss_call is None else loss_object_kind(loss_call.loss)
            c.add("loss", "loss", loss, layer_class="loss", order=n_calls, loss_kind=kind,
                  from_logits=from_logits)
        owners = self.weight_owners()

        def owner(v):
            # a variable shared by several layers (a retrieval layer handed an Embedding's table) is filed
            # under the layer that used it in this step (the first to run), else the deepest that owns it
            candidates = owners.get(id(v), [(self.model.name, type(self.model).__name__, None)])
            ran = [c for c in candidates if id(c[2]) in order]
            path, cls, layer = min(ran, key=lambda c: order[id(c[2])]) if ran else candidates[0]
            return path, cls, order.get(id(layer), n_calls)

        def scaled(g):
            return g if unscale is None else tf.cast(g, tf.float32) * unscale

        if not traced:
            # Untraced steps (trace_every > 1) still refuse a non-finite update: one sum
            # per weight gradient; NaN/Inf counts only on the step where a sum is not finite.
            for v, g in zip(tvars, wgrads):
                if g is None:
                    continue
                g_t = g.values if isinstance(g, tf.IndexedSlices) else g
                path, cls, o = owner(v)
                c.add("weight_gradient", path, scaled(g_t), layer_class=cls, name=v.name, shape=tuple(v.shape),
                      order=o)
            table, matrix, _ = c.build(needs=needs, replicas=replicas)
            table.optimizer = optimizer
            return table, matrix, c, ids
        k = 0
        grad_of = {}
        for c_i, call in enumerate(calls):
            for p, t in zip(call.output_paths, call.outputs):
                g = ograds[k]
                k += 1
                if g is not None:
                    g = scaled(tf.convert_to_tensor(g))
                    grad_of[id(t)] = g
                    c.add("gradient", p, g, layer_class=type(call.layer).__name__, shape=tuple(t.shape), order=c_i)
        # each Embedding call's looked-up rows (its output) and their gradients, beside its ids
        by_path = {call.path: call for call in calls}
        for i, ids_t in ids.items():
            call = by_path.get(c.rows[i].path)
            rows = call.outputs[0] if call is not None and len(call.outputs) == 1 else None
            if rows is not None and rows.shape.rank == ids_t.shape.rank + 1:
                c.lookups[i] = st.Lookup(ids_t, rows, grad_of.get(id(rows)), call.layer)
        # Weights only change through (gated) updates, so they are measured on reported
        # steps only, unless a detector needs their norm every step (update_ratio).
        deferred = "update_ratio" not in self.columns and not needs >= st.ALL_BASE
        for v, g in zip(tvars, wgrads):
            path, cls, o = owner(v)
            meta = dict(layer_class=cls, name=v.name, shape=tuple(v.shape), order=o)
            if isinstance(g, tf.IndexedSlices):
                # never densify an embedding table: the looked-up rows and their gradient slices
                rows_of = (lambda v=v, idx=g.indices: tf.gather(v.value, idx))
                w_row = c.add("weight", path, rows_of if deferred else rows_of(), deferred=deferred, **meta)
                g_t = scaled(g.values)
            else:
                value_of = (lambda v=v: v.value)
                w_row = c.add("weight", path, value_of if deferred else value_of(), deferred=deferred, **meta)
                g_t = None if g is None else scaled(g)
            if g_t is not None:
                c.ratio(c.add("weight_gradient", path, g_t, **meta), w_row)
        lr = compat.current_learning_rate(optimizer)
        lr = None if lr is None else tf.cast(lr, tf.float32)
        table, matrix, _ = c.build(lr=lr, needs=needs, replicas=replicas)
        table.graph = layer_graph.build(calls, loss, lambda call: call.path)
        table.optimizer = optimizer
        return table, matrix, c, ids

    def weight_owners(self):
        """``id(variable) -> [(layer path, layer class, layer)]``: the layers that own it, deepest first (a
        layer's weights include its sublayers'; a variable handed to another layer is owned by both)."""
        owners = {}
        layers = sorted(self.tap.layers.values(), key=lambda l: -self.tap.path_of(l).count("/"))
        for layer in layers:
            for v in layer.trainable_weights:
                entry = (self.tap.path_of(layer), type(layer).__name__, layer)
                mine = owners.setdefault(id(v), [])
                # a parent owns its sublayers' weights through them: keep only the deepest of one branch
                if not any(p.startswith(entry[0] + "/") for p, _, _ in mine):
                    mine.append(entry)
        return owners


def model_has_weights(model) -> bool:
    return bool(model.trainable_weights)


def _restored(variables, saved):
    for v, old in zip(variables, saved):
        v.assign(old)
    return tf.constant(False)


def _all_finite(grads):
    """True when every gradient (an IndexedSlices' values) is free of NaN/Inf."""
    checks = [tf.reduce_all(tf.math.is_finite(g.values if isinstance(g, tf.IndexedSlices) else g))
              for g in grads if g is not None]
    return tf.reduce_all(tf.stack(checks)) if checks else tf.constant(True)


def _applied(original, grads, tvars):
    original(grads, tvars)
    return tf.constant(True)
