"""The engine: everything gradtrace adds to one ``fit`` call, on the graph side (see :mod:`gradtrace.step`)."""

from __future__ import annotations

import contextlib
import warnings

import keras
import tensorflow as tf

from gradtrace import _keras_compat as compat
from gradtrace import distribute
from gradtrace import hooks
from gradtrace import stats as st
import gradtrace.step.gate as gate
import gradtrace.step.record as records
from gradtrace.anomaly import DetectorError
from gradtrace.step.context import start
from gradtrace.step.plan import DETECTOR_SCOPE, FIRED, KEY, GatedUpdate, Layout, Variant
from gradtrace.step.rows import Rows, label_units, update_tensors, weight_owners


class Engine:
    """Everything gradtrace adds to one ``fit`` call, on the graph side: one :class:`Variant` per
    :class:`Plan`, the functions that run them, and the hooks that watch them."""

    def __init__(self, model, detectors, actions, tap, optimizers=(), keep_history=True, guard="step"):
        self.model = model
        self.detectors = list(detectors)
        for d in self.detectors:
            d.reset()  # a new engine traces anew: its detectors start with fresh state
        self.actions, self.guard = dict(actions), guard  # detector name -> action; see gradtrace.step.gate
        self.tap = tap
        # the per-layer history's device buffer, written at every traced step (off: benchmarks/overhead.py)
        self.keep_history = keep_history
        # ids are made safe before the lookup only where a detector reports the bad ones (the step is then
        # held); otherwise a bad id fails the lookup exactly as under model.fit
        self.sanitize_ids = any(d.wants_ids and "bad" in d.needs for d in self.detectors)
        # class labels of a sparse crossentropy, checked against the output's units before the loss
        self.label_units = label_units(model) if any(d.wants_labels for d in self.detectors) else None
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
        self._plain = False  # a plain (unwatched) step is running: see unwatched()

    # -- variants and the functions that run them --------------------------------------------
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
        """The train function Keras builds around the watched step (iterator in, logs out), made once; for
        :data:`PLAIN`, around the model's own step, unwatched."""
        variant = self.variant(plan)
        if variant.function is None and plan.mode == "plain":
            variant.function = self.unwatched(compat.make_train_function(self.model, self.model_train_step))
        elif variant.function is None:
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
            records.keep_batch(variant, data if custom else data[0])
            return out

        return step_keeping_the_batch

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

    def warn_once(self, key, message):
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"gradtrace: {message}", stacklevel=2)

    def unwatched(self, function):
        """``function`` (the model's own step, or yours) run as it is: its updates are not outside updates."""

        def plain(*args, **kwargs):
            self._plain = True
            try:
                return function(*args, **kwargs)
            finally:
                self._plain = False

        return plain

    def outside_step(self, optimizer):
        """An optimizer update applied outside the watched step (a callback, a second loop)."""
        if self._plain:
            return
        name = self._optimizer_label.get(id(optimizer), getattr(optimizer, "name", "optimizer"))
        self.warn_once(f"outside:{id(optimizer)}", f"an update of {name} was applied outside the training step "
                       "(from a callback or another loop?); gradtrace does not watch it and applies it as it is.")

    # -- the step ------------------------------------------------------------------------------
    def detectors_for(self, plan):
        """The detectors that check a step under ``plan`` (an untraced step: those that read the weight
        gradients, ids or labels)."""
        if not plan.detects:
            return []
        return [d for d in self.detectors
                if d.checks_in_step and (plan.traced or d.every_step or d.wants_ids or d.wants_labels)]

    def _run_step(self, variant, data, body=None, reports_fired=False):
        variant.traces += 1
        ctx, data = start(self, variant, data, body, reports_fired)
        with ctx.trace.active(ctx):
            logs = self.model_train_step(data) if body is None else body()
        logs = finish_logs(self, ctx, logs)
        fired = None
        if ctx.reports_fired and ctx.updates and ctx.plan.mode == "train":
            fired = tf.reduce_any(tf.stack([u.record.any.read_value() for u in ctx.updates]))
        if ctx.pairs:
            return logs, fired
        if fired is not None and isinstance(logs, dict):
            logs = dict(logs)
            logs[FIRED] = fired
        return logs

    # -- the hooked optimizer update -------------------------------------------------------------
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
        # ids or labels replaced to let the step complete: such a step is never committed
        changed = tf.reduce_any(tf.stack(ctx.recorder.changed)) if ctx.recorder.changed else None
        if ctx.plan.mode == "force":
            committed = gate.redo(ctx, optimizer, original, grads, tvars, changed)
        else:
            segment = ctx.variant.segment(index)
            segment.optimizer = self._optimizer_label.get(id(optimizer), getattr(optimizer, "name", "optimizer"))
            u = update_tensors(ctx, self, segment.optimizer, optimizer, grads, tvars)
            update = self._checked(ctx, segment, optimizer, u)
            if ctx.plan.mode == "inspect" and index == 0:
                paths = [p for c in u.calls for p in c.output_paths]
                ctx.variant.inspected = {
                    "loss": u.loss, "y_pred": ctx.recorder.y_pred,
                    "outputs": dict(zip(paths, u.outputs)),
                    "gradients": dict(zip(paths, u.output_gradients)),
                    "weight_gradients": list(zip(tvars, grads)),
                }
            guard = gate.guard_for(self.guard, optimizer, self.warn_once)
            committed = update.committed = gate.gate(ctx, update, original, grads, tvars, changed, guard, optimizer)
            ctx.updates.append(update)
        ctx.held = tf.logical_or(ctx.held, tf.logical_not(committed))
        return committed

    def _checked(self, ctx, segment, optimizer, u) -> GatedUpdate:
        """The update's statistics, and every detector's check of them (in-graph)."""
        plan, detectors = ctx.plan, ctx.detectors
        replicas = distribute.current()
        # only what this variant's detectors read (an untraced step: the sums of its rows)
        needs = st.ALL_BASE if plan.every_statistic else st.base_needs({c for d in detectors for c in d.needs})
        rows = Rows(ctx, self.model, weight_owners(self.tap), self.label_units, "update_ratio" in self.columns)
        table, matrix, collector, ids = rows.build(u, needs, replicas, optimizer)
        first = next((t for t in tf.nest.flatten(ctx.x) if t is not None))
        examples = tf.shape(first)[0] * (replicas.n if replicas is not None else 1)
        view = st.StatsView(table, matrix, ctx.step, ids,
                            loss_scaled=isinstance(optimizer, keras.optimizers.LossScaleOptimizer),
                            lookups=collector.lookups, alive=collector.alive,
                            unit_rows=collector.unit_rows() if collector.alive is not None else [],
                            examples=tf.cast(examples, tf.float32), columns=collector.columns)
        fired_m, values_m, each = run_checks(detectors, view, len(table))
        histogram_rows = histograms = None
        if plan.summary_bins:
            histogram_rows, histograms = collector.histograms(matrix, ("output", "gradient"), plan.summary_bins)
        columns = st.computed_columns(needs, self.columns) if plan.mode == "train" and not plan.summary_bins \
            else None
        segment.layout = Layout(table, tuple(detectors), None if columns is None else frozenset(columns),
                                histogram_rows)
        update = GatedUpdate(table, matrix, fired_m, values_m, tf.reduce_any(fired_m, axis=1), collector.faults,
                             collector.counted_exactly, histograms, blocks=blocks(detectors, each, ctx.blocking))
        if plan.mode == "train":
            update.record = records.record_for(segment, update, ctx, keep_batch=self.keep_batch)
        return update


