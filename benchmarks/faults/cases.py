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


# ---- more real bugs: divergence, heads, NaN origins, dying and saturating units ----------------------------


def _take(x, sl):
    return [a[sl] for a in x] if isinstance(x, (list, tuple)) else x[sl]


def _train_copy(model, x, y, steps, probe=None):
    """Trains ``model`` for ``steps`` batches of 32 (in order, cycling) in a plain ``tf.GradientTape`` loop
    with a fresh optimizer of the same configuration, without gradtrace; returns the per-step losses and
    the gradient norms (and ``probe(model)`` after the last step), then puts every weight back, so that
    the model handed to the scorer is untouched."""
    saved = model.get_weights()
    opt = model.optimizer.__class__.from_config(model.optimizer.get_config())
    loss_fn = keras.losses.get(model.loss)
    n = len(y)
    losses, norms = [], []
    try:
        for i in range(steps):
            lo = (32 * i) % n
            sl = slice(lo, lo + 32)
            xb, yb = _take(x, sl), tf.constant(y[sl])
            with tf.GradientTape() as tape:
                loss = ops.mean(loss_fn(yb, model(xb, training=True)))
            grads = tape.gradient(loss, model.trainable_variables)
            losses.append(float(loss))
            norms.append(float(tf.linalg.global_norm([g for g in grads if g is not None])))
            opt.apply_gradients(zip(grads, model.trainable_variables))
        out = probe(model) if probe is not None else None
    finally:
        model.set_weights(saved)
    return losses, norms, out


def _runs_away(losses, factor=10.0):
    """The loss rises ``factor``-fold above its first value, or stops being finite."""
    arr = np.asarray(losses, dtype=np.float64)
    return bool(not np.all(np.isfinite(arr)) or arr.max() > factor * arr[0])


def _sgd_mlp(lr):
    """Data Science Stack Exchange, "Why is learning rate causing my neural network's weights to
    skyrocket?" (https://datascience.stackexchange.com/questions/15962): a plain MLP trained by gradient
    descent whose loss "jumps from a number in the thousands to a trillion and then to infinity" until the
    learning rate is lowered; the learning-rate fault class of AUTOTRAINER ("unstable training") and DeepFD.
    Here: a 13-feature regression MLP (standardised features and target) with SGD(learning_rate=1.0).
    Fix: SGD(learning_rate=0.01), the Keras default."""
    inp = keras.Input((13,))
    h = layers.Dense(64, activation="relu", name="d1")(inp)
    h = layers.Dense(64, activation="relu", name="d2")(h)
    m = keras.Model(inp, layers.Dense(1, name="out")(h), name="sgd_mlp")
    m.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    return m


# house features as listed (square feet, year built, lot size in square feet, bedrooms, bathrooms, garage
# places): their means and standard deviations, which the fix standardises with
_HOUSE_MEAN = np.array([2000.0, 1960.0, 10000.0, 3.5, 2.5, 1.5], "float32")
_HOUSE_SD = np.array([700.0, 35.0, 4000.0, 1.7, 1.1, 1.1], "float32")


def _unscaled_houses(standardise):
    """Cross Validated, "Simple Linear Regression in Keras" (https://stats.stackexchange.com/questions/284189):
    a Keras regression trained with keras.optimizers.SGD() on raw columns gives "nan loss on every epoch";
    the answer: "no normalization done ... StandardScaler". Here: house features in their own units
    (square feet, year built, lot size, counts; values in the thousands) into an MLP with SGD's default
    learning rate 0.01. Fix: standardise the features (a Normalization layer with their mean and
    variance)."""
    inp = keras.Input((6,))
    h = inp
    if standardise:
        h = layers.Normalization(mean=_HOUSE_MEAN, variance=_HOUSE_SD ** 2, name="standardise")(h)
    h = layers.Dense(32, activation="relu", name="d1")(h)
    h = layers.Dense(32, activation="relu", name="d2")(h)
    m = keras.Model(inp, layers.Dense(1, name="price")(h), name="houses")
    m.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    return m


