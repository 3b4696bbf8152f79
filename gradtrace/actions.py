"""The host side of a watched fit: what happens after each call of the train function.

:class:`Run` is handed the step's record after every call of Keras' train
function. It reads one boolean; only when a detector fired it turns the
record into :class:`~gradtrace.Anomaly` records and acts on them: log and
print, snapshot (and redo the held step), halt, raise, write to TensorBoard.
The epoch-end and fit-end checks of the detectors run here too, through two
small callbacks.
"""

from __future__ import annotations

import sys
import time

import keras
import numpy as np
import tensorflow as tf

from gradtrace import _keras_compat as compat
from gradtrace import embeddings
from gradtrace import snapshot as snapshot_module
from gradtrace.anomaly import BLOCKING, Anomaly, AnomalyError, AnomalyLog, DetectorError, stopped_how, strongest
from gradtrace.history import BUFFER, LayerHistory, StepValues
from gradtrace.stats import row_dict
from gradtrace.step import FIRED, INSPECT, KEY, TRACED, UNTRACED, Plan

_TENSOR_NAMES = {"ids": "input", "labels": "target"}


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

    def __init__(self, step, epoch, table, matrix, anomalies, columns=None, optimizer=""):
        self.step = step
        self.optimizer = optimizer  # the update of the step these statistics are about
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
        # your own loop (gradtrace.watch): ``(your step function, run(plan, batch) -> its logs)``, and the
        # optimizer it applies (written in a snapshot)
        self.own_step = None
        self.snapshot_optimizer = None
        self._last = None  # the record of the last traced step
        self.held_logs = None  # the logs of a step held by a halt
        self.trace_every = trace_every
        self.budget = None  # a gradtrace.budget.Budget when fit got overhead=
        self.traced_calls = 0
        self.verbose = verbose
        self.log = AnomalyLog()
        self.records: list[StepRecord] = []
        self.keep_records = keep_records
        self.calls = 0
        self.epoch = 0
        self.halted = False
        self._periodic = {}  # detector name -> the last period (step // every) it was checked in
        # the step counter as last read, the calls since, and the most it grew per call: an upper bound on
        # the step, so that the counter is read only when a period may have ended
        self._counter = None
        self._calls_since_read = 0
        self._per_call = 1.0
        self.history = LayerHistory()  # per-layer statistics of every traced step, bounded (gradtrace.history)
        self.epoch_logs = {}  # the last finished epoch's logs (RunCallback), for the host-side checks
        self._drained = {}  # (plan, segment index) -> traced steps already taken from its device buffer
        self._step_values = {}  # (table, columns) -> history.StepValues: how its buffer becomes history values
        self._since_drain = 0  # steps run since the last drain
        for plan, variant in engine.variants.items():  # a compiled step kept from an earlier fit: its buffer
            for segment in variant.segments:          # holds that fit's steps, not this one's
                rec = segment.record()
                if rec is not None:
                    self._drained[(plan, segment.index)] = int(rec.hist_count.numpy())
        self.tensorboard = None  # a gradtrace.tensorboard.Writer when fit got tensorboard_dir

    # -- the train_function Keras calls ----------------------------------------
    def train_function(self):
        """What Keras' ``fit`` calls for each execution: Keras' own train function around the
        watched step, then one boolean read; only when a detector fired, the record is read,
        turned into :class:`~gradtrace.Anomaly` records and acted on."""
        engine = self.engine

        def function(iterator):
            plan, traced, summary = self.next_plan()
            if self.calls == 0:
                compat.build_state_before_tracing(self.model, iterator)
            start, found = time.perf_counter(), self.log.total
            logs = engine.train_function(plan)(iterator)
            fired = logs.pop(FIRED, None) if isinstance(logs, dict) else None
            logs = self.after_call(plan, traced, summary, logs, fired)
            self.timed(traced, time.perf_counter() - start, summary or self.log.total != found)
            self.after_step(traced)
            return logs

        return function

    def next_plan(self):
        """``(plan, traced, summary)`` for the next call of the step."""
        summary = self.tensorboard is not None and self.calls % self.tensorboard.every == 0
        if summary:
            traced = True
        elif self.budget is not None:
            traced = self.budget.trace_next()
        else:
            traced = self.trace_every == 1 or self.calls % self.trace_every == 0
        plan = Plan(True, summary_bins=self.tensorboard.bins) if summary else TRACED if traced else UNTRACED
        return plan, traced, summary

    def after_call(self, plan, traced, summary=False, logs=None, fired=None):
        """After one call of the watched step (one execution): read one boolean (``fired``, from the step's
        outputs; else one per update, from its records); act only when a detector fired. Returns the logs
        the callbacks get."""
        self.calls += 1
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
        if fired:
            held_logs = {k: v.numpy() for k, v in fired[0].record().logs.items()}
            held = not all(bool(seg.record().committed.numpy()) for seg in fired)
            redone = self._handle(variant, fired, complete=summary)
            if redone is not None:
                return redone
            if self.halted and held and isinstance(logs, dict) and set(held_logs) == set(logs):
                # the callbacks see the held step's own logs (its real, non-finite loss), as they
                # would under model.fit; the epoch's logs too (see HeldLogs)
                self.held_logs = held_logs
                return held_logs
        return logs

    def hand_over_held_logs(self, epoch_logs):
        """When a halt held the epoch's last step, put that step's own logs into the epoch's logs."""
        if self.held_logs is not None and epoch_logs is not None:
            for k, v in self.held_logs.items():
                if k in epoch_logs:
                    epoch_logs[k] = float(v)

    @property
    def last_stats(self):
        """The statistics of the last traced step (``[rows, columns]``), or ``None``."""
        return None if self._last is None else tf.convert_to_tensor(self._last.last)

    def _handle(self, variant, segments, complete=False):
        """Detectors fired in the last execution, at the updates ``segments`` of one step (Keras' own
        step has one update; a custom step may have several). ``complete``: the step measured every
        statistic."""
        found, records = [], []
        data = dist_data = None
        report = None
        for seg in segments:
            rec = seg.record()
            matrix = rec.stats.numpy()
            fired, values = rec.fired.numpy(), rec.values.numpy()
            step, committed = int(rec.step.numpy()), bool(rec.committed.numpy())
            faults = None if rec.faults is None else rec.faults.numpy()
            if not committed and data is None:
                data, dist_data = variant.captured_batch(seg, self.model.distribute_strategy)
            columns = None if complete else seg.columns
            if not complete and not committed and dist_data is not None:
                # The step was held, so its pre-step state is intact: measure everything (exact
                # NaN/Inf counts, std, min, max, weights) by running it again, committing nothing.
                # The watched step itself only computes what the detectors read.
                if report is None:
                    report = dict(self.run_step(Plan(variant.plan.traced, "report"), dist_data))[KEY]
                if seg.index < len(report):
                    matrix = report[seg.index]["stats"].numpy()
                    faults = report[seg.index]["replica_faults"].numpy() if "replica_faults" in report[seg.index] \
                        else faults
                    columns = None
            mine = build_anomalies(seg.detectors, self.engine.actions, seg.table, fired, values, matrix, step,
                                   self.epoch, faults, columns)
            table = seg.table
            if mine and not variant.plan.traced and not committed and dist_data is not None:
                # a guarded (untraced) step refused a non-finite update; it was held, so its pre-step
                # state is intact: trace it now, committing nothing, to name the layer it started in
                traced = self._traced_findings(dist_data, seg.index, step, {a.detector for a in mine})
                if traced is not None:
                    mine, table, matrix = traced
                    columns = None
            for a in mine:
                a.optimizer = seg.optimizer
            if mine:
                found.extend(mine)
                records.append(StepRecord(step, self.epoch, table, matrix, mine, columns, seg.optimizer))
        variant.reset()
        if not found:
            return None
        if data is None and self.snapshot_dir is not None and not all(bool(s.record().committed.numpy())
                                                                      for s in segments):
            for a in found:
                a.snapshot_error = ("not written: the failing batch is not kept under jit_compile=True with a "
                                    "distribution strategy (Keras' jit_compile='auto' is False under any strategy)")
        return self._act(found, records[0], data, dist_data, more_records=records[1:])

    def run_step(self, plan, dist_data):
        """The watched step under ``plan`` on a batch the host holds (a held step measured in full, traced
        again, or redone): the model's own step, or your loop's (gradtrace.watch). Returns its logs."""
        if self.own_step is not None:
            return self.own_step[1](plan, dist_data)
        return self.engine.batch_function(plan)(dist_data)

    def _traced_findings(self, dist_data, index, step, detectors):
        """Run a held step again traced (every layer, every statistic, every detector; nothing committed)
        and return ``(anomalies, table, matrix)`` of its update ``index``, or ``None`` when the traced
        step does not confirm every detector in ``detectors`` (then the guarded step's findings stand)."""
        try:
            out = dict(self.run_step(INSPECT, dist_data))[KEY]
        except Exception as e:  # the guarded step's findings stand (its update is held either way)
            self.engine.warn_once("inspect", f"the held step could not be traced again to name its layer "
                                  f"({type(e).__name__}: {e}); its findings are those of the guarded step.")
            return None
        segments = self.engine.variants[INSPECT].segments
        if index >= len(out) or index >= len(segments):
            return None
        res, seg = out[index], segments[index]
        matrix = res["stats"].numpy()
        faults = res["replica_faults"].numpy() if "replica_faults" in res else None
        mine = build_anomalies(seg.detectors, self.engine.actions, seg.table, res["fired"].numpy(),
                               res["values"].numpy(), matrix, step, self.epoch, faults, None)
        if not detectors <= {a.detector for a in mine}:
            return None
        return mine, seg.table, matrix

    def _act(self, found, record, data=None, dist_data=None, stage="step", more_records=()):
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
            a.layer_alias = self.engine.tap.alias_of(a.layer)
            self.log.add(a)
        for rec in (record, *more_records):  # one per update of the step that found something
            if len(self.records) < self.keep_records:
                self.records.append(rec)
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
            # the step was held so the snapshot has its pre-step state; now redo it, committed (unless its
            # update is non-finite: then it is skipped)
            if dist_data is None:
                return None
            out = self.run_step(Plan(False, "force"), dist_data)
            if self.own_step is not None:  # your own loop's step (gradtrace.watch): its outputs are yours
                return None
            out = dict(out)
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
                table=record.table, matrix=record.matrix, optimizer=self.snapshot_optimizer,
                own_step=None if self.own_step is None else getattr(self.own_step[0], "__qualname__", "step"),
            )
        except Exception as e:  # a snapshot must never crash training silently: say why on the anomaly
            for a in found:
                a.snapshot_error = f"{type(e).__name__}: {e}"
            if self.verbose:
                print(f"gradtrace: snapshot of step {record.step} failed ({type(e).__name__}: {e}); nothing was left behind",
                      flush=True)
            return
        self.snapshots.append(path)
        snapshot_module.remember_classes(path, self.model)
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
        self.drain_history()
        self._host_checks("epoch_end", epoch)
        if self.tensorboard is not None:
            infos = self.embedding_tables()
            if infos:
                self.tensorboard.write_tables(self.current_step(), infos,
                                              dict(self.embedding_layers()))

    def embedding_tables(self):
        """Every Embedding table of the model: size, ids seen, rows used, rows that never learned,
        effective rank (:mod:`gradtrace.embeddings`)."""
        return embeddings.tables(self)

    def embedding_layers(self):
        """``[(path, layer)]`` of every Embedding layer of the model."""
        tap = self.engine.tap
        return [(tap.paths.get(lid, layer.name), layer) for lid, layer in tap.layers.items()
                if isinstance(layer, keras.layers.Embedding)]

    def timed(self, traced, seconds, untimed=False):
        """One call of the step took ``seconds`` (``untimed``: it did more than step, e.g. a finding was
        handled or a summary written, so its time says nothing about the step's cost)."""
        self.traced_calls += bool(traced)
        if self.budget is not None:
            steps = int(getattr(self.model, "steps_per_execution", 1) or 1)
            self.budget.observe(traced, None if untimed else seconds, steps)

    def tracing(self) -> dict:
        """How often this run traced: ``calls`` of the step, ``traced_calls``, and under an overhead budget
        the budget, the interval chosen last and the traced step's measured extra cost."""
        out = {"calls": self.calls, "traced_calls": self.traced_calls}
        if self.budget is not None:
            out.update(self.budget.summary())
        return out

    def current_step(self) -> int:
        """The iterations of the step's first optimizer (``model.optimizer``, else the one a watched loop
        applies); 0 when there is none."""
        opts = self.engine.optimizers
        return int(compat.iterations(opts[0]).numpy()) if opts else 0

    def after_step(self, traced):
        """Housekeeping after every call of the step: the periodic checks that are due, and the history's
        device buffer drained once it is full."""
        self.periodic_checks()
        self._since_drain += int(getattr(self.model, "steps_per_execution", 1) or 1) if traced else 0
        if self._since_drain >= BUFFER:
            self.drain_history()

    def periodic_checks(self):
        """After a call of the step: the detectors whose ``every`` steps have passed since their last
        periodic check. The step counter is read in the first calls, then only once the steps run since
        its last read may have reached the next period: the counter grows by at most ``steps_per_execution``
        times the most it grew per step in a call so far (a held step does not move it)."""
        due = [d for d in self.engine.detectors if d.every]
        if not due or self.halted:
            return
        self._calls_since_read += 1
        steps = int(getattr(self.model, "steps_per_execution", 1) or 1)
        if self._counter is not None:
            last, reads = self._counter
            bound = last + self._calls_since_read * steps * self._per_call
            if reads >= 3 and bound < min((self._periodic.get(d.name, 0) + 1) * d.every for d in due):
                return
            step = self.current_step()
            self._per_call = max(self._per_call, (step - last) / (self._calls_since_read * steps))
            self._counter = (step, reads + 1)
        else:
            step = self.current_step()
            self._counter = (step, 1)
        self._calls_since_read = 0
        ready = [d for d in due if step // d.every > self._periodic.get(d.name, 0)]
        for d in ready:
            self._periodic[d.name] = step // d.every
        if ready:
            self._host_checks("periodic", self.epoch, ready)

    def fit_end_checks(self):
        self.drain_history()
        self._host_checks("fit_end", self.epoch)

    def drain_history(self):
        """Move the traced steps the device buffers hold into :attr:`history` (every ``BUFFER`` traced
        steps and at each epoch's end: one read of a few small variables, not one per step)."""
        self._since_drain = 0
        blocks = []  # (steps, keys, values[steps, keys]) of each update's buffer
        for plan, variant in list(self.engine.variants.items()):
            if plan.mode != "train" or not plan.traced:
                continue
            for segment in variant.segments:
                rec = segment.record()
                if rec is None or segment.table is None:
                    continue
                key = (plan, segment.index)
                count = int(rec.hist_count.numpy())
                new = min(count - self._drained.get(key, 0), BUFFER)
                self._drained[key] = count
                if new <= 0:
                    continue
                slots = [k % BUFFER for k in range(count - new, count)]
                hist, steps = rec.hist.numpy()[slots], rec.hist_steps.numpy()[slots]
                cache = (id(segment.table), None if segment.columns is None else frozenset(segment.columns))
                if cache not in self._step_values:
                    self._step_values[cache] = StepValues(segment.table, segment.columns)
                values = self._step_values[cache]
                blocks.append((steps, values.keys, values(hist)))
        if len(blocks) == 1:
            steps, keys, values = blocks[0]
            order = np.argsort(steps, kind="stable")
            self.history.add_steps(steps[order], self.epoch, keys, values[order])
        elif blocks:  # several updates or variants: one row per step, their values side by side
            keys = list(dict.fromkeys(k for _, ks, _ in blocks for k in ks))
            col = {k: j for j, k in enumerate(keys)}
            steps = np.unique(np.concatenate([b[0] for b in blocks]))
            merged = np.full((len(steps), len(keys)), np.nan)
            for b_steps, b_keys, b_values in blocks:
                rows = np.searchsorted(steps, b_steps)
                cols = [col[k] for k in b_keys]
                merged[np.ix_(rows, cols)] = b_values
            self.history.add_steps(steps, self.epoch, keys, merged)

    def _host_checks(self, stage, epoch, detectors=None):
        """Run every detector's ``epoch_end``, ``fit_end`` or ``periodic`` hook and act on what they found."""
        found = []
        step = self.current_step()
        for d in self.engine.detectors if detectors is None else detectors:
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
