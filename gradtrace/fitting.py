"""``gradtrace.fit``: a drop-in ``model.fit`` that watches every nested layer.

Keras' own ``fit`` drives the run (data adapters, callbacks, validation, the
progress bar, History), so every argument means what it means in Keras, and
Keras' own train function runs the model's own ``train_step``. For the
duration of the call gradtrace installs its hooks (:mod:`gradtrace.hooks`: a
wrapper on each layer's ``call``, on ``tf.GradientTape`` and on the
optimizer's ``apply``) and a ``train_function`` that calls Keras' own and hands
the step's record to the run (:mod:`gradtrace.run`); it removes them in a
``finally`` block. This module is the entry point and nothing else.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Optional, Sequence, Union

import keras
import numpy as np
import tensorflow as tf

from gradtrace import _keras_compat as compat
from gradtrace import distribute
from gradtrace import tensorboard as tb_module
from gradtrace.anomaly import AnomalyError, DetectorError
from gradtrace.capturing import format_call_log
from gradtrace.run import HeldLogs, RunCallback
from gradtrace import verify
from gradtrace.session import DetectorSpec, Options, PathLike, Session, attach_run, check_model
from gradtrace.step import DETECTOR_SCOPE

def _data_leaves(value):
    """The arrays of a (nested) list/tuple/dict of model inputs; a long list is data itself, not a structure."""
    if isinstance(value, dict):
        for v in value.values():
            yield from _data_leaves(v)
    elif isinstance(value, (list, tuple)) and len(value) <= 64:
        for v in value:
            yield from _data_leaves(v)
    else:
        yield value


def _check_arguments(x, y, detectors, batch_size=None):
    """Refuse, before anything is installed, the inputs Keras would take silently or explain badly."""
    from gradtrace.detectors.base import Detector

    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                   or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r} is not allowed: it must be a positive integer or None.")
    for name, value in (("x", x), ("y", y)):
        if isinstance(value, (str, bytes)):
            raise ValueError(
                f"{name}={value!r} is a string. gradtrace.fit (like model.fit) takes arrays, lists or dicts of "
                "arrays, a tf.data.Dataset, a keras.utils.PyDataset or a generator; load the data first."
            )
    if isinstance(x, tf.data.Dataset):
        if int(x.cardinality()) == 0:
            raise ValueError(
                "x is an empty tf.data.Dataset (it yields no batch), so there is nothing to train on. "
                "Check the filters, take() or batch(drop_remainder=True) that built it."
            )
    else:
        for name, value in (("x", x), ("y", y)):
            for leaf in _data_leaves(value):
                shape = getattr(leaf, "shape", None)
                if shape is not None and len(shape) >= 1 and shape[0] == 0:
                    raise ValueError(
                        f"{name} holds 0 samples (an array of shape {tuple(shape)}), so there is nothing to train on."
                    )
    if detectors is not None and not (
        isinstance(detectors, (list, tuple, str, Detector))
        or (isinstance(detectors, type) and issubclass(detectors, Detector))
    ):
        raise TypeError(
            f"detectors={detectors!r} is not allowed: pass None (the default detectors) or a list of detector "
            "names ('nan') and gradtrace.Detector instances."
        )


def fit(
    model: keras.Model,
    x: Any = None,
    y: Any = None,
    batch_size: Optional[int] = None,
    epochs: int = 1,
    verbose: Union[str, int] = "auto",
    callbacks: Optional[Sequence[keras.callbacks.Callback]] = None,
    validation_split: float = 0.0,
    validation_data: Any = None,
    shuffle: Union[bool, str] = True,
    class_weight: Optional[dict] = None,
    sample_weight: Any = None,
    initial_epoch: int = 0,
    steps_per_epoch: Optional[int] = None,
    validation_steps: Optional[int] = None,
    validation_batch_size: Optional[int] = None,
    validation_freq: int = 1,
    *,
    detectors: Optional[Sequence[DetectorSpec]] = None,
    on_anomaly: Optional[str] = None,
    snapshot_dir: Optional[PathLike] = None,
    trace_every: int = 1,
    max_snapshots: int = 5,
    tensorboard_dir: Optional[PathLike] = None,
    tensorboard_every: int = 100,
    overhead: Optional[float] = None,
    trace_at_least_every: int = 100,
    verify_hints: bool = False,
    guard: Optional[str] = "step",
) -> keras.callbacks.History:
    """Train ``model`` exactly as ``model.fit`` would, watching every nested layer.

    Arguments up to ``validation_freq`` are ``model.fit``'s. gradtrace adds:

    - ``detectors``: ``None`` for every built-in detector with its defaults, or
      a list of names (``"nan"``) and :class:`~gradtrace.Detector` instances.
    - ``on_anomaly``: one action for every detector, overriding their defaults:
      ``"halt"`` (stop; the step's update is not applied), ``"warn"`` (record,
      print, go on), ``"raise"`` (raise :class:`~gradtrace.AnomalyError`; the
      update is not applied), ``"snapshot"``.
    - ``snapshot_dir``: where snapshots of failing steps are written (for the
      actions halt, raise and snapshot). Defaults to ``./gradtrace_snapshots``
      when some detector's action is ``"snapshot"``; otherwise no snapshot.
    - ``max_snapshots``: at most this many snapshots per fit (default 5).
    - ``trace_every``: capture and check every layer every N steps; the steps
      in between (*guarded*) check the loss, the Embedding ids, the labels and
      every weight gradient for NaN/Inf, and one that refuses an update is
      traced again, uncommitted, to name its layer.
    - ``overhead``: a budget instead of ``trace_every``: gradtrace times its traced
      and guarded steps against model.fit's and traces as often as keeps its
      whole extra time within this share of model.fit's step (0.05: 5%),
      and at least every ``trace_at_least_every`` steps (default 100). Every
      step checks the loss and every weight gradient for NaN/Inf, but for
      the 10 model.fit steps its calibration times (see :mod:`gradtrace.budget`).
    - ``guard``: ``"step"`` (default), ``"variable"`` or ``None``: see :mod:`gradtrace.step.gate`.
    - ``tensorboard_dir``: write per-layer scalars and histograms there every
      ``tensorboard_every`` steps (default 100), and each anomaly as a text
      event (see :mod:`gradtrace.tensorboard`).
    - ``verify_hints``: at a halt, try each setting the hints name (learning
      rate, clipping, data scale) from the state before the held step and set
      ``Anomaly.verified`` (see :mod:`gradtrace.verify`).

    Returns the ``keras.callbacks.History`` with one more attribute,
    ``anomalies`` (a list of :class:`~gradtrace.Anomaly`), and ``gradtrace``
    (the run, for :func:`gradtrace.report`).
    """
    check_model(model)
    _check_arguments(x, y, detectors, batch_size)
    options = Options.build(detectors=detectors, on_anomaly=on_anomaly, snapshot_dir=snapshot_dir,
                            trace_every=trace_every, max_snapshots=max_snapshots, tensorboard_every=tensorboard_every,
                            overhead=overhead, trace_at_least_every=trace_at_least_every, verify_hints=verify_hints,
                            guard=guard)
    if tensorboard_dir is not None and distribute.is_chief(model.distribute_strategy):
        tb_module.check_dir(tensorboard_dir)  # refused before anything is installed
    # by keyword: a subclass's fit (KerasHub's PipelineModel.fit) may order its arguments otherwise
    fit_args = dict(x=x, y=y, batch_size=batch_size, epochs=epochs, verbose=verbose, validation_split=validation_split,
                    validation_data=validation_data, shuffle=shuffle, class_weight=class_weight,
                    sample_weight=sample_weight, initial_epoch=initial_epoch, steps_per_epoch=steps_per_epoch,
                    validation_steps=validation_steps, validation_batch_size=validation_batch_size,
                    validation_freq=validation_freq)
    if model.built and not model.trainable_weights:
        return _nothing_to_watch(model, callbacks, fit_args)
    if compat.runs_keras_train_step(model):
        _build_optimizer(model)  # (a custom step may never use model.optimizer: leave it as Keras would)
    with _one_step_per_execution_for_snapshot(model, options):
        session = Session(model, options, 1 if verbose == "auto" else verbose, tensorboard_dir)
        run = session.run
        with session, compat.first_batch_build_fix(model):
            session.replace_train_function()
            previous_history = getattr(model, "history", None)
            try:
                history = model.fit(callbacks=_callbacks(run, model, callbacks), **fit_args)
            except BaseException as e:
                _failed(e, model, previous_history, session)
                raise
        verify.after_halt(session.run)
    history.anomalies = run.anomalies
    history.gradtrace = run
    return history


def _nothing_to_watch(model, callbacks, fit_args):
    warnings.warn(
        f"Model {model.name!r} has no trainable weights, so there is no update to watch: gradtrace trains "
        "it as model.fit does (forward pass, loss tracker and metrics) and runs no detector. Make its "
        "layers trainable (layer.trainable = True) to watch it.",
        stacklevel=3,
    )
    history = model.fit(callbacks=callbacks, **fit_args)
    history.anomalies, history.gradtrace = [], None
    return history


@contextlib.contextmanager
def _one_step_per_execution_for_snapshot(model, options):
    """A snapshotted step is held and then redone on the host: inside a multi-step execution the steps after
    it would run before the redo, so with the action snapshot the fit runs one step per execution."""
    spe = int(getattr(model, "steps_per_execution", 1) or 1)
    if spe == 1 or "snapshot" not in options.actions.values():
        yield
        return
    warnings.warn(
        f"steps_per_execution={spe} with the action 'snapshot': the snapshotted step is redone on the host, "
        "so gradtrace trains with steps_per_execution=1 for this fit (the result is the same).",
        stacklevel=4,
    )
    model.steps_per_execution = 1
    try:
        yield
    finally:
        model.steps_per_execution = spe


def _callbacks(run, model, callbacks):
    """The fit's callbacks with the run's: HeldLogs first, the run's callback last, after a History (an
    epoch-end finding that raises or halts then finds that epoch recorded by every callback, as the epoch's
    updates were applied)."""
    cb = RunCallback(run)
    if isinstance(callbacks, keras.callbacks.CallbackList):
        callbacks.append(cb)
        cb.set_model(model)
        return callbacks
    out = [HeldLogs(run)] + list(callbacks or [])
    if not any(compat.is_history(c) for c in out):
        out.append(keras.callbacks.History())
    out.append(cb)
    return out


def _failed(e, model, previous_history, session):
    """Whatever stopped the fit (an AnomalyError, a user's callback, Ctrl-C, the data), keep what was learnt
    so far reachable: ``e.history`` is this fit's History (None when Keras had not made one yet), with
    ``.anomalies`` and ``.gradtrace``, and ``e.gradtrace`` is the run. A detector's in-graph check that
    failed becomes a DetectorError, and a failing model call names its layer."""
    run, engine = session.run, session.engine
    history = getattr(model, "history", None)
    if history is previous_history:
        history = None  # a History of an earlier fit, not of this one
    if history is not None:
        history.anomalies = run.anomalies
        history.gradtrace = run
    failed = _failed_detector(e, engine)
    if failed is not None:
        new = DetectorError(failed, "check", e, run.anomalies)
        attach_run(new, history, run)
        raise new from e
    attach_run(e, history, run)
    _note_peer_failure(e, model, run)
    if isinstance(e, Exception) and not isinstance(e, AnomalyError):
        try:
            _reraise_with_layer_table(e, engine.tap.failure)
        except BaseException as new:
            attach_run(new, history, run)
            raise


def _build_optimizer(model):
    """Make the optimizer's variables now, as the step's first trace would (``apply_gradients`` builds
    an unbuilt optimizer on the model's trainable variables). A ``tf.function`` that creates variables
    while it is traced is traced a second time, so this halves the cost of the first step. Nothing
    changes otherwise: the same variables, made with the same initial values."""
    optimizer = model.optimizer
    if getattr(optimizer, "built", True) or not model.built or not model.trainable_variables:
        return
    with model.distribute_strategy.scope():
        optimizer.build(model.trainable_variables)


def _failed_detector(e, engine):
    """The name of the detector whose in-graph check raised ``e`` at run time, if one did."""
    if not isinstance(e, tf.errors.OpError):
        return None
    text = f"{e.message} {getattr(e.op, 'name', '') or ''}"
    for d in engine.detectors:
        if f"{DETECTOR_SCOPE}{d.name}/" in text:
            return d.name
    return None


def _note_peer_failure(e, model, run):
    """Under a multi-worker strategy, say what a failed collective op most likely means."""
    collective = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError,
                  tf.errors.AbortedError)
    if isinstance(e, collective) and isinstance(model.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy) \
            and hasattr(e, "add_note"):
        e.add_note(
            f"gradtrace: a collective operation failed after {run.calls} step(s) on this worker: another worker "
            "most likely stopped (crashed, was preempted or killed). The failing step was not applied here; "
            "the model is left as after the last completed step. Restart every worker, from a checkpoint."
        )


def _reraise_with_layer_table(e, failure):
    if failure is None:
        return
    path, cls, log = failure
    table = format_call_log(log, path, cls)
    msg = f"{e}\n\ngradtrace: the model call failed in layer {path!r} ({cls}). Layers that ran before it:\n{table}"
    try:
        new = type(e)(msg)
    except Exception:
        new = None
    if new is not None and str(new) == msg:
        raise new from e
    if hasattr(e, "add_note"):
        e.add_note(msg)
