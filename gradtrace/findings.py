"""From a step's record to anomalies: what the host does after a call of the step at which a detector fired.

It reads the records of the updates that fired; where the step was held (its
pre-step state is intact) it runs it again on the kept batch, committing
nothing: measured in full (exact NaN/Inf counts, every statistic, the weights)
and, for a guarded (untraced) step, traced to name the layer the fault started
in. Each detector then explains its rows (:func:`gradtrace.anomaly.build_anomalies`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from gradtrace import stats as st
from gradtrace.anomaly import build_anomalies
from gradtrace.step import INSPECT, KEY, Plan


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


@dataclass
class Findings:
    """What one call of the step found: the anomalies, one :class:`StepRecord` per update that found
    something, and the failing batch (host tensors, and as the step took it, distributed) when kept."""

    anomalies: list = field(default_factory=list)
    records: list = field(default_factory=list)
    data: object = None
    dist_data: object = None
    held: bool = False  # an update that found something was held


def read(run, variant, segments, complete=False) -> Optional[Findings]:
    """Detectors fired in the last call, at the updates ``segments`` of ``variant`` (Keras' own step has
    one update; a custom step may have several). ``complete``: the step measured every statistic.
    ``run`` gives the epoch, the detectors' actions and :meth:`~gradtrace.run.Run.run_step`."""
    out = Findings()
    report = None
    for seg in segments:
        rec = seg.record()
        matrix = rec.stats.numpy()
        fired, values = rec.fired.numpy(), rec.values.numpy()
        step, committed = int(rec.step.numpy()), bool(rec.committed.numpy())
        out.held = out.held or not committed
        faults = None if rec.faults is None else rec.faults.numpy()
        if not committed and out.data is None:
            out.data, out.dist_data = variant.captured_batch(seg, run.model.distribute_strategy)
        columns = None if complete else seg.columns
        if not complete:
            # a layer's NaN/Inf are flags, not counts (a held step is measured again below)
            matrix = st.uncounted(matrix, [r.kind for r in seg.table.rows], replicas=faults is not None)
        if not complete and not committed and out.dist_data is not None:
            # The step was held, so its pre-step state is intact: measure everything (exact
            # NaN/Inf counts, std, min, max, weights) by running it again, committing nothing.
            # The watched step itself only computes what the detectors read.
            if report is None:
                report = dict(run.run_step(Plan(variant.plan.traced, "report"), out.dist_data))[KEY]
            if seg.index < len(report):
                matrix = report[seg.index].stats.numpy()
                if report[seg.index].replica_faults is not None:
                    faults = report[seg.index].replica_faults.numpy()
                columns = None
        mine = build_anomalies(seg.detectors, run.engine.actions, seg.table, fired, values, matrix, step,
                               run.epoch, faults, columns)
        table = seg.table
        if mine and not variant.plan.traced and not committed and out.dist_data is not None:
            # a guarded (untraced) step refused a non-finite update; it was held, so its pre-step
            # state is intact: trace it now, committing nothing, to name the layer it started in
            traced = _traced(run, out.dist_data, seg.index, step, {a.detector for a in mine})
            if traced is not None:
                mine, table, matrix = traced
                columns = None
        for a in mine:
            a.optimizer = seg.optimizer
        if mine:
            out.anomalies.extend(mine)
            out.records.append(StepRecord(step, run.epoch, table, matrix, mine, columns, seg.optimizer))
    variant.reset()
    return out if out.anomalies else None


def _traced(run, dist_data, index, step, detectors):
    """Run a held step again traced (every layer, every statistic, every detector; nothing committed)
    and return ``(anomalies, table, matrix)`` of its update ``index``, or ``None`` when the traced
    step does not confirm every detector in ``detectors`` (then the guarded step's findings stand)."""
    engine = run.engine
    try:
        out = dict(run.run_step(INSPECT, dist_data))[KEY]
    except Exception as e:  # the guarded step's findings stand (its update is held either way)
        engine.warn_once("inspect", f"the held step could not be traced again to name its layer "
                         f"({type(e).__name__}: {e}); its findings are those of the guarded step.")
        return None
    segments = engine.variants[INSPECT].segments
    if index >= len(out) or index >= len(segments):
        return None
    res, seg = out[index], segments[index]
    matrix = res.stats.numpy()
    faults = None if res.replica_faults is None else res.replica_faults.numpy()
    mine = build_anomalies(seg.detectors, engine.actions, seg.table, res.fired.numpy(), res.values.numpy(),
                           matrix, step, run.epoch, faults, None)
    if not detectors <= {a.detector for a in mine}:
        return None
    return mine, seg.table, matrix