def _house_rows(rng, n=384):
    z = rng.normal(size=(n, 6)).astype("float32")
    x = _HOUSE_MEAN + _HOUSE_SD * z
    x[:, 3:] = np.clip(np.round(x[:, 3:]), [1, 1, 0], [7, 5, 4])  # counts
    y = z @ np.array([0.8, 0.2, 0.3, 0.3, 0.3, 0.1], "float32") + 0.2 * rng.normal(size=n)
    return x.astype("float32"), ((y - y.mean()) / y.std()).astype("float32")[:, None]


def mse_in_100k(y_true, y_pred):
    """The squared error in units of $100,000 (the targets scaled as the fix scales them)."""
    return ops.mean(ops.square((y_true - y_pred) / 1e5), axis=-1)


def _dollar_targets(scaled):
    """The unscaled-target half of the same answer (Cross Validated, "Simple Linear Regression in Keras",
    https://stats.stackexchange.com/questions/284189, whose fix standardises y as well as x), and DeepFD's
    preprocessing fault class: standardised features but house prices in dollars (1e5 to 6e5) as MSE
    targets, with SGD(0.01): the first gradients are ~1e5 times too large. Fix: the loss on targets in
    units of $100,000 (the output layer's unit scaled back to dollars by a Rescaling)."""
    inp = keras.Input((13,))
    h = layers.Dense(32, activation="relu", name="d1")(inp)
    h = layers.Dense(32, activation="relu", name="d2")(h)
    out = layers.Dense(1, name="price")(h)
    if scaled:
        out = layers.Rescaling(1e5, name="dollars")(out)
    m = keras.Model(inp, out, name="prices")
    m.compile(optimizer=keras.optimizers.SGD(0.01), loss=mse_in_100k if scaled else "mse")
    return m


def _dollars(rng, n=384):
    x = rng.normal(size=(n, 13)).astype("float32")
    y = 3e5 + 6e4 * (x @ rng.normal(0, 0.35, (13, 1)))
    return x, np.clip(y, 1e5, 6e5).astype("float32")


def _relu_head_cnn(head):
    """Keras issue #12096, "Simple CNN not learning at all" (https://github.com/keras-team/keras/issues/12096):
    Conv2D(96, (11, 11), relu), MaxPooling2D((3, 3), strides=2), Flatten, then Dense(2, activation='relu')
    as the output layer, one-hot labels, loss='categorical_crossentropy', Adam: the loss never moves.
    Ported to 32x32 grey images (pixels 0..255, scaled by 1/255 in both versions so that only the head
    differs) and 8 filters of 5x5. Fix: Dense(2, activation='softmax')."""
    inp = keras.Input((32, 32, 1))
    h = layers.Rescaling(1 / 255, name="scale")(inp)
    h = layers.Conv2D(8, 5, activation="relu", name="conv")(h)
    h = layers.MaxPooling2D(3, strides=2, name="pool")(h)
    h = layers.Flatten(name="flat")(h)
    m = keras.Model(inp, layers.Dense(2, activation=head, name="out")(h), name="cnn2")
    m.compile(optimizer="adam", loss="categorical_crossentropy")
    return m


def _two_kinds_of_images(rng, n=384):
    label = rng.integers(0, 2, n)
    x = rng.uniform(0, 120, (n, 32, 32, 1))
    x[label == 1, 8:24, 8:24] += 110.0  # class 1: a bright square in the middle
    return x.astype("float32"), np.eye(2, dtype="float32")[label]


def _relu_logits_vgg(activation):
    """GitHub issue huyng/tensorflow-vgg#13, "ReLU applied to logits"
    (https://github.com/huyng/tensorflow-vgg/issues/13): the VGG's last fully connected layer (fc8, the
    logits) keeps the ReLU of fc6/fc7 and feeds tf.nn.sparse_softmax_cross_entropy_with_logits. Ported to
    a small VGG (two conv blocks, fc6/fc7 of 64) on 32x32 RGB images, 10 classes, with
    SparseCategoricalCrossentropy(from_logits=True). Fix: no activation on fc8."""
    inp = keras.Input((32, 32, 3))
    h = layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1_1")(inp)
    h = layers.MaxPooling2D(2, name="pool1")(h)
    h = layers.Conv2D(16, 3, padding="same", activation="relu", name="conv2_1")(h)
    h = layers.MaxPooling2D(2, name="pool2")(h)
    h = layers.Flatten(name="flat")(h)
    h = layers.Dense(64, activation="relu", name="fc6")(h)
    h = layers.Dense(64, activation="relu", name="fc7")(h)
    m = keras.Model(inp, layers.Dense(10, activation=activation, name="fc8")(h), name="vgg")
    m.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return m


