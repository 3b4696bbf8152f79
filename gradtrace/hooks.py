"""The three places where gradtrace hooks into a training step it does not own.

gradtrace runs the step that ``model.fit`` would have run (Keras' own
``train_step``, inside Keras' own train function) and hooks in at three
points, only while a :class:`Trace` is active on the tracing thread:

1. **layer calls** (:mod:`gradtrace.capturing`): every nested layer's outputs
   are recorded and watched by the tapes that are open;
2. **``tf.GradientTape.gradient``**: a call whose tape was opened during the
   step also asks for the gradients of the outputs recorded under that tape,
   in the same backward pass, and keeps them;
3. **the optimizer's ``apply``** (what ``apply_gradients`` calls): the
   statistics are computed, the detectors run, and the update is committed or
   held in-graph (:meth:`gradtrace.step.Engine.on_apply`).

Beside the tape, ``keras.losses.Loss.__call__`` notes each Keras loss object a
step calls under a tape (:class:`LossCall`): a custom ``train_step`` that
computes its own loss (a GAN's) gets the head/loss checks a compiled loss gets.

The tape methods are patched on the class for the duration of a fit (a
``with`` statement looks ``__enter__`` up on the type); the optimizer's
``apply`` on the instance. Both are removed when the fit ends, whatever
happens, and do nothing on threads with no active step.
"""

from __future__ import annotations

import contextlib
import threading

import tensorflow as tf

_STATE = threading.local()
_LOCK = threading.Lock()
_TAPE = {"count": 0, "saved": None}


def set_on_instance(obj, name, value):
    """Set ``obj.<name>`` on the instance (Keras looks ``call``, ``train_step`` and ``apply`` up there
    first) and return a function that puts back exactly what the instance had before."""
    had = name in obj.__dict__
    previous = obj.__dict__.get(name)
    object.__setattr__(obj, name, value)

    def restore():
        if had:
            object.__setattr__(obj, name, previous)
        elif name in obj.__dict__:
            object.__delattr__(obj, name)

    return restore


def current():
    """The :class:`Trace` of the step being traced on this thread, or ``None``."""
    return getattr(_STATE, "ctx", None)


class GradientCall:
    """One hooked ``tape.gradient`` call: its target, the gradients it returned, and the gradients
    of the outputs recorded under its tape (``id(call) -> [gradient per output]``)."""

    def __init__(self, tape, target, source_grads, by_call):
        self.tape = tape
        self.target = target
        self.source_grads = source_grads
        self.by_call = by_call


class LossCall:
    """One call of a ``keras.losses.Loss`` inside the step (a custom ``train_step`` computing its loss)."""

    def __init__(self, loss, y_true, y_pred, tapes):
        self.loss = loss
        self.y_true = y_true
        self.y_pred = y_pred
        self.tapes = tapes


class Trace:
    """What the hooks see of one traced step (one replica's trace): the layer calls its recorder keeps,
    the tapes entered, the ``tape.gradient`` calls and the Keras losses called, in order."""

    def __init__(self, recorder):
        self.recorder = recorder
        self.open_tapes: list = []  # tapes entered during the step and not yet exited
        self.tapes: list = []  # every tape entered during the step
        self.gradients: list[GradientCall] = []
        self.loss_calls: list[LossCall] = []  # the Keras loss objects called in the step, in order
        self.owner = None  # what the optimizer hook hands on_apply (the step's context), while active
        self._used_gradients = set()
        self._used_calls = set()

    @contextlib.contextmanager
    def active(self, owner):
        """The hooks see this trace while the step's body runs; an optimizer update inside it reaches
        ``on_apply(owner, ...)``."""
        previous = current()
        self.owner = owner
        _STATE.ctx = self
        try:
            with self.recorder.active():
                yield self
        finally:
            _STATE.ctx = previous
            self.owner = None

    def gradient_for(self, grads):
        """The tape.gradient call that produced ``grads`` (the latest one not used yet when the
        gradients were transformed after it, clipped for example); ``None`` when no tape did."""
        wanted = {id(g) for g in grads if g is not None}
        candidates = [g for g in reversed(self.gradients) if id(g) not in self._used_gradients]
        found = next((g for g in candidates if any(id(s) in wanted for s in g.source_grads if s is not None)),
                     candidates[0] if candidates else None)
        if found is not None:
            self._used_gradients.add(id(found))
        return found

    def calls_for(self, gradient):
        """The layer calls an update is about: those recorded under its tape, and those recorded
        under no tape (forward passes outside any tape) not yet part of an earlier update."""
        out = []
        for c in self.recorder.calls:
            if id(c) in self._used_calls:
                continue
            if not c.tapes or gradient is None or any(t is gradient.tape for t in c.tapes):
                out.append(c)
                self._used_calls.add(id(c))
        return out

    def loss_call_for(self, gradient):
        """The last Keras loss object called under ``gradient``'s tape (what a custom step differentiates)."""
        if gradient is None:
            return None
        mine = [c for c in self.loss_calls if any(t is gradient.tape for t in c.tapes)]
        return mine[-1] if mine else None

    def output_gradients(self, gradient):
        """Per recorded call, the gradients of its outputs from ``gradient`` (``None`` where it has none)."""
        return [gradient.by_call.get(id(c), [None] * len(c.outputs)) for c in self.recorder.calls]


