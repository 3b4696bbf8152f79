"""``gradtrace.Watch``: gradtrace as a callback, for a ``fit`` you do not call yourself (your own loop:
:mod:`gradtrace.looping`).

It runs the same engine as :func:`gradtrace.fit`: the same hooks on layer
calls, ``tape.gradient`` and the optimizer's ``apply``, the same detectors,
the same in-graph gating of each update, the same anomalies and report.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Union

import keras

from gradtrace import verify
from gradtrace.session import DetectorSpec, Options, PathLike, Session, attach_run, check_model


class Watch(keras.callbacks.Callback):
    """``model.fit(..., callbacks=[gradtrace.Watch()])``: gradtrace inside a ``fit`` you do not call.

    Takes the options of :func:`gradtrace.fit` (``detectors``, ``on_anomaly``,
    ``snapshot_dir``, ``trace_every``, ``max_snapshots``, ``tensorboard_dir``,
    ``tensorboard_every``, ``overhead``, ``trace_at_least_every``, ``verify_hints``, ``guard``) and gives the
    same detection, halting, anomalies and
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
                 trace_at_least_every: int = 100, verify_hints: bool = False,
                 guard: Optional[str] = "step") -> None:
        super().__init__()
        self.options = Options.build(detectors=detectors, on_anomaly=on_anomaly, snapshot_dir=snapshot_dir,
                                     trace_every=trace_every, max_snapshots=max_snapshots,
                                     tensorboard_every=tensorboard_every, overhead=overhead,
                                     trace_at_least_every=trace_at_least_every, verify_hints=verify_hints,
                                     guard=guard)
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
        verify.after_halt(self.run)  # after a halt, with gradtrace off the model
