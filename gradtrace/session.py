"""What the three ways in share: the options (:class:`Options`, checked once), the engine kept per model,
and one :class:`Session` that starts a run, installs gradtrace on the model and always takes it off.

``gradtrace.fit``, ``gradtrace.Watch`` and ``gradtrace.loop`` are thin adapters around a Session.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import tensorflow as tf

from gradtrace import _keras_compat as compat
from gradtrace import budget as budget_module
from gradtrace import detectors as detectors_module
from gradtrace import distribute
from gradtrace import snapshot as snapshot_module
from gradtrace import tensorboard as tb_module
from gradtrace.actions import Snapshots
from gradtrace.anomaly import BLOCKING, AnomalyError, check_action
from gradtrace.capturing import LayerTap
from gradtrace.run import VERIFY_STEPS, Run
from gradtrace.schedule import Schedule
from gradtrace.step import Engine
import gradtrace.step.gate as gate_module

DetectorSpec = Union[str, detectors_module.Detector, type]  # a built-in's name, an instance, or a subclass
PathLike = Union[str, os.PathLike]


def _integer(name, value, low, meaning=""):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}={value!r} is not allowed: it must be an integer >= {low}{meaning}.")
    return int(value)


def _snapshot_dir(value):
    if value is None:
        return None
    value = os.fspath(value)
    if os.path.exists(value) and not os.path.isdir(value):
        raise ValueError(f"snapshot_dir={value!r} exists and is not a directory. "
                         "Pass a directory path (it is created if missing).")
    return value


@dataclass(frozen=True)
class Options:
    """The options of gradtrace.fit, checked once (shared by :class:`gradtrace.Watch` and
    :class:`gradtrace.loop`): build them with :meth:`Options.build`, by keyword. ``actions`` (detector
    name -> action) is the one place the action each detector takes is decided."""

    detectors: tuple
    actions: dict  # detector name -> the action it takes
    snapshot_dir: Optional[str] = None
    trace_every: int = 1
    max_snapshots: int = 5
    tensorboard_every: int = 100
    overhead: Optional[float] = None
    trace_at_least_every: int = 100
    verify_hints: bool = False
    guard: Optional[str] = "step"

    @classmethod
    def build(cls, *, detectors=None, on_anomaly=None, snapshot_dir=None, trace_every=1, max_snapshots=5,
              tensorboard_every=100, overhead=None, trace_at_least_every=100, verify_hints=False,
              guard="step") -> "Options":
        """Check gradtrace's own options (one check per option) and resolve the detectors and their actions."""
        if on_anomaly is not None:
            check_action(on_anomaly)
        budget_module.check_overhead(overhead, trace_at_least_every)
        if overhead is not None and trace_every != 1:
            raise ValueError(f"overhead={overhead!r} and trace_every={trace_every!r} both say how often to trace: "
                             "pass one. overhead lets gradtrace choose (trace_at_least_every bounds the gap), "
                             "trace_every fixes it.")
        trace_every = _integer("trace_every", trace_every, 1, " (1 checks every step, 16 checks one step in 16)")
        dets = detectors_module.resolve(detectors)
        actions = {d.name: d.action_under(on_anomaly) for d in dets}
        max_snapshots = _integer("max_snapshots", max_snapshots, 0)
        if snapshot_dir is None and "snapshot" in actions.values():
            snapshot_dir = snapshot_module.DEFAULT_DIR
        guard = gate_module.check_guard(guard)
        if guard != "step" and snapshot_dir is not None:
            raise ValueError(f"guard={guard!r} and snapshots do not go together: a snapshot holds the state before "
                             "the failing step, which only guard='step' (the default) keeps. Pass guard='step', "
                             "or leave snapshot_dir and the 'snapshot' action out.")
        if guard != "step" and verify_hints is True:
            raise ValueError(f"guard={guard!r} and verify_hints=True do not go together: the fixes are tried from "
                             "the state before the failing step, which only guard='step' (the default) keeps.")
        if not isinstance(verify_hints, bool):
            raise ValueError(f"verify_hints={verify_hints!r} is not allowed: pass True (try each hinted setting "
                             "at a halt and say whether it works) or False.")
        return cls(tuple(dets), actions, _snapshot_dir(snapshot_dir), trace_every, max_snapshots,
                   _integer("tensorboard_every", tensorboard_every, 1), None if overhead is None else float(overhead),
                   int(trace_at_least_every), verify_hints, guard)


