"""Real training bugs with their fixes, ported to Keras 3 on synthetic data of their shapes and scales.

Each case: ``build(buggy)`` returns a compiled model (the buggy program or its fix), ``data(rng)`` the
data, ``expected`` the (detector, layer) that must come first on the buggy version, ``source`` where
the program comes from, and ``symptom(model, x, y)`` checks the fault WITHOUT gradtrace (a plain forward
pass or the loss's own gradient): true on the buggy version, false on the fix. ``benchmarks/faults/
score.py`` runs them all and prints the scores; ``tests/test_precision.py`` runs the ``TESTED`` ones.
"""

from dataclasses import dataclass
from typing import Callable

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops


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


class LogOf(layers.Layer):
    """A feature transform that takes the log of a non-negative input (a price, a count)."""

    def __init__(self, eps=0.0, **kw):
        super().__init__(**kw)
        self.eps = eps

    def call(self, x):
        return ops.log(x + self.eps)


def _log_features(eps):
    """The log(0) class (Stack Overflow, "Keras loss becomes nan": a log of a count or price that can be
    0, e.g. a free item, gives -inf and then NaN everywhere). Fix: log(x + 1)."""
    inp = keras.Input((6,))
    h = LogOf(eps, name="log")(inp)
    h = layers.Dense(16, activation="relu", name="d1")(h)
    m = keras.Model(inp, layers.Dense(1, name="out")(h), name="logm")
    m.compile(optimizer="adam", loss="mse")
    return m


def _counts(rng):
    x = rng.poisson(3.0, (384, 6)).astype("float32")  # counts: some are 0
    return x, np.log1p(x).sum(axis=1, keepdims=True).astype("float32")


def _small_vocab(input_dim):
    """Stack Overflow's most asked Embedding error, "indices[i,j] = N is not in [0, N)": the table is
    sized for the vocabulary but the ids run from 1 to N (0 kept for padding). Fix: input_dim = N + 1."""
    inp = keras.Input((8,), dtype="int32")
    h = layers.Embedding(input_dim, 8, name="emb")(inp)
    h = layers.GlobalAveragePooling1D(name="pool")(h)
    m = keras.Model(inp, layers.Dense(1, activation="sigmoid", name="out")(h), name="text")
    m.compile(optimizer="adam", loss="binary_crossentropy")
    return m


def _ids_1_to_100(rng):
    x = rng.integers(1, 101, (384, 8)).astype("int32")
    x[40, 3] = 100  # the largest id appears in batch 1 at the latest
    return x, (x.mean(axis=1, keepdims=True) > 50).astype("float32")


def _sigmoid_stack(activation):
    """AUTOTRAINER's vanishing-gradient class: a deep stack of sigmoid layers (10 here); the gradient
    shrinks by up to 4x per layer on its way down. Fix: ReLU with He initialisation."""
    inp = keras.Input((20,))
    h = inp
    for i in range(10):
        h = layers.Dense(32, activation=activation, name=f"s{i}",
                         kernel_initializer="he_normal" if activation == "relu" else "glorot_uniform")(h)
    m = keras.Model(inp, layers.Dense(1, activation="sigmoid", name="out")(h), name="stack")
    m.compile(optimizer=keras.optimizers.SGD(0.01), loss="binary_crossentropy")
    return m


@dataclass(frozen=True)
class Case:
    name: str
    source: str
    build: Callable  # build(buggy: bool) -> compiled model
    data: Callable  # data(rng) -> (x, y)
    expected: tuple  # (detector, layer) of the first anomaly on the buggy version
    symptom: Callable  # symptom(model, x, y) -> bool, without gradtrace
    epochs: int = 3  # epochs for the fixed version


def _predict(model, x):
    return np.asarray(model(x[:128], training=False))


def _clipped_by_the_loss(model, x, y):
    scores = tf.constant(_predict(model, x))
    with tf.GradientTape() as tape:
        tape.watch(scores)
        loss = keras.losses.get(model.loss)(tf.constant(y[:128]), scores)
    return bool((tape.gradient(loss, scores).numpy() == 0).mean() > 0.2)


