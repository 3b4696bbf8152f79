"""verify_hints: at a halt, the hinted settings are tried from the state before the held step, and the
model is left exactly as a plain halt leaves it."""

import numpy as np
import keras
import pytest
from keras import ops

import gradtrace
import gradtrace.reporting


def _regression(lr, n=1024):
    """An MLP on a linear target with plain SGD: at learning rate 1.0 its updates overshoot and the
    gradients explode (a real fault whose hint is a setting: lower the learning rate, or clip)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1))).astype("float32")
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dropout(0.1),
                          keras.layers.Dense(32, activation="relu"), keras.layers.Dense(1)])
    m.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.5), loss="mse", metrics=["mae"])
    return m, x, y


def _state(model):
    return [v.numpy() for v in [*model.variables, *model.optimizer.variables, *model.metrics_variables]]


@pytest.fixture(scope="module")
def halted_both_ways(tmp_path_factory):
    out = {}
    for verify in (False, True):
        m, x, y = _regression(0.3)
        h = gradtrace.fit(m, x, y, batch_size=32, epochs=4, verbose=0, shuffle=False, verify_hints=verify,
                          snapshot_dir=tmp_path_factory.mktemp(f"snaps_{verify}"))
        out[verify] = (m, h, np.random.get_state()[1].copy())
    return out


def test_the_hinted_settings_are_tried_and_the_verdict_given(halted_both_ways):
    _, h, _ = halted_both_ways[True]
    halting = [a for a in h.anomalies if a.action == "halt"]
    assert halting and h.gradtrace.halted
    a = halting[0]
    assert "learning rate" in a.hint
    assert a.verified is not None, a.verification
    assert "with learning_rate" in a.verification and "steps" in a.verification and "loss" in a.verification
    assert f"{'verified' if a.verified else 'tried, did not help'}: " in str(a)
    assert h.gradtrace.verification_seconds > 0
    # the findings themselves are those of the plain halt
    plain = [(b.detector, b.layer, b.step) for b in halted_both_ways[False][1].anomalies]
    assert [(b.detector, b.layer, b.step) for b in h.anomalies] == plain
    text = gradtrace.reporting.format_report(h.gradtrace)
    assert a.verification.split(":")[0] in text  # the report shows it beside the hint


def test_the_snapshot_and_the_cli_carry_the_verdict(halted_both_ways, capsys):
    import gradtrace.cli

    a = next(a for a in halted_both_ways[True][1].anomalies if a.action == "halt")
    assert a.snapshot
    assert gradtrace.cli.main(["show", a.snapshot]) == 0
    out = capsys.readouterr().out
    assert f"hint: {a.hint}" in out and a.verification in out
    gradtrace.replay(a.snapshot)  # the rewritten manifest still reads as a whole snapshot


def test_after_verification_the_model_equals_a_plain_halt_bit_for_bit(halted_both_ways):
    (m0, h0, rng0), (m1, h1, rng1) = halted_both_ways[False], halted_both_ways[True]
    s0, s1 = _state(m0), _state(m1)
    assert len(s0) == len(s1)
    for a, b in zip(s0, s1):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(rng0, rng1)  # NumPy's global stream too
    assert m1.optimizer.iterations.numpy() == m0.optimizer.iterations.numpy()
    assert h1.history == h0.history
    # and it trains on as the plain one does
    x = np.random.default_rng(1).normal(size=(64, 8)).astype("float32")
    np.testing.assert_array_equal(m0.predict(x, verbose=0), m1.predict(x, verbose=0))


@keras.saving.register_keras_serializable(package="gradtrace_tests")
class _Log(keras.layers.Layer):
    def call(self, t):
        return ops.log(t)


def test_a_code_fault_is_never_claimed_fixed():
    """log(0) in a custom layer: the fix is a change of code, so nothing is tried (verified stays None)."""
    keras.utils.set_random_seed(0)
    x = np.abs(np.random.default_rng(0).normal(size=(256, 4))).astype("float32") + 0.5
    x[100] = 0.0
    y = np.ones((256, 1), "float32")
    inp = keras.Input((4,))
    m = keras.Model(inp, keras.layers.Dense(1)(_Log()(inp)))
    m.compile(optimizer="adam", loss="mse")
    h = gradtrace.fit(m, x, y, batch_size=32, epochs=1, verbose=0, shuffle=False, verify_hints=True)
    a = next(a for a in h.anomalies if a.action == "halt")
    assert a.detector == "nan" and a.verified is None and a.verification == ""


def test_verify_hints_must_be_a_bool():
    with pytest.raises(ValueError, match="verify_hints"):
        gradtrace.Watch(verify_hints="yes")


def test_watch_verifies_too_and_a_data_fix_is_tried():
    """Labels counted from 1 into a 3-unit softmax (a sparse crossentropy): the hint's fix, the labels minus
    1, is tried under gradtrace.Watch."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 6)).astype("float32")
    y = (np.argmax(x[:, :3], 1) + 1).astype("int32")
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu"),
                          keras.layers.Dense(3, activation="softmax")])
    m.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    w = gradtrace.Watch(verify_hints=True, verbose=0)
    m.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[w])
    a = next(a for a in w.anomalies if a.action == "halt")
    assert a.detector == "labels_out_of_range" and a.verified is True, a.verification
    assert a.verification.startswith("with the labels minus 1: 20 steps finite")