def _ten_classes_rgb(rng, n=384):
    label = rng.integers(0, 10, n)
    protos = rng.normal(0, 1, (10, 8, 8, 3))
    x = np.repeat(np.repeat(protos[label], 4, axis=1), 4, axis=2) + rng.normal(0, 1, (n, 32, 32, 3))
    return (0.5 * x).astype("float32"), label.astype("int32")


def _tanh_price_lstm(head):
    """The tanh-output time-series forecaster: an LSTM over a window of past prices whose output layer
    keeps the LSTM's own activation, Dense(1, activation='tanh'), trained with MSE on unscaled prices
    (about $10 here): it can never exceed 1, so it predicts a constant. The same head is what
    pytorch/examples#250, "Add linear layer to time series prediction"
    (https://github.com/pytorch/examples/pull/250), removed from the time-series example ("the final
    network output is modulated with a tanh nonlinearity. This is undesirable"). Fix: a linear output."""
    inp = keras.Input((20, 1))
    h = layers.LSTM(32, name="lstm")(inp)
    m = keras.Model(inp, layers.Dense(1, activation=head, name="price")(h), name="lstm_price")
    m.compile(optimizer="adam", loss="mse")
    return m


def _price_windows(rng, n=384):
    walk = 10.0 + np.cumsum(rng.normal(0, 0.15, n + 21))
    walk = 6.0 + np.abs(walk - 6.0)  # a $6 to $15 stock
    x = np.stack([walk[i:i + 20] for i in range(n)])[..., None]
    return x.astype("float32"), walk[20:20 + n, None].astype("float32")


def _iris(units):
    """rstudio/keras issue #465, "Loss sparse_categorical_crossentropy indexing issue"
    (https://github.com/rstudio/keras3/issues/465): iris (4 measurements in cm, 3 species) with the species
    coded 1, 2, 3 into a 3-unit softmax and sparse_categorical_crossentropy: "Received a label value of 3
    which is outside the valid range of [0, 3)" on CPU (and a silent NaN or a wrong row on GPU). Fix: an
    output of max label + 1 = 4 units (class 0 unused), as for an Embedding."""
    inp = keras.Input((4,))
    h = layers.Dense(16, activation="relu", name="d1")(inp)
    m = keras.Model(inp, layers.Dense(units, activation="softmax", name="species")(h), name="iris")
    m.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return m


def _iris_data(rng, n=150):
    species = rng.integers(1, 4, n)
    centres = np.array([[5.0, 3.4, 1.5, 0.2], [5.9, 2.8, 4.3, 1.3], [6.6, 3.0, 5.6, 2.0]])
    x = centres[species - 1] + rng.normal(0, 0.3, (n, 4))
    species[5] = 3  # the largest label appears in the first batch
    return x.astype("float32"), species.astype("int32")


class Distance(layers.Layer):
    """The Euclidean distance between two embeddings, sqrt(sum((a - b)^2)), with ``eps`` under the root
    as in the Keras example's ``ops.sqrt(ops.maximum(sum_square, epsilon))``."""

    def __init__(self, eps=0.0, **kw):
        super().__init__(**kw)
        self.eps = eps

    def call(self, inputs):
        a, b = inputs
        sum_square = ops.sum(ops.square(a - b), axis=1, keepdims=True)
        return ops.sqrt(ops.maximum(sum_square, self.eps) if self.eps else sum_square)


