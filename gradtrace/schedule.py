"""When to trace, and when the periodic checks are due: the run's cadence, host side.

:class:`Schedule` picks the plan of each call of the step (traced every
``trace_every`` calls, or as often as an overhead budget allows, and traced
with histograms whenever TensorBoard is due) and times the calls for the budget.
:class:`Periodic` says which detectors' periodic checks are due, reading the
step counter only when a period may have ended.
"""

from __future__ import annotations

import warnings

from gradtrace.step import TRACED, PLAIN, UNTRACED, Plan

_PLANS = {"traced": TRACED, "guarded": UNTRACED, "plain": PLAIN}


class Schedule:
    """The plan of each call of the step (``budget``: a :class:`gradtrace.budget.Budget`; ``tensorboard``: a
    :class:`gradtrace.tensorboard.Writer`), and how often the run traced."""

    def __init__(self, model, trace_every=1, budget=None, tensorboard=None):
        self.model = model
        self.trace_every = trace_every
        self.budget = budget
        self.tensorboard = tensorboard
        self.calls = 0
        self.traced_calls = 0
        self._kind = "traced"  # the budget's kind of the call planned last

    def next_plan(self):
        """``(plan, traced, summary)`` for the next call of the step."""
        summary = self.tensorboard is not None and self.calls % self.tensorboard.every == 0
        if summary:
            self._kind = "traced"
        elif self.budget is not None:
            self._kind = self.budget.next_kind()
        else:
            self._kind = "traced" if self.trace_every == 1 or self.calls % self.trace_every == 0 else "guarded"
        plan = Plan(True, summary_bins=self.tensorboard.bins) if summary else _PLANS[self._kind]
        return plan, self._kind == "traced", summary

    def timed(self, traced, seconds, untimed=False):
        """One call of the step took ``seconds`` (``untimed``: it did more than step, e.g. a finding was
        handled or a summary written, so its time says nothing about the step's cost)."""
        self.traced_calls += bool(traced)
        if self.budget is not None:
            steps = int(getattr(self.model, "steps_per_execution", 1) or 1)
            self.budget.observe(self._kind, None if untimed else seconds, steps)
            said = self.budget.verdict()
            if said:
                warnings.warn(f"gradtrace: {said}", stacklevel=3)

    def host_work(self, seconds):
        """gradtrace's host work after a watched call took ``seconds`` (the budget counts it)."""
        if self.budget is not None:
            self.budget.observe_host(self._kind, seconds, int(getattr(self.model, "steps_per_execution", 1) or 1))

    def tracing(self) -> dict:
        """How often this run traced: ``calls`` of the step, ``traced_calls``, and under an overhead budget
        the budget, the interval chosen last, the traced step's and the guard's measured extra cost, whether the
        budget can be kept and the whole cost expected (see :meth:`gradtrace.budget.Budget.summary`)."""
        out = {"calls": self.calls, "traced_calls": self.traced_calls}
        if self.budget is not None:
            out.update(self.budget.summary())
        return out


class Periodic:
    """Which detectors' ``every``-step checks are due after a call of the step. The step counter is read in
    the first calls, then only once the steps run since its last read may have reached the next period:
    the counter grows by at most ``steps_per_execution`` times the most it grew per step in a call so far
    (a held step does not move it)."""

    def __init__(self, detectors, model):
        self.detectors = [d for d in detectors if d.every]
        self.model = model
        self._last = {}  # detector name -> the last period (step // every) it was checked in
        self._counter = None  # (the step counter as last read, how many reads)
        self._calls_since_read = 0
        self._per_call = 1.0  # the most the counter grew per step in a call

    def due(self, current_step):
        """``(step, detectors due)`` after one more call; ``current_step()`` reads the counter."""
        if not self.detectors:
            return None, []
        self._calls_since_read += 1
        steps = int(getattr(self.model, "steps_per_execution", 1) or 1)
        if self._counter is not None:
            last, reads = self._counter
            bound = last + self._calls_since_read * steps * self._per_call
            if reads >= 3 and bound < min((self._last.get(d.name, 0) + 1) * d.every for d in self.detectors):
                return None, []
            step = current_step()
            self._per_call = max(self._per_call, (step - last) / (self._calls_since_read * steps))
            self._counter = (step, reads + 1)
        else:
            step = current_step()
            self._counter = (step, 1)
        self._calls_since_read = 0
        ready = [d for d in self.detectors if step // d.every > self._last.get(d.name, 0)]
        for d in ready:
            self._last[d.name] = step // d.every
        return step, ready
