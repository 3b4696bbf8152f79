"""``gradtrace.fit``: a drop-in ``model.fit`` that watches every nested layer.

Keras' own ``fit`` drives the run (data adapters, callbacks, validation, the
progress bar, History), so every argument means what it means in Keras. For
the duration of the call gradtrace installs three things on the model and
removes them in a ``finally`` block: a wrapper on each layer's ``call``, its
own ``train_step``, and a ``train_function`` that, after each compiled step,
reads one boolean and, only when a detector fired, turns the packed
statistics into :class:`~gradtrace.Anomaly` records and acts on them.
"""

from __future__ import annotations

import os
import sys
import warnings
import weakref

import keras
import numpy as np
import tensorflow as tf

from gradtrace import _keras_compat as compat
from gradtrace import detectors as detectors_module
from gradtrace import distribute
from gradtrace import snapshot as snapshot_module
from gradtrace import tensorboard as tb_module
from gradtrace.anomaly import (BLOCKING, Anomaly, AnomalyError, AnomalyLog, DetectorError, check_action, stopped_how,
                               strongest)
from gradtrace.capture import LayerTap, format_call_log
from gradtrace.stats import row_dict
from gradtrace.step import DETECTOR_SCOPE, KEY, TRACED, UNTRACED, Engine, Plan

_TENSOR_NAMES = {"ids": "input"}


def build_anomalies(detectors, actions, table, fired, values, matrix, step, epoch, replica_faults=None, columns=None):
    """Host side, on a step where something fired: each detector explains its rows.

    ``replica_faults`` (``[replicas, rows]``, under a strategy) names the
    replicas whose shard held the blamed row's NaN/Inf or bad ids; ``columns``
    are the statistics ``matrix`` really holds (all when ``None``).
    """
    found = []
    for d_i, d in enumerate(detectors):
        if not fired[d_i].any():
            continue
        try:
            explained = list(d.explain(table.rows, fired[d_i], values[d_i], matrix, table))
        except Exception as e:
            raise DetectorError(d.name, "explain", e) from e
        for row, value, message, *hint in explained:
            found.append(Anomaly(
                detector=d.name, layer=row.path, tensor=_TENSOR_NAMES.get(row.kind, row.kind), step=step,
                epoch=epoch, value=value, message=message, action=actions[d.name],
                stats=row_dict(matrix[row.index], columns),
                replicas=() if replica_faults is None else tuple(
                    int(r) for r in np.flatnonzero(replica_faults[:, row.index])),
                hint=hint[0] if hint else "",
            ))
    return found


class StepRecord:
    """The statistics of one step at which something fired (kept for the report)."""

    def __init__(self, step, epoch, table, matrix, anomalies, columns=None):
        self.step = step
        self.epoch = epoch
        self.table = table
        self.matrix = matrix
        self.anomalies = anomalies
        # the statistics the matrix holds: all (None) on a held step, which is measured
        # again in full; on a step that only warned, what the detectors needed
        self.columns = columns