def _enter(self):
    out = _TAPE["saved"]["__enter__"](self)
    ctx = current()
    if ctx is not None:
        ctx.open_tapes.append(self)
        ctx.tapes.append(self)
    return out


def _exit(self, *exc):
    ctx = current()
    if ctx is not None and self in ctx.open_tapes:
        ctx.open_tapes.remove(self)
    return _TAPE["saved"]["__exit__"](self, *exc)


def _gradient(self, target, sources, output_gradients=None,
              unconnected_gradients=tf.UnconnectedGradients.NONE):
    original = _TAPE["saved"]["gradient"]
    ctx = current()
    if ctx is None or not any(t is self for t in ctx.tapes) or output_gradients is not None \
            or not isinstance(target, (tf.Tensor, tf.Variable)) or target.shape.rank != 0:
        # only the gradient of a scalar (a loss) is an update's; a gradient penalty's inner
        # gradient (of a batch of outputs) passes through untouched
        return original(self, target, sources, output_gradients, unconnected_gradients)
    mine = [c for c in ctx.recorder.calls if any(x is self for x in c.tapes)]
    outputs = [t for c in mine for t in c.outputs]
    flat = tf.nest.flatten(sources)
    grads = original(self, target, flat + outputs, None, tf.UnconnectedGradients.NONE)
    source_grads, output_grads = list(grads[: len(flat)]), list(grads[len(flat):])
    by_call, k = {}, 0
    for c in mine:
        by_call[id(c)] = output_grads[k:k + len(c.outputs)]
        k += len(c.outputs)
    ctx.gradients.append(GradientCall(self, target, source_grads, by_call))
    if unconnected_gradients == tf.UnconnectedGradients.ZERO or unconnected_gradients == "zero":
        source_grads = [tf.zeros_like(s) if g is None else g for s, g in zip(flat, source_grads)]
    return tf.nest.pack_sequence_as(sources, source_grads)


def _loss_call(self, y_true, y_pred, *args, **kwargs):
    out = _TAPE["loss"](self, y_true, y_pred, *args, **kwargs)
    ctx = current()
    graph = None if tf.executing_eagerly() else tf.compat.v1.get_default_graph()
    if ctx is not None and ctx.open_tapes and graph is ctx.recorder.graph:
        ctx.loss_calls.append(LossCall(self, y_true, y_pred, tuple(ctx.open_tapes)))
    return out


def install_tape_hooks():
    """The tape's methods, and ``keras.losses.Loss.__call__`` (to see the losses a custom step computes)."""
    import keras

    with _LOCK:
        if _TAPE["count"] == 0:
            _TAPE["saved"] = {name: tf.GradientTape.__dict__[name] for name in ("__enter__", "__exit__", "gradient")}
            tf.GradientTape.__enter__ = _enter
            tf.GradientTape.__exit__ = _exit
            tf.GradientTape.gradient = _gradient
            _TAPE["loss"] = keras.losses.Loss.__dict__["__call__"]
            keras.losses.Loss.__call__ = _loss_call
        _TAPE["count"] += 1


def uninstall_tape_hooks():
    with _LOCK:
        if _TAPE["count"] == 0:
            return
        _TAPE["count"] -= 1
        if _TAPE["count"] == 0:
            for name, fn in _TAPE["saved"].items():
                setattr(tf.GradientTape, name, fn)
            _TAPE["saved"] = None
            import keras

            keras.losses.Loss.__call__ = _TAPE.pop("loss")


class OptimizerHook:
    """Routes ``optimizer.apply`` through ``on_apply(owner, optimizer, original, grads, variables)`` while a
    step is active (``owner``: what the active :class:`Trace` was given); an update applied with no active step is passed through, after ``outside(optimizer)``."""

    def __init__(self, optimizer, on_apply, outside=None):
        self.optimizer = optimizer
        self.on_apply = on_apply
        self.outside = outside
        self._restore = None

    def install(self):
        opt = self.optimizer
        original = opt.apply
        on_apply, outside = self.on_apply, self.outside

        def apply(grads, trainable_variables=None):
            ctx = current()
            if ctx is None:
                if outside is not None:
                    outside(opt)
                return original(grads, trainable_variables)
            return on_apply(ctx.owner, opt, original, grads, trainable_variables)

        apply.__gradtrace_wrapper__ = True
        self._restore = set_on_instance(opt, "apply", apply)
        return self

    def uninstall(self):
        if self._restore is not None:
            restore, self._restore = self._restore, None
            restore()