def run_checks(detectors, view, rows):
    """Every detector's in-graph check of one update: ``(fired, values, each)``, the first two ``[detectors,
    rows]``, ``each`` every detector's own ``([rows] flags, [rows] values)`` (what a gate waits for). Each
    runs under its own name scope, so an op of its that fails at run time names it."""
    if not detectors or not rows:
        none = tf.zeros([len(detectors), rows], tf.bool)
        zeros = tf.zeros([len(detectors), rows], tf.float32)
        return none, zeros, [(none[i], zeros[i]) for i in range(len(detectors))]
    fired, values = [], []
    for d in detectors:
        try:
            with tf.name_scope(f"{DETECTOR_SCOPE}{d.name}"):
                f, v = d.check(view)
        except Exception as e:  # traced: the step has not run, nothing was applied
            raise DetectorError(d.name, "check", e) from e
        fired.append(tf.cast(tf.reshape(f, [rows]), tf.bool))
        values.append(tf.cast(tf.reshape(v, [rows]), tf.float32))
    return tf.stack(fired), tf.stack(values), list(zip(fired, values))


def blocks(detectors, each, blocking):
    """Whether a blocking detector fired (``each``: every detector's ``(flags, values)``; None when none
    blocks). Made of the blocking detectors' checks, and of every check of a detector that is not built in
    (yours may fail at run time: its step is then held, not applied), not of the built-in non-blocking
    ones': the update runs beside those and the statistics only they read."""
    if not blocking:
        return None
    fired = tf.reduce_any(tf.stack([tf.reduce_any(each[i][0]) for i in blocking]))
    yours = [t for d, pair in zip(detectors, each) if not built_in(d) for t in pair]
    if yours:
        with tf.control_dependencies(yours):
            fired = tf.identity(fired)
    return fired


def built_in(detector) -> bool:
    """A detector of gradtrace's own (its class, not a subclass of yours)."""
    return type(detector).__module__.startswith("gradtrace.detectors.")


def finish_logs(engine, ctx, logs):
    """After the step's body: the metric accumulators put back where the step was held (after its logs
    were read), the statistics handed back (a step that returns them), the records written."""
    plan = ctx.plan

    def restore_metrics():
        return gate.restored(ctx.metric_vars, ctx.saved_metrics)

    if not ctx.updates:  # the step applied no update gradtrace could see: nothing was watched
        if ctx.metric_vars and plan.mode == "force":  # a redo held for its replaced ids
            tf.cond(ctx.held, restore_metrics, lambda: tf.constant(False))
        if engine.model.trainable_weights and plan.mode == "train":
            engine.warn_once("no_update", f"{type(engine.model).__name__}.train_step applied no update through an "
                           f"optimizer gradtrace sees ({', '.join(engine.optimizer_names) or 'none'}), so nothing "
                           "in it was checked; it trains exactly as under model.fit. Use the model's optimizers "
                           "(attributes of the model) with apply_gradients or apply to have it watched.")
        return logs
    if plan.returns_result:
        restore_metrics()
        logs = dict(logs) if isinstance(logs, dict) else {"outputs": logs}  # your own step's outputs
        logs[KEY] = [u.output(ctx.step) for u in ctx.updates]
        return logs
    if ctx.metric_vars:  # a held step leaves the metric accumulators as they were (after its logs were read)
        tf.cond(ctx.held, restore_metrics, lambda: tf.constant(False))
    if plan.mode == "train":
        for u in ctx.updates:
            u.record.write(u, ctx.step, logs, ctx.data, ctx.stopping, plan.every_statistic, plan.traced,
                           engine.keep_history)
    return logs
