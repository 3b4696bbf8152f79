"""Real training bugs, each with its fix: the right detector names the right layer at the first step,
and the fixed program trains 3 epochs with nothing firing.

The cases live in benchmarks/faults/cases.py (with their sources); benchmarks/faults/score.py scores the
whole corpus. Each symptom is checked without gradtrace first (a plain forward pass or the loss's own
gradient), on the buggy version and not on the fixed one, so the test cannot pass on a fault that is
not there.
"""

import keras
import numpy as np
import pytest

import gradtrace
from benchmarks.faults.cases import BY_NAME, TESTED

# Keras itself warns (without naming the layer) when a softmax runs over an axis of size 1
pytestmark = pytest.mark.filterwarnings("ignore:.*softmax over axis:UserWarning")


@pytest.fixture(scope="module")
def runs():
    out = {}
    for name in TESTED:
        case = BY_NAME[name]
        for bug in (True, False):
            keras.utils.set_random_seed(3)
            x, y = case.data(np.random.default_rng(3))
            model = case.build(bug)
            symptom = case.symptom(model, x, y)
            h = gradtrace.fit(model, x, y, batch_size=32, epochs=case.epochs if not bug else 1, shuffle=False,
                              verbose=0, on_anomaly="warn")
            out[name, bug] = (symptom, h.anomalies, h.history["loss"])
    return out


@pytest.mark.parametrize("name", TESTED)
def test_the_buggy_program_is_caught_in_its_first_steps_and_the_culprit_named_with_a_hint(runs, name):
    symptom, anomalies, _ = runs[name, True]
    assert symptom, "the buggy port no longer shows its fault"
    detector, layer = BY_NAME[name].expected
    assert anomalies, f"{name}: nothing fired"
    first = anomalies[0]
    assert (first.detector, first.layer) == (detector, layer), [str(a) for a in anomalies]
    assert first.step <= 2 and first.hint  # a run-away loss needs two steps to be one


@pytest.mark.parametrize("name", TESTED)
def test_the_fixed_program_trains_three_epochs_with_nothing_firing(runs, name):
    symptom, anomalies, loss = runs[name, False]
    assert not symptom, "the fixed port shows the fault"
    assert anomalies == [], [str(a) for a in anomalies]
    assert loss[-1] < loss[0]


def test_the_output_layer_is_found_inside_a_nested_model():
    """The outer model's prediction is its inner model's output, which is the inner model's last layer's:
    that layer, not the inner model, is the output layer that head_mismatch blames."""
    from keras import layers

    inp = keras.Input((4,))
    h = layers.Dense(8, activation="relu", name="h")(inp)
    inner = keras.Model(inp, layers.Dense(1, activation="sigmoid", name="out")(h), name="inner")
    outer_in = keras.Input((4,))
    outer = keras.Model(outer_in, inner(outer_in), name="outer")
    outer.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(0).random((64, 4)).astype("float32")
    h = gradtrace.fit(outer, x, 10.0 * x.sum(axis=1, keepdims=True), batch_size=16, verbose=0)
    heads = [r.path for r in h.gradtrace.engine.tables[True].rows if r.kind == "output" and r.head]
    assert heads == ["outer/inner/out"]
    assert [(a.detector, a.layer) for a in h.anomalies] == [("head_mismatch", "outer/inner/out")]
