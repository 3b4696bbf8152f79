"""gradtrace: a training-loop debugger for Keras 3 on TensorFlow.

Swap ``model.fit(...)`` for ``gradtrace.fit(model, ...)`` to capture every
nested layer's output and gradient in the compiled step and stop at the first
bad step.

The public names are imported on first use (PEP 562), so ``import gradtrace``
does not import TensorFlow until something needs it, and
``python -m gradtrace.demo`` can set TensorFlow's start-up output aside
itself (see :mod:`gradtrace.demo`).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_HOME = {
    **dict.fromkeys(("ACTIONS", "Anomaly", "AnomalyError", "DetectorError"), "gradtrace.anomaly"),
    **dict.fromkeys((
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
    ), "gradtrace.detectors"),
    "is_patched": "gradtrace.capturing",
    "layer_paths": "gradtrace.capturing",
    "fit": "gradtrace.fitting",
    "LayerHistory": "gradtrace.history",
    "save_report": "gradtrace.html",
    "capture": "gradtrace.inspection",
    "summary": "gradtrace.inspection",
    "plot": "gradtrace.pictures",
    "Replay": "gradtrace.replaying",
    "replay": "gradtrace.replaying",
    "report": "gradtrace.reporting",
    "Run": "gradtrace.run",
    "SnapshotError": "gradtrace.snapshot",
    "StatsView": "gradtrace.stats",
    "Row": "gradtrace.stats",
    "COLUMNS": "gradtrace.stats",
    "Watch": "gradtrace.watching",
    "loop": "gradtrace.looping",
    "watch": "gradtrace.looping",
}

__all__ = sorted(_HOME) + ["__version__"]


def __getattr__(name):
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'gradtrace' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # found once
    return value


def __dir__():
    return sorted(set(globals()) | set(_HOME))
