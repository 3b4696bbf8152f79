"""gradtrace: a training-loop debugger for Keras 3 on TensorFlow.

Swap ``model.fit(...)`` for ``gradtrace.fit(model, ...)`` to capture every
nested layer's output and gradient in the compiled step and stop at the first
bad step.
"""

from gradtrace.anomaly import ACTIONS, Anomaly, AnomalyError, DetectorError
from gradtrace.capture import is_patched, layer_paths
from gradtrace.detectors import (
    BUILTINS,
    DEFAULT,
    DeadReLU,
    Detector,
    Divergence,
    EmbeddingCollapse,
    EmbeddingOutOfRange,
    EmbeddingRows,
    EmbeddingTwins,
    Exploding,
    HeadMismatch,
    LabelsOutOfRange,
    LossPlateau,
    NaN,
    NoGradient,
    Saturation,
    ScaleGrowth,
    UnusedEmbedding,
    Vanishing,
)
from gradtrace.fit import fit
from gradtrace.history import LayerHistory
from gradtrace.html import save_report
from gradtrace.inspection import capture, summary
from gradtrace.plot import plot
from gradtrace.replay import Replay, replay
from gradtrace.report import report
from gradtrace.snapshot import SnapshotError
from gradtrace.watch import Watch, watch

__version__ = "0.1.0"

__all__ = [
    "ACTIONS",
    "Anomaly",
    "AnomalyError",
    "DetectorError",
    "BUILTINS",
    "DEFAULT",
    "DeadReLU",
    "Detector",
    "Divergence",
    "EmbeddingCollapse",
    "EmbeddingOutOfRange",
    "EmbeddingRows",
    "EmbeddingTwins",
    "Exploding",
    "HeadMismatch",
    "LabelsOutOfRange",
    "LayerHistory",
    "LossPlateau",
    "NaN",
    "NoGradient",
    "Saturation",
    "ScaleGrowth",
    "UnusedEmbedding",
    "Vanishing",
    "capture",
    "fit",
    "plot",
    "save_report",
    "summary",
    "is_patched",
    "layer_paths",
    "Replay",
    "replay",
    "report",
    "SnapshotError",
    "Watch",
    "watch",
    "__version__",
]
