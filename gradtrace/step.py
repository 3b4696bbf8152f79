"""The one compiled training step: capture -> statistics -> detectors -> commit or hold.

``Engine._step`` has the signature of Keras' ``train_step``; it is compiled the
way Keras compiles its own step (``_keras_compat.compile_step``: ``strategy.run``,
``tf.function`` with the model's ``jit_compile``, eager under ``run_eagerly``),
and Keras' own ``fit`` drives it, so data handling, callbacks, validation and
the progress bar are Keras'.

Inside the step: the forward pass runs under ``tf.GradientTape`` with a
:class:`~gradtrace.capture.Recorder` active, so every nested layer's outputs are
recorded and watched. One ``tape.gradient`` call gives the gradients of the
loss with respect to every trainable variable and every captured output. The
statistics the detectors read are packed into one ``[rows, columns]`` tensor,
each detector's check reads it, and a single ``tf.cond`` either commits the
step (optimizer update, loss tracker and metrics) or, when a blocking detector
fired, holds it back and restores every non-trainable variable (BatchNorm
moving statistics, seed generator states) to its pre-step value. A held step
is then measured in full by the ``"report"`` variant, which the host runs on
the same batch.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from gradtrace import _keras_compat as compat
from gradtrace import distribute
from gradtrace import stats as st
from gradtrace.anomaly import BLOCKING, DetectorError
from gradtrace.capture import Recorder
from gradtrace.heads import loss_kind

KEY = "__gradtrace__"
# the targets' and the model outputs' minimum and maximum are measured at every traced step
# (small tensors) so that the head/loss checks can read them under any strategy
RANGE = ("min", "max")
# every detector's in-graph check runs under this name scope, so a failing op names its detector
DETECTOR_SCOPE = "gradtrace_detector_"


def _float_tensors(structure, prefix):
    """Flatten a data structure into ``[(name, tensor)]`` of float tensors."""
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
            out.extend(_float_tensors(value, f"{prefix}{name}/"))
            continue
        if isinstance(value, (tf.Tensor, tf.Variable)) and value.dtype.is_floating:
            out.append((f"{prefix}{name}".rstrip("/"), value))
    return out


def _batch_size(x):
    first = next(t for t in tf.nest.flatten(x) if t is not None)
    return tf.shape(first)[0]


class Engine:
    """Everything gradtrace adds to one ``fit`` call, on the graph side."""

    def __init__(self, model, detectors, actions, tap):
        self.model = model
        self.detectors = list(detectors)
        for d in self.detectors:
            d.reset()  # a new engine traces anew: its detectors start with fresh state
        self.actions = dict(actions)  # detector name -> action
        self.tap = tap
        self.tables = {}  # traced (bool) -> stats.Table of the latest trace
        self.active = {}  # traced (bool) -> detectors run in that variant
        self.sanitize_ids = any(d.wants_ids for d in self.detectors)
        self._compiled = {}  # traced (bool) -> compiled step, made once per engine
        # the statistics the detectors read (each variant computes what its own detectors need)
        self.columns = {c for d in self.detectors for c in d.needs}
        self.columns_computed = {}  # traced (bool) -> the columns its statistics really hold

    def make_step(self, traced: bool):
        def train_step(data):
            return self._step(data, traced)

        return train_step

    def compiled(self, trace_every):
        """The compiled traced step and (for ``trace_every > 1``) the untraced one, made once."""
        if True not in self._compiled:
            self._compiled[True] = compat.compile_step(self.model, self.make_step(traced=True), (KEY,))
        if trace_every > 1 and False not in self._compiled:
            self._compiled[False] = compat.compile_step(self.model, self.make_step(traced=False), (KEY,))
        return self._compiled[True], self._compiled.get(False) if trace_every > 1 else None

    def compiled_summary(self, bins):
        """The traced step that also measures every statistic and histograms of every
        output and gradient (for TensorBoard), made once per engine."""
        key = ("summary", bins)
        if key not in self._compiled:
            self._compiled[key] = compat.compile_step(
                self.model, lambda data: self._step(data, traced=True, summary_bins=bins), (KEY,))
        return self._compiled[key]

    def compiled_report(self, traced):
        """The step that measures every statistic (exact NaN/Inf counts included) and commits
        nothing: run by the host on a held step, whose pre-step state is intact, to report it."""
        key = ("report", traced)
        if key not in self._compiled:
            self._compiled[key] = compat.compile_step(
                self.model, lambda data: self._step(data, traced=traced, mode="report"), (KEY,))
        return self._compiled[key]

    def make_forced_step(self):
        """The step that commits whatever the detectors say: used to redo a snapshotted step.

        It runs no detector (their state was already updated by the held run),
        and is compiled as Keras compiles its own step.
        """
        def forced(data):
            return self._step(data, traced=False, mode="force")

        return compat.compile_step(self.model, forced, (KEY,))

    # ------------------------------------------------------------------------------
    def _weight_owners(self):
        """``id(variable) -> (layer path, layer class, first-call order)``, deepest layer wins."""
        owners = {}
        layers = sorted(self.tap.layers.values(), key=lambda l: self.tap.path_of(l).count("/"))
        for layer in layers:
            for v in layer.trainable_weights:
                owners[id(v)] = (self.tap.path_of(layer), type(layer).__name__, layer)
        return owners

    def _step(self, data, traced, mode="train", summary_bins=0):
        """One step. ``mode``: ``"train"`` (commit unless a blocking detector fired),
        ``"force"`` (commit, no detectors), ``"report"`` (no detectors, every statistic,
        never commit, non-trainable variables restored), ``"inspect"`` (never commit;
        every statistic; keep every tensor in ``self.inspected``, for replay).
        ``summary_bins``: also return every statistic and ``summary_bins``-bin
        histograms of outputs and gradients."""
        model = self.model
        optimizer = model.optimizer
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        step = tf.identity(compat.iterations(optimizer))
        detectors = [d for d in self.detectors if d.checks_in_step and (traced or d.every_step or d.wants_ids)]
        if mode in ("force", "report"):
            detectors = []
        blocking = [i for i, d in enumerate(detectors) if self.actions[d.name] in BLOCKING]
        rollback_vars = list(model.non_trainable_variables) if blocking or mode == "report" else []
        saved = [tf.identity(v.value) for v in rollback_vars]

        replicas = distribute.current()
        recorder = Recorder(sanitize_ids=self.sanitize_ids or mode in ("force", "report"), keep=traced)
        with tf.GradientTape() as tape:
            recorder.tape = tape
            with recorder.active():
                if compat.call_has_training_arg(model):
                    y_pred = model(x, training=True)
                else:
                    y_pred = model(x)
            loss = compat.compute_loss(model, x, y, y_pred, sample_weight)
            scaled_loss = optimizer.scale_loss(loss)

        tvars = list(model.trainable_variables)
        if not tvars:
            raise ValueError(
                f"Model {model.name!r} has no trainable weights, so there is nothing to train or debug. "
                "Check that its layers are trainable (layer.trainable = True) and that it has weights."
            )
        outputs = [t for c in recorder.calls for t in c.outputs]
        grads = tape.gradient(
            scaled_loss, tvars + outputs, unconnected_gradients=tf.UnconnectedGradients.NONE
        )
        wgrads, ograds = grads[: len(tvars)], grads[len(tvars) :]
        # statistics are of the true gradients: undo the loss scaling (mixed precision)
        loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        unscale = None
        if loss_scaled:
            scale = optimizer.dynamic_scale if optimizer.built else optimizer.initial_scale
            unscale = 1.0 / tf.cast(tf.convert_to_tensor(scale), tf.float32)
        elif getattr(optimizer, "loss_scale_factor", None) is not None:
            unscale = tf.constant(1.0 / float(optimizer.loss_scale_factor), tf.float32)

        # only what this variant's detectors read (an untraced step: the sums of its rows)
        needs = st.base_needs({c for d in detectors for c in d.needs})
        if summary_bins or mode in ("report", "inspect"):
            needs = st.ALL_BASE
        if mode == "train" and not summary_bins:
            self.columns_computed[traced] = st.computed_columns(needs, self.columns)
        table, matrix, collector, ids = self._rows(x, y, loss, recorder, tvars, wgrads, ograds, traced, unscale,
                                                   replicas, needs, y_pred)
        examples = _batch_size(x) * (replicas.n if replicas is not None else 1)
        view = st.StatsView(table, matrix, step, ids, loss_scaled=loss_scaled,
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
            fired_m = tf.stack(fired)
            values_m = tf.stack(values)
            per_detector = tf.reduce_any(fired_m, axis=1)
        else:
            fired_m = tf.zeros([len(detectors), len(table)], tf.bool)
            values_m = tf.zeros([len(detectors), len(table)], tf.float32)
            per_detector = tf.zeros([len(detectors)], tf.bool)
        if mode in ("train", "inspect"):
            self.tables[traced] = table
            self.active[traced] = detectors

        batch_size = _batch_size(x)

        def commit(wgrads, x, y, y_pred, sample_weight, loss, batch_size):
            optimizer.apply_gradients(zip(wgrads, tvars))
            compat.update_loss_tracker(model, loss, batch_size)
            model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
            return tf.constant(True)

        def hold(saved):
            for v, old in zip(rollback_vars, saved):
                v.assign(old)
            return tf.constant(False)

        commit_args = (wgrads, x, y, y_pred, sample_weight, loss, batch_size)

        if mode == "report":
            committed = hold(saved)
        elif mode == "inspect":
            paths = [p for c in recorder.calls for p in c.output_paths]
            self.inspected = {
                "loss": loss, "y_pred": y_pred,
                "outputs": dict(zip(paths, outputs)),
                "gradients": dict(zip(paths, ograds)),
                "weight_gradients": list(zip(tvars, wgrads)),
            }
            committed = tf.constant(False)
        elif blocking:
            block = tf.reduce_any(tf.gather(per_detector, blocking))
            if replicas is not None:  # the statistics, and so block, are the same on every replica
                committed = replicas.gate(block, commit, commit_args, hold, saved)
            else:
                committed = tf.cond(block, lambda: hold(saved), lambda: commit(*commit_args))
        else:
            committed = commit(*commit_args)
        logs = {} if mode in ("inspect", "report") else dict(model.get_metrics_result())
        any_fired = tf.reduce_any(per_detector)
        faults = collector.faults
        logs[KEY] = {
            "any": any_fired,
            "fired": fired_m,
            "values": values_m,
            "stats": matrix,
            "step": step,
            "committed": committed,
        }
        if faults is not None:
            logs[KEY]["replica_faults"] = faults  # [replicas, rows]: where NaN/Inf or bad ids were
        if summary_bins:
            self.histogram_rows, logs[KEY]["histograms"] = collector.histograms(
                matrix, ("output", "gradient"), summary_bins)
        return logs

    def _rows(self, x, y, loss, recorder, tvars, wgrads, ograds, traced, unscale, replicas=None, needs=None,
              y_pred=None):
        """Register every captured tensor of the step with a stats Collector (in a fixed order).
        The model's output (head) rows and the targets also get their minimum and maximum."""
        c = st.Collector()
        ids, heads = {}, []
        predictions = [t for t in tf.nest.flatten(y_pred) if t is not None] if traced else []
        if traced:
            for name, t in _float_tensors(x, ""):
                c.add("input", "inputs", t, name=name, shape=tuple(t.shape))
            for name, t in _float_tensors(y, ""):
                c.add("target", "targets", t, name=name, shape=tuple(t.shape), always=RANGE)
        order = {}
        for i, call in enumerate(recorder.calls):
            order.setdefault(id(call.layer), i)
            cls = type(call.layer).__name__
            if call.ids is not None:
                dim = int(call.layer.input_dim)
                ids[c.add("ids", call.path, values=st.ids_stats(call.ids, dim), counted=None, layer_class=cls,
                          order=i, input_dim=dim, shape=tuple(call.ids.shape))] = call.ids
            for p, t in zip(call.output_paths, call.outputs):
                # the layer that produced a prediction (the innermost: a nested model's call, recorded
                # after its own layers, returns its last layer's tensor)
                head = any(t is q for q in predictions) and not any(t is q for q in heads)
                c.add("output", p, t, relu=call.relu, activation=call.activation, layer_class=cls,
                      shape=tuple(t.shape), order=i, head=head, always=RANGE if head else ())
                if head:
                    heads.append(t)
        kind, from_logits = loss_kind(self.model)
        c.add("loss", "loss", loss, layer_class="loss", order=len(recorder.calls), loss_kind=kind,
              from_logits=from_logits)
        owners = self._weight_owners()

        def owner(v):
            path, cls, layer = owners.get(id(v), (self.model.name, type(self.model).__name__, None))
            return path, cls, order.get(id(layer), len(recorder.calls))

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
            return table, matrix, c, ids
        k = 0
        for c_i, call in enumerate(recorder.calls):
            for p, t in zip(call.output_paths, call.outputs):
                g = ograds[k]
                k += 1
                if g is not None:
                    c.add("gradient", p, scaled(tf.convert_to_tensor(g)), layer_class=type(call.layer).__name__,
                          shape=tuple(t.shape), order=c_i)
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
        lr = tf.cast(compat.current_learning_rate(self.model.optimizer), tf.float32)
        table, matrix, _ = c.build(lr=lr, needs=needs, replicas=replicas)
        return table, matrix, c, ids
