"""``gradtrace.loop``: gradtrace around your own ``GradientTape`` loop.

It runs the same engine as :func:`gradtrace.fit` and :class:`gradtrace.Watch`
(:mod:`gradtrace.watching`): the same hooks on layer calls, ``tape.gradient``
and the optimizer's ``apply``, the same detectors, the same in-graph gating of
each update, the same anomalies and report.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Callable, Optional, Sequence

import keras
import tensorflow as tf

from gradtrace import _keras_compat as compat
from gradtrace.session import DetectorSpec, Options, PathLike, Session, attach_run


class loop:
    """gradtrace around your own training loop.

    ::

        with gradtrace.loop(model, optimizer) as w:
            @w.step
            @tf.function
            def train_step(x, y):
                with tf.GradientTape() as tape:
                    loss = loss_fn(y, model(x, training=True))
                grads = tape.gradient(loss, model.trainable_variables)
                optimizer.apply_gradients(zip(grads, model.trainable_variables))
                return loss

            for x, y in dataset:
                train_step(x, y)
                if w.halted:
                    break

    ``w.step`` wraps the step (compiled with ``tf.function`` if you gave it one,
    eager otherwise): every layer output recorded under the tape and its
    gradient are checked at each ``optimizer.apply_gradients``, and a blocking
    detector holds the update in-graph. After each call the detectors' findings
    are acted on as in :func:`gradtrace.fit`: ``halt`` sets ``w.halted`` (the
    update was not applied; stop your loop), ``raise`` raises
    :class:`~gradtrace.AnomalyError`. ``w.anomalies`` and ``w.run`` (for
    :func:`gradtrace.report`) hold what was found. The optimizers watched are
    ``optimizer`` and the model's own (``model.optimizer`` and optimizer
    attributes). With ``snapshot_dir`` (or ``on_anomaly="snapshot"``) the failing step's batch (the
    step's arguments), weights and optimizer state are written, under XLA too; replay it with
    ``gradtrace.replay(path, model=model, step=train_step, optimizer=optimizer)``.
    ``tensorboard_dir`` writes the per-layer summaries every ``tensorboard_every`` steps, as under
    :func:`gradtrace.fit`.
    """

    def __init__(self, model: keras.layers.Layer, optimizer: Optional[keras.optimizers.Optimizer] = None,
                 detectors: Optional[Sequence[DetectorSpec]] = None, on_anomaly: Optional[str] = None,
                 trace_every: int = 1, verbose: int = 1, overhead: Optional[float] = None,
                 trace_at_least_every: int = 100, snapshot_dir: Optional[PathLike] = None, max_snapshots: int = 5,
                 tensorboard_dir: Optional[PathLike] = None, tensorboard_every: int = 100,
                 guard: Optional[str] = "step") -> None:
        if not isinstance(model, keras.layers.Layer):
            raise TypeError(f"gradtrace.loop expects a Keras model or layer, got {type(model).__name__}.")
        if optimizer is not None and not isinstance(optimizer, keras.optimizers.Optimizer):
            raise TypeError(f"optimizer must be a keras.optimizers.Optimizer, got {type(optimizer).__name__}.")
        self.model = model
        self.optimizer = optimizer
        self.options = Options.build(detectors=detectors, on_anomaly=on_anomaly, snapshot_dir=snapshot_dir,
                                     trace_every=trace_every, max_snapshots=max_snapshots,
                                     tensorboard_every=tensorboard_every, overhead=overhead,
                                     trace_at_least_every=trace_at_least_every, guard=guard)
        self.tensorboard_dir = tensorboard_dir
        self.verbose = verbose
        self.run = None
        self._session = None

    @property
    def halted(self) -> bool:
        return bool(self.run is not None and self.run.halted)

    @property
    def anomalies(self):
        return self.run.anomalies if self.run is not None else []

    def __enter__(self):
        with contextlib.ExitStack() as stack:
            self._session = stack.enter_context(Session(self.model, self.options, self.verbose, self.tensorboard_dir,
                                                        optimizer=self.optimizer))
            stack.pop_all()  # entered: the session stays on until __exit__
        self.run = self._session.run
        self.run.snapshots.optimizer = self.optimizer or getattr(self.model, "optimizer", None)
        return self

    def __exit__(self, *exc):
        session, self._session = self._session, None
        if session is not None:
            with session:  # the hooks come off (and TensorBoard closes) whatever happens
                if exc[1] is None:
                    self.run.drain_history()
        if exc[1] is not None:
            attach_run(exc[1], None, self.run)
        return False

    def step(self, fn: Callable) -> Callable:
        """Wrap your step function (a ``tf.function`` or a plain Python function)."""
        if self.run is None:
            raise RuntimeError("use w.step inside `with gradtrace.loop(model, optimizer) as w:`")
        python_function = getattr(fn, "python_function", None)
        compiled = python_function is not None
        python_function = python_function or fn
        engine, run = self._session.engine, self.run
        functions = {}

        def make(plan):
            if plan.mode == "plain":  # your step as you wrote it (an overhead budget's reference)
                unwatched = engine.unwatched(fn)
                return lambda *args, **kwargs: (unwatched(*args, **kwargs), None)
            step = engine.custom_step(plan, python_function)
            if not compiled:
                return step
            if compat.function_jit_compile(fn) and plan.mode == "train":
                # XLA for your step as you asked; the failing batch kept outside the XLA cluster
                return tf.function(engine.keeping_the_batch(engine.variant(plan),
                                                            tf.function(step, jit_compile=True), custom=True))
            return tf.function(step, jit_compile=compat.function_jit_compile(fn))

        def run_on(plan, data):  # a held step measured in full, traced again or redone (gradtrace.fit's too)
            if plan not in functions:
                functions[plan] = make(plan)
            return functions[plan](*data)[0]

        run.own_step = (python_function, run_on)

        def call(*args, **kwargs):
            if self._session is None:
                raise RuntimeError("the watched step was called after its `with gradtrace.loop(...)` block ended; "
                                   "call it inside the block (or watch it again)")
            plan, traced, summary = run.schedule.next_plan()
            if plan not in functions:
                functions[plan] = make(plan)
            start, found = time.perf_counter(), run.log.total
            out, fired = functions[plan](*args, **kwargs)
            run.after_call(plan, traced, summary, fired=fired)
            run.schedule.timed(traced, time.perf_counter() - start, run.log.total != found)
            host = time.perf_counter()
            run.after_step(traced)
            run.schedule.host_work(time.perf_counter() - host)
            return out

        # what gradtrace.replay(path, step=...) runs, and how it was compiled
        call.gradtrace_step = (python_function, compiled, bool(compat.function_jit_compile(fn)))
        return call


def watch(*args, **kwargs) -> loop:
    """The former name of :class:`loop` (``watch`` beside ``Watch`` read as one name in two cases)."""
    warnings.warn("gradtrace.watch was renamed gradtrace.loop (same arguments); gradtrace.watch will be removed.",
                  DeprecationWarning, stacklevel=2)
    return loop(*args, **kwargs)
