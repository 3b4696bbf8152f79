"""The host side of a watched fit: what happens after each call of the train function.

:class:`Run` is handed the step's record after every call of Keras' train
function. It reads one boolean; only when a detector fired it turns the
record into :class:`~gradtrace.Anomaly` records (:mod:`gradtrace.findings`)
and acts on them (:mod:`gradtrace.actions`). The epoch-end, periodic and
fit-end checks of the detectors run here too, through two small callbacks.
What users read of a run: :attr:`Run.anomalies`, :attr:`Run.history`,
:meth:`Run.tracing` and :meth:`Run.embedding_tables`.
"""

from __future__ import annotations

import time

import keras
import tensorflow as tf

from gradtrace import _keras_compat as compat
from gradtrace import actions
from gradtrace import embeddings
from gradtrace import findings
from gradtrace.anomaly import Anomaly, AnomalyLog, DetectorError
from gradtrace.history import Drain, LayerHistory
from gradtrace.schedule import Periodic, Schedule
from gradtrace.step import FIRED

VERIFY_STEPS = 20  # verify_hints: steps each hinted fix is tried for (the held one and the next ones)


class HostView:
    """What a detector's host-side hooks (``epoch_begin``, ``epoch_end``, ``periodic``, ``fit_end``) see of
    the run: the model, the optimizers the step applies, the layer tap (paths of every nested layer), the
    last finished epoch's logs, the step counter and the per-layer history."""

    def __init__(self, run):
        self._run = run
        self.model = run.model
        self.optimizers = run.engine.optimizers
        self.tap = run.engine.tap

    @property
    def epoch_logs(self) -> dict:
        return self._run.epoch_logs

    @property
    def history(self) -> LayerHistory:
        return self._run.history

    def current_step(self) -> int:
        return self._run.current_step()

    def embedding_layers(self):
        return self._run.embedding_layers()