class Run:
    """Host-side state of one ``gradtrace.fit`` call."""

    def __init__(self, model, engine, trace_every, verbose, keep_records=20, snapshot_dir=None, max_snapshots=5):
        self.model = model
        self.engine = engine
        self.snapshot_dir = snapshot_dir
        self.max_snapshots = max_snapshots
        self.snapshots: list[str] = []
        self._last = None  # the record of the last traced step
        self.held_logs = None  # the logs of a step held by a halt
        self.trace_every = trace_every
        self.verbose = verbose
        self.log = AnomalyLog()
        self.records: list[StepRecord] = []
        self.keep_records = keep_records
        self.calls = 0
        self.epoch = 0
        self.halted = False
        self.tensorboard = None  # a gradtrace.tensorboard.Writer when fit got tensorboard_dir

    # -- the train_function Keras calls ----------------------------------------
    def train_function(self):
        """What Keras' ``fit`` calls for each execution: Keras' own train function around the
        watched step, then one boolean read; only when a detector fired, the record is read,
        turned into :class:`~gradtrace.Anomaly` records and acted on."""
        engine = self.engine

        def function(iterator):
            summary = self.tensorboard is not None and self.calls % self.tensorboard.every == 0
            traced = summary or self.trace_every == 1 or self.calls % self.trace_every == 0
            plan = Plan(True, summary_bins=self.tensorboard.bins) if summary else TRACED if traced else UNTRACED
            logs = engine.train_function(plan)(iterator)
            self.calls += 1
            variant = engine.variants[plan]
            record = variant.record()
            if record is None:  # no update was applied: nothing was watched
                return logs
            if traced:
                self._last = record
            if summary:
                self.tensorboard.write_step(int(record.last_step.numpy()), variant.table, record.last.numpy(),
                                            variant.histogram_rows, record.histograms.numpy())
            if bool(record.any.numpy()):
                held_logs = {k: v.numpy() for k, v in record.logs.items()}
                redone = self._handle(variant, complete=summary)
                if redone is not None:
                    return redone
                if self.halted and not bool(record.committed.numpy()) and set(held_logs) == set(logs):
                    # the callbacks see the held step's own logs (its real, non-finite loss), as they
                    # would under model.fit; the epoch's logs too (see _HeldLogs)
                    self.held_logs = held_logs
                    return held_logs
            return logs

        return function

    @property
    def last_stats(self):
        """The statistics of the last traced step (``[rows, columns]``), or ``None``."""
        return None if self._last is None else tf.convert_to_tensor(self._last.last)

    def _handle(self, variant, complete=False):
        """A detector fired in the last execution. ``complete``: the step measured every statistic."""
        rec = variant.record()
        matrix = rec.stats.numpy()
        fired, values = rec.fired.numpy(), rec.values.numpy()
        step, committed = int(rec.step.numpy()), bool(rec.committed.numpy())
        faults = None if rec.faults is None else rec.faults.numpy()
        data = dist_data = None
        if not committed:
            data, dist_data = variant.captured_batch(self.model.distribute_strategy)
        variant.reset()
        columns = None if complete else variant.columns
        if not complete and dist_data is not None:
            # The step was held, so its pre-step state is intact: measure everything (exact
            # NaN/Inf counts, std, min, max, weights) by running it again, committing nothing.
            # The watched step itself only computes what the detectors read.
            report = dict(self.engine.batch_function(Plan(variant.plan.traced, "report"))(dist_data))[KEY]
            matrix = report["stats"].numpy()
            faults = report["replica_faults"].numpy() if "replica_faults" in report else faults
            columns = None
        found = build_anomalies(variant.detectors, self.engine.actions, variant.table, fired, values, matrix, step,
                                self.epoch, faults, columns)
        if not found:
            return None
        if not committed and data is None and self.snapshot_dir is not None:
            for a in found:
                a.snapshot_error = "not written: the failing batch is not kept under jit_compile=True"
        return self._act(found, StepRecord(step, self.epoch, variant.table, matrix, found, columns), data, dist_data)

    def _act(self, found, record, data=None, dist_data=None, stage="step"):
        """Act on the findings of one step (``data``: its batch, ``dist_data``: the same batch as the
        step took it, distributed) or of an epoch's end (no batch).

        | action   | step finding                              | epoch-end finding                        |
        | warn     | record, print, go on                      | the same                                 |
        | snapshot | snapshot the held step, then redo it      | record, go on (no step to snapshot)      |
        | halt     | stop; the step's update is not applied    | stop after this epoch (its updates stay) |
        | raise    | raise; the step's update is not applied   | raise after this epoch                   |
        """
        for a in found:
            a.stage = stage
            self.log.add(a)
        if len(self.records) < self.keep_records:
            self.records.append(record)
        action = strongest([a.action for a in found])
        if stage != "step" and action == "snapshot":
            for a in found:
                a.snapshot_error = "not written: a finding at the end of an epoch or of training has no failing step"
            action = "warn"
        if stage == "fit_end" and action == "halt":
            action = "warn"  # training has ended: there is nothing left to stop
        if action in BLOCKING and data is not None and self.snapshot_dir is not None:
            self._snapshot(found, record, data)
        if self.tensorboard is not None:
            self.tensorboard.write_anomalies(found)
        if self.verbose:
            for a in found:
                print(f"\ngradtrace: {a}", file=sys.stdout, flush=True)
        if action == "raise":
            self.halted = True
            raise AnomalyError(found)
        if action == "snapshot":
            # the step was held so the snapshot has its pre-step state; now redo it, committed
            if dist_data is None:
                return None
            out = dict(self.engine.batch_function(Plan(False, "force"))(dist_data))
            out.pop(KEY, None)
            return out
        if action == "halt":
            self.halted = True
            self.model.stop_training = True
            if self.verbose:
                from gradtrace.report import format_report

                table = format_report(self, steps=[record.step]) if stage == "step" else ""
                print(f"gradtrace: halted at step {record.step}; {stopped_how(stage, record.epoch)}.\n" + table,
                      flush=True)

    def _snapshot(self, found, record, data):
        if len(self.snapshots) >= self.max_snapshots:
            for a in found:
                a.snapshot_error = f"not written: the cap of {self.max_snapshots} snapshots per fit was reached"
            return
        try:
            path = snapshot_module.write(
                self.snapshot_dir, model=self.model, data=data, step=record.step, epoch=record.epoch,
                anomalies=found, detectors=[d.name for d in self.engine.detectors],
                table=record.table, matrix=record.matrix,
            )
        except Exception as e:  # a snapshot must never crash training silently: say why on the anomaly
            for a in found:
                a.snapshot_error = f"{type(e).__name__}: {e}"
            if self.verbose:
                print(f"gradtrace: snapshot of step {record.step} failed ({type(e).__name__}: {e}); nothing was left behind",
                      flush=True)
            return
        self.snapshots.append(path)
        from gradtrace.replay import remember_classes

        remember_classes(path, self.model)
        for a in found:
            a.snapshot = path
        if self.verbose:
            print(f"gradtrace: snapshot of step {record.step} written to {path}\n"
                  f"           replay it with: gradtrace replay {path}", flush=True)

    def epoch_begin(self, epoch):
        self.epoch = epoch
        for d in self.engine.detectors:
            try:
                d.epoch_begin(self)
            except Exception as e:
                raise DetectorError(d.name, "epoch_begin", e, self.anomalies) from e

    def epoch_end_checks(self, epoch):
        self._host_checks("epoch_end", epoch)

    def fit_end_checks(self):
        self._host_checks("fit_end", self.epoch)

    def _host_checks(self, stage, epoch):
        """Run every detector's ``epoch_end`` or ``fit_end`` hook and act on what they found."""
        found = []
        step = int(compat.iterations(self.model.optimizer).numpy())
        for d in self.engine.detectors:
            try:
                results = list(getattr(d, stage)(self) or ())
            except Exception as e:
                raise DetectorError(d.name, stage, e, self.anomalies) from e
            for layer, tensor, value, message, *hint in results:
                found.append(Anomaly(d.name, layer, tensor, step, epoch, float(value), message,
                                     action=self.engine.actions[d.name], stage=stage, hint=hint[0] if hint else ""))
        if found:
            self._act(found, StepRecord(step, epoch, None, None, found), stage=stage)

    @property
    def anomalies(self):
        return self.log.as_list()