def _layer_output(model, name, x):
    return np.asarray(keras.Model(model.inputs[0], model.get_layer(name).output)(x[:128]))


def _first_layer_grad_rms_ratio(model, x, y):
    xs, ys = tf.constant(x[:128]), tf.constant(y[:128])
    with tf.GradientTape() as tape:
        loss = keras.losses.get(model.loss)(ys, model(xs, training=True))
    first, last = model.get_layer("s0").kernel, model.get_layer("s9").kernel
    g0, g9 = tape.gradient(loss, [first, last])
    return float(tf.norm(g0) / tf.maximum(tf.norm(g9), 1e-30))


CASES = [
    Case("softmax_over_one_unit", "Stack Overflow, 'Why does a binary Keras CNN always predict 1?' "
         "(mirrored at techfeed.net/es/456718)",
         lambda bug: _binary_cnn("softmax" if bug else "sigmoid"), _binary_cnn_data, ("head_mismatch", "cnn/prob"),
         lambda m, x, y: bool(np.all(_predict(m, x) == 1.0))),
    Case("sigmoid_on_house_prices", "Deep Learning with Python, 3.6 (Boston housing), with a sigmoid output",
         lambda bug: _housing("sigmoid" if bug else None), _housing_data, ("head_mismatch", "housing/price"),
         lambda m, x, y: bool(_predict(m, x).max() <= 1.0 and y.min() > 1.0)),
    Case("relu_on_standardised_targets", "regression head with a ReLU on standardised targets",
         lambda bug: _standardised_regression("relu" if bug else None), lambda rng: _housing_data(rng, center=True),
         ("head_mismatch", "reg/out"), lambda m, x, y: bool(_predict(m, x).min() >= 0.0 and (y < 0).mean() > 0.3)),
    Case("crossentropy_on_raw_scores", "binary_crossentropy (from_logits=False) on an output with no activation",
         lambda bug: _logits_bce(from_logits=not bug), _clf20, ("head_mismatch", "clf/score"), _clipped_by_the_loss),
    Case("normal_init_deep_mlp", "AUTOTRAINER (ICSE 2021), bad weight initialisation: N(0, 1) kernels",
         lambda bug: _deep_mlp(keras.initializers.RandomNormal(0.0, 1.0) if bug else "glorot_uniform"), _reg20,
         ("scale_growth", "deep/h0"), lambda m, x, y: bool(np.sqrt((_predict(m, x) ** 2).mean()) > 1e3)),
    Case("negative_bias_relu", "DeepFD's dying-ReLU class: a hidden ReLU layer with bias -10",
         lambda bug: _negative_bias(-10.0 if bug else 0.0), _reg20, ("dead_relu", "mlp/d2"),
         lambda m, x, y: bool(np.all(_layer_output(m, "d2", x) == 0.0))),
    Case("log_of_zero", "Stack Overflow, 'Keras loss becomes nan': log of a count that can be 0",
         lambda bug: _log_features(0.0 if bug else 1.0), _counts, ("nan", "logm/log"),
         lambda m, x, y: bool(np.isinf(_layer_output(m, "log", x)).any())),
    Case("vocabulary_off_by_one", "Stack Overflow, 'indices[i,j] = N is not in [0, N)' (Embedding)",
         lambda bug: _small_vocab(100 if bug else 101), _ids_1_to_100, ("embedding_out_of_range", "text/emb"),
         lambda m, x, y: bool(x.max() >= m.get_layer("emb").input_dim)),
    Case("deep_sigmoid_stack", "AUTOTRAINER (ICSE 2021), vanishing gradient: 10 sigmoid layers",
         lambda bug: _sigmoid_stack("sigmoid" if bug else "relu"), _clf20, ("vanishing", "stack/s0"),
         lambda m, x, y: _first_layer_grad_rms_ratio(m, x, y) < 1e-3),
]
BY_NAME = {c.name: c for c in CASES}
# run by tests/test_precision.py on every CI run (the scorer runs them all)
TESTED = ("softmax_over_one_unit", "sigmoid_on_house_prices", "relu_on_standardised_targets",
          "crossentropy_on_raw_scores", "normal_init_deep_mlp", "negative_bias_relu")