class Run:
    """Host-side state of one ``gradtrace.fit`` call (or one ``Watch`` fit, or one ``gradtrace.loop``)."""

    def __init__(self, model, engine, verbose, schedule=None, snapshots=None, keep_records=20):
        self.model = model
        self.engine = engine
        self.verbose = verbose
        self.schedule = schedule or Schedule(model)
        self.snapshots = snapshots or actions.Snapshots()
        # your own loop (gradtrace.loop): ``(your step function, run(plan, batch) -> its logs)``
        self.own_step = None
        self.held_logs = None  # the logs of a step held by a halt
        self.log = AnomalyLog()
        self.records: list[findings.StepRecord] = []
        self.keep_records = keep_records
        self.epoch = 0
        self.halted = False
        self.epoch_logs = {}  # the last finished epoch's logs (RunCallback), for the host-side checks
        self.history = LayerHistory()  # per-layer statistics of every traced step, bounded (gradtrace.history)
        self._drain = Drain(self.history, engine.variants)
        self._periodic = Periodic(engine.detectors, model)
        self._view = HostView(self)
        self._last = None  # the record of the last traced step
        # verify_hints: how many steps a fix is tried for (0: off), and the batches it is tried on (the held
        # step's, then the next ones the fit would have trained on)
        self.verify_steps = 0
        self.verify_batches: list = []
        self.verification_seconds = 0.0

    @property
    def tensorboard(self):
        """The :class:`gradtrace.tensorboard.Writer` of this run, or None."""
        return self.schedule.tensorboard

    @property
    def calls(self) -> int:
        return self.schedule.calls

    @property
    def anomalies(self) -> list[Anomaly]:
        return self.log.as_list()

    def tracing(self) -> dict:
        """How often this run traced (:meth:`gradtrace.schedule.Schedule.tracing`)."""
        return self.schedule.tracing()

    def embedding_tables(self):
        """Every Embedding table of the model: size, ids seen, rows used, rows that never learned,
        effective rank (:mod:`gradtrace.embeddings`)."""
        return embeddings.tables(self)

    def embedding_layers(self):
        """``[(path, layer)]`` of every Embedding layer of the model."""
        tap = self.engine.tap
        return [(tap.paths.get(lid, layer.name), layer) for lid, layer in tap.layers.items()
                if isinstance(layer, keras.layers.Embedding)]

    def current_step(self) -> int:
        """The iterations of the step's first optimizer (``model.optimizer``, else the one a watched loop
        applies); 0 when there is none."""
        opts = self.engine.optimizers
        return int(compat.iterations(opts[0]).numpy()) if opts else 0

    @property
    def last_stats(self):
        """The statistics of the last traced step (``[rows, columns]``), or ``None``."""
        return None if self._last is None else tf.convert_to_tensor(self._last.last)

    # -- each call of the step ---------------------------------------------------------------
    def train_function(self):
        """What Keras' ``fit`` calls for each execution: Keras' own train function around the
        watched step, then one boolean read; only when a detector fired, the record is read,
        turned into :class:`~gradtrace.Anomaly` records and acted on."""

        def function(iterator):
            plan, traced, summary = self.schedule.next_plan()
            if self.calls == 0:
                compat.build_state_before_tracing(self.model, iterator)
            start, found = time.perf_counter(), self.log.total
            logs = self.engine.train_function(plan)(iterator)
            fired = logs.pop(FIRED, None) if isinstance(logs, dict) else None
            logs = self.after_call(plan, traced, summary, logs, fired)
            self.schedule.timed(traced, time.perf_counter() - start, summary or self.log.total != found)
            host = time.perf_counter()
            self.after_step(traced)
            self.schedule.host_work(time.perf_counter() - host)
            if self.halted and len(self.verify_batches) == 1:
                self._take_next_batches(iterator)
            return logs

        return function

    def after_call(self, plan, traced, summary=False, logs=None, fired=None):
        """After one call of the watched step (one execution): read one boolean (``fired``, from the step's
        outputs; else one per update, from its records); act only when a detector fired. Returns the logs
        the callbacks get."""
        self.schedule.calls += 1
        variant = self.engine.variants.get(plan)
        record = variant.record() if variant is not None else None
        if record is None:  # no update was applied: nothing was watched
            return logs
        if traced:
            self._last = record
        if summary:
            self.tensorboard.write_step(int(record.last_step.numpy()), variant.table, record.last.numpy(),
                                        variant.histogram_rows, record.histograms.numpy())
        if fired is not None and not bool(fired):
            return logs
        # one boolean read per update (Keras' own step has one)
        fired = [seg for seg, rec in ((s, s.record()) for s in variant.segments)
                 if rec is not None and bool(rec.any.numpy())]
        if not fired:
            return logs
        held_logs = {k: v.numpy() for k, v in fired[0].record().logs.items()}
        found = findings.read(self, variant, fired, complete=summary)
        if found is None:
            return logs
        if found.data is None and self.snapshots.directory is not None and found.held:
            for a in found.anomalies:
                a.snapshot_error = ("not written: the failing batch is not kept under jit_compile=True with a "
                                    "distribution strategy (Keras' jit_compile='auto' is False under any strategy)")
        redone = actions.act(self, found.anomalies, found.records[0], found.data, found.dist_data,
                             more_records=found.records[1:])
        if self.halted and self.verify_steps and found.data is not None and found.data is found.dist_data:
            self.verify_batches = [found.data]  # one device: the held batch, as the step took it
        if redone is not None:
            return redone
        if self.halted and found.held and isinstance(logs, dict) and set(held_logs) == set(logs):
            # the callbacks see the held step's own logs (its real, non-finite loss), as they
            # would under model.fit; the epoch's logs too (see HeldLogs)
            self.held_logs = held_logs
            return held_logs
        return logs

    def _take_next_batches(self, iterator):
        """After a halt, for verify_hints: the batches the fit would have trained on next (training stops
        anyway), as many as a fix is tried for, or what is left of the epoch."""
        while len(self.verify_batches) < self.verify_steps:
            try:
                self.verify_batches.append(next(iterator))
            except (StopIteration, tf.errors.OutOfRangeError):
                break

    def run_step(self, plan, dist_data):
        """The watched step under ``plan`` on a batch the host holds (a held step measured in full, traced
        again, or redone): the model's own step, or your loop's (gradtrace.loop). Returns its logs."""
        if self.own_step is not None:
            return self.own_step[1](plan, dist_data)
        return self.engine.batch_function(plan)(dist_data)

    def after_step(self, traced):
        """Housekeeping after every call of the step: the periodic checks that are due, and the history's
        device buffer drained once it is full."""
        if not self.halted:
            step, due = self._periodic.due(self.current_step)
            if due:
                self._host_checks("periodic", self.epoch, due)
        if traced and self._drain.counted(int(getattr(self.model, "steps_per_execution", 1) or 1)):
            self.drain_history()

    def hand_over_held_logs(self, epoch_logs):
        """When a halt held the epoch's last step, put that step's own logs into the epoch's logs."""
        if self.held_logs is not None and epoch_logs is not None:
            for k, v in self.held_logs.items():
                if k in epoch_logs:
                    epoch_logs[k] = float(v)

    # -- epochs -------------------------------------------------------------------------------
    def epoch_begin(self, epoch):
        self.epoch = epoch
        for d in self.engine.detectors:
            try:
                d.epoch_begin(self._view)
            except Exception as e:
                raise DetectorError(d.name, "epoch_begin", e, self.anomalies) from e

    def epoch_end_checks(self, epoch):
        self.drain_history()
        self._host_checks("epoch_end", epoch)
        if self.tensorboard is not None:
            infos = self.embedding_tables()
            if infos:
                self.tensorboard.write_tables(self.current_step(), infos, dict(self.embedding_layers()))

    def fit_end_checks(self):
        self.drain_history()
        self._host_checks("fit_end", self.epoch)

    def drain_history(self):
        """Move the traced steps the device buffers hold into :attr:`history` (:class:`gradtrace.history.Drain`)."""
        self._drain(self.engine.variants, self.epoch)

    def _host_checks(self, stage, epoch, detectors=None):
        """Run every detector's ``epoch_end``, ``fit_end`` or ``periodic`` hook and act on what they found."""
        found = []
        step = self.current_step()
        for d in self.engine.detectors if detectors is None else detectors:
            try:
                results = list(getattr(d, stage)(self._view) or ())
            except Exception as e:
                raise DetectorError(d.name, stage, e, self.anomalies) from e
            for layer, tensor, value, message, *hint in results:
                found.append(Anomaly(d.name, layer, tensor, step, epoch, float(value), message,
                                     action=self.engine.actions[d.name], stage=stage, hint=hint[0] if hint else ""))
        if found:
            actions.act(self, found, findings.StepRecord(step, epoch, None, None, found), stage=stage)


class RunCallback(keras.callbacks.Callback):
    """Tells the run which epoch it is in and runs the epoch-end checks."""

    def __init__(self, run):
        super().__init__()
        self.run = run

    def on_epoch_begin(self, epoch, logs=None):
        self.run.epoch_begin(epoch)

    def on_epoch_end(self, epoch, logs=None):
        self.run.epoch_logs = dict(logs or {})  # the epoch's mean loss, for the host-side checks
        self.run.epoch_end_checks(epoch)

    def on_train_end(self, logs=None):
        self.run.fit_end_checks()


class HeldLogs(keras.callbacks.Callback):
    """First of the callbacks: when a halt held the epoch's last step, the epoch's logs are that step's
    own logs (Keras would read the metric accumulators, which the held step left as before it)."""

    def __init__(self, run):
        super().__init__()
        self.run = run

    def on_epoch_end(self, epoch, logs=None):
        self.run.hand_over_held_logs(logs)