def _siamese(eps):
    """Keras example "Image similarity estimation using a Siamese Network with a contrastive loss"
    (https://keras.io/examples/vision/siamese_contrastive/): two MNIST images through one tower (Conv2D(4,
    5, tanh), AveragePooling2D, Conv2D(16, 5, tanh), AveragePooling2D, Dense(10, tanh)), their Euclidean
    distance, BatchNormalization, Dense(1, sigmoid), the contrastive loss with margin 1, RMSprop. The
    example's distance is sqrt(maximum(sum_square, epsilon)); without the epsilon (the plain
    sqrt(sum(square(a - b))) of many ports) a pair of identical images (which random pairing draws) has
    distance 0 and the gradient of sqrt at 0 is inf * 0 = NaN: TensorFlow issues #12071, "Numerical
    instability of gradient calculation of tf.norm (nan at 0, inf for small values)", and #30199,
    "Gradient returns 'Nan' values when using triplet loss with similar batches". The tower's
    BatchNormalization layers are replaced by a 1/255 Rescaling (in batch statistics two identical images
    in different halves of the pair would not map to exactly the same embedding). Fix: the epsilon."""
    tower_in = keras.Input((28, 28, 1))
    h = layers.Rescaling(1 / 255, name="scale")(tower_in)
    h = layers.Conv2D(4, 5, activation="tanh", name="conv1")(h)
    h = layers.AveragePooling2D(2, name="pool1")(h)
    h = layers.Conv2D(16, 5, activation="tanh", name="conv2")(h)
    h = layers.AveragePooling2D(2, name="pool2")(h)
    h = layers.Flatten(name="flat")(h)
    tower = keras.Model(tower_in, layers.Dense(10, activation="tanh", name="embed")(h), name="tower")
    a, b = keras.Input((28, 28, 1), name="left"), keras.Input((28, 28, 1), name="right")
    d = Distance(eps, name="distance")([tower(a), tower(b)])
    d = layers.BatchNormalization(name="bn")(d)
    m = keras.Model([a, b], layers.Dense(1, activation="sigmoid", name="similar")(d), name="siamese")
    m.compile(optimizer="rmsprop", loss=contrastive_loss)
    return m


def contrastive_loss(y_true, y_pred, margin=1.0):
    """The Keras example's contrastive loss (label 0: same digit, 1: different)."""
    return ops.mean((1 - y_true) * ops.square(y_pred) + y_true * ops.square(ops.maximum(margin - y_pred, 0.0)))


def _image_pairs(rng, n=384):
    protos = rng.uniform(0, 255, (10, 28, 28, 1)) * (rng.uniform(size=(10, 28, 28, 1)) < 0.2)
    digits = rng.integers(0, 10, n)
    left = np.clip(protos[digits] + rng.normal(0, 30, (n, 28, 28, 1)), 0, 255)
    same = rng.uniform(size=n) < 0.5
    other = np.where(same, digits, (digits + rng.integers(1, 10, n)) % 10)
    right = np.clip(protos[other] + rng.normal(0, 30, (n, 28, 28, 1)), 0, 255)
    twins = np.arange(0, n, 24)  # a pair drawn twice from the same image, as random pairing does
    right[twins], same[twins] = left[twins], True
    return [left.astype("float32"), right.astype("float32")], (~same).astype("float32")[:, None]


class BatchStandardise(layers.Layer):
    """Standardises each feature over the batch: (x - mean) / std, std as sqrt(var + eps)."""

    def __init__(self, eps=0.0, **kw):
        super().__init__(**kw)
        self.eps = eps

    def call(self, x):
        mean = ops.mean(x, axis=0, keepdims=True)
        std = ops.sqrt(ops.var(x, axis=0, keepdims=True) + self.eps) if self.eps else ops.std(x, axis=0,
                                                                                               keepdims=True)
        return (x - mean) / std


