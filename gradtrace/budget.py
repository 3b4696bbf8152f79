"""The overhead budget: trace as often as a cost the user sets allows.

``gradtrace.fit(..., overhead=0.05)`` keeps two compiled steps, as
``trace_every`` does: the *traced* step (every layer captured, every detector)
and the *guarded* step (the loss, Embedding ids, labels and every weight
gradient checked for NaN/Inf, so a non-finite update is never applied). It
times both while training and traces one step in ``interval``, the smallest
interval at which the traced steps' extra time is at most ``overhead`` of the
guarded steps' time::

    interval = ceil((traced - guarded) / (overhead * guarded)),  1 <= interval <= longest_gap

``traced / guarded`` is the median ratio of adjacent timed calls of the two
(among the last ``4 * WINDOW`` calls), so that the machine's load, which
drifts, cancels out of each pair. At an interval of 1 one call in ``WINDOW`` is
still guarded, so that there are pairs to measure. The first call of each
step is not timed (it traces and compiles). Until each has ``WARMUP`` timings
the two alternate. The guarded step is the
reference because it is what the run costs when nothing is traced: measuring
``model.fit`` itself would take a third step, run only to be timed.

The budget lives with the compiled steps (one per model, detectors and compile
state, as they are): a second ``fit`` of the same model starts from what the
first one measured, with no warm-up. Only the choice of step depends on time;
everything a step does is the same as under ``trace_every``. :class:`Budget` takes its timings as arguments, so
its arithmetic is tested on given numbers and the fit on counts.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

WARMUP = 3  # timed calls of each step before the interval is chosen
WINDOW = 16  # timed calls kept per step; the pairs are read from the last 4 * WINDOW calls


def check_overhead(overhead, longest_gap):
    """Validate ``overhead`` (None or a number in (0, 1]) and ``trace_at_least_every`` (an integer >= 1)."""
    if overhead is not None and (isinstance(overhead, bool) or not isinstance(overhead, (int, float, np.floating))
                                 or not 0.0 < float(overhead) <= 1.0):
        raise ValueError(f"overhead={overhead!r} is not allowed: it must be a number in (0, 1], the share of the "
                         "step time tracing may add (0.05: at most 5%), or None to trace every step.")
    if isinstance(longest_gap, bool) or not isinstance(longest_gap, (int, np.integer)) or longest_gap < 1:
        raise ValueError(f"trace_at_least_every={longest_gap!r} is not allowed: it must be an integer >= 1 (the "
                         "most steps between two traced steps under an overhead budget).")


class Budget:
    """Chooses, call by call, whether the next call of the step is traced (see the module docstring)."""

    def __init__(self, overhead, longest_gap=100):
        check_overhead(overhead, longest_gap)
        self.overhead = float(overhead)
        self.longest_gap = int(longest_gap)
        self.times = {True: deque(maxlen=WINDOW), False: deque(maxlen=WINDOW)}
        self.recent = deque(maxlen=4 * WINDOW)  # (traced, seconds per step) of the timed calls, in order
        self._compiled = {True: False, False: False}  # the first call of each step compiles: not timed
        self._calls = {True: 0, False: 0}
        self.interval = 1
        self.since_traced = 0  # calls since the last traced one
        self.since_guarded = 0  # calls since the last guarded one
        self.calls = 0
        self.traced_calls = 0

    def warming_up(self) -> bool:
        return min(len(self.times[True]), len(self.times[False])) < WARMUP

    def trace_next(self) -> bool:
        """Whether the next call is traced."""
        if self.warming_up():
            # alternate, the step called less often first (the traced step at the very first call)
            return self._calls[True] <= self._calls[False]
        if self.since_guarded + 1 >= WINDOW and self.longest_gap > 1:
            # tracing every step: still time the guarded step now and then, or a few slow guarded
            # calls early on (a garbage collection) would keep it tracing every step for good
            return False
        return self.since_traced + 1 >= self.interval

    def observe(self, traced, seconds, steps=1):
        """A call of the step ran ``steps`` steps in ``seconds`` (``None``: not timed, e.g. a finding
        was handled during it)."""
        self.calls += 1
        self._calls[bool(traced)] += 1
        self.traced_calls += bool(traced)
        self.since_traced = 0 if traced else self.since_traced + 1
        self.since_guarded = self.since_guarded + 1 if traced else 0
        if not self._compiled[traced]:
            self._compiled[traced] = True
            return
        if seconds is not None and seconds > 0:
            self.times[traced].append(seconds / max(int(steps), 1))
            self.recent.append((bool(traced), seconds / max(int(steps), 1)))
        else:
            self.recent.append(None)  # breaks adjacency: an untimed call sits between its neighbours
        if not self.warming_up():
            self.interval = self.choose()

    @property
    def cost(self):
        """The traced step's extra time, as a share of the guarded step's (None until both are timed):
        the median over adjacent timed calls of different steps of ``traced / guarded - 1``. Neighbours
        ran under the same load, so a slow spell of the machine (another process starting, a garbage
        collection) moves both sides of a pair, not the estimate; with no adjacent pair yet, the
        ratio of the two medians."""
        if not self.times[True] or not self.times[False]:
            return None
        items = list(self.recent)
        pairs = [(a[1], b[1]) if a[0] else (b[1], a[1]) for a, b in zip(items, items[1:])
                 if a is not None and b is not None and a[0] != b[0]]
        if pairs:
            ratio = float(np.median([t / max(g, 1e-9) for t, g in pairs]))
        else:
            ratio = float(np.median(self.times[True])) / max(float(np.median(self.times[False])), 1e-9)
        return max(ratio - 1.0, 0.0)

    def choose(self) -> int:
        cost = self.cost
        if cost is None:
            return 1
        return int(min(max(math.ceil(cost / self.overhead - 1e-9), 1), self.longest_gap))

    def summary(self) -> dict:
        """The budget, the interval it chose last and the traced step's measured extra cost."""
        cost = self.cost
        return {"overhead": self.overhead, "trace_at_least_every": self.longest_gap, "interval": self.interval,
                "traced_cost": None if cost is None else round(cost, 4)}
