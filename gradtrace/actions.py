"""Acting on what was found: record and print, snapshot (and redo the held step), halt, raise, and
write to TensorBoard.

| action   | step finding                              | epoch-end finding                        |
| warn     | record, print, go on                      | the same                                 |
| snapshot | snapshot the held step, then redo it      | record, go on (no step to snapshot)      |
| halt     | stop; the step's update is not applied    | stop after this epoch (its updates stay) |
| raise    | raise; the step's update is not applied   | raise after this epoch                   |
"""

from __future__ import annotations

import sys

from gradtrace import snapshot as snapshot_module
from gradtrace.anomaly import BLOCKING, AnomalyError, stopped_how, strongest
from gradtrace.step import KEY, Plan


class Snapshots:
    """Where a run writes its snapshots, how many it may write, and those written."""

    def __init__(self, directory=None, cap=5):
        self.directory = directory
        self.cap = cap
        self.paths: list[str] = []
        self.optimizer = None  # the optimizer your own loop applies (gradtrace.loop), written in a snapshot

    def write(self, run, found, record, data, verbose):
        if len(self.paths) >= self.cap:
            for a in found:
                a.snapshot_error = f"not written: the cap of {self.cap} snapshots per fit was reached"
            return
        try:
            path = snapshot_module.write(
                self.directory, model=run.model, data=data, step=record.step, epoch=record.epoch,
                anomalies=found, detectors=[d.name for d in run.engine.detectors],
                table=record.table, matrix=record.matrix, optimizer=self.optimizer,
                own_step=None if run.own_step is None else getattr(run.own_step[0], "__qualname__", "step"),
            )
        except Exception as e:  # a snapshot must never crash training silently: say why on the anomaly
            for a in found:
                a.snapshot_error = f"{type(e).__name__}: {e}"
            if verbose:
                print(f"gradtrace: snapshot of step {record.step} failed ({type(e).__name__}: {e}); nothing was "
                      "left behind", flush=True)
            return
        self.paths.append(path)
        snapshot_module.remember_classes(path, run.model)
        for a in found:
            a.snapshot = path
        if verbose:
            print(f"gradtrace: snapshot of step {record.step} written to {path}\n"
                  f"           replay it with: gradtrace replay {path}", flush=True)


def act(run, found, record, data=None, dist_data=None, stage="step", more_records=()):
    """Act on the findings of one step (``data``: its batch, ``dist_data``: the same batch as the step took
    it, distributed) or of an epoch's end (no batch); see the module docstring. Returns the logs of a
    snapshotted step's redo (Keras' own step), else None."""
    for a in found:
        a.stage = stage
        a.layer_alias = run.engine.tap.alias_of(a.layer)
        run.log.add(a)
    for rec in (record, *more_records):  # one per update of the step that found something
        if len(run.records) < run.keep_records:
            run.records.append(rec)
    action = strongest([a.action for a in found])
    if stage != "step" and action == "snapshot":
        for a in found:
            a.snapshot_error = "not written: a finding at the end of an epoch or of training has no failing step"
        action = "warn"
    if stage == "fit_end" and action == "halt":
        action = "warn"  # training has ended: there is nothing left to stop
    if action in BLOCKING and data is not None and run.snapshots.directory is not None:
        run.snapshots.write(run, found, record, data, run.verbose)
    if run.tensorboard is not None:
        run.tensorboard.write_anomalies(found)
    if run.verbose:
        for a in found:
            print(f"\ngradtrace: {a}", file=sys.stdout, flush=True)
    if action == "raise":
        run.halted = True
        raise AnomalyError(found, run.engine.guard)
    if action == "snapshot":
        return _redo(run, dist_data)
    if action == "halt":
        run.halted = True
        run.model.stop_training = True
        if run.verbose:
            from gradtrace.reporting import format_report

            table = format_report(run, steps=[record.step]) if stage == "step" else ""
            how = stopped_how(stage, record.epoch, run.engine.guard)
            print(f"gradtrace: halted at step {record.step}; {how}.\n" + table,
                  flush=True)
    return None


def _redo(run, dist_data):
    """The snapshotted step was held so that the snapshot has its pre-step state; now redo it, committed
    (unless its update is non-finite: then it is skipped)."""
    if dist_data is None:
        return None
    out = run.run_step(Plan(False, "force"), dist_data)
    if run.own_step is not None:  # your own loop's step (gradtrace.loop): its outputs are yours
        return None
    out = dict(out)
    out.pop(KEY, None)
    return out