class _RunCallback(keras.callbacks.Callback):
    """Tells the run which epoch it is in and runs the epoch-end checks."""

    def __init__(self, run):
        super().__init__()
        self.run = run

    def on_epoch_begin(self, epoch, logs=None):
        self.run.epoch_begin(epoch)

    def on_epoch_end(self, epoch, logs=None):
        self.run.epoch_end_checks(epoch)

    def on_train_end(self, logs=None):
        self.run.fit_end_checks()


class _HeldLogs(keras.callbacks.Callback):
    """First of the callbacks: when a halt held the epoch's last step, the epoch's logs are that step's
    own logs (Keras would read the metric accumulators, which the held step left as before it)."""

    def __init__(self, run):
        super().__init__()
        self.run = run

    def on_epoch_end(self, epoch, logs=None):
        if self.run.held_logs is not None and logs is not None:
            for k, v in self.run.held_logs.items():
                if k in logs:
                    logs[k] = float(v)


class _Installed:
    """Installs gradtrace on a model for one fit and always leaves it plain again: the hooks,
    and a ``train_function`` (Keras' own, around the watched step, checked after each call)."""

    def __init__(self, model, engine, run):
        self.model = model
        self.engine = engine
        self.run = run
        self._hooks = None

    def __enter__(self):
        m = self.model
        self._saved_function = m.train_function
        self._hooks = self.engine.installed()
        self._hooks.__enter__()
        m.train_function = self.run.train_function()
        return self

    def __exit__(self, *exc):
        try:
            self.model.train_function = self._saved_function
        finally:
            self._hooks.__exit__(None, None, None)
        return False


