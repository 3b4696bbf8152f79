"""Finding every nested layer, naming it by its path, and recording its calls.

Keras 3 has no layer hooks, but ``Operation.__call__`` looks ``self.call`` up on
the instance at call time, so an instance attribute ``call`` wins. gradtrace
installs one small wrapper per layer for the duration of a fit and removes it
in a ``finally`` block. The wrapper does nothing unless a :class:`Recorder` is
active on this thread, which only happens inside a step gradtrace watches.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from dataclasses import dataclass, field

import keras
import tensorflow as tf

from gradtrace import _keras_compat as compat
from gradtrace.hooks import set_on_instance

_STATE = threading.local()

RELU_FAMILY = ("relu", "relu6")


def _active_recorder():
    return getattr(_STATE, "recorder", None)


@dataclass
class Call:
    """One recorded call of a layer inside a training step."""

    path: str
    layer: object
    outputs: list  # float output tensors, one per flat output
    output_paths: list
    ids: object = None  # integer ids for Embedding layers (before the lookup)
    relu: bool = False
    shapes: list = field(default_factory=list)
    activation: str = ""
    tapes: tuple = ()  # the gradient tapes open when the layer ran (they watch its outputs)


def activation_name(layer) -> str:
    """The name of the activation applied last by ``layer`` (``""`` when none is known)."""
    if isinstance(layer, keras.layers.ReLU):
        plain = getattr(layer, "negative_slope", 0.0) == 0.0 and getattr(layer, "threshold", 0.0) == 0.0
        return "relu" if plain else "leaky_relu"
    act = getattr(layer, "activation", None)
    return getattr(act, "__name__", "") if act is not None else ""


def is_relu_family(layer) -> bool:
    return activation_name(layer) in RELU_FAMILY


def layer_paths(model) -> dict:
    """Map ``id(layer) -> path`` for every layer reachable from ``model``.

    Paths start with the model's own name (``outer/inner/user_emb``); a layer
    reachable along several routes keeps the first path found (breadth first).
    A layer that Keras named automatically (``embedding_1``) and that its parent's
    code holds in an attribute (``self.candidate_embedding``) is named by that
    attribute, leading underscores dropped: the name the code uses, the same in every
    process (:func:`layer_aliases` keeps the automatic one).
    """
    return _walk(model)[0]


def layer_aliases(model) -> dict:
    """``path -> the path by Keras' automatic names``, for the layers named by an attribute."""
    return _walk(model)[1]


def _walk(model):
    paths, auto = {id(model): model.name}, {id(model): model.name}
    queue = [model]
    while queue:
        parent = queue.pop(0)
        children = [c for c in compat.sublayers(parent) if id(c) not in paths]
        names = _attribute_names(parent, children)
        for child in children:
            if id(child) in paths:
                continue
            paths[id(child)] = f"{paths[id(parent)]}/{names.get(id(child), child.name)}"
            auto[id(child)] = f"{auto[id(parent)]}/{child.name}"
            queue.append(child)
    aliases = {paths[i]: auto[i] for i in paths if paths[i] != auto[i]}
    return paths, aliases


def _attribute_names(parent, children) -> dict:
    """``id(child) -> attribute name`` for the auto-named children ``parent`` holds in an attribute (a
    subclassed model or layer), where that name is unique among its children's names."""
    if not children or compat.is_graph_model(parent):
        return {}
    held = {}
    for attr, value in vars(parent).items():
        if isinstance(value, keras.layers.Layer) and id(value) not in held:
            name = attr.lstrip("_")
            if name:
                held[id(value)] = name
    taken = {c.name for c in children}
    names = {}
    for child in children:
        name = held.get(id(child))
        if name and name != child.name and compat.is_auto_name(child) and name not in taken:
            names[id(child)] = name
            taken.add(name)
    return names


def variable_paths(model) -> list:
    """``[(path, variable)]`` for ``model.variables``, each named by the deepest layer that
    owns it (``outer/inner/drop/seed_generator_state``): stable across processes,
    unlike Keras' auto-numbered variable paths."""
    paths = layer_paths(model)
    layers = [model] + compat.all_layers(model)
    owner = {}
    for layer in sorted(layers, key=lambda l: paths.get(id(l), "").count("/")):
        for v in layer.variables:
            owner[id(v)] = paths.get(id(layer), layer.name)
    out, seen = [], {}
    for v in model.variables:
        name = f"{owner.get(id(v), model.name)}/{v.name}"
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}#{seen[name]}", v))
    return out


