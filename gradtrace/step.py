"""The one compiled training step: capture -> statistics -> detectors -> commit or hold.

``Engine.make_step`` returns a function with the signature of Keras'
``train_step``; Keras' own ``make_train_function`` wraps it in ``tf.function``
(honouring ``jit_compile`` and ``run_eagerly``) and Keras' own ``fit`` drives it,
so data handling, callbacks, validation and the progress bar are Keras'.

Inside the step: the forward pass runs under ``tf.GradientTape`` with a
:class:`~gradtrace.capture.Recorder` active, so every nested layer's outputs are
recorded and watched. One ``tape.gradient`` call gives the gradients of the
loss with respect to every trainable variable and every captured output. The
statistics of all of them are packed into one ``[rows, columns]`` tensor, each
detector's check reads it, and a single ``tf.cond`` either commits the step
(optimizer update, loss tracker and metrics) or, when a blocking detector
fired, holds it back and restores every non-trainable variable (BatchNorm
moving statistics, seed generator states) to its pre-step value.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from gradtrace import _keras_compat as compat
from gradtrace import stats as st
from gradtrace.anomaly import BLOCKING
from gradtrace.capture import Recorder

KEY = "__gradtrace__"


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
        self.actions = dict(actions)  # detector name -> action
        self.tap = tap
        self.tables = {}  # traced (bool) -> stats.Table of the latest trace
        self.active = {}  # traced (bool) -> detectors run in that variant
        self.sanitize_ids = any(d.wants_ids for d in self.detectors)

    def make_step(self, traced: bool):
        def train_step(data):
            return self._step(data, traced)

        return train_step

    # ------------------------------------------------------------------------------
    def _weight_owners(self):
        """``id(variable) -> (layer path, layer class, first-call order)``, deepest layer wins."""
        owners = {}
        layers = sorted(self.tap.layers.values(), key=lambda l: self.tap.path_of(l).count("/"))
        for layer in layers:
            for v in layer.trainable_weights:
                owners[id(v)] = (self.tap.path_of(layer), type(layer).__name__, layer)
        return owners

    def _step(self, data, traced):
        model = self.model
        optimizer = model.optimizer
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        step = tf.identity(optimizer.iterations)
        detectors = [d for d in self.detectors if traced or d.every_step or d.wants_ids]
        blocking = [i for i, d in enumerate(detectors) if self.actions[d.name] in BLOCKING]
        rollback_vars = list(model.non_trainable_variables) if blocking else []
        saved = [tf.identity(v.value) for v in rollback_vars]

        recorder = Recorder(sanitize_ids=self.sanitize_ids, keep=traced)
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
        unscale = 1.0
        if getattr(optimizer, "loss_scale_factor", None) is not None:
            unscale = 1.0 / float(optimizer.loss_scale_factor)

        table, entries, ids = self._rows(x, y, loss, recorder, tvars, wgrads, ograds, traced, unscale)
        matrix = st.pack(entries)
        view = st.StatsView(table, matrix, step, ids)
        fired, values = [], []
        for d in detectors:
            f, v = d.check(view)
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
        self.tables[traced] = table
        self.active[traced] = detectors

        batch_size = _batch_size(x)

        def commit():
            optimizer.apply_gradients(zip(wgrads, tvars))
            compat.update_loss_tracker(model, loss, batch_size)
            model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
            return tf.constant(True)

        def hold():
            for v, old in zip(rollback_vars, saved):
                v.assign(old)
            return tf.constant(False)

        if blocking:
            block = tf.reduce_any(tf.gather(per_detector, blocking))
            committed = tf.cond(block, hold, commit)
        else:
            committed = commit()
        logs = dict(model.get_metrics_result())
        logs[KEY] = {
            "any": tf.reduce_any(per_detector),
            "fired": fired_m,
            "values": values_m,
            "stats": matrix,
            "step": step,
            "committed": committed,
            "data": data,
        }
        return logs

    def _rows(self, x, y, loss, recorder, tvars, wgrads, ograds, traced, unscale):
        rows, entries, ids = [], [], {}

        def add(kind, path, stats_dict, counted, **meta):
            rows.append(st.Row(index=len(rows), kind=kind, path=path, **meta))
            entries.append((stats_dict, counted))

        if traced:
            for name, t in _float_tensors(x, ""):
                add("input", "inputs", st.float_stats(t), t, name=name, shape=tuple(t.shape))
            for name, t in _float_tensors(y, ""):
                add("target", "targets", st.float_stats(t), t, name=name, shape=tuple(t.shape))
        order = {}
        for i, c in enumerate(recorder.calls):
            order.setdefault(id(c.layer), i)
            if c.ids is not None:
                dim = int(c.layer.input_dim)
                ids[len(rows)] = c.ids
                add("ids", c.path, st.ids_stats(c.ids, dim), None, layer_class=type(c.layer).__name__,
                    order=i, input_dim=dim, shape=tuple(c.ids.shape))
            for p, t in zip(c.output_paths, c.outputs):
                add("output", p, st.float_stats(t, relu=c.relu, activation=c.activation), t,
                    layer_class=type(c.layer).__name__, shape=tuple(t.shape), relu=c.relu,
                    activation=c.activation, order=i)
        add("loss", "loss", st.float_stats(loss), loss, layer_class="loss", order=len(recorder.calls))
        owners = self._weight_owners()
        if not traced:
            # Untraced steps (trace_every > 1) still refuse a non-finite update: one sum
            # per weight gradient; NaN/Inf counts only on the step where a sum is not finite.
            for v, g in zip(tvars, wgrads):
                if g is None:
                    continue
                g_t = g.values if isinstance(g, tf.IndexedSlices) else g
                path, cls, layer = owners.get(id(v), (self.model.name, type(self.model).__name__, None))
                add("weight_gradient", path, {"_s": tf.reduce_sum(tf.cast(g_t, tf.float32)),
                                              "size": tf.cast(tf.size(g_t), tf.float32)},
                    g_t, layer_class=cls, name=v.name, shape=tuple(v.shape), order=order.get(id(layer), 0))
            return st.Table(rows), entries, ids
        k = 0
        for c_i, c in enumerate(recorder.calls):
            for p, t in zip(c.output_paths, c.outputs):
                g = ograds[k]
                k += 1
                if g is None:
                    continue
                g = tf.convert_to_tensor(g) * unscale
                add("gradient", p, st.float_stats(g), g, layer_class=type(c.layer).__name__,
                    shape=tuple(t.shape), order=c_i)
        lr = tf.cast(compat.current_learning_rate(self.model.optimizer), tf.float32)
        for v, g in zip(tvars, wgrads):
            path, cls, layer = owners.get(id(v), (self.model.name, type(self.model).__name__, None))
            o = order.get(id(layer), len(recorder.calls))
            name = v.name
            if isinstance(g, tf.IndexedSlices):
                rows_w = tf.gather(v.value, g.indices)
                w_stats = st.float_stats(rows_w)
                g_t = g.values * unscale
            else:
                w_stats = st.float_stats(v.value)
                g_t = None if g is None else g * unscale
            add("weight", path, w_stats,
                v.value if not isinstance(g, tf.IndexedSlices) else rows_w,
                layer_class=cls, name=name, shape=tuple(v.shape), order=o)
            if g_t is None:
                continue
            g_stats = st.float_stats(g_t)
            g_stats["update_ratio"] = lr * g_stats["norm"] / (w_stats["norm"] + 1e-12)
            add("weight_gradient", path, g_stats, g_t, layer_class=cls, name=name, shape=tuple(v.shape), order=o)
        return st.Table(rows), entries, ids
