"""The Anomaly record, the actions a detector can take, and a bounded log."""

from __future__ import annotations

import collections
from dataclasses import asdict, dataclass, field

ACTIONS = ("warn", "snapshot", "halt", "raise")
# Actions that hold back the step's update in-graph (the step is not committed).
BLOCKING = ("halt", "raise", "snapshot")
_SEVERITY = {a: i for i, a in enumerate(ACTIONS)}


def check_action(action, what="on_anomaly"):
    if action not in ACTIONS:
        raise ValueError(
            f"{what}={action!r} is not an action gradtrace knows. "
            f"Use one of {', '.join(repr(a) for a in ACTIONS)} "
            "(or None to keep each detector's default)."
        )
    return action


def strongest(actions):
    return max(actions, key=lambda a: _SEVERITY[a]) if actions else None


@dataclass
class Anomaly:
    """One finding of a detector at one training step.

    ``step`` is ``model.optimizer.iterations`` before the step's update;
    ``layer`` is the layer path (``outer/inner/user_emb``) or ``inputs`` /
    ``targets`` / ``loss`` when the data or the loss is to blame.
    ``replicas`` (under ``tf.distribute``): the replicas whose shard held the
    NaN/Inf or bad ids of the blamed row; empty on one device or when the
    finding is about the combined statistics.
    """

    detector: str
    layer: str
    tensor: str
    step: int
    epoch: int
    value: float
    message: str
    snapshot: str | None = None
    action: str = "warn"
    snapshot_error: str | None = None
    stats: dict = field(default_factory=dict, repr=False)
    replicas: tuple = ()

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self):
        where = ""
        if self.replicas:
            where = f" [replica{'s' if len(self.replicas) > 1 else ''} {', '.join(map(str, self.replicas))}]"
        return f"[{self.detector}] step {self.step} (epoch {self.epoch}){where}: {self.message}"


class AnomalyError(RuntimeError):
    """Raised by ``on_anomaly="raise"``; the step's update was not applied."""

    def __init__(self, anomalies):
        self.anomalies = list(anomalies)
        lines = "\n".join(f"  {a}" for a in self.anomalies)
        super().__init__(
            f"gradtrace stopped training on {len(self.anomalies)} anomal"
            f"{'y' if len(self.anomalies) == 1 else 'ies'} "
            f"(the step's update was not applied):\n{lines}"
        )


class AnomalyLog:
    """Keeps the first ``keep`` and the last ``keep`` anomalies, and counts all of them.

    A run that warns on every step for days holds at most ``2 * keep`` records.
    """

    def __init__(self, keep=500):
        self.keep = keep
        self.first: list[Anomaly] = []
        self.last: collections.deque = collections.deque(maxlen=keep)
        self.counts: collections.Counter = collections.Counter()
        self.total = 0

    def add(self, anomaly: Anomaly):
        self.total += 1
        self.counts[anomaly.detector] += 1
        if len(self.first) < self.keep:
            self.first.append(anomaly)
        else:
            self.last.append(anomaly)

    def __len__(self):
        return len(self.first) + len(self.last)

    def as_list(self) -> list[Anomaly]:
        return self.first + list(self.last)

    @property
    def dropped(self) -> int:
        return self.total - len(self)
