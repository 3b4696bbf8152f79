"""gradtrace: a training-loop debugger for Keras 3 on TensorFlow.

Swap ``model.fit(...)`` for ``gradtrace.fit(model, ...)`` to capture every
nested layer's output and gradient in the compiled step and stop at the first
bad step.
"""

from gradtrace.anomaly import ACTIONS, Anomaly, AnomalyError
from gradtrace.capture import is_patched, layer_paths
from gradtrace.detectors import (
    BUILTINS,
    DEFAULT,
    DeadReLU,
    Detector,
    EmbeddingOutOfRange,
    Exploding,
    LossPlateau,
    NaN,
    Saturation,
    UnusedEmbedding,
    Vanishing,
)
from gradtrace.fit import fit
from gradtrace.report import report

__version__ = "0.1.0"

__all__ = [
    "ACTIONS",
    "Anomaly",
    "AnomalyError",
    "BUILTINS",
    "DEFAULT",
    "DeadReLU",
    "Detector",
    "EmbeddingOutOfRange",
    "Exploding",
    "LossPlateau",
    "NaN",
    "Saturation",
    "UnusedEmbedding",
    "Vanishing",
    "fit",
    "is_patched",
    "layer_paths",
    "report",
    "__version__",
]
