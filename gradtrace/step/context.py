"""What one trace of a watched step knows (:class:`StepContext`): set once, when the step starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import tensorflow as tf

from gradtrace import hooks
from gradtrace.anomaly import BLOCKING
from gradtrace.capturing import Recorder
from gradtrace.step.plan import STOPPING, Plan, Variant


@dataclass
class StepContext:
    """One replica's trace of a watched step. Every field but the last four is fixed when the step starts;
    ``step``, ``applies``, ``held`` and ``updates`` grow as its optimizer updates are traced."""

    plan: Plan
    variant: Variant
    trace: hooks.Trace  # what the hooks record: layer calls, tapes, gradient and loss calls
    detectors: list  # the detectors that check this step
    blocking: list  # indices (into detectors) of those whose action holds the update
    stopping: list  # indices of those whose action stops training (and holds the rest of the execution)
    rollback: list  # variables a held update puts back (non-trainable: BatchNorm statistics, seeds)
    saved: list  # their values before the step
    metric_vars: list  # the metric accumulators a held step puts back (after its logs were read)
    saved_metrics: list
    reports_fired: bool  # the step returns whether a detector fired (not under a strategy)
    pairs: bool  # a hand-written step: returns (its outputs, fired)
    data: object  # the batch as the step took it
    x: object
    y: object
    sample_weight: object
    labels: Optional[tf.Tensor] = None  # class labels checked against the output's units (made safe)
    step: Optional[tf.Tensor] = None  # the iterations of the step's first optimizer, read before its update
    applies: int = 0  # optimizer updates traced so far
    held: tf.Tensor = field(default_factory=lambda: tf.constant(False))  # an update was held: later ones are
    updates: list = field(default_factory=list)  # one GatedUpdate per gated optimizer update, in order

    @property
    def recorder(self):
        return self.trace.recorder


def start(engine, variant, data, body, reports_fired):
    """A step starts: its :class:`StepContext` (``engine``: the :class:`~gradtrace.step.Engine`; ``body``: a
    hand-written step, else the model's own), and the data its body runs on (labels made safe)."""
    plan = variant.plan
    detectors = engine.detectors_for(plan)
    blocking = [i for i, d in enumerate(detectors) if engine.actions[d.name] in BLOCKING]
    stopping = [i for i, d in enumerate(detectors) if engine.actions[d.name] in STOPPING]
    # a step whose ids or labels were made safe (a changed value) is held whatever the action
    sanitizes = engine.sanitize_ids or plan.mode in ("force", "report") or (
        body is None and engine.label_units is not None)
    restores = bool(blocking) or plan.mode in ("report", "inspect") or sanitizes
    rollback = list(engine.model.non_trainable_variables) if restores else []
    metric_vars = list(getattr(engine.model, "metrics_variables", [])) if restores else []
    recorder = Recorder(sanitize_ids=engine.sanitize_ids or plan.mode in ("force", "report"), keep=plan.traced)
    trace = hooks.Trace(recorder)
    recorder.tapes = trace.open_tapes
    unpacked = data if isinstance(data, tuple) and 1 <= len(data) <= 3 else (data,)
    x, y, sample_weight = (tuple(unpacked) + (None, None))[:3]
    labels, runs_on = None, data
    if body is None and engine.label_units and isinstance(y, tf.Tensor) and y.dtype.is_integer:
        # a label outside [0, units) aborts the loss on CPU and gives NaN on GPU: check it first,
        # and let the step complete on label 0 (the detector holds it)
        units, ignored = engine.label_units
        labels = y if ignored is None else tf.where(tf.equal(y, ignored), tf.zeros_like(y), y)
        bad = (labels < 0) | (labels >= units)
        recorder.changed.append(tf.reduce_any(bad))
        runs_on = (x, tf.where(bad, tf.zeros_like(y), y)) + tuple(unpacked[2:])
    ctx = StepContext(
        plan=plan, variant=variant, trace=trace, detectors=detectors, blocking=blocking, stopping=stopping,
        rollback=rollback, saved=[tf.identity(v.value) for v in rollback],
        metric_vars=metric_vars, saved_metrics=[tf.identity(v.value) for v in metric_vars],
        # under a strategy the per-replica outputs are reduced by Keras: the host reads the records instead
        reports_fired=reports_fired and not tf.distribute.has_strategy(),
        pairs=body is not None and reports_fired, data=data, x=x, y=y, sample_weight=sample_weight,
        labels=labels)
    return ctx, runs_on
