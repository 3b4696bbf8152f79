"""One batch, eagerly: every nested layer's output and gradient (``capture``), and a
table of every nested layer (``summary``). What people do by hand with
``get_layer('embedding')`` and ``predict`` on one input, done for every layer at once."""

from __future__ import annotations

import keras
import tensorflow as tf
from tabulate import tabulate

from gradtrace import _keras_compat as compat
from gradtrace.capturing import LayerTap, Recorder


class Captured:
    """``outputs`` and ``gradients`` by layer path (in execution order), and the ``loss``."""

    def __init__(self, outputs, gradients, loss, calls):
        self.outputs = outputs
        self.gradients = gradients
        self.loss = loss
        self.calls = calls

    def __repr__(self):
        return f"Captured({len(self.outputs)} outputs, {len(self.gradients)} gradients, loss={self.loss})"


def _as_tensors(x):
    return tf.nest.map_structure(lambda a: None if a is None else tf.convert_to_tensor(a), x)


def capture(model, x, y=None, sample_weight=None, training=False):
    """Run one batch eagerly and return every nested layer's output and gradient by path.

    With ``y``, gradients are of the model's compiled loss (the model must be
    compiled); without it, only outputs are returned. Nothing is updated.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"capture expects a keras.Model, got {type(model).__name__}")
    if y is not None and not compat.is_compiled(model):
        raise ValueError("capture with y needs the model's loss: call model.compile(optimizer=..., loss=...) first")
    x = _as_tensors(x)
    saved = [tf.identity(v.value) for v in model.non_trainable_variables] if training else []
    with LayerTap(model) as tap, tf.GradientTape() as tape:
        recorder = Recorder(tapes=[tape])
        with recorder.active():
            y_pred = model(x, training=training) if compat.call_has_training_arg(model) else model(x)
        loss = None
        if y is not None:
            loss = compat.compute_loss(model, x, _as_tensors(y), y_pred, _as_tensors(sample_weight))
    outputs = {p: t for c in recorder.calls for p, t in zip(c.output_paths, c.outputs)}
    gradients = {}
    if loss is not None:
        flat = [t for c in recorder.calls for t in c.outputs]
        grads = tape.gradient(loss, flat, unconnected_gradients=tf.UnconnectedGradients.NONE)
        paths = [p for c in recorder.calls for p in c.output_paths]
        gradients = {p: g for p, g in zip(paths, grads) if g is not None}
    for v, old in zip(model.non_trainable_variables, saved):
        v.assign(old)
    del tap
    return Captured(outputs, gradients, None if loss is None else float(loss), recorder.calls)


def summary(model, x, print_fn=print) -> str:
    """Print (and return) every nested layer's path, class, output shape and parameter count."""
    cap = capture(model, x)
    rows = []
    seen = set()
    for c in cap.calls:
        params = "" if id(c.layer) in seen else f"{c.layer.count_params():,}" if c.layer.built else "0"
        seen.add(id(c.layer))
        shapes = ", ".join(str(tuple(s)) for s in c.shapes)
        rows.append((c.path, type(c.layer).__name__, shapes, params))
    text = tabulate(rows, headers=["layer path", "class", "output shape", "params"])
    text += f"\n{len(seen)} layers called, {model.count_params():,} parameters in {model.name!r}"
    tables = [(c.path, c.layer, c.ids) for c in cap.calls if c.ids is not None]
    if tables:
        from gradtrace.embeddings import effective_rank

        lines = []
        for path, layer, ids in tables:
            flat = tf.reshape(tf.cast(ids, tf.int64), [-1]).numpy()
            n, d = (int(v) for v in layer.embeddings.shape)
            erank = effective_rank(layer.embeddings)
            lines.append((path, f"{n} x {d}", f"{flat.min()}..{flat.max()}" if flat.size else "",
                          len(set(flat.tolist())), "" if erank is None else f"{erank:.3g} of {min(n, d)}"))
        text += "\n\n" + tabulate(lines, headers=["Embedding", "input_dim x d", "ids in this batch",
                                                   "distinct ids", "effective rank"])
    if print_fn:
        print_fn(text)
    return text
