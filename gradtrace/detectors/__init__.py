"""Built-in detectors and the rules that turn ``detectors=`` into instances.

One file per detector; a new detector is a subclass of
:class:`~gradtrace.detectors.base.Detector` and needs no engine change.
"""

from __future__ import annotations

from gradtrace.detectors.base import Detector
from gradtrace.detectors.dead_relu import DeadReLU
from gradtrace.detectors.divergence import Divergence
from gradtrace.detectors.embedding_out_of_range import EmbeddingOutOfRange
from gradtrace.detectors.embedding_rows import EmbeddingRows
from gradtrace.detectors.embedding_tables import EmbeddingCollapse, EmbeddingTwins
from gradtrace.detectors.exploding import Exploding
from gradtrace.detectors.gradient_cut import GradientCut
from gradtrace.detectors.head_mismatch import HeadMismatch
from gradtrace.detectors.identical_units import IdenticalUnits
from gradtrace.detectors.labels_out_of_range import LabelsOutOfRange
from gradtrace.detectors.loss_plateau import LossPlateau
from gradtrace.detectors.nan import NaN
from gradtrace.detectors.penalties import Penalties
from gradtrace.detectors.no_gradient import NoGradient
from gradtrace.detectors.no_progress import NoProgress
from gradtrace.detectors.saturation import Saturation
from gradtrace.detectors.scale_growth import ScaleGrowth
from gradtrace.detectors.unused_embedding import UnusedEmbedding
from gradtrace.detectors.update_size import UpdateSize
from gradtrace.detectors.vanishing import Vanishing

BUILTINS = {
    cls.name: cls
    for cls in (NaN, Exploding, Vanishing, DeadReLU, UnusedEmbedding, EmbeddingOutOfRange, Saturation, LossPlateau,
                HeadMismatch, NoGradient, ScaleGrowth, EmbeddingTwins, EmbeddingCollapse, Divergence,
                EmbeddingRows, LabelsOutOfRange, GradientCut, IdenticalUnits, NoProgress, Penalties, UpdateSize)
}
# Used when detectors=None. loss_plateau is off by default.
# In this order: the detectors that name a cause (the learning rate or the data's scale, the data, the
# output layer, the initialisation, a cut in the gradient) come before those that see a symptom (a
# gradient that explodes or vanishes), so the first anomaly of a step is its most likely origin.
DEFAULT = ("divergence", "nan", "embedding_out_of_range", "labels_out_of_range", "head_mismatch", "scale_growth",
           "identical_units", "no_gradient", "gradient_cut", "exploding", "vanishing", "saturation", "dead_relu",
           "unused_embedding", "embedding_rows", "embedding_twins", "embedding_collapse", "penalties",
           "update_size", "no_progress")


def resolve(detectors) -> list[Detector]:
    """``None`` -> every default detector; otherwise a list of names, classes or instances."""
    if detectors is None:
        detectors = list(DEFAULT)
    if isinstance(detectors, (str, Detector)):
        detectors = [detectors]
    out, seen = [], set()
    for d in detectors:
        if isinstance(d, str):
            if d not in BUILTINS:
                raise ValueError(
                    f"Unknown detector {d!r}. Built-in detectors: {', '.join(sorted(BUILTINS))}; "
                    "or pass an instance of a gradtrace.Detector subclass."
                )
            d = BUILTINS[d]()
        elif isinstance(d, type) and issubclass(d, Detector):
            d = d()
        if not isinstance(d, Detector):
            raise TypeError(
                f"detectors must hold detector names or gradtrace.Detector instances, got {type(d).__name__}: {d!r}."
            )
        if d.name in seen:
            raise ValueError(f"Detector {d.name!r} is listed twice; configure it once.")
        seen.add(d.name)
        d.validate()
        out.append(d)
    return out


__all__ = [
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
    "GradientCut",
    "HeadMismatch",
    "IdenticalUnits",
    "LabelsOutOfRange",
    "LossPlateau",
    "NaN",
    "NoGradient",
    "NoProgress",
    "Penalties",
    "Saturation",
    "ScaleGrowth",
    "UnusedEmbedding",
    "UpdateSize",
    "Vanishing",
    "resolve",
]