def _batch_standardise(eps):
    """The constant-column standardisation fault: fastai issue #889, "Normalization for tabulardata
    produces nan for constant columns" (https://github.com/fastai/fastai/issues/889; "(x - mean) / std ...
    will turn some columns to nan if stds is 0"), and Keras issue #2960, "K.std results in NaN if input
    is zero vector" (https://github.com/keras-team/keras/issues/2960), whose fix is sqrt(var + eps). Here
    a custom standardisation layer over the batch in front of a tabular MLP; one column (a flag) is 0 in
    every row. Fix: std = sqrt(var + 1e-6)."""
    inp = keras.Input((8,))
    h = BatchStandardise(eps, name="standardise")(inp)
    h = layers.Dense(32, activation="relu", name="d1")(h)
    m = keras.Model(inp, layers.Dense(1, activation="sigmoid", name="out")(h), name="tab")
    m.compile(optimizer="adam", loss="binary_crossentropy")
    return m


def _table_with_constant_column(rng, n=384):
    x = rng.normal(0, 1, (n, 8)) * [1, 10, 100, 1, 5, 1, 1, 0] + [0, 50, 1000, 0, 20, 0, 3, 0]
    return x.astype("float32"), (x[:, 0] + 0.1 * x[:, 1] - 5 > -5 + 0.3 * x[:, 3]).astype("float32")[:, None]


def unclipped_crossentropy(y_true, y_pred):
    """TensorFlow-Examples' logistic regression cost, -reduce_sum(y * log(pred), 1), without clipping."""
    return -ops.sum(y_true * ops.log(y_pred), axis=-1)


def clipped_crossentropy(y_true, y_pred):
    """The fix proposed in the issue: log(clip_by_value(pred, 1e-10, 1.0))."""
    return -ops.sum(y_true * ops.log(ops.clip(y_pred, 1e-10, 1.0)), axis=-1)


def _logistic_regression(clipped):
    """GitHub issue aymericdamien/TensorFlow-Examples#383, "[Potential NAN bug] Loss may become NAN during
    training" (https://github.com/aymericdamien/TensorFlow-Examples/issues/383): the logistic regression
    example, pred = softmax(x W + b) on 784 MNIST pixels in [0, 1] with W = 0, and the cost
    reduce_mean(-reduce_sum(y * log(pred), 1)): once a softmax output underflows to exactly 0, log(0) = -inf
    and 0 * -inf = NaN. Trained here with Adam(learning_rate=0.1) instead of the example's gradient descent
    at 0.01, so that the softmax gets that sharp within one epoch (Adam keeps sharpening it on separable
    data, which a correct loss handles: the fix trains on with the same optimizer). Fix:
    log(clip_by_value(pred, 1e-10, 1.0))."""
    inp = keras.Input((784,))
    out = layers.Dense(10, activation="softmax", kernel_initializer="zeros", name="pred")(inp)
    m = keras.Model(inp, out, name="logreg")
    m.compile(optimizer=keras.optimizers.Adam(0.1), loss=clipped_crossentropy if clipped else unclipped_crossentropy)
    return m


def _mnist_like(rng, n=384, scale=1.0):
    protos = rng.uniform(size=(10, 784)) < 0.2
    digits = rng.integers(0, 10, n)
    x = (protos[digits] ^ (rng.uniform(size=(n, 784)) < 0.05)) * rng.uniform(0.5, 1.0, (n, 784))
    return (scale * x).astype("float32"), digits


def _mnist_onehot(rng):
    x, digits = _mnist_like(rng)
    return x, np.eye(10, dtype="float32")[digits]


def _relu_lstm(activation):
    """Stack Overflow, "Why am I getting NaN after adding relu activation in LSTM?"
    (https://stackoverflow.com/questions/55322991; "When I don't use activation or use tanh everything
    works but when I switch relu I keep getting NaN loss"; answer: with relu the outputs and the cell
    state are unbounded and the gradients explode), and Keras issue #2194, "Nan acc in A LSTM model with
    ReLU activations" (https://github.com/keras-team/keras/issues/2194; 64-d inputs, sentences up to 1019
    steps). Here an LSTM(32, activation='relu') over 200 steps of 16 non-negative features, trained with
    Adam(learning_rate=0.01): the recurrence runs away within a few updates. Fix: tanh (the Keras
    default)."""
    inp = keras.Input((200, 16))
    h = layers.LSTM(32, activation=activation, name="lstm")(inp)
    m = keras.Model(inp, layers.Dense(4, activation="softmax", name="tag")(h), name="rnn")
    m.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    return m


