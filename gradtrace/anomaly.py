"""The Anomaly record, how detectors' findings become anomalies, the actions a detector can take, and a
bounded log."""

from __future__ import annotations

import collections
from dataclasses import asdict, dataclass, field

import numpy as np

from gradtrace.stats import row_dict

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
    stage: str = "step"
    hint: str = ""  # the most likely fix, in the terms of the model (layer names, activations, values)
    optimizer: str = ""  # the update it was found at: the name the model knows its optimizer by
    # ``layer`` by Keras' automatic layer names (``retrieval_model/embedding_1`` for a layer the code holds
    # as ``self.candidate_embedding``, which ``layer`` uses); "" when the two are the same
    layer_alias: str = ""
    # verify_hints: True when the hinted fix, tried from the state before the held step, made the fault go
    # away and the loss fall; False when it was tried and did not; None when not tried (gradtrace.verify)
    verified: bool | None = None
    verification: str = ""  # one line of evidence: what was tried and what it gave

    def at(self, path) -> bool:
        """True when the finding is at layer ``path``, by its attribute name or by its automatic one."""
        return path in (self.layer, self.layer_alias) and bool(path)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self):
        where = ""
        if self.replicas:
            where = f" [replica{'s' if len(self.replicas) > 1 else ''} {', '.join(map(str, self.replicas))}]"
        when = f"step {self.step} (epoch {self.epoch})"
        if self.optimizer and self.optimizer != "optimizer":  # a step with several updates (a GAN's)
            when += f", update of {self.optimizer}"
        if self.stage == "epoch_end":
            when = f"end of epoch {self.epoch} (step {self.step})"
        elif self.stage == "fit_end":
            when = f"end of training (step {self.step}, epoch {self.epoch})"
        elif self.stage == "periodic":
            when = f"periodic check after step {self.step} (epoch {self.epoch})"
        text = f"[{self.detector}] {when}{where}: {self.message}"
        if self.hint:
            text += f"\n    hint: {self.hint}"
        if self.verification:
            text += f"\n    {VERDICT[self.verified]}: {self.verification}"
        return text


# how a verify_hints verdict (Anomaly.verified) reads, wherever it is shown
VERDICT = {True: "verified", False: "tried, did not help", None: "not verified"}

# the tensor an anomaly names, by the kind of row it is about (the others: the kind itself)
_TENSOR_NAMES = {"ids": "input", "labels": "target"}


def build_anomalies(detectors, actions, table, fired, values, matrix, step, epoch, replica_faults=None,
                    columns=None):
    """Host side, on a step where something fired: each detector explains its rows.

    ``fired`` and ``values`` are ``[detectors, rows]``; ``replica_faults`` (``[replicas, rows]``, under a
    strategy) names the replicas whose shard held the blamed row's NaN/Inf or bad ids; ``columns`` are the
    statistics ``matrix`` really holds (all when ``None``).
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


def stopped_how(stage, epoch=None, guard="step") -> str:
    """What stopping on a finding of ``stage`` did to the model, in words (``guard``: how the step's update
    waited for the checks, see :mod:`gradtrace.step.gate`)."""
    if stage == "step" and guard == "variable":
        return ("each variable whose gradient had NaN/Inf was not updated (guard='variable'); the other "
                "variables of the step were")
    if stage == "step" and guard is None:
        return "the step's update was applied (guard=None)"
    if stage == "step":
        return "the step's update was not applied"
    if stage == "epoch_end":
        return (f"at the end of epoch {epoch}: the check reads the whole epoch, so that epoch's updates "
                "were applied")
    if stage == "periodic":
        return "at a periodic check: it reads many steps, so the updates up to it were applied"
    return "after training ended: every update was applied"


class AnomalyError(RuntimeError):
    """Raised by ``on_anomaly="raise"``. On a step finding the step's update was not applied;
    on an epoch-end finding training stops after that epoch."""

    def __init__(self, anomalies, guard="step"):
        self.anomalies = list(anomalies)
        lines = "\n".join(f"  {a}" for a in self.anomalies)
        first = self.anomalies[0] if self.anomalies else None
        how = stopped_how(first.stage, first.epoch, guard) if first is not None else stopped_how("step", None, guard)
        super().__init__(
            f"gradtrace stopped training on {len(self.anomalies)} anomal"
            f"{'y' if len(self.anomalies) == 1 else 'ies'} "
            f"({how}):\n{lines}"
        )


class DetectorError(RuntimeError):
    """A detector itself failed (a bug in the detector, not an anomaly of the model).

    ``detector`` names it, ``stage`` says where it failed (``"check"``: its
    in-graph check, while the step was compiled or run; ``"explain"``: its
    host-side explanation of a step where it fired; ``"epoch_begin"`` /
    ``"epoch_end"``: its epoch hooks). The step it failed in was not applied
    when its check failed, and was held when a blocking detector fired;
    ``anomalies`` holds the findings of the fit up to then.
    """

    def __init__(self, detector, stage, error, anomalies=()):
        self.detector = detector
        self.stage = stage
        self.anomalies = list(anomalies)
        where = {
            "check": "in its in-graph check (Detector.check)",
            "explain": "while explaining a step where it fired (Detector.explain)",
            "epoch_begin": "at the start of an epoch (Detector.epoch_begin)",
            "epoch_end": "at the end of an epoch (Detector.epoch_end)",
            "fit_end": "when training ended (Detector.fit_end)",
        }.get(stage, stage)
        super().__init__(
            f"gradtrace: detector {detector!r} failed {where}: {type(error).__name__}: {error}. "
            "This is a fault of the detector, not of the model; the model was left as after its last "
            "applied step. Fix the detector or leave it out of detectors=."
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