# Compiled steps are kept per model, like Keras keeps model.train_function: a second
# gradtrace.fit on the same model with the same detectors and compile state does not
# trace again (the detectors' state carries over, as training does).
_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def engine_for(model, dets, actions, optimizers=(), guard="step"):
    key = (
        guard,
        tuple(id(o) for o in optimizers),
        tuple((type(d), d.config()) for d in dets),
        tuple(sorted(actions.items())),
        id(getattr(model, "optimizer", None)),  # an uncompiled model (your own loop) has none
        compat.compile_identity(model),
        bool(getattr(model, "run_eagerly", False)),
        bool(getattr(model, "jit_compile", False)),
        int(getattr(model, "steps_per_execution", 1) or 1),
    )
    cached = _ENGINES.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    engine = Engine(model, dets, actions, LayerTap(model), optimizers=optimizers, guard=guard)
    _ENGINES[model] = (key, engine)
    return engine


def cached_engine(model):
    """What :func:`engine_for` keeps for ``model`` (to put back with :func:`keep_engine`)."""
    return _ENGINES.get(model)


def keep_engine(model, cached):
    if cached is None:
        _ENGINES.pop(model, None)
    else:
        _ENGINES[model] = cached


def attach_run(e, history, run):
    """Keep what was found reachable from an exception that ends a fit (or a watched loop)."""
    try:
        e.history = history
        e.gradtrace = run
        e.run = run  # the name AnomalyError has always had
        if not isinstance(e, AnomalyError):
            e.anomalies = run.anomalies  # every finding of the fit up to the failure
    except Exception:  # an exception type that takes no attributes: re-raise it as it is
        pass


class Session:
    """One watched fit (or loop): the engine for the model, a new :class:`~gradtrace.run.Run`, and, while
    the session is entered, gradtrace's hooks on the model (and, with :meth:`replace_train_function`, the
    train function Keras' fit calls). Leaving it takes every hook off and closes TensorBoard, whatever
    happened; an exception leaving it carries the run (``e.gradtrace``, ``e.anomalies``)."""

    def __init__(self, model, options: Options, verbose, tensorboard_dir=None, optimizer=None):
        self.model = model
        self.options = options
        self.engine = engine_for(model, options.detectors, options.actions,
                                 () if optimizer is None else (optimizer,), guard=options.guard)
        budget = None
        if options.overhead is not None:
            # kept with the compiled steps it times: a later fit of the same model goes on from its timings
            key = (options.overhead, options.trace_at_least_every)
            # with no detector that holds an update, the guarded step has no gate to measure
            guard = self.engine.guard if any(a in BLOCKING for a in options.actions.values()) else None
            budget = self.engine.budgets.setdefault(key, budget_module.Budget(*key, guard=guard))
        writer = None
        if tensorboard_dir is not None:  # every worker runs the summary steps (collectives); the chief writes
            writer = tb_module.Writer(tensorboard_dir, every=options.tensorboard_every,
                                      write=distribute.is_chief(model.distribute_strategy))
        self.run = Run(model, self.engine, verbose, Schedule(model, options.trace_every, budget, writer),
                       Snapshots(options.snapshot_dir, options.max_snapshots))
        self.run.verify_steps = VERIFY_STEPS if options.verify_hints else 0
        self._stack = None

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        if self.run.tensorboard is not None:
            self._stack.callback(self.run.tensorboard.close)
        self._stack.enter_context(self.engine.installed())
        return self

    def replace_train_function(self):
        """Keras' fit calls the run's train function (Keras' own around the watched step) until the session
        ends; then the model's own is put back."""
        model = self.model
        saved = model.train_function
        model.train_function = self.run.train_function()

        def restore():
            model.train_function = saved

        self._stack.callback(restore)
        return self

    @property
    def active(self) -> bool:
        return self._stack is not None

    def close(self):
        """Take gradtrace off the model now (idempotent)."""
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    def __exit__(self, exc_type, exc, tb):
        self.close()
        if exc is not None and getattr(exc, "gradtrace", None) is None and isinstance(exc, Exception):
            attach_run(exc, None, self.run)
        return False


def check_model(model):
    if not compat.is_trainer(model):
        raise TypeError(
            f"gradtrace.fit expects a keras.Model (or another Keras Trainer) as its first argument, got "
            f"{type(model).__name__}. Call it as gradtrace.fit(model, x, y, ...)."
        )
    if not compat.is_compiled(model):
        raise ValueError(
            f"Model {model.name!r} is not compiled. Call model.compile(optimizer=..., loss=...) "
            "before gradtrace.fit(model, ...), exactly as before model.fit(...)."
        )
    if not distribute.built_in_current_scope(model):
        raise RuntimeError(
            f"gradtrace.fit is called inside the scope of {type(tf.distribute.get_strategy()).__name__}, but the "
            f"variables of model {model.name!r} were made outside it. Build and compile the model inside "
            "`with strategy.scope():` (then call gradtrace.fit inside or outside that scope), as model.fit requires."
        )
