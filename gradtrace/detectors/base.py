"""The detector protocol: what a detector needs, how it checks, what it says.

A detector is a small object with

- ``name`` (the ``Anomaly.detector`` value) and ``default_action``,
- ``needs``: the statistic columns its check reads (validated before training),
- ``check(view)``: an in-graph function of the packed statistics returning
  ``(fired, value)``, two ``[rows]`` tensors. It runs inside the compiled step,
  before the optimizer update, so a blocking action can hold the update back,
- ``explain(...)`` (host side, only on steps where it fired): which rows to
  blame and the sentence to print,
- ``epoch_end(ctx)`` (host side, optional): checks that need a whole epoch.
- ``reports_at``: where its findings are made, ``("step",)``, ``("epoch_end",)``
  and/or ``("fit_end",)``. An action means something at every stage except
  ``"snapshot"``, which needs a failing step and its batch: a detector that
  only reports at epoch end refuses ``action="snapshot"``, and under
  ``on_anomaly="snapshot"`` it warns.

Thresholds are constructor arguments validated in ``__init__``; state that
must persist across steps (patience counters, running averages) lives in
variables made with :meth:`Detector.state`.
"""

from __future__ import annotations

import copy

import numpy as np
import tensorflow as tf

from gradtrace import _keras_compat as compat
from gradtrace.anomaly import check_action
from gradtrace.stats import COLUMNS



def describe(obj) -> str:
    """A Keras initialiser's or regulariser's class and settings, as written in code:
    ``Constant(value=0.1)``, ``L2(l2=1)`` (floats short, no seed)."""
    try:
        cfg = {k: v for k, v in obj.get_config().items() if v is not None and k != "seed"}
    except Exception:
        cfg = {}
    args = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v!r}" for k, v in sorted(cfg.items()))
    return f"{type(obj).__name__}({args})"


