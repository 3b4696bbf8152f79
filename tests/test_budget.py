"""The overhead budget (``overhead=``): how often it traces, asserted on counts, and the guard on every step."""

import keras
import numpy as np
import pytest
from keras import layers

import gradtrace
from gradtrace.budget import WARMUP, WINDOW, Budget
from tests import models as M


def _feed(budget, traced_s, guarded_s, calls):
    """Run ``calls`` calls with fixed per-step times; return which were traced."""
    pattern = []
    for _ in range(calls):
        traced = budget.trace_next()
        pattern.append(traced)
        budget.observe(traced, traced_s if traced else guarded_s)
    return pattern


def test_the_interval_keeps_the_traced_steps_extra_time_within_the_budget():
    # tracing doubles the step: at 5% one step in 20 may be traced
    b = Budget(0.05, longest_gap=100)
    pattern = _feed(b, 2.0, 1.0, 200)
    warm = 2 * (WARMUP + 1)  # each step's first call compiles and is not timed
    assert pattern[:warm] == [True, False] * (WARMUP + 1)  # the two alternate until both are timed
    assert b.interval == 20 and b.cost == pytest.approx(1.0)
    gaps = np.diff(np.flatnonzero(pattern[warm:]))
    assert set(gaps) == {20}
    # an expensive step whose tracing costs 1%: every step is traced but one in WINDOW, which keeps the
    # guarded step's time current (a slow start then does not pin the interval at 1 for good)
    b = Budget(0.05)
    after = _feed(b, 1.01, 1.0, 8 + 4 * WINDOW)[warm:]
    assert b.interval == 1 and after.count(False) == 4 and after.count(True) == 4 * WINDOW - 4
    b = Budget(0.05)
    _feed(b, 1.0, 1.5, warm)  # the guarded step looked slower than the traced one at first
    _feed(b, 2.0, 1.0, 4 * WINDOW)
    assert b.interval == 20
    # tracing 30x the step: never more than trace_at_least_every steps apart
    b = Budget(0.05, longest_gap=50)
    _feed(b, 31.0, 1.0, 300)
    assert b.interval == 50 and b.summary()["traced_cost"] == pytest.approx(30.0)
    # a call that handled a finding is not timed, and does not move the interval
    before = list(b.times[True])
    b.observe(True, None)
    assert list(b.times[True]) == before


@pytest.mark.parametrize("bad, match", [
    (dict(overhead=0.0), r"overhead=0\.0 is not allowed.*\(0, 1\]"),
    (dict(overhead=True), r"overhead=True is not allowed"),
    (dict(overhead=0.05, trace_at_least_every=0), r"trace_at_least_every=0 is not allowed.*integer >= 1"),
    (dict(overhead=0.05, trace_every=4), r"overhead=0\.05 and trace_every=4 both say how often to trace"),
])
def test_bad_budget_arguments_say_what_to_pass(bad, match):
    model = M.two_embedding()
    model.compile(optimizer="adam", loss="binary_crossentropy")
    x, y = M.two_embedding_data(n=32)
    with pytest.raises(ValueError, match=match):
        gradtrace.fit(model, x, y, verbose=0, **bad)


def _cheap():
    """Many tiny layers at batch 4: the statistics cost about as much as the step."""
    inp = keras.Input((4,))
    h = inp
    for k in range(16):
        h = layers.Dense(4, activation="relu", name=f"d{k}")(h)
    model = keras.Model(inp, layers.Dense(1, name="out")(h), name="cheap")
    return model, 4, 4


def _expensive():
    """One wide matrix product at batch 512 into few units: the product dwarfs the statistics of its
    small output (tracing costs about 1% of the step)."""
    inp = keras.Input((4096,))
    h = layers.Dense(128, activation="relu", name="wide")(inp)
    model = keras.Model(inp, layers.Dense(1, name="out")(h), name="expensive")
    return model, 4096, 512


@pytest.mark.quiet
def test_the_budget_traces_less_when_the_step_is_cheap_and_more_when_it_is_expensive():
    import tensorflow as tf

    from tests import background

    # the budget reads the time of real steps: under the load of the scenario processes the suite starts
    # beside it (other TensorFlow processes on the same 2 cores), tracing the cheap model looks free,
    # since its steps mostly wait for a core. So it runs last (conftest), once they are done.
    background.wait_all()

    counts = {}
    for name, make in (("cheap", _cheap), ("expensive", _expensive)):
        model, width, batch = make()
        model.compile(optimizer="adam", loss="mse")
        xb = np.random.default_rng(0).normal(size=(batch, width)).astype("float32")
        data = tf.data.Dataset.from_tensors((xb, xb[:, :1])).repeat(48)
        h = gradtrace.fit(model, data, epochs=1, verbose=0, shuffle=False, overhead=0.05, trace_at_least_every=24)
        t = h.gradtrace.tracing()
        assert t["calls"] == 48 and 1 <= t["interval"] <= 24 and not h.anomalies, (t, h.anomalies)
        counts[name] = t["traced_calls"]
        counts[name + "_tracing"] = t
    # the warm-up traces 4 of its first 8 calls; after it each model is traced about one step in
    # (its measured cost / 5%): tracing the cheap one costs 50-80% (one step in 10-16 traced), the
    # expensive one 3-15% on this machine, so far more of its steps are traced
    assert counts["cheap"] < counts["expensive"], counts
    assert counts["cheap"] <= 4 + 40 // 2, counts
    # a second fit of the same model goes on from the first one's timings: no warm-up
    model, width, batch = _cheap()
    model.compile(optimizer="adam", loss="mse")
    data = tf.data.Dataset.from_tensors((np.ones((batch, width), "float32"), np.ones((batch, 1), "float32")))
    first = gradtrace.fit(model, data.repeat(24), verbose=0, shuffle=False, overhead=0.05).gradtrace
    second = gradtrace.fit(model, data.repeat(8), verbose=0, shuffle=False, overhead=0.05).gradtrace
    assert second.schedule.budget is first.schedule.budget and first.tracing()["interval"] > 2
    assert second.tracing()["traced_calls"] < 4, second.tracing()  # the warm-up would trace 4 of these 8


def test_under_a_budget_a_nan_at_any_step_is_held_and_traced_to_its_layer():
    model = M.two_embedding_with_fault(at=23)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    x, y = M.two_embedding_data(n=32 * 30)
    h = gradtrace.fit(model, x, y, batch_size=32, epochs=1, shuffle=False, verbose=0, overhead=0.05,
                      trace_at_least_every=100)
    a = h.anomalies[0]
    # whether step 23 was traced or guarded, the update was refused and the held step was traced to its layer
    assert (a.detector, a.layer, a.tensor, a.step) == ("nan", "outer/inner/faulty", "output", 23)
    assert int(model.optimizer.iterations) == 23
    assert all(np.isfinite(w).all() for w in M.weights_of(model))
    assert h.gradtrace.tracing()["calls"] == 24
    assert "outer/inner/faulty" in gradtrace.report(h)
