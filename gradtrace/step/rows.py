"""The rows of one gated update: every tensor the step captured, registered with a
:class:`gradtrace.stats.Collector` in a fixed order (inputs and targets, class labels, ids, layer
outputs, the loss, output gradients, weights and weight gradients), then built into its table and
statistics matrix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import keras
import tensorflow as tf

from gradtrace import _keras_compat as compat
from gradtrace import graph as layer_graph
from gradtrace import stats as st
from gradtrace.heads import loss_kind, loss_object_kind

# the targets' and the model outputs' minimum and maximum are measured at every traced step
# (small tensors) so that the head/loss checks can read them under any strategy
RANGE = ("min", "max")


@dataclass(frozen=True)
class UpdateTensors:
    """What one optimizer update of a traced step is about: the layer calls recorded under its tape, their
    outputs and those outputs' gradients, its loss (and the Keras loss object a custom step called, if no
    loss was compiled), and the variables and gradients the optimizer received."""

    calls: list
    outputs: list
    output_gradients: list
    loss: Optional[tf.Tensor]
    loss_call: object
    variables: list
    gradients: list
    unscale: Optional[tf.Tensor]  # 1 / the loss scale (mixed precision), else None

    def scaled(self, g):
        return g if self.unscale is None else tf.cast(g, tf.float32) * self.unscale


def label_units(model):
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


def float_tensors(structure, prefix, integers=False):
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
            out.extend(float_tensors(value, f"{prefix}{name}/", integers))
            continue
        if isinstance(value, (tf.Tensor, tf.Variable)) and value.dtype.is_floating:
            out.append((f"{prefix}{name}".rstrip("/"), value))
        elif integers and isinstance(value, (tf.Tensor, tf.Variable)) and value.dtype.is_integer:
            out.append((f"{prefix}{name}".rstrip("/"), tf.cast(value, tf.float32)))
    return out


def weight_owners(tap):
    """``id(variable) -> [(layer path, layer class, layer)]``: the layers that own it, deepest first (a
    layer's weights include its sublayers'; a variable handed to another layer is owned by both)."""
    owners = {}
    layers = sorted(tap.layers.values(), key=lambda l: -tap.path_of(l).count("/"))
    for layer in layers:
        for v in layer.trainable_weights:
            entry = (tap.path_of(layer), type(layer).__name__, layer)
            mine = owners.setdefault(id(v), [])
            # a parent owns its sublayers' weights through them: keep only the deepest of one branch
            if not any(p.startswith(entry[0] + "/") for p, _, _ in mine):
                mine.append(entry)
    return owners


class Rows:
    """Registers one update's tensors with a Collector. ``ctx`` is the step's context (its batch, labels,
    recorder), ``model`` the watched model, ``owners`` :func:`weight_owners`, ``label_units`` the
    checked labels' ``(units, ignore_class)``, ``weights_every_step``: a detector reads the weights'
    norms at every step (else they are measured only on reported steps)."""

    def __init__(self, ctx, model, owners, label_units=None, weights_every_step=False):
        self.ctx, self.model, self.owners = ctx, model, owners
        self.label_units = label_units
        self.weights_every_step = weights_every_step
        self.c = st.Collector()
        self.ids = {}  # row index -> the ids tensor of an Embedding call
        self.order = {}  # id(layer) -> the index of its first call in this update

    def build(self, u: UpdateTensors, needs, replicas, optimizer):
        """``(table, matrix, collector, ids)`` of the update ``u``."""
        traced = self.ctx.plan.traced
        if traced:
            self._data()
        if self.ctx.labels is not None:
            units = self.label_units[0]
            labels = self.ctx.labels
            self.c.add("labels", "targets", ids=(labels, units), layer_class="labels", name="labels",
                       input_dim=units, shape=tuple(labels.shape))
        self._outputs(u, traced)
        if u.loss is not None:
            kind, from_logits = loss_kind(self.model) if u.loss_call is None else loss_object_kind(u.loss_call.loss)
            self.c.add("loss", "loss", u.loss, layer_class="loss", order=len(self.ctx.recorder.calls),
                       loss_kind=kind, from_logits=from_logits)
        if not traced:
            # Untraced steps (trace_every > 1) still refuse a non-finite update: one sum
            # per weight gradient; NaN/Inf counts only on the step where a sum is not finite.
            for v, g in zip(u.variables, u.gradients):
                if g is not None:
                    path, cls, o = self._owner(v)
                    g_t = g.values if isinstance(g, tf.IndexedSlices) else g
                    self.c.add("weight_gradient", path, u.scaled(g_t), layer_class=cls, name=v.name,
                               shape=tuple(v.shape), order=o)
            table, matrix, _ = self.c.build(needs=needs, replicas=replicas, optimizer=optimizer)
            return table, matrix, self.c, self.ids
        self._gradients(u)
        self._weights(u, needs)
        lr = compat.current_learning_rate(optimizer)
        lr = None if lr is None else tf.cast(lr, tf.float32)
        graph = layer_graph.build(u.calls, u.loss, lambda call: call.path)
        table, matrix, _ = self.c.build(lr=lr, needs=needs, replicas=replicas, graph=graph, optimizer=optimizer)
        return table, matrix, self.c, self.ids

    def _data(self):
        for name, t in float_tensors(self.ctx.x, ""):
            self.c.add("input", "inputs", t, name=name, shape=tuple(t.shape))
        for name, t in float_tensors(self.ctx.y, "", integers=True):
            self.c.add("target", "targets", t, name=name, shape=tuple(t.shape), always=RANGE)

    def _outputs(self, u, traced):
        # the model's predictions are what the compiled loss reads; a custom step's own Keras loss (no loss
        # compiled) reads its y_pred (its y_true are the step's own making, label noise included: not checked)
        y_pred = self.ctx.recorder.y_pred if u.loss_call is None else u.loss_call.y_pred
        predictions = [t for t in tf.nest.flatten(y_pred) if t is not None] if traced else []
        heads = []
        for i, call in enumerate(u.calls):
            self.order.setdefault(id(call.layer), i)
            cls = type(call.layer).__name__
            if call.ids is not None:
                dim = int(call.layer.input_dim)
                self.ids[self.c.add("ids", call.path, ids=(call.ids, dim), layer_class=cls, order=i,
                                    input_dim=dim, shape=tuple(call.ids.shape))] = call.ids
            for p, t in zip(call.output_paths, call.outputs):
                # the layer that produced a prediction (the innermost: a nested model's call, recorded
                # after its own layers, returns its last layer's tensor)
                head = any(t is q for q in predictions) and not any(t is q for q in heads)
                self.c.add("output", p, t, relu=call.relu, activation=call.activation, layer_class=cls,
                           shape=tuple(t.shape), order=i, head=head, always=RANGE if head else ())
                if head:
                    heads.append(t)

    def _owner(self, v):
        # a variable shared by several layers (a retrieval layer handed an Embedding's table) is filed
        # under the layer that used it in this step (the first to run), else the deepest that owns it
        n_calls = len(self.ctx.recorder.calls)
        candidates = self.owners.get(id(v), [(self.model.name, type(self.model).__name__, None)])
        ran = [c for c in candidates if id(c[2]) in self.order]
        path, cls, layer = min(ran, key=lambda c: self.order[id(c[2])]) if ran else candidates[0]
        return path, cls, self.order.get(id(layer), n_calls)

    def _gradients(self, u):
        k = 0
        grad_of = {}
        for c_i, call in enumerate(u.calls):
            for p, t in zip(call.output_paths, call.outputs):
                g = u.output_gradients[k]
                k += 1
                if g is not None:
                    g = u.scaled(tf.convert_to_tensor(g))
                    grad_of[id(t)] = g
                    self.c.add("gradient", p, g, layer_class=type(call.layer).__name__, shape=tuple(t.shape),
                               order=c_i)
        # each Embedding call's looked-up rows (its output) and their gradients, beside its ids
        by_path = {call.path: call for call in u.calls}
        for i, ids_t in self.ids.items():
            call = by_path.get(self.c.rows[i].path)
            rows = call.outputs[0] if call is not None and len(call.outputs) == 1 else None
            if rows is not None and rows.shape.rank == ids_t.shape.rank + 1:
                self.c.lookups[i] = st.Lookup(ids_t, rows, grad_of.get(id(rows)), call.layer)

    def _weights(self, u, needs):
        # Weights only change through (gated) updates, so they are measured on reported
        # steps only, unless a detector needs their norm every step (update_ratio).
        deferred = not self.weights_every_step and not needs >= st.ALL_BASE
        for v, g in zip(u.variables, u.gradients):
            path, cls, o = self._owner(v)
            meta = dict(layer_class=cls, name=v.name, shape=tuple(v.shape), order=o)
            if isinstance(g, tf.IndexedSlices):
                # never densify an embedding table: the looked-up rows and their gradient slices
                rows_of = (lambda v=v, idx=g.indices: tf.gather(v.value, idx))
                w_row = self.c.add("weight", path, rows_of if deferred else rows_of(), deferred=deferred, **meta)
                g_t = u.scaled(g.values)
            else:
                value_of = (lambda v=v: v.value)
                w_row = self.c.add("weight", path, value_of if deferred else value_of(), deferred=deferred, **meta)
                g_t = None if g is None else u.scaled(g)
            if g_t is not None:
                self.c.ratio(self.c.add("weight_gradient", path, g_t, **meta), w_row)


def update_tensors(ctx, engine, name, optimizer, grads, tvars) -> UpdateTensors:
    """The tensors one update is about (see :class:`UpdateTensors`); ``name``: what the model calls the
    optimizer."""
    gradient = ctx.trace.gradient_for(grads)
    if gradient is None and ctx.plan.traced:
        engine.warn_once(f"no_tape:{name}", f"the gradients applied by {name} were not "
                       "computed by a tf.GradientTape inside the step (no tape), so the layer outputs and their "
                       "gradients cannot be followed; its weight gradients are still checked.")
    calls = ctx.trace.calls_for(gradient)
    outputs = [t for c in calls for t in c.outputs]
    if gradient is not None:
        by_call = dict(zip(map(id, ctx.recorder.calls), ctx.trace.output_gradients(gradient)))
        ograds = [g for c in calls for g in by_call[id(c)]]
    else:
        ograds = [None] * len(outputs)
    # statistics are of the true gradients: undo the loss scaling (mixed precision)
    unscale = None
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        scale = optimizer.dynamic_scale if optimizer.built else optimizer.initial_scale
        unscale = 1.0 / tf.cast(tf.convert_to_tensor(scale), tf.float32)
    elif getattr(optimizer, "loss_scale_factor", None) is not None:
        unscale = tf.constant(1.0 / float(optimizer.loss_scale_factor), tf.float32)
    loss = None
    if gradient is not None and gradient.target.shape.rank == 0:
        loss = tf.cast(gradient.target, tf.float32)
        if unscale is not None:
            loss = loss * unscale
    # no loss compiled (a custom train_step): the last Keras loss of a known kind called under this tape
    loss_call = ctx.trace.loss_call_for(gradient) if loss_kind(engine.model)[0] == "other" else None
    if loss_call is not None and loss_object_kind(loss_call.loss)[0] in ("other", "several"):
        loss_call = None
    return UpdateTensors(calls, outputs, ograds, loss, loss_call, tvars, grads, unscale)