class LayerTap:
    """Installs call wrappers on every layer of a model and always removes them."""

    def __init__(self, model):
        self.model = model
        self.paths: dict = {}
        self.layers: dict = {}
        self._saved: dict = {}  # id(layer) -> the function that puts the layer's own ``call`` back
        self._stack: list = []
        self.log: list = []  # (path, class, output shapes) of the calls of the current model call
        self.failure = None  # (path, class, log) of the innermost layer whose call raised

    def install(self):
        self.failure = None  # a failure of an earlier fit must not be blamed for this one's errors
        self.log = []
        self.refresh()
        return self

    def refresh(self):
        """Wrap any layer not yet wrapped (sublayers created in ``build`` appear late)."""
        for lid, path in layer_paths(self.model).items():
            if lid in self._saved:
                continue
            layer = self.layers.get(lid)
            if layer is None:
                layer = _find_layer(self.model, lid)
            if lid == id(self.model):
                layer = self.model
            if layer is None:
                continue
            self.paths[lid] = path
            self.layers[lid] = layer
            self._wrap(layer)

    def _wrap(self, layer):
        original = layer.call
        tap = self

        @functools.wraps(original)
        def call(*args, **kwargs):
            return tap.run(layer, original, args, kwargs)

        call.__gradtrace_wrapper__ = True
        self._saved[id(layer)] = set_on_instance(layer, "call", call)

    def run(self, layer, original, args, kwargs):
        """Every wrapped call goes through here: keep a short call log, find the failing layer."""
        rec = _active_recorder()
        if rec is not None and _current_graph() is not rec.graph:
            # inside a control-flow body (an RNN cell in tf.while_loop) or a scratch graph
            # of shape inference: nothing there can be captured by the step
            return original(*args, **kwargs)
        if not self._stack:
            self.log = []
            self.failure = None
        self._stack.append(layer)
        try:
            if rec is not None and layer is not self.model:
                out = rec.layer_call(self, layer, original, args, kwargs)
            else:
                out = original(*args, **kwargs)
                if rec is not None and rec.y_pred is None:
                    rec.y_pred = out  # the model's own call: its predictions
        except Exception:
            if self.failure is None:
                self.failure = (self.path_of(layer), type(layer).__name__, list(self.log))
            raise
        finally:
            self._stack.pop()
        if len(self.log) < 10000:
            shapes = [tuple(getattr(t, "shape", ())) for t in tf.nest.flatten(out)]
            self.log.append((self.path_of(layer), type(layer).__name__, shapes))
        return out

    def uninstall(self):
        for restore in self._saved.values():
            try:
                restore()
            except Exception:  # pragma: no cover - never leave the rest patched
                pass
        self._saved.clear()

    def path_of(self, layer) -> str:
        return self.paths.get(id(layer), layer.name)

    def alias_of(self, path) -> str:
        """``path`` (a row's: ``a/b``, ``a/b#2``, ``a/b:0``) by Keras' automatic layer names; "" when the same."""
        aliases = layer_aliases(self.model)
        best = max((p for p in aliases if path == p or path.startswith(p) and path[len(p)] in "/#:"),
                   key=len, default=None)
        return "" if best is None else aliases[best] + path[len(best):]

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.uninstall()
        return False


def _current_graph():
    return None if tf.executing_eagerly() else tf.compat.v1.get_default_graph()


def _find_layer(model, lid):
    for layer in compat.all_layers(model):
        if id(layer) == lid:
            return layer
    return None


def is_patched(layer) -> bool:
    """True when a gradtrace wrapper is still installed on ``layer``."""
    fn = layer.__dict__.get("call")
    return bool(getattr(fn, "__gradtrace_wrapper__", False))


