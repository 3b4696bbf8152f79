"""The overhead budget (``overhead=``): how often it traces, asserted on counts, and the guard on every step."""

import math
import re
import warnings

import keras
import numpy as np
import pytest
from keras import layers

import gradtrace
from gradtrace.budget import BLOCK, CALIBRATION, UNTIMED, WARMUP, WINDOW, Budget
from tests import models as M

# the warm-up: traced and guarded in turn, then the calibration (runs of BLOCK plain and BLOCK guarded calls);
# the first UNTIMED calls of each kind are not timed; the calibration ends on its last plain call
_PLAIN = UNTIMED + 2 * WARMUP
WARM = 2 * (UNTIMED + WARMUP) + (_PLAIN // BLOCK) * 2 * BLOCK + (_PLAIN % BLOCK or -BLOCK)


def _feed(budget, traced_s, guarded_s, calls, plain_s=None):
    """Run ``calls`` calls with fixed per-step times; return the kind of each."""
    times = {"traced": traced_s, "guarded": guarded_s, "plain": guarded_s if plain_s is None else plain_s}
    pattern = []
    for _ in range(calls):
        kind = budget.next_kind()
        pattern.append(kind)
        budget.observe(kind, times[kind])
    return pattern


def test_the_interval_keeps_the_whole_extra_time_within_the_budget():
    # a free guard and tracing that doubles the step: at 5% one step in 20 may be traced
    b = Budget(0.05, longest_gap=100)
    pattern = _feed(b, 2.0, 1.0, 200)
    # traced and guarded in turn, the first call traced; then guarded and plain meet in both orders
    warm = WARM
    turns = 2 * (UNTIMED + WARMUP)
    assert pattern[:turns] == ["traced", "guarded"] * (UNTIMED + WARMUP)
    assert pattern[turns:warm] == (list(CALIBRATION) * warm)[:warm - turns] and pattern[warm - 1] == "plain"
    assert b.interval == 20 and b.cost == pytest.approx(1.0) and b.guard_cost == pytest.approx(0.0)
    assert set(pattern[warm:]) == {"traced", "guarded"}  # the plain step only in the warm-up
    gaps = np.diff(np.flatnonzero(np.array(pattern[warm:]) == "traced"))
    assert set(gaps) == {20}
    # an expensive step whose tracing costs 1%: every step is traced but one in WINDOW, which keeps the
    # guarded step's time current (a slow start then does not pin the interval at 1 for good)
    b = Budget(0.05)
    after = _feed(b, 1.01, 1.0, warm + 4 * WINDOW)[warm:]
    assert b.interval == 1 and after.count("guarded") == 4 and after.count("traced") == 4 * WINDOW - 4
    b = Budget(0.05)
    _feed(b, 1.0, 1.5, warm)  # the guarded step looked slower than the traced one at first
    _feed(b, 2.0, 1.0, 4 * WINDOW)
    assert b.interval == 20
    # tracing 30x the step: never more than trace_at_least_every steps apart
    b = Budget(0.05, longest_gap=50)
    _feed(b, 31.0, 1.0, 300)
    assert b.interval == 50 and b.summary()["traced_cost"] == pytest.approx(30.0)
    # a call that handled a finding is not timed, and does not move the interval
    before = list(b.times["traced"])
    b.observe("traced", None)
    assert list(b.times["traced"]) == before
    # gradtrace's host work after each call (periodic checks) counts as the guard's: 0.1 per call
    b = Budget(0.05)
    for _ in range(warm):
        kind = b.next_kind()
        b.observe(kind, {"traced": 2.0, "guarded": 1.0, "plain": 1.0}[kind])
        b.observe_host(kind, 0.1 if kind == "guarded" else 0.0)
    assert b.guard_cost == pytest.approx(0.1) and b.kept is False and b.interval == 100


def test_the_guard_is_counted_and_a_budget_it_exceeds_is_said_once():
    # a guard of 2%: tracing (2x) fits in the 3% left, one step in 34: 1.02 * (2 + 33) / 34 = 1.05
    b = Budget(0.05, longest_gap=100)
    _feed(b, 2.04, 1.02, 200, plain_s=1.0)
    assert b.guard_cost == pytest.approx(0.02) and b.interval == 34 and b.kept
    assert b.expected() == pytest.approx(1.05, abs=1e-3) and b.verdict() is None
    # a guard of 30%: no interval keeps 5%; said once, with the figures and the choices, and the
    # budget traces as rarely as trace_at_least_every allows
    b = Budget(0.05, longest_gap=100)
    _feed(b, 2.6, 1.3, WARM - 1, plain_s=1.0)
    assert b.warming_up() and b.verdict() is None  # nothing said before the figures are in
    _feed(b, 2.6, 1.3, 1, plain_s=1.0)
    said = b.verdict()
    assert "overhead=0.05 cannot be kept" in said and "1.30x" in said and "guard='variable'" in said
    assert "one step in 100" in said and "guard=None" in said
    assert b.verdict() is None  # once
    assert b.interval == 100 and b.kept is False
    assert b.summary()["guard_cost"] == pytest.approx(0.3) and b.summary()["expected"] == pytest.approx(1.313)
    b = Budget(0.05, guard="variable")
    _feed(b, 2.6, 1.3, WARM, plain_s=1.0)
    assert "(each variable" not in b.verdict()  # the cheaper guard is the one in use
    b = Budget(0.05, guard=None)  # no detector holds anything: the checks alone cost 30%
    _feed(b, 2.6, 1.3, WARM, plain_s=1.0)
    said = b.verdict()
    assert "guard=None" in said and "guard=None (" not in said and "the checks alone cost this much" in said


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

    for name, make in (("cheap", _cheap), ("expensive", _expensive)):
        model, width, batch = make()
        model.compile(optimizer="adam", loss="mse")
        xb = np.random.default_rng(0).normal(size=(batch, width)).astype("float32")
        data = tf.data.Dataset.from_tensors((xb, xb[:, :1])).repeat(60)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            h = gradtrace.fit(model, data, epochs=1, verbose=0, shuffle=False, overhead=0.05,
                              trace_at_least_every=24)
        t = h.gradtrace.tracing()
        assert t["calls"] == 60 and 1 <= t["interval"] <= 24 and not h.anomalies, (t, h.anomalies)
        # where the guard alone costs more than the budget, the fit said so once, with its figure, and
        # traces as rarely as it may; else the whole cost it expects is within the budget
        verdicts = [str(w.message) for w in said if "cannot be kept" in str(w.message)]
        assert len(verdicts) == (0 if t["kept"] else 1), (t, verdicts)
        if verdicts:
            figure = float(re.search(r"alone costs (\d+\.\d+)x model.fit's own step", verdicts[0]).group(1))
            assert figure >= 1.05 and "guard='variable'" in verdicts[0] and t["interval"] == 24, verdicts[0]
        else:  # the interval the whole cost allows, from the figures the run reports
            g, cost = 1 + t["guard_cost"], t["traced_cost"]
            assert abs(t["interval"] - min(max(math.ceil(g * cost / (1.05 - g)), 1), 24)) <= 1, t
        assert t["traced_cost"] > 0 and t["guard_cost"] is not None, t
    # a second fit of the same model goes on from the first one's timings: no warm-up
    model, width, batch = _cheap()
    model.compile(optimizer="adam", loss="mse")
    data = tf.data.Dataset.from_tensors((np.ones((batch, width), "float32"), np.ones((batch, 1), "float32")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the cheap model's guard may cost more than 5%: tested above)
        first = gradtrace.fit(model, data.repeat(40), verbose=0, shuffle=False, overhead=0.05).gradtrace
        plain = first.schedule.budget.kind_calls["plain"]
        second = gradtrace.fit(model, data.repeat(9), verbose=0, shuffle=False, overhead=0.05).gradtrace
    assert second.schedule.budget is first.schedule.budget and first.tracing()["interval"] > 2
    # no warm-up again: no plain call, and traced as rarely as the first fit found it may
    assert second.tracing()["traced_calls"] < 2 and second.schedule.budget.kind_calls["plain"] == plain


def test_under_a_budget_a_nan_after_the_calibration_is_held_and_traced_to_its_layer():
    def fit(at, steps):
        model = M.two_embedding_with_fault(at=at)
        model.compile(optimizer="adam", loss="binary_crossentropy")
        x, y = M.two_embedding_data(n=32 * steps)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # whether 5% can be kept on this machine is not the point here
            h = gradtrace.fit(model, x, y, batch_size=32, epochs=1, shuffle=False, verbose=0, overhead=0.05,
                              trace_at_least_every=100)
        return model, h

    model, h = fit(WARM + 5, WARM + 10)
    a = h.anomalies[0]
    # whether the step was traced or guarded, the update was refused and the held step traced to its layer
    assert (a.detector, a.layer, a.tensor, a.step) == ("nan", "outer/inner/faulty", "output", WARM + 5)
    assert int(model.optimizer.iterations) == WARM + 5
    assert all(np.isfinite(w).all() for w in M.weights_of(model))
    assert h.gradtrace.tracing()["calls"] == WARM + 6
    assert "outer/inner/faulty" in gradtrace.report(h)
    # the calibration's plain calls are model.fit's own steps: nothing checks them. A NaN made at the first
    # of them reaches the weights, and the first guarded call after the run of plain ones names that weight
    first_plain = 2 * (UNTIMED + WARMUP)
    model, h = fit(first_plain, first_plain + 2 * BLOCK)
    a = h.anomalies[0]
    assert (a.detector, a.tensor, a.step) == ("nan", "weight", first_plain + BLOCK)
    assert not all(np.isfinite(w).all() for w in M.weights_of(model))


def test_a_budgeted_run_trains_as_model_fit_and_times_your_own_loop_too():
    """The plain reference calls are the model's own step (yours, in a loop): a run under a budget trains
    bit for bit as model.fit, and none of its updates counts as applied outside the step."""
    import tensorflow as tf

    def make():
        keras.utils.set_random_seed(3)
        inp = keras.Input((6,))
        h = layers.Dense(8, activation="relu")(inp)
        model = keras.Model(inp, layers.Dense(1)(layers.BatchNormalization()(h)))
        model.compile(optimizer="adam", loss="mse")
        return model

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8 * 40, 6)).astype("float32"), rng.normal(size=(8 * 40, 1)).astype("float32")
    plain, watched = make(), make()
    plain.fit(x, y, batch_size=8, verbose=0, shuffle=False)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        h = gradtrace.fit(watched, x, y, batch_size=8, verbose=0, shuffle=False, overhead=0.05)
    assert not [w for w in said if "outside the training step" in str(w.message)]
    kinds = h.gradtrace.schedule.budget.kind_calls
    assert kinds["plain"] >= 2 * WARMUP and kinds["traced"] >= WARMUP and kinds["guarded"] >= WARMUP
    for a, b in zip(plain.weights + plain.optimizer.variables, watched.weights + watched.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    model = make()
    optimizer = keras.optimizers.Adam()
    loss_fn = keras.losses.MeanSquaredError()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with gradtrace.loop(model, optimizer, overhead=0.05, verbose=0) as w:
            @w.step
            @tf.function
            def train_step(xb, yb):
                with tf.GradientTape() as tape:
                    loss = loss_fn(yb, model(xb, training=True))
                grads = tape.gradient(loss, model.trainable_variables)
                optimizer.apply_gradients(zip(grads, model.trainable_variables))
                return loss

            for k in range(40):
                train_step(x[8 * k:8 * k + 8], y[8 * k:8 * k + 8])
    assert not [w for w in said if "outside the training step" in str(w.message)]
    assert w.run.tracing()["calls"] == 40 and w.run.schedule.budget.kind_calls["plain"] >= 2 * WARMUP
    assert int(optimizer.iterations) == 40 and all(np.isfinite(v).all() for v in model.get_weights())
