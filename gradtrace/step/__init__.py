"""The watched step: Keras' own step, with capture -> statistics -> detectors -> commit or hold.

gradtrace does not replace the step that ``model.fit`` runs. It wraps it:
the model's own ``train_step`` runs unchanged, inside the train function that
Keras' own ``make_train_function`` builds (its ``steps_per_execution`` loop,
its iterator, its replica reduction), and :mod:`gradtrace.hooks` adds three
things while it is traced:

- every nested layer's outputs are recorded (:mod:`gradtrace.capturing`);
- the step's ``tape.gradient`` call also returns the gradients of those
  outputs, from the same backward pass;
- the optimizer's ``apply`` becomes :meth:`Engine.on_apply`: the statistics
  the detectors read are packed into one ``[rows, columns]`` tensor
  (:mod:`~gradtrace.step.rows`), each detector's check reads it, and one
  ``tf.cond`` commits the update or holds it (:mod:`~gradtrace.step.gate`; with ``guard="variable"``,
  one per variable).

A held step leaves the state as it was before the step: the weights, the
optimizer (``iterations`` included), the non-trainable variables (BatchNorm
statistics, seed generator states) and the metric accumulators (Keras feeds
the loss tracker before the gradient; they are restored after the step's logs
are read, so the logs carry the held step's real loss, as under ``model.fit``).

The package, in the order a step runs through it:

- :mod:`~gradtrace.step.plan`: what a step variant is (:class:`Plan`), where a compiled variant keeps
  its layout and records (:class:`Variant`, :class:`Segment`), what an update computed
  (:class:`GatedUpdate`) and what a step that returns its statistics hands back (:class:`StepOutput`);
- :mod:`~gradtrace.step.context`: what one trace of the step knows (:class:`StepContext`);
- :mod:`~gradtrace.step.rows`: the update's rows and statistics;
- :mod:`~gradtrace.step.gate`: commit or hold;
- :mod:`~gradtrace.step.record`: the variables the step writes for the host, on the first step of an
  execution at which a detector fired (and the failing batch, for a snapshot), so nothing extra crosses
  the replica reduction and the host reads one boolean per call;
- :mod:`~gradtrace.step.engine`: :class:`Engine`, which ties them to one model.
"""

from gradtrace.step.context import StepContext
from gradtrace.step.engine import Engine
from gradtrace.step.plan import (
    DETECTOR_SCOPE,
    FIRED,
    INSPECT,
    KEY,
    STOPPING,
    PLAIN,
    TRACED,
    UNTRACED,
    GatedUpdate,
    Layout,
    Plan,
    Segment,
    StepOutput,
    Variant,
)

__all__ = ["DETECTOR_SCOPE", "FIRED", "INSPECT", "KEY", "STOPPING", "PLAIN", "TRACED", "UNTRACED", "Engine",
           "GatedUpdate", "Layout", "Plan", "Segment", "StepContext", "StepOutput", "Variant"]
