"""gradtrace: a training-loop debugger for Keras 3 on TensorFlow.

Swap ``model.fit(...)`` for ``gradtrace.fit(model, ...)`` to capture every
nested layer's output and gradient in the compiled step and stop at the first
bad step.
"""

import contextlib
import importlib
import os
import sys


@contextlib.contextmanager
def _quiet_start_for_the_demo():
    """``python -m gradtrace.demo`` should read cleanly: TensorFlow's C++ runtime prints a few lines when
    it is first imported, before its logging is set up (``TF_CPP_MIN_LOG_LEVEL`` does not reach them).
    For that one command, and only while TensorFlow is imported, they are sent to /dev/null."""
    demo = getattr(sys, "orig_argv", [])[1:3] in (["-m", "gradtrace.demo"], ["-m", "gradtrace"])
    try:
        fd = sys.stderr.fileno() if demo and "tensorflow" not in sys.modules else None
    except (AttributeError, OSError, ValueError):
        fd = None
    if fd is None:
        yield
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            importlib.import_module("tensorflow")  # quietly, for the imports below
    finally:
        os.dup2(saved, fd)
        os.close(saved)
    yield


with _quiet_start_for_the_demo():
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
    IdenticalUnits,
    LabelsOutOfRange,
    LossPlateau,
    NaN,
    NoGradient,
    NoProgress,
    Penalties,
    UpdateSize,
    GradientCut,
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
    "IdenticalUnits",
    "LabelsOutOfRange",
    "LayerHistory",
    "LossPlateau",
    "NaN",
    "NoGradient",
    "NoProgress",
    "Penalties",
    "UpdateSize",
    "GradientCut",
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