class Recorder:
    """Collects the layer calls of one step (one trace, or one eager call).

    Every tape in ``tapes`` (the tapes open at the time of the call) watches
    every float output, so that gradients with respect to outputs of layers
    with no trainable weights upstream exist too.
    ``sanitize_ids`` replaces out-of-range Embedding ids by 0 before the lookup,
    so the step completes (and the detector reports) instead of aborting on CPU.
    """

    def __init__(self, tapes=(), sanitize_ids=False, keep=True):
        self.tapes = tapes  # a live list: the tapes open now
        self.y_pred = None
        self.sanitize_ids = sanitize_ids
        self.keep = keep
        self.calls: list[Call] = []
        self.changed: list = []  # one boolean per sanitised lookup: did it replace an id (the step is held)
        self._counts: dict = {}
        self._refreshed = False
        self.graph = None

    @contextlib.contextmanager
    def active(self):
        # Only tensors of the step's own graph can be captured: calls inside a
        # control-flow body (an RNN cell inside tf.while_loop) pass through.
        self.graph = _current_graph()
        previous = _active_recorder()
        _STATE.recorder = self
        try:
            yield self
        finally:
            _STATE.recorder = previous

    def layer_call(self, tap, layer, original, args, kwargs):
        if not self._refreshed:
            tap.refresh()
            self._refreshed = True
        base = tap.path_of(layer)
        n = self._counts.get(id(layer), 0) + 1
        self._counts[id(layer)] = n
        path = base if n == 1 else f"{base}#{n}"
        ids = None
        lookup = id_lookup(layer, original, args, kwargs)
        if lookup is not None:
            ids, rebuild = _id_values(args[0])
            if lookup == "sure" and self.sanitize_ids:
                # the lookup reads row 0 instead; the step is held whenever a value was changed
                bad = tf.logical_or(ids < 0, ids >= layer.input_dim)
                self.changed.append(tf.reduce_any(bad))
                args = (rebuild(tf.where(bad, tf.zeros_like(ids), ids)),) + tuple(args[1:])
        out = original(*args, **kwargs)
        flat = tf.nest.flatten(out)
        outputs, out_paths = [], []
        for i, t in enumerate(flat if self.keep else ()):
            if not isinstance(t, (tf.Tensor, tf.Variable)) or not t.dtype.is_floating:
                continue
            for tape in self.tapes:
                tape.watch(t)
            outputs.append(t)
            out_paths.append(path if len(flat) == 1 else f"{path}:{i}")
        if self.keep or ids is not None:
            self.calls.append(
                Call(path, layer, outputs, out_paths, ids=ids, relu=is_relu_family(layer),
                     shapes=[tuple(getattr(t, "shape", ())) for t in flat], activation=activation_name(layer),
                     tapes=tuple(self.tapes))
            )
        return out


_EMBEDDING_CALL = keras.layers.Embedding.call


def id_lookup(layer, original, args, kwargs):
    """Whether this call of ``layer`` looks ids up in an Embedding table: ``"sure"`` (its ids may be made
    safe before the lookup), ``"check"`` (integer ids to an Embedding subclass's own ``call`` with
    other arguments: checked, passed on untouched) or ``None`` (not a lookup, or not known to be one:
    ``ReversibleEmbedding(hidden, reverse=True)`` is a float matmul with the transposed table).

    Decided by the call, not by the class: Keras' own ``Embedding.call`` is always a lookup (it casts
    any input to int32); a subclass's ``call`` is one when it gets integer ids and nothing else differs
    from its defaults."""
    if not isinstance(layer, keras.layers.Embedding) or not args:
        return None
    ids = args[0]
    dtype = getattr(ids, "dtype", None)
    integer = dtype is not None and tf.as_dtype(dtype).is_integer
    own = getattr(type(layer), "call", None) is _EMBEDDING_CALL
    if own:
        return "sure"
    if not integer:
        return None
    return "sure" if _only_defaults(original, args, kwargs) else "check"


def _only_defaults(fn, args, kwargs):
    """True when every argument of the call after the first is left at its default."""
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return False
    params = list(inspect.signature(fn).parameters.values())
    for name, value in list(bound.arguments.items())[1:]:
        param = next((p for p in params if p.name == name), None)
        if param is None or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            if value:
                return False
            continue
        default = param.default
        if default is inspect.Parameter.empty or not (value is default or (
                isinstance(value, (bool, int, float, str, type(None))) and value == default)):
            return False
    return True


def _id_values(ids):
    """``(values, rebuild)``: the ids an Embedding looks up, as a dense tensor (the flat values of
    ragged ids, the values of sparse ones), and how to put checked values back in their structure."""
    if isinstance(ids, tf.RaggedTensor):
        return ids.flat_values, ids.with_flat_values
    if isinstance(ids, tf.SparseTensor):
        return ids.values, lambda v: tf.SparseTensor(ids.indices, v, ids.dense_shape)
    dense = tf.convert_to_tensor(ids)
    return dense, lambda v: v


def format_call_log(log, failed_path=None, failed_class=None) -> str:
    from tabulate import tabulate

    rows = [(p, c, ", ".join(str(tuple(s)) for s in shapes)) for p, c, shapes in log]
    if failed_path:
        rows.append((failed_path, failed_class or "", "<- failed here"))
    return tabulate(rows, headers=["layer path", "class", "output shape"])
