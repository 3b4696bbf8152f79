"""The overhead budget: trace as often as a cost the user sets allows, and count the whole cost.

``gradtrace.fit(..., overhead=0.05)`` keeps compiled steps of three kinds:

- *traced*: every layer captured, every detector;
- *guarded*: the loss, Embedding ids, labels and every weight gradient checked
  for NaN/Inf, and the update held as the ``guard`` says (see
  :mod:`gradtrace.step.gate`);
- *plain*: the model's own step, unwatched, as ``model.fit`` runs it: the
  reference the budget is counted against, timed while the budget warms up.

The budget counts the whole cost against the plain step: what the guard adds
(``G``: the guarded step's time, with gradtrace's host work per call, over the
plain one's) and what tracing adds (``T``: the traced step's time over the
guarded one's). Tracing one call in ``k`` costs ``G (T + k - 1) / k`` plain
steps per step, so the interval is the smallest ``k`` that keeps that within
``1 + overhead``::

    k = ceil(G (T - 1) / (1 + overhead - G)),  1 <= k <= longest_gap

Where the guard alone costs more than the budget (``G - 1 >= overhead``), no
interval keeps it: :meth:`Budget.verdict` says so once, with the figures and the
choices (a cheaper guard, no guard, a larger budget), and the budget traces one
call in ``longest_gap`` (``trace_at_least_every``) with the guard it was given.

Each ratio is the median over adjacent timed calls of the two kinds (among the
last ``WINDOW`` such pairs), so that the machine's load, which drifts, cancels
out of each pair. The first ``UNTIMED`` calls of each kind are not timed (the
first traces and compiles, the second still warms up). The warm-up: traced and guarded calls in
turn (the first call traced) until each has ``WARMUP`` timings; then the
*calibration*, runs of ``BLOCK`` plain and ``BLOCK`` guarded calls in turn
(:data:`CALIBRATION`; a call right after the other step's runs a little slower,
so each run's median is compared with the next run's, in both orders) until the
plain step has ``2 * WARMUP`` timings: about 40 calls in all. After the calibration the plain step is not
run again (the guard ratio is the calibration's), and at an interval of 1 one
call in ``WINDOW`` is still guarded, so that there are pairs to measure.
gradtrace's host work after a call (periodic checks, the history's drain) is
timed apart; its mean after guarded calls is added to the guard's cost, after
traced calls to tracing's. The calibration's 10 plain calls are ``model.fit``'s
own steps: nothing checks them (a NaN one of them makes is found at the next
checked step, in the weights).

The budget lives with the compiled steps (one per model, detectors and compile
state, as they are): a second ``fit`` of the same model starts from what the
first one measured, with no warm-up. Only the choice of step depends on time;
everything a step does is the same as under ``trace_every``. :class:`Budget` takes its timings as
arguments, so its arithmetic is tested on given numbers and the fit on counts.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Optional

import numpy as np

WARMUP = 4  # timed calls of the traced step before the interval is chosen (of the plain step: twice as many)
WINDOW = 16  # timed calls (and adjacent pairs) kept per kind
KINDS = ("traced", "guarded", "plain")
UNTIMED = 2  # the first calls of each kind are not timed: the first compiles, the second still warms up
# the calibration's order: guarded and plain meet in both orders, and away from traced calls, which leave the
# next call a little slower
BLOCK = 4  # calls of one kind in a row in the calibration: a call right after the other step's runs slower
CALIBRATION = ("plain",) * BLOCK + ("guarded",) * BLOCK


def check_overhead(overhead, longest_gap):
    """Validate ``overhead`` (None or a number in (0, 1]) and ``trace_at_least_every`` (an integer >= 1)."""
    if overhead is not None and (isinstance(overhead, bool) or not isinstance(overhead, (int, float, np.floating))
                                 or not 0.0 < float(overhead) <= 1.0):
        raise ValueError(f"overhead={overhead!r} is not allowed: it must be a number in (0, 1], the share of the "
                         "time of model.fit's step gradtrace may add (0.05: at most 5%), or None to trace every step.")
    if isinstance(longest_gap, bool) or not isinstance(longest_gap, (int, np.integer)) or longest_gap < 1:
        raise ValueError(f"trace_at_least_every={longest_gap!r} is not allowed: it must be an integer >= 1 (the "
                         "most steps between two traced steps under an overhead budget).")


class Budget:
    """Chooses, call by call, which kind of step runs next (see the module docstring). ``guard``: the guard
    of the guarded step (``None``: no detector holds an update; the plain step is still the reference)."""

    def __init__(self, overhead, longest_gap=100, guard="step"):
        check_overhead(overhead, longest_gap)
        self.overhead = float(overhead)
        self.longest_gap = int(longest_gap)
        self.guard = guard
        # gradtrace's host seconds per step after each watched call, by kind (the drain follows traced calls)
        self.host = {"traced": deque(maxlen=WINDOW), "guarded": deque(maxlen=4 * WINDOW)}
        self.times = {k: deque(maxlen=WINDOW) for k in KINDS}
        self.recent = deque(maxlen=4 * WINDOW)  # (kind, seconds per step) of the timed calls, in order
        self.blocks = []  # the calibration's runs of one kind: [kind, [seconds per step, ...]]
        self.kind_calls = {k: 0 for k in KINDS}
        self.interval = 1
        self.since_traced = 0  # calls since the last traced one
        self.since_guarded = 0  # calls since the last guarded one
        self.calls = 0
        self.traced_calls = 0
        self._said = False
        self._calibration = None  # the call the calibration started at
        self._reference = None  # the calibration's ratios, once it is over

    def calibrating(self) -> bool:
        """The plain step's timings are still being taken (beside the guarded step's)."""
        return len(self.times["plain"]) < 2 * WARMUP

    def warming_up(self) -> bool:
        return self.calibrating() or len(self.times["traced"]) < WARMUP or len(self.times["guarded"]) < WARMUP

    def next_kind(self) -> str:
        """The kind of the next call: ``"traced"``, ``"guarded"`` or ``"plain"``."""
        if self.calls == 0:
            return "traced"  # the first step is traced whatever the budget
        if len(self.times["traced"]) < WARMUP or len(self.times["guarded"]) < WARMUP:
            return "guarded" if self.kind_calls["traced"] > self.kind_calls["guarded"] else "traced"
        if self.calibrating():
            if self._calibration is None:
                self._calibration = self.calls
            return CALIBRATION[(self.calls - self._calibration) % len(CALIBRATION)]
        if self.since_guarded + 1 >= WINDOW and self.longest_gap > 1:
            # tracing every step: still time the guarded step now and then, or a few slow guarded
            # calls early on (a garbage collection) would keep it tracing every step for good
            return "guarded"
        return "traced" if self.since_traced + 1 >= self.interval else "guarded"

    def observe(self, kind, seconds, steps=1):
        """A call of kind ``kind`` ran ``steps`` steps in ``seconds`` (``None``: not timed, e.g. a finding was
        handled during it)."""
        self.calls += 1
        self.kind_calls[kind] += 1
        self.traced_calls += kind == "traced"
        self.since_traced = 0 if kind == "traced" else self.since_traced + 1
        self.since_guarded = 0 if kind == "guarded" else self.since_guarded + 1
        if seconds is None or seconds <= 0 or self.kind_calls[kind] <= UNTIMED:
            self.recent.append(None)  # breaks adjacency: an untimed call sits between its neighbours
            return
        per_step = seconds / max(int(steps), 1)
        calibrating = self.calibrating()  # (the reference is the calibration's: fixed once it is over)
        self.times[kind].append(per_step)
        if calibrating and self._calibration is not None:
            if not self.blocks or self.blocks[-1][0] != kind:
                self.blocks.append([kind, []])
            self.blocks[-1][1].append(per_step)
        self.recent.append((kind, per_step))
        if not self.warming_up():
            self.interval = self.choose()

    @property
    def reference(self) -> list:
        """The calibration's guarded / plain ratios: the median of each block over the median of the block
        of the other kind next to it (both orders); worked out once, when the calibration is over."""
        if self._reference is not None:
            return self._reference
        medians = [(k, float(np.median(t))) for k, t in self.blocks if t]
        ratios = [(a[1] / max(b[1], 1e-12)) if a[0] == "guarded" else (b[1] / max(a[1], 1e-12))
                  for a, b in zip(medians, medians[1:]) if {a[0], b[0]} == {"guarded", "plain"}]
        if not self.calibrating():
            self._reference = ratios
        return ratios

    def observe_host(self, kind, seconds, steps=1):
        """gradtrace's host work after a watched call of ``kind`` (periodic checks, the history's drain) took
        ``seconds``."""
        if kind in self.host:
            self.host[kind].append(max(float(seconds), 0.0) / max(int(steps), 1))

    def _host(self, kind, per):
        """The mean host work after calls of ``kind``, as a share of ``per`` seconds."""
        return float(np.mean(self.host[kind])) / max(per, 1e-12) if self.host[kind] else 0.0

    def _ratio(self, a, b) -> Optional[float]:
        """The median of ``a``'s time over ``b``'s across adjacent calls of the two (guarded and plain: the
        warm-up's; traced and guarded: among the last ``4 * WINDOW`` calls), with none, of their medians."""
        if not self.times[a] or not self.times[b]:
            return None
        if (a, b) == ("guarded", "plain"):
            ratios = self.reference
        else:
            items = list(self.recent)
            ratios = [(x[1] / max(y[1], 1e-12)) if x[0] == a else (y[1] / max(x[1], 1e-12))
                      for x, y in zip(items, items[1:]) if x is not None and y is not None and {x[0], y[0]} == {a, b}]
        if ratios:
            return float(np.median(ratios))
        return float(np.median(self.times[a])) / max(float(np.median(self.times[b])), 1e-12)

    @property
    def cost(self):
        """The traced step's extra time, with its host work, as a share of the guarded step's (None until both
        are timed)."""
        t = self._ratio("traced", "guarded")
        if t is None:
            return None
        guarded = float(np.median(self.times["guarded"]))
        return max(t - 1.0 + self._host("traced", guarded) - self._host("guarded", guarded), 0.0)

    @property
    def guard_cost(self):
        """The guarded step's extra time, with gradtrace's host work per call, as a share of the plain step's
        (None until both are timed)."""
        g = self._ratio("guarded", "plain")
        if g is None:
            return None
        return max(g - 1.0 + self._host("guarded", float(np.median(self.times["plain"]))), 0.0)

    @property
    def kept(self) -> Optional[bool]:
        """Whether the budget can be kept: the guard alone costs less than it (None until measured). Once the
        fit was told it cannot (:meth:`verdict`), it stays so: the host work counted in the guard's cost moves
        as the run goes on, and what was said is what gradtrace does."""
        if self._said:
            return False
        g = self.guard_cost
        return None if g is None else g < self.overhead

    def choose(self) -> int:
        cost, guard = self.cost, self.guard_cost
        if cost is None or guard is None:
            return 1
        if self._said or guard >= self.overhead:
            return self.longest_gap
        g = 1.0 + guard
        need = g * cost / (1.0 + self.overhead - g)
        return int(min(max(math.ceil(need - 1e-9), 1), self.longest_gap))

    def expected(self) -> Optional[float]:
        """The whole cost at the chosen interval, as a ratio to the plain step."""
        cost, guard = self.cost, self.guard_cost
        if cost is None or guard is None:
            return None
        k = self.interval
        return (1.0 + guard) * (1.0 + cost + k - 1) / k

    def verdict(self) -> Optional[str]:
        """Once the warm-up is over and only once: where the guard alone costs more than the budget, what it
        costs, what gradtrace does instead and the choices; else None."""
        if self._said or self.warming_up() or self.kept is not False:
            return None
        self._said = True
        g, whole = 1.0 + self.guard_cost, self.expected()
        choices = []
        if self.guard == "step":
            choices.append("guard='variable' (each variable's update waits only for its own gradient's check: no "
                           "NaN/Inf ever enters a weight or slot, but a step that holds one variable updates the "
                           "others)")
        if self.guard is not None:
            choices.append("guard=None (nothing held: findings are reported at their step)")
        choices.append("a larger overhead=" if choices else "a larger overhead= (the checks alone cost this much)")
        return (f"overhead={self.overhead:g} cannot be kept on this model: the guarded step alone costs "
                f"{g:.2f}x model.fit's own step (guard={self.guard!r}; measured in the first calls, in runs of "
                f"{BLOCK} of each, with gradtrace's host work). gradtrace goes on guarding every step and "
                f"traces one step in {self.interval} (trace_at_least_every), about {whole:.2f}x in all. For less: "
                + ", or ".join(choices) + ".")

    def summary(self) -> dict:
        """The budget, the interval it chose last, the traced step's and the guard's measured extra cost,
        whether the budget can be kept and the whole cost expected at that interval."""
        cost, guard, whole = self.cost, self.guard_cost, self.expected()
        return {"overhead": self.overhead, "trace_at_least_every": self.longest_gap, "interval": self.interval,
                "traced_cost": None if cost is None else round(cost, 4),
                "guard": self.guard, "guard_cost": None if guard is None else round(guard, 4),
                "kept": self.kept, "expected": None if whole is None else round(whole, 4)}