class Detector:
    name = "detector"
    default_action = "warn"
    needs: tuple = ()
    # Runs on untraced steps too (trace_every > 1), where only the loss row exists.
    every_step = False
    # Sees Embedding ids (rows of kind "ids") and wants them sanitised before the lookup.
    wants_ids = False
    # Sees the class labels of a sparse crossentropy (a row of kind "labels") and wants them made safe
    # before the loss.
    wants_labels = False
    # Where its findings come from: "step" (check/explain) and/or "epoch_end" (epoch_end).
    reports_at: tuple = ("step",)
    # Steps between two calls of :meth:`periodic` (None: not called).
    every = None

    def __init__(self, action=None):
        what = f"{type(self).__name__}(action=...)"
        self.action = check_action(action, what) if action else self.default_action
        if self.action == "snapshot" and "step" not in self.reports_at:
            raise ValueError(
                f"{what}='snapshot' is not possible: {self.name!r} reports at the end of an epoch, where there "
                "is no failing step and batch to snapshot. Use 'warn', 'halt' (stop after that epoch) or 'raise'."
            )
        self._state: dict = {}

    def action_under(self, on_anomaly):
        """The action this detector takes when ``gradtrace.fit`` got ``on_anomaly`` (None: its own)."""
        if on_anomaly is None:
            return self.action
        if on_anomaly == "snapshot" and "step" not in self.reports_at:
            return "warn"  # nothing to snapshot at an epoch's end: record and go on
        return on_anomaly

    # -- validation helpers ---------------------------------------------------------
    @staticmethod
    def check_range(name, value, low, high, low_open=False, high_open=False):
        """``value`` when it is a number in the range (``low_open``/``high_open``: the bound itself is out);
        else a ValueError that names the option, the value and the range. For a detector's ``__init__``."""
        ok_low = value > low if low_open else value >= low
        ok_high = value < high if high_open else value <= high
        if not (isinstance(value, (int, float, np.floating, np.integer)) and ok_low and ok_high):
            lo = "(" if low_open else "["
            hi = ")" if high_open else "]"
            raise ValueError(f"{name}={value!r} is out of range: it must be a number in {lo}{low}, {high}{hi}.")
        return value

    @staticmethod
    def check_int(name, value, low):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}={value!r} is out of range: it must be an integer >= {low}.")
        return int(value)

    def validate(self):
        unknown = [c for c in self.needs if c not in COLUMNS]
        if unknown:
            raise ValueError(
                f"Detector {self.name!r} needs statistic(s) {unknown} that gradtrace does not compute. "
                f"Available statistics: {', '.join(COLUMNS)}."
            )

    # -- in-graph -------------------------------------------------------------------
    def state(self, view, name, initial=0.0, dtype=tf.float32, size=None):
        """A ``[rows]`` variable kept across steps, created once per table layout
        (``[size]`` when ``size`` is given, e.g. one entry per ReLU unit)."""
        key = (name, tuple((r.kind, r.path) for r in view.table.rows), size)
        var = self._state.get(key)
        if var is None:
            with tf.init_scope():
                initial_value = tf.fill([len(view.table) if size is None else size], tf.cast(initial, dtype))
            var = compat.detector_variable(initial_value, f"gradtrace_{self.name}_{name}")
            self._state[key] = var
        return var

    def config(self) -> tuple:
        """The detector's settings (public attributes), to tell two configurations apart."""
        return tuple(sorted((k, repr(v)) for k, v in vars(self).items() if not k.startswith("_")))

    def fresh(self):
        """A detector with the same settings and no state (for a trial run beside this one's)."""
        twin = copy.copy(self)
        twin.reset()
        return twin

    def reset(self):
        """Forget all state (called at the start of every fit)."""
        self._state = {}

    def update(self, var, value):
        """Assign ``value`` to a state variable (inside the step) and return it."""
        var.assign(tf.cast(value, var.dtype))
        return value

    def check(self, view):
        """Return ``(fired, value)``: a ``[rows]`` bool tensor and a ``[rows]`` float tensor.

        A detector that only checks in its host-side hooks (``epoch_end``, ``fit_end``) does not
        define it, and adds nothing to the compiled step."""
        raise NotImplementedError

    @property
    def checks_in_step(self) -> bool:
        """True when the detector has an in-graph check (it overrides :meth:`check`)."""
        return type(self).check is not Detector.check

    # -- host side ------------------------------------------------------------------
    def explain(self, rows, fired, values, matrix, table):
        """Yield ``(row, value, message)`` or ``(row, value, message, hint)`` for the findings to report
        (default: every fired row). ``hint`` is one line with the most likely fix."""
        for i in np.flatnonzero(fired):
            row = table.rows[i]
            yield row, float(values[i]), self.message(row, float(values[i]), matrix[i])

    def message(self, row, value, stats_row) -> str:
        return f"{self.name} fired on {row.kind} of {row.path} (value {value:.4g})."

    def epoch_begin(self, ctx):
        """Host-side hook at the start of an epoch (reset per-epoch state here). ``ctx`` in every host-side
        hook is a :class:`gradtrace.run.HostView`: ``model``, ``optimizers``, ``tap`` (every nested layer's
        path), ``epoch_logs``, ``history``, ``current_step()`` and ``embedding_layers()``."""

    def epoch_end(self, ctx):
        """Host-side checks at the end of an epoch; return a list of ``(layer, tensor, value, message)``
        (optionally with a fifth item, the hint)."""
        return []

    def periodic(self, ctx):
        """Host-side checks every ``self.every`` steps (``every`` None: never), for what is too costly
        to check at every step (a whole table's spectrum) but should not wait for an epoch's end;
        same return value as :meth:`epoch_end`. Declare ``"periodic"`` in ``reports_at``."""
        return []

    def fit_end(self, ctx):
        """Host-side checks when training ends (a streak the end of training cut short); same
        return value as :meth:`epoch_end`. Declare ``"fit_end"`` in ``reports_at``."""
        return []

    def __repr__(self):
        return f"{type(self).__name__}(action={self.action!r})"
