"""Two more ways in: ``gradtrace.Watch`` (a callback, for someone else's ``fit``) and
``gradtrace.loop`` (for your own ``GradientTape`` loop).

Both run the same engine as :func:`gradtrace.fit`: the same hooks on layer
calls, ``tape.gradient`` and the optimizer's ``apply``, the same detectors,
the same in-graph gating of each update, the same anomalies and report.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Callable, Optional, Sequence, Union

import keras
import tensorflow as tf

from gradtrace import _keras_compat as compat
from gradtrace.fitting import check_model
from gradtrace.session import DetectorSpec, Options, PathLike, Session, attach_run


class Watch(keras.callbacks.Callback):
    """``model.fit(..., callbacks=[gradtrace.Watch()])``: gradtrace inside a ``fit`` you do not call.

    Takes the options of :func:`gradtrace.fit` (``detectors``, ``on_anomaly``,
    ``snapshot_dir``, ``trace_every``, ``max_snapshots``, ``tensorboard_dir``,
    ``tensorboard_every``, ``overhead``, ``trace_at_least_every``) and gives the same detection, halting, anomalies and
    report: ``watch.anomalies``, ``watch.run`` (for :func:`gradtrace.report`), and
    ``history.anomalies`` / ``history.gradtrace`` on the History of the fit.

    At ``on_train_begin`` it installs gradtrace's hooks and its train function
    on the model (Keras' ``fit`` calls ``model.train_function`` for each
    execution); at ``on_train_end``, or when its train function raises, it
    removes them. A fit stopped by another callback's exception never reaches
    ``on_train_end``: call :meth:`close` then (the next ``on_train_begin`` also
    removes what a previous fit left). Put it first in the callback list: on a
    halted step it hands the callbacks after it the held step's own logs for
    the epoch. ``verbose="auto"`` (the default) prints what ``fit`` would print:
    nothing under ``model.fit(..., verbose=0)``.
    """

    def __init__(self, detectors: Optional[Sequence[DetectorSpec]] = None, on_anomaly: Optional[str] = None,
                 snapshot_dir: Optional[PathLike] = None, trace_every: int = 1, max_snapshots: int = 5,
                 tensorboard_dir: Optional[PathLike] = None, tensorboard_every: int = 100,
                 verbose: Union[str, int] = "auto", overhead: Optional[float] = None,
                 trace_at_least_every: int = 100) -> None:
        super().__init__()
        self.options = Options.build(detectors=detectors, on_anomaly=on_anomaly, snapshot_dir=snapshot_dir,
                                     trace_every=trace_every, max_snapshots=max_snapshots,
                                     tensorboard_every=tensorboard_every, overhead=overhead,
                                     trace_at_least_every=trace_at_least_every)
        self.tensorboard_dir = tensorboard_dir
        self.verbose = verbose
        self.run = None  # the run of the latest fit
        self.runs = []  # one run per fit watched, shared with the copies a tuner makes (KerasTuner deep-copies)
        self._installed = None

    def __deepcopy__(self, memo):
        twin = Watch.__new__(Watch)
        keras.callbacks.Callback.__init__(twin)
        twin.options, twin.tensorboard_dir, twin.verbose = self.options, self.tensorboard_dir, self.verbose
        twin.run, twin.runs, twin._installed = None, self.runs, None
        return twin

    @property
    def anomalies(self):
        """Every finding of every fit this callback (or a copy of it) watched, in order."""
        return [a for run in self.runs for a in run.anomalies]

    def on_train_begin(self, logs=None):
        self.close()  # what an interrupted earlier fit may have left
        model = self.model
        check_model(model)
        spe = int(getattr(model, "steps_per_execution", 1) or 1)
        if spe > 1 and "snapshot" in self.options.actions.values():
            # Keras has already laid out this fit's executions: unlike gradtrace.fit, a callback cannot
            # fall back to one step per execution, and the steps after a snapshotted one would run
            # before its redo
            raise ValueError(
                f"gradtrace.Watch with the action 'snapshot' needs steps_per_execution=1 (the model has {spe}): "
                "a snapshotted step is redone on the host after its execution. Compile with "
                "steps_per_execution=1, use on_anomaly='halt' with snapshot_dir (one snapshot, then stop), or "
                "call gradtrace.fit(model, ...), which falls back to one step per execution by itself.")
        self._installed = contextlib.ExitStack()
        session = self._installed.enter_context(Session(model, self.options, self._verbosity(), self.tensorboard_dir))
        self.run = session.run
        self.runs.append(self.run)
        session.replace_train_function()
        function = model.train_function

        def guarded(iterator):
            try:
                return function(iterator)
            except StopIteration:
                raise
            except BaseException as e:
                history = getattr(self.model, "history", None)
                attach_run(e, history, self.run)
                self._attach_to_history(history)
                self._remove()
                raise

        model.train_function = guarded

    def _verbosity(self):
        """``verbose="auto"``: as quiet as the fit it watches (``model.fit(..., verbose=0)`` prints nothing)."""
        if self.verbose != "auto":
            return self.verbose
        fit_verbose = (self.params or {}).get("verbose", 1)
        return 1 if fit_verbose == "auto" else int(bool(fit_verbose))

    def _attach_to_history(self, history):
        if history is not None:
            history.anomalies = self.run.anomalies
            history.gradtrace = self.run

    def _remove(self):
        if self._installed is not None:
            installed, self._installed = self._installed, None
            installed.close()

    def close(self):
        """Remove gradtrace from the model now (idempotent)."""
        self._remove()

    def on_epoch_begin(self, epoch, logs=None):
        self.run.epoch_begin(epoch)

    def on_epoch_end(self, epoch, logs=None):
        self.run.hand_over_held_logs(logs)
        self.run.epoch_logs = dict(logs or {})
        self.run.epoch_end_checks(epoch)

    def on_train_end(self, logs=None):
        try:
            self.run.fit_end_checks()
        finally:
            self._remove()  # (TensorBoard closes with the session)
            self._attach_to_history(getattr(self.model, "history", None))


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
                 tensorboard_dir: Optional[PathLike] = None, tensorboard_every: int = 100) -> None:
        if not isinstance(model, keras.layers.Layer):
            raise TypeError(f"gradtrace.loop expects a Keras model or layer, got {type(model).__name__}.")
        if optimizer is not None and not isinstance(optimizer, keras.optimizers.Optimizer):
            raise TypeError(f"optimizer must be a keras.optimizers.Optimizer, got {type(optimizer).__name__}.")
        self.model = model
        self.optimizer = optimizer
        self.options = Options.build(detectors=detectors, on_anomaly=on_anomaly, snapshot_dir=snapshot_dir,
                                     trace_every=trace_every, max_snapshots=max_snapshots,
                                     tensorboard_every=tensorboard_every, overhead=overhead,
                                     trace_at_least_every=trace_at_least_every)
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
            run.after_step(traced)
            return out

        # what gradtrace.replay(path, step=...) runs, and how it was compiled
        call.gradtrace_step = (python_function, compiled, bool(compat.function_jit_compile(fn)))
        return call


def watch(*args, **kwargs) -> loop:
    """The former name of :class:`loop` (``watch`` beside ``Watch`` read as one name in two cases)."""
    warnings.warn("gradtrace.watch was renamed gradtrace.loop (same arguments); gradtrace.watch will be removed.",
                  DeprecationWarning, stacklevel=2)
    return loop(*args, **kwargs)