# Compiled steps are kept per model, like Keras keeps model.train_function: a second
# gradtrace.fit on the same model with the same detectors and compile state does not
# trace again (the detectors' state carries over, as training does).
_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _engine_for(model, dets, actions):
    key = (
        tuple((type(d), d.config()) for d in dets),
        tuple(sorted(actions.items())),
        id(model.optimizer),
        compat.compile_identity(model),
        bool(model.run_eagerly),
        bool(model.jit_compile),
        int(getattr(model, "steps_per_execution", 1) or 1),
    )
    cached = _ENGINES.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    engine = Engine(model, dets, actions, LayerTap(model))
    _ENGINES[model] = (key, engine)
    return engine


def _check_model(model):
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


def _check_arguments(x, y, detectors):
    """Refuse, before anything is installed, the inputs Keras would take silently or explain badly."""
    from gradtrace.detectors.base import Detector

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
    model,
    x=None,
    y=None,
    batch_size=None,
    epochs=1,
    verbose="auto",
    callbacks=None,
    validation_split=0.0,
    validation_data=None,
    shuffle=True,
    class_weight=None,
    sample_weight=None,
    initial_epoch=0,
    steps_per_epoch=None,
    validation_steps=None,
    validation_batch_size=None,
    validation_freq=1,
    *,
    detectors=None,
    on_anomaly=None,
    snapshot_dir=None,
    trace_every=1,
    max_snapshots=5,
    tensorboard_dir=None,
    tensorboard_every=100,
):
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
      in between check the loss only (and Embedding ids).
    - ``tensorboard_dir``: write per-layer scalars and histograms there every
      ``tensorboard_every`` steps (default 100), and each anomaly as a text
      event (see :mod:`gradtrace.tensorboard`).

    Returns the ``keras.callbacks.History`` with one more attribute,
    ``anomalies`` (a list of :class:`~gradtrace.Anomaly`), and ``gradtrace``
    (the run, for :func:`gradtrace.report`).
    """
    _check_model(model)
    _check_arguments(x, y, detectors)
    if on_anomaly is not None:
        check_action(on_anomaly)
    if isinstance(trace_every, bool) or not isinstance(trace_every, (int, np.integer)) or trace_every < 1:
        raise ValueError(
            f"trace_every={trace_every!r} is not allowed: it must be an integer >= 1 "
            "(1 checks every step, 16 checks one step in 16)."
        )
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r} is not allowed: it must be a positive integer or None.")
    dets = detectors_module.resolve(detectors)
    actions = {d.name: d.action_under(on_anomaly) for d in dets}
    if isinstance(max_snapshots, bool) or not isinstance(max_snapshots, (int, np.integer)) or max_snapshots < 0:
        raise ValueError(f"max_snapshots={max_snapshots!r} is not allowed: it must be an integer >= 0.")
    if snapshot_dir is None and "snapshot" in actions.values():
        snapshot_dir = snapshot_module.DEFAULT_DIR
    if snapshot_dir is not None:
        snapshot_dir = os.fspath(snapshot_dir)
        if os.path.exists(snapshot_dir) and not os.path.isdir(snapshot_dir):
            raise ValueError(
                f"snapshot_dir={snapshot_dir!r} exists and is not a directory. "
                "Pass a directory path (it is created if missing)."
            )

    if isinstance(tensorboard_every, bool) or not isinstance(tensorboard_every, (int, np.integer)) \
            or tensorboard_every < 1:
        raise ValueError(f"tensorboard_every={tensorboard_every!r} is not allowed: it must be an integer >= 1.")
    if tensorboard_dir is not None and distribute.is_chief(model.distribute_strategy):
        tensorboard_dir = tb_module.check_dir(tensorboard_dir)

    def plain_fit():
        history = model.fit(x, y, batch_size, epochs, verbose, callbacks, validation_split, validation_data,
                            shuffle, class_weight, sample_weight, initial_epoch, steps_per_epoch,
                            validation_steps, validation_batch_size, validation_freq)
        history.anomalies = []
        history.gradtrace = None
        return history

    if compat.overrides_train_step(model):
        warnings.warn(
            f"{type(model).__name__} overrides train_step, so gradtrace cannot instrument its step; "
            "running plain model.fit without detectors. Move custom loss logic to compute_loss to use gradtrace.",
            stacklevel=2,
        )
        return plain_fit()
    if model.built and not model.trainable_weights:
        warnings.warn(
            f"Model {model.name!r} has no trainable weights, so there is no update to watch: gradtrace trains "
            "it as model.fit does (forward pass, loss tracker and metrics) and runs no detector. Make its "
            "layers trainable (layer.trainable = True) to watch it.",
            stacklevel=2,
        )
        return plain_fit()

    spe = int(getattr(model, "steps_per_execution", 1) or 1)
    if spe > 1 and "snapshot" in actions.values():
        # a snapshotted step is held and then redone on the host: inside a multi-step execution the
        # steps after it would run before the redo, so snapshot runs one step per execution
        warnings.warn(
            f"steps_per_execution={spe} with the action 'snapshot': the snapshotted step is redone on the host, "
            "so gradtrace trains with steps_per_execution=1 for this fit (the result is the same).",
            stacklevel=2,
        )
    else:
        spe = 1
    _build_optimizer(model)
    run = None
    try:
        if spe > 1:
            model.steps_per_execution = 1
        engine = _engine_for(model, dets, actions)
        resolved_verbose = 1 if verbose == "auto" else verbose
        run = Run(model, engine, int(trace_every), resolved_verbose, snapshot_dir=snapshot_dir,
                  max_snapshots=int(max_snapshots))
        if tensorboard_dir is not None:
            run.tensorboard = tb_module.Writer(tensorboard_dir, every=int(tensorboard_every),
                                               write=distribute.is_chief(model.distribute_strategy))
        cb = _RunCallback(run)
        if isinstance(callbacks, keras.callbacks.CallbackList):
            callbacks.append(cb)
            cb.set_model(model)
            cb_arg = callbacks
        else:
            # the run's callback comes last, after a History: an epoch-end finding that raises or halts
            # then finds that epoch recorded by every callback, as the epoch's updates were applied
            cb_arg = [_HeldLogs(run)] + list(callbacks or [])
            if not any(compat.is_history(c) for c in cb_arg):
                cb_arg.append(keras.callbacks.History())
            cb_arg.append(cb)
        with _Installed(model, engine, run), compat.first_batch_build_fix(model):
            previous_history = getattr(model, "history", None)
            try:
                history = model.fit(
                    x=x, y=y, batch_size=batch_size, epochs=epochs, verbose=verbose, callbacks=cb_arg,
                    validation_split=validation_split, validation_data=validation_data, shuffle=shuffle,
                    class_weight=class_weight, sample_weight=sample_weight, initial_epoch=initial_epoch,
                    steps_per_epoch=steps_per_epoch, validation_steps=validation_steps,
                    validation_batch_size=validation_batch_size, validation_freq=validation_freq,
                )
            except BaseException as e:
                # Whatever stopped the fit (an AnomalyError, a user's callback, Ctrl-C, the data), keep
                # what was learnt so far reachable: e.history is this fit's History (None when Keras
                # had not made one yet), with .anomalies and .gradtrace, and e.gradtrace is the run.
                history = getattr(model, "history", None)
                if history is previous_history:
                    history = None  # a History of an earlier fit, not of this one
                if history is not None:
                    history.anomalies = run.anomalies
                    history.gradtrace = run
                failed = _failed_detector(e, engine)
                if failed is not None:
                    new = DetectorError(failed, "check", e, run.anomalies)
                    _attach_run(new, history, run)
                    raise new from e
                _attach_run(e, history, run)
                _note_peer_failure(e, model, run)
                if isinstance(e, Exception) and not isinstance(e, AnomalyError):
                    try:
                        _reraise_with_layer_table(e, engine.tap.failure)
                    except BaseException as new:
                        _attach_run(new, history, run)
                        raise
                raise
    finally:
        if spe > 1:
            model.steps_per_execution = spe
        if run is not None and run.tensorboard is not None:
            run.tensorboard.close()
    history.anomalies = run.anomalies
    history.gradtrace = run
    return history


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


def _attach_run(e, history, run):
    try:
        e.history = history
        e.gradtrace = run
        e.run = run  # the name AnomalyError has always had
        if not isinstance(e, AnomalyError):
            e.anomalies = run.anomalies  # every finding of the fit up to the failure
    except Exception:  # an exception type that takes no attributes: re-raise it as it is
        pass


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
