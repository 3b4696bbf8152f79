"""Built-in detectors and the rules that turn ``detectors=`` into instances."""

from __future__ import annotations

from gradtrace.detectors.base import Detector
from gradtrace.detectors.nan import NaN

BUILTINS = {cls.name: cls for cls in (NaN,)}
DEFAULT = ("nan",)


def resolve(detectors) -> list[Detector]:
    """``None`` -> every default detector; otherwise a list of names or instances."""
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


__all__ = ["Detector", "NaN", "BUILTINS", "DEFAULT", "resolve"]
