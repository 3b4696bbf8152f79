"""Health invariants on real programs: what every healthy run keeps, broken one way each.

- the gradient reaches every trainable weight (``gradient_cut``): a Sign on the way (a binarised
  activation trained as is), a kernel read once in ``build()``, BatchNormalization over batches of one;
- a layer's units differ (``identical_units``): every kernel initialised to one constant;
- training makes progress (``no_progress``): labels shuffled apart from their inputs, a learning rate
  far too small;
- the data drives the loss (``penalties``): an L2 factor of 1 on every hidden kernel.

The healthy side of each (silence) is the healthy suite and the client models, run with every default
detector (tests/test_healthy.py, tests/test_clients.py, tests/test_keras_io.py).
"""

import warnings

import keras
import numpy as np
import pytest
from keras import layers, ops

import gradtrace

RNG = np.random.default_rng(0)
X = RNG.normal(size=(1024, 8)).astype("float32")
Y = (X[:, :1] + X[:, 1:2] > 0).astype("float32")


def _fit(model, x=X, y=Y, **kw):
    kw.setdefault("batch_size", 32)
    with warnings.catch_warnings(record=True):  # Keras warns of variables without gradients; findings warn
        warnings.simplefilter("always")
        return gradtrace.fit(model, x, y, verbose=0, **kw)


def _mlp(middle, name="m", init="glorot_uniform", opt="adam"):
    keras.utils.set_random_seed(0)
    inp = keras.Input((8,))
    h = middle(layers.Dense(8, kernel_initializer=init, name="d1")(inp))
    h = layers.Dense(4, activation="relu", kernel_initializer=init, name="d2")(h)
    model = keras.Model(inp, layers.Dense(1, activation="sigmoid", name="out")(h), name=name)
    model.compile(opt, "binary_crossentropy")
    return model


class ReadOnce(layers.Layer):
    """A Dense whose kernel is read once, in ``build()``: every step uses that first value."""

    def build(self, shape):
        self.kernel = self.add_weight(shape=(shape[-1], 8), initializer="glorot_uniform", name="kernel")
        self.bias = self.add_weight(shape=(8,), initializer="zeros", name="bias")
        self.frozen_kernel = ops.convert_to_tensor(self.kernel) * 1.0

    def call(self, x):
        return ops.matmul(x, self.frozen_kernel) + self.bias


def test_gradient_cut_names_the_op_the_weight_and_the_normalisation_that_cut_it():
    # Sign passes a zero gradient: d1's weights get exactly 0, at every step (after `patience` steps)
    h = _fit(_mlp(lambda t: layers.Lambda(ops.sign, name="binarize")(t)), epochs=1)
    found = [a for a in h.anomalies if a.detector == "gradient_cut"]
    assert [(a.layer, a.step) for a in found] == [("m/d1", 4)] and "Sign" in found[0].message
    # a kernel read once in build(): its gradient is None, said at the first step
    keras.utils.set_random_seed(0)
    inp = keras.Input((8,))
    out = layers.Dense(1, activation="sigmoid", name="out")(ReadOnce(name="custom")(inp))
    model = keras.Model(inp, out, name="c")
    model.compile("adam", "binary_crossentropy")
    h = _fit(model, epochs=1)
    found = [a for a in h.anomalies if a.detector == "gradient_cut"]
    assert [(a.layer, a.step) for a in found] == [("c/custom", 0)]
    assert "never reads kernel" in found[0].message and "bias" not in found[0].message.split(":")[1]
    # BatchNormalization over batches of 1 outputs its offset only (0 at the start): the ReLU layer above it
    # reads zeros, so its weights get no gradient (and, dead, it passes none to the layers below)
    h = _fit(_mlp(lambda t: layers.BatchNormalization(name="bn")(t)), X[:16], Y[:16], batch_size=1, epochs=1)
    found = [a for a in h.anomalies if a.detector == "gradient_cut"]
    assert found and found[0].layer == "m/d2" and "m/bn (BatchNormalization)" in found[0].message
    assert "batch of 1 example" in found[0].message


def test_identical_units_names_the_constant_initialiser():
    # d1 and d2 start constant, the output layer random: d2's units part (each feeds its own output weight),
    # d1's never do (each reads the same input, and d2's rows for them stay equal)
    model = _mlp(lambda t: layers.Activation("relu")(t), init=keras.initializers.Constant(0.1))
    h = _fit(model, epochs=1)
    found = [a for a in h.anomalies if a.detector == "identical_units"]
    assert [a.layer for a in found] == ["m/d1"] and "Constant(value=0.1)" in found[0].message
    assert found[0].stage == "epoch_end"


@pytest.mark.parametrize("fault", ["shuffled_labels", "tiny_learning_rate"])
def test_no_progress_says_why(fault):
    y = RNG.permutation(Y) if fault == "shuffled_labels" else Y
    opt = keras.optimizers.SGD(1e-6) if fault == "tiny_learning_rate" else "adam"
    detectors = ["gradient_cut", gradtrace.NoProgress(window=1024, min_steps=64)]
    h = _fit(_mlp(lambda t: layers.Activation("relu")(t), opt=opt), y=y, batch_size=8, epochs=2,
             detectors=detectors)
    found = [a for a in h.anomalies if a.detector == "no_progress"]
    assert [a.step for a in found] == [127], [str(a) for a in h.anomalies]  # 128 steps of 8: the window
    if fault == "shuffled_labels":
        assert "class prior" in found[0].message and "labels belong to their inputs" in found[0].hint
    else:
        assert "updates are too small" in found[0].message and "1e-06 (SGD)" in found[0].message


def test_penalties_name_the_regulariser_and_its_factor():
    keras.utils.set_random_seed(0)
    l2 = keras.regularizers.L2(1.0)
    model = keras.Sequential([keras.Input((8,)), layers.Dense(64, activation="relu", kernel_regularizer=l2, name="h1"),
                              layers.Dense(64, activation="relu", kernel_regularizer=l2, name="h2"),
                              layers.Dense(1, activation="sigmoid", name="out")], name="reg")
    model.compile("adam", "binary_crossentropy")
    h = _fit(model, epochs=2)
    found = [a for a in h.anomalies if a.detector == "penalties"]
    assert [a.layer for a in found] == ["reg/h2"] and "L2(l2=1)" in found[0].message, [str(a) for a in h.anomalies]


def test_update_size_names_a_learning_rate_far_too_small():
    """The blind corpus' "Loss and Accuracy Get Stuck in Keras" (SGD at 1e-5, loss 1.9112 -> 1.9105): the
    default detectors say so within its first 24 steps; the fix (0.1) moves the weights by a healthy amount."""
    from benchmarks.faults.cases_blind import _seven_classes, _sgd_classifier

    x, y = _seven_classes(np.random.default_rng(3))
    found = {}
    for buggy in (True, False):
        keras.utils.set_random_seed(3)
        h = _fit(_sgd_classifier(buggy), x, y, epochs=2, on_anomaly="warn", shuffle=False)
        found[buggy] = [a for a in h.anomalies if a.detector == "update_size"]
    assert [(a.layer, a.step, a.stage) for a in found[True]] == [("learning rate", 20, "periodic")]
    assert "1e-05 (SGD)" in found[True][0].message and "raise the learning rate" in found[True][0].hint
    assert found[False] == []