def _long_sequences(rng, n=384):
    x = rng.uniform(0, 1, (n, 200, 16)) * (rng.uniform(size=(n, 200, 16)) < 0.5)
    return x.astype("float32"), (x[:, -50:, :4].sum(axis=(1, 2)) // 25).clip(0, 3).astype("int32")


def _high_lr_relu_mlp(lr):
    """AUTOTRAINER's (ICSE 2021) dying-ReLU symptom caused by a too-large learning rate ("as much as 40% of
    your network can be dead if the learning rate is set too high", quoted in Keras issue #7057, "Feature
    proposal: detect dead ReLUs", https://github.com/keras-team/keras/issues/7057, and in the Data Science
    Stack Exchange question "What is the 'dying ReLU' problem in neural networks?"): an MNIST-shaped ReLU
    MLP (784 pixels in [0, 1], Dense(64, relu) x 2, softmax over 10 digits) trained with
    Adam(learning_rate=0.5): most of the first hidden layer is 0 for every image within the first epoch.
    Fix: Adam(learning_rate=1e-3)."""
    inp = keras.Input((784,))
    h = layers.Dense(64, activation="relu", name="h1")(inp)
    h = layers.Dense(64, activation="relu", name="h2")(h)
    m = keras.Model(inp, layers.Dense(10, activation="softmax", name="digit")(h), name="mlp_lr")
    m.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy")
    return m


def _raw_pixel_mlp(scale):
    """Keras issue #6914, "MNIST not learning" (https://github.com/keras-team/keras/issues/6914): an MNIST MLP
    fed the raw pixels 0..255 ("It turns out I didn't normalized the input: x_train /= 255"), here with
    sigmoid hidden layers (Dense(64, sigmoid) x 2, softmax output, as in the neural-network-always-predicts-
    the-same-class questions): every hidden sigmoid saturates at 0 or 1. Fix: divide by 255 (a Rescaling
    layer)."""
    inp = keras.Input((784,))
    h = layers.Rescaling(1 / 255, name="scale")(inp) if scale else inp
    h = layers.Dense(64, activation="sigmoid", name="h1")(h)
    h = layers.Dense(64, activation="sigmoid", name="h2")(h)
    m = keras.Model(inp, layers.Dense(10, activation="softmax", name="digit")(h), name="pixels")
    m.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return m


def _digits_bce(multiclass):
    """Data Science Stack Exchange, "Too low accuracy on MNIST dataset using a neural network"
    (https://datascience.stackexchange.com/questions/38604): Dense(64, relu), then Dense(1,
    activation='sigmoid') with loss='binary_crossentropy' on the digit labels 0..9: "loss: -55.0254 -
    acc: 0.1142", stuck. The labels are the integer digits, as mnist.load_data() gives them; the pixels
    are scaled by 1/255 in both versions (the question also left them raw), so that only the head
    differs. Fix: Dense(10, softmax) with sparse_categorical_crossentropy."""
    inp = keras.Input((784,))
    h = layers.Rescaling(1 / 255, name="scale")(inp)
    h = layers.Dense(64, activation="relu", name="hidden")(h)
    if multiclass:
        out = layers.Dense(10, activation="softmax", name="out")(h)
    else:
        out = layers.Dense(1, activation="sigmoid", name="out")(h)
    m = keras.Model(inp, out, name="digits")
    m.compile(optimizer="adam", loss="sparse_categorical_crossentropy" if multiclass else "binary_crossentropy")
    return m


def _pixels01(rng):
    x, digits = _mnist_like(rng)
    return x, digits.astype("int32")


def _raw_pixels(rng):
    x, digits = _mnist_like(rng, scale=255.0)
    return x, digits.astype("int32")


# symptoms of the cases above, each without gradtrace


def _diverges(model, x, y):
    losses, _, _ = _train_copy(model, x, y, steps=12)  # one epoch of the scorer's buggy run
    return _runs_away(losses)


def _zero_outputs(model, x, y):
    return bool((_predict(model, x) == 0.0).mean() > 0.2)


def _head_cannot_reach(name):
    """The output layer's activation at +-1e3 (the farthest it can go) against the targets."""
    def symptom(model, x, y):
        lo, hi = np.asarray(model.get_layer(name).activation(tf.constant([-1e3, 1e3])))
        return bool(((y < lo) | (y > hi)).mean() > 0.5)
    return symptom


def _labels_past_the_head(model, x, y):
    return bool(y.max() >= model.output_shape[-1])


def _nan_gradient(model, x, y):
    xs, ys = _take(x, slice(0, 128)), tf.constant(y[:128])
    with tf.GradientTape() as tape:
        loss = ops.mean(keras.losses.get(model.loss)(ys, model(xs, training=True)))
    grads = tape.gradient(loss, model.trainable_variables)
    return bool(not all(np.all(np.isfinite(g.numpy())) for g in grads if g is not None))


def _nan_output(name):
    return lambda m, x, y: bool(np.isnan(_layer_output(m, name, x)).any())


def _nan_loss_in_first_epoch(model, x, y):
    losses, _, _ = _train_copy(model, x, y, steps=12)
    return bool(not np.all(np.isfinite(losses)))


def _gradient_explodes(model, x, y):
    _, norms, _ = _train_copy(model, x, y, steps=12)
    arr = np.asarray(norms)
    return bool(not np.all(np.isfinite(arr)) or arr.max() > 1e6 or arr.max() > 100 * arr[0])


def _dead_after_first_epoch(model, x, y):
    dead = lambda m: float((_layer_output(m, "h1", x).max(axis=0) == 0.0).mean())  # noqa: E731
    _, _, share = _train_copy(model, x, y, steps=12, probe=dead)
    return share > 0.7


def _sigmoid_saturated(model, x, y):
    h = _layer_output(model, "h1", x)
    return bool(((h < 0.01) | (h > 0.99)).mean() > 0.9)


def _sigmoid_head_on_digits(model, x, y):
    return bool(model.output_shape[-1] == 1 and y.max() > 1.0 and _predict(model, x).max() <= 1.0)


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
    Case("sgd_learning_rate_too_high", "Data Science Stack Exchange, 'Why is learning rate causing my neural "
         "network's weights to skyrocket?' (https://datascience.stackexchange.com/questions/15962); AUTOTRAINER / "
         "DeepFD learning-rate class", lambda bug: _sgd_mlp(1.0 if bug else 0.01),
         lambda rng: _housing_data(rng, center=True), ("divergence", "learning rate"), _diverges),
    # The two unscaled-data cases explode at step 0, before any update: the symptom is an exploding
    # gradient and the culprit the data (no loss history yet to call it a run-away).
    Case("unscaled_house_features", "Cross Validated, 'Simple Linear Regression in Keras' "
         "(https://stats.stackexchange.com/questions/284189): SGD on raw feature columns, nan loss",
         lambda bug: _unscaled_houses(standardise=not bug), _house_rows, ("exploding", "inputs"), _diverges),
    Case("unscaled_dollar_targets", "Cross Validated, 'Simple Linear Regression in Keras' "
         "(https://stats.stackexchange.com/questions/284189), unscaled y; DeepFD preprocessing class",
         lambda bug: _dollar_targets(scaled=not bug), _dollars, ("exploding", "targets"), _diverges),
    Case("relu_output_categorical_crossentropy", "Keras issue #12096, 'Simple CNN not learning at all' "
         "(https://github.com/keras-team/keras/issues/12096)",
         lambda bug: _relu_head_cnn("relu" if bug else "softmax"), _two_kinds_of_images,
         ("head_mismatch", "cnn2/out"), _zero_outputs),
    Case("relu_on_logits", "huyng/tensorflow-vgg issue #13, 'ReLU applied to logits' "
         "(https://github.com/huyng/tensorflow-vgg/issues/13)",
         lambda bug: _relu_logits_vgg("relu" if bug else None), _ten_classes_rgb, ("head_mismatch", "vgg/fc8"),
         _zero_outputs),
    Case("tanh_head_on_prices", "LSTM price forecaster with a tanh output on unscaled prices; the head removed "
         "in pytorch/examples#250 (https://github.com/pytorch/examples/pull/250)",
         lambda bug: _tanh_price_lstm("tanh" if bug else None), _price_windows,
         ("head_mismatch", "lstm_price/price"), _head_cannot_reach("price")),
    Case("labels_from_one", "rstudio/keras issue #465, 'Loss sparse_categorical_crossentropy indexing issue' "
         "(https://github.com/rstudio/keras3/issues/465)", lambda bug: _iris(3 if bug else 4), _iris_data,
         ("labels_out_of_range", "targets"), _labels_past_the_head),
    Case("siamese_distance_without_epsilon", "Keras example 'Image similarity estimation using a Siamese Network "
         "with a contrastive loss' (https://keras.io/examples/vision/siamese_contrastive/) without its epsilon; "
         "TensorFlow issues #12071, #30199", lambda bug: _siamese(0.0 if bug else 1e-7), _image_pairs,
         ("nan", "siamese/distance"), _nan_gradient),
    Case("standardise_constant_column", "fastai issue #889, 'Normalization for tabulardata produces nan for "
         "constant columns' (https://github.com/fastai/fastai/issues/889); Keras issue #2960",
         lambda bug: _batch_standardise(0.0 if bug else 1e-6), _table_with_constant_column,
         ("nan", "tab/standardise"), _nan_output("standardise")),
    Case("crossentropy_without_clipping", "TensorFlow-Examples issue #383, '[Potential NAN bug] Loss may become "
         "NAN during training' (https://github.com/aymericdamien/TensorFlow-Examples/issues/383)",
         lambda bug: _logistic_regression(clipped=not bug), _mnist_onehot, ("nan", "loss"),
         _nan_loss_in_first_epoch),
    Case("relu_lstm_long_sequences", "Stack Overflow, 'Why am I getting NaN after adding relu activation in "
         "LSTM?' (https://stackoverflow.com/questions/55322991); Keras issue #2194",
         lambda bug: _relu_lstm("relu" if bug else "tanh"), _long_sequences, ("exploding", "rnn/lstm"),
         _gradient_explodes),
    # Adam at 0.5 makes the loss run away (149 after one epoch) before the ReLU units die: the fix is the
    # learning rate, so the learning rate is the culprit.
    Case("dying_relu_high_learning_rate", "AUTOTRAINER (ICSE 2021), dying ReLU from a large learning rate; Keras "
         "issue #7057 (https://github.com/keras-team/keras/issues/7057)",
         lambda bug: _high_lr_relu_mlp(0.5 if bug else 1e-3), _pixels01, ("divergence", "learning rate"),
         _dead_after_first_epoch),
    Case("sigmoid_on_raw_pixels", "Keras issue #6914, 'MNIST not learning' "
         "(https://github.com/keras-team/keras/issues/6914), with sigmoid hidden layers",
         lambda bug: _raw_pixel_mlp(scale=not bug), _raw_pixels, ("saturation", "pixels/h1"), _sigmoid_saturated),
    Case("binary_crossentropy_on_digits", "Data Science Stack Exchange, 'Too low accuracy on MNIST dataset using a "
         "neural network' (https://datascience.stackexchange.com/questions/38604)",
         lambda bug: _digits_bce(multiclass=not bug), _raw_pixels, ("head_mismatch", "digits/out"),
         _sigmoid_head_on_digits),
]
BY_NAME = {c.name: c for c in CASES}
# run by tests/test_precision.py on every CI run (the scorer runs them all)
TESTED = ("softmax_over_one_unit", "sigmoid_on_house_prices", "relu_on_standardised_targets",
          "crossentropy_on_raw_scores", "normal_init_deep_mlp", "negative_bias_relu", "sgd_learning_rate_too_high",
          "labels_from_one", "siamese_distance_without_epsilon")
