"""Real training bugs, each with its fix: the right detector names the right layer at the first step,
and the fixed program trains 3 epochs with nothing firing.

Each case is a published buggy program ported to Keras 3 on synthetic data of its original shapes and
scales. The symptom is checked without gradtrace first (a plain forward pass or loss curve), on the
buggy version and not on the fixed one, so the test cannot pass on a fault that is not there.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import gradtrace

# Keras itself warns (without naming the layer) when a softmax runs over an axis of size 1
pytestmark = pytest.mark.filterwarnings("ignore:.*softmax over axis:UserWarning")


def _binary_cnn(head):
    """Stack Overflow, "Why does a binary Keras CNN always predict 1?" (Conv1D on (10, 4) windows,
    Dense(1) followed by Activation('softmax'), binary_crossentropy; mirrored at
    techfeed.net/es/456718). Fix: Activation('sigmoid')."""
    inp = keras.Input((10, 4))
    h = layers.Conv1D(16, 4, padding="same", name="conv1")(inp)
    h = layers.BatchNormalization(name="bn1")(h)
    h = layers.LeakyReLU(name="act1")(h)
    h = layers.Conv1D(8, 4, padding="same", name="conv2")(h)
    h = layers.BatchNormalization(name="bn2")(h)
    h = layers.LeakyReLU(name="act2")(h)
    h = layers.Flatten(name="flat")(h)
    h = layers.Dense(64, name="fc")(h)
    h = layers.LeakyReLU(name="act3")(h)
    h = layers.Dense(1, name="logit")(h)
    out = layers.Activation(head, name="prob")(h)
    m = keras.Model(inp, out, name="cnn")
    m.compile(optimizer="adam", loss="binary_crossentropy")
    return m


def _binary_cnn_data(rng):
    x = rng.normal(size=(384, 10, 4)).astype("float32")
    return x, (x[:, :, 0].mean(axis=1, keepdims=True) > 0).astype("float32")


def _housing(head):
    """Deep Learning with Python, section 3.6 (Boston housing: 13 features, the median price in
    $1000s, 5 to 50), with the classifier's habit of a sigmoid on the output layer, as asked about
    on Stack Overflow under "regression model predicts the same value". Fix: no activation."""
    inp = keras.Input((13,))
    h = layers.Dense(64, activation="relu", name="d1")(inp)
    h = layers.Dense(64, activation="relu", name="d2")(h)
    m = keras.Model(inp, layers.Dense(1, activation=head, name="price")(h), name="housing")
    m.compile(optimizer="rmsprop", loss="mse")
    return m


def _housing_data(rng, center=False):
    x = rng.normal(size=(404, 13)).astype("float32")  # standardised features, as in the book
    y = np.clip(22.5 + x @ rng.normal(0, 2.5, (13, 1)), 5.0, 50.0).astype("float32")
    return x, (y - y.mean()) / y.std() if center else y


def _standardised_regression(head):
    """A regression head with a ReLU on standardised targets (half of them negative): the output
    layer can never produce them. Fix: no activation on the output layer."""
    inp = keras.Input((13,))
    h = layers.Dense(32, activation="relu", name="d1")(inp)
    m = keras.Model(inp, layers.Dense(1, activation=head, name="out")(h), name="reg")
    m.compile(optimizer="adam", loss="mse")
    return m


def _logits_bce(from_logits):
    """A binary classifier whose output layer has no activation, trained with
    loss='binary_crossentropy' (from_logits=False): Keras clips the raw scores into [1e-7, 1-1e-7].
    Fix: BinaryCrossentropy(from_logits=True)."""
    inp = keras.Input((20,))
    h = layers.Dense(32, activation="relu", name="d1")(inp)
    m = keras.Model(inp, layers.Dense(1, name="score")(h), name="clf")
    m.compile(optimizer="adam", loss=keras.losses.BinaryCrossentropy(from_logits=from_logits))
    return m


def _deep_mlp(init):
    """AUTOTRAINER's (ICSE 2021) bad-initialisation class: a 6-layer ReLU MLP whose kernels are drawn
    from N(0, 1). Fix: the Keras default (glorot_uniform)."""
    inp = keras.Input((20,))
    h = inp
    for i in range(6):
        h = layers.Dense(64, activation="relu", kernel_initializer=init, name=f"h{i}")(h)
    m = keras.Model(inp, layers.Dense(1, name="out")(h), name="deep")
    m.compile(optimizer="adam", loss="mse")
    return m


def _negative_bias(bias):
    """The dying-ReLU class of DeepFD's fault taxonomy: a hidden ReLU layer whose bias starts far below
    0, so every pre-activation is negative. Fix: zero bias."""
    inp = keras.Input((20,))
    h = layers.Dense(32, activation="relu", name="d1")(inp)
    h = layers.Dense(32, activation="relu", bias_initializer=keras.initializers.Constant(bias), name="d2")(h)
    m = keras.Model(inp, layers.Dense(1, name="out")(h), name="mlp")
    m.compile(optimizer="adam", loss="mse")
    return m


def _reg20(rng):
    x = rng.normal(size=(384, 20)).astype("float32")
    return x, (x @ rng.normal(0, 0.3, (20, 1))).astype("float32")


def _clf20(rng):
    x = rng.normal(size=(384, 20)).astype("float32")
    return x, (x[:, :1] + 0.3 * x[:, 1:2] > 0).astype("float32")


# name: (build(buggy: bool), data(rng), expected (detector, layer), symptom check without gradtrace)
CASES = {
    "softmax_over_one_unit": (lambda bug: _binary_cnn("softmax" if bug else "sigmoid"), _binary_cnn_data,
                              ("head_mismatch", "cnn/prob")),
    "sigmoid_on_house_prices": (lambda bug: _housing("sigmoid" if bug else None), _housing_data,
                                ("head_mismatch", "housing/price")),
    "relu_on_standardised_targets": (lambda bug: _standardised_regression("relu" if bug else None),
                                     lambda rng: _housing_data(rng, center=True), ("head_mismatch", "reg/out")),
    "crossentropy_on_raw_scores": (lambda bug: _logits_bce(from_logits=not bug), _clf20,
                                   ("head_mismatch", "clf/score")),
    "normal_init_deep_mlp": (lambda bug: _deep_mlp(keras.initializers.RandomNormal(0.0, 1.0) if bug else
                                                   "glorot_uniform"), _reg20, ("scale_growth", "deep/h0")),
    "negative_bias_relu": (lambda bug: _negative_bias(-10.0 if bug else 0.0), _reg20, ("dead_relu", "mlp/d2")),
}


def _symptom(name, model, x, y):
    """The fault, seen without gradtrace on the untrained model (True when present)."""
    p = np.asarray(model(x[:128], training=False))
    if name == "softmax_over_one_unit":
        return bool(np.all(p == 1.0))
    if name == "sigmoid_on_house_prices":
        return bool(p.max() <= 1.0 and y.min() > 1.0)
    if name == "relu_on_standardised_targets":
        return bool(p.min() >= 0.0 and (y < 0).mean() > 0.3)
    if name == "crossentropy_on_raw_scores":
        # the loss passes no gradient for the examples whose raw score it clipped
        scores = tf.constant(p)
        with tf.GradientTape() as tape:
            tape.watch(scores)
            loss = model.loss(tf.constant(y[:128]), scores)
        return bool((tape.gradient(loss, scores).numpy() == 0).mean() > 0.2)
    if name == "normal_init_deep_mlp":
        return bool(np.sqrt((p ** 2).mean()) > 1e3)
    # negative bias: every unit of d2 outputs 0
    d2 = keras.Model(model.inputs[0], model.get_layer("d2").output)
    return bool(np.all(np.asarray(d2(x[:128])) == 0.0))


@pytest.fixture(scope="module")
def runs():
    out = {}
    for name, (build, data, _) in CASES.items():
        for bug in (True, False):
            keras.utils.set_random_seed(3)
            x, y = data(np.random.default_rng(3))
            model = build(bug)
            symptom = _symptom(name, model, x, y)
            h = gradtrace.fit(model, x, y, batch_size=32, epochs=3 if not bug else 1, shuffle=False, verbose=0,
                              on_anomaly="warn")
            out[name, bug] = (symptom, h.anomalies, h.history["loss"])
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_the_buggy_program_is_caught_at_step_0_and_the_culprit_named_with_a_hint(runs, name):
    symptom, anomalies, _ = runs[name, True]
    assert symptom, "the buggy port no longer shows its fault"
    detector, layer = CASES[name][2]
    assert anomalies, f"{name}: nothing fired"
    first = anomalies[0]
    assert (first.detector, first.layer) == (detector, layer), [str(a) for a in anomalies]
    assert first.step <= 1 and first.hint


@pytest.mark.parametrize("name", list(CASES))
def test_the_fixed_program_trains_three_epochs_with_nothing_firing(runs, name):
    symptom, anomalies, loss = runs[name, False]
    assert not symptom, "the fixed port shows the fault"
    assert anomalies == [], [str(a) for a in anomalies]
    assert loss[-1] < loss[0]
