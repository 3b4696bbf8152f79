"""What a watched step is compiled as (:class:`Plan`), what it computed (:class:`StepOutput`), and where
each compiled variant keeps its tables and records (:class:`Variant`, :class:`Segment`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import tensorflow as tf

# the logs of a step that returns its statistics (a held step measured in full, a replay) carry one
# StepOutput per gated update under this key
KEY = "__gradtrace__"
# a step Keras' fit calls returns, with its logs, whether a detector has fired and not yet been handled (one
# boolean the host reads off the step's outputs, instead of one variable read per update)
FIRED = "__gradtrace_fired__"
# every detector's in-graph check runs under this name scope, so a failing op names its detector
DETECTOR_SCOPE = "gradtrace_detector_"
# the actions that stop training (and hold the rest of the execution)
STOPPING = ("halt", "raise")


@dataclass(frozen=True)
class Plan:
    """One step variant.

    - ``traced``: capture every layer (False: the weight gradients' sums only, for ``trace_every``);
    - ``mode``: ``"train"`` (detect; commit unless a blocking detector fired), ``"force"``
      (commit, detect nothing: the redo of a snapshotted step), ``"report"`` (measure every
      statistic, commit nothing: a held step, measured in full), ``"inspect"`` (measure every
      statistic, run the detectors, commit nothing, keep every tensor: replay);
    - ``summary_bins``: also measure every statistic and histograms (TensorBoard).

    Mode ``"plain"`` is not watched at all: the model's own step, as ``model.fit`` runs it (what an
    overhead budget times as its reference).
    """

    traced: bool = True
    mode: str = "train"
    summary_bins: int = 0

    @property
    def detects(self) -> bool:
        return self.mode in ("train", "inspect")

    @property
    def commits(self) -> bool:
        return self.mode in ("train", "force")

    @property
    def every_statistic(self) -> bool:
        return bool(self.summary_bins) or self.mode in ("report", "inspect")

    @property
    def returns_result(self) -> bool:
        """The step returns its statistics with its logs (it runs on a batch the host holds)."""
        return self.mode in ("report", "inspect")


TRACED = Plan(True)
UNTRACED = Plan(False)
PLAIN = Plan(False, "plain")
INSPECT = Plan(True, "inspect")


class StepOutput(NamedTuple):
    """What one gated update of a step that returns its statistics hands back (under :data:`KEY` in its
    logs, one per update): every detector's per-row flags and values, the statistics ``[rows, columns]``,
    the step, whether the update was committed, and under a strategy which replicas held each row's fault."""

    fired: tf.Tensor
    values: tf.Tensor
    stats: tf.Tensor
    step: tf.Tensor
    committed: tf.Tensor
    replica_faults: Optional[tf.Tensor] = None


@dataclass
class GatedUpdate:
    """What the gated update of one traced step computed (in-graph, while the step is traced)."""

    table: object
    matrix: object
    fired: object  # [detectors, rows]
    values: object  # [detectors, rows]
    per_detector: object  # [detectors]
    faults: object  # [replicas, rows] or None
    exact_counts: object  # matrix -> the matrix with the batch's and the loss's exact NaN/Inf counts (the record's)
    histograms: object = None
    committed: object = None
    record: object = None
    blocks: object = None  # a blocking detector fired (a boolean made of their checks alone); None: none blocks

    def output(self, step) -> StepOutput:
        return StepOutput(self.fired, self.values, self.matrix, step, self.committed, self.faults)


@dataclass(frozen=True)
class Layout:
    """What one update's rows are, fixed at its trace: its table, the detectors that check it, the
    statistics its matrix holds (None: every one) and its histogram rows."""

    table: object
    detectors: tuple
    columns: Optional[frozenset]
    histogram_rows: object = None


class Segment:
    """One gated optimizer update of a step: its layout, its record per replica.

    Keras' own step applies one update; a custom step may apply several (a GAN's
    discriminator and generator updates), each watched on its own."""

    def __init__(self, index):
        self.index = index
        self.layout: Optional[Layout] = None  # set once, when the update is traced
        self.records = {}  # replica id -> Record
        self.optimizer = ""  # the name the model knows the optimizer by ("optimizer", "d_optimizer")

    @property
    def table(self):
        return None if self.layout is None else self.layout.table

    @property
    def detectors(self):
        return [] if self.layout is None else list(self.layout.detectors)

    @property
    def columns(self):
        return None if self.layout is None else self.layout.columns

    @property
    def histogram_rows(self):
        return None if self.layout is None else self.layout.histogram_rows

    def record(self):
        """The record of the first replica (every replica decides alike), or ``None``."""
        return self.records[min(self.records)] if self.records else None

    def reset(self):
        for r in self.records.values():
            r.reset()


@dataclass
class Variant:
    """A :class:`Plan` compiled for one model: one :class:`Segment` per optimizer update of its step."""

    plan: Plan
    segments: list = field(default_factory=list)
    batch_structure: object = None  # the step's data, symbolic: how to rebuild the captured batch
    batch_outside: bool = False  # the batch is kept outside the step (XLA): see Engine.keeping_the_batch
    inspected: Optional[dict] = None  # replay: every tensor of the first update
    function: object = None
    traces: int = 0  # how many times the step was traced (Python ran it)

    def segment(self, index) -> Segment:
        while len(self.segments) <= index:
            self.segments.append(Segment(len(self.segments)))
        return self.segments[index]

    # the first update's table, detectors and record (Keras' own step has exactly one)
    @property
    def table(self):
        return self.segments[0].table if self.segments else None

    @property
    def detectors(self):
        return self.segments[0].detectors if self.segments else []

    @property
    def columns(self):
        return self.segments[0].columns if self.segments else None

    @property
    def histogram_rows(self):
        return self.segments[0].histogram_rows if self.segments else None

    @property
    def records(self):
        return self.segments[0].records if self.segments else {}

    def record(self):
        return self.segments[0].record() if self.segments else None

    def reset(self):
        for seg in self.segments:
            seg.reset()

    def captured_batch(self, segment=None, strategy=None):
        """The failing batch the step kept (in ``segment``'s record): host tensors (concatenated over
        this worker's replicas), and the same batch distributed as the step took it; ``(None, None)``
        when the step could not keep it."""
        records = (segment or self.segments[0]).records if self.segments else {}
        if not records or any(r.batch is None for r in records.values()):
            return None, None
        shards = []
        for rid in sorted(records):
            values = iter([tf.convert_to_tensor(v) for v in records[rid].batch])
            leaves = [None if leaf is None else next(values)
                      for leaf in tf.nest.flatten(self.batch_structure, expand_composites=True)]
            shards.append(tf.nest.pack_sequence_as(self.batch_structure, leaves, expand_composites=True))
        host = shards[0] if len(shards) == 1 else tf.nest.map_structure(
            lambda *p: tf.concat(list(p), 0), *shards)
        if len(shards) == 1 or strategy is None:
            return host, host
        ids = sorted(records)
        dist = strategy.experimental_distribute_values_from_function(
            lambda c: tf.nest.map_structure(tf.identity, shards[ids.index(int(c.replica_id_in_sync_group))]))
        return host, dist
