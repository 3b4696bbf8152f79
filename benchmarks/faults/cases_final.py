"""The final held-out ports: eight published training bugs with their published fixes, ported to Keras 3
without reading the debugger (its code, tests, docs or scorer) and without running it, on synthetic data of
the originals' shapes and scales, in the ``Case`` format of ``benchmarks/faults/cases.py``. They are scored
once, at the end, and never tuned against: nothing here was adjusted after seeing a debugger result.

Each case is a published program (a GitHub issue or pull request, a Keras example, a blog post) whose training
goes wrong for a reason different from the other cases here and from those of ``cases.py``,
``cases_blind.py`` and ``cases_heldout.py``: a percentage error divided by zero-valued targets, an optimizer
default that changed between libraries, multi-hot rows fed to an Embedding, an LSTM given one time step, a
stack of Dense layers with no activation between them, CIFAR rows reshaped in the wrong channel order, a
custom loss summed over the batch, and a pooling layer that collapses a series to one number.
``expected`` is a guess at the detector's name (short snake_case name of the property broken) and the layer
at fault; ``symptom`` checks the fault with plain Keras/NumPy (a forward pass, the loss's own gradient, or a
short plain ``fit`` of a throwaway copy), true on the buggy version and false on the fix.
"""

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from benchmarks.faults.cases import Case
from benchmarks.faults.cases_heldout import _digit_prototypes

_N = 384  # examples per data set, as in cases.py


def _predict(model, x, n=128, training=False):
    return np.asarray(model(x[:n], training=training))


def _loss_grad(model, x, y, variables, n=128):
    """The gradient of the compiled loss (mean over ``n`` examples) with respect to ``variables``."""
    loss_fn = keras.losses.get(model.loss)
    with tf.GradientTape() as tape:
        loss = ops.mean(loss_fn(tf.constant(y[:n]), model(x[:n], training=True)))
    return tape.gradient(loss, variables)


def _throwaway_copy(model):
    """A clone with the same weights, compiled with a fresh optimizer of the same configuration."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    optimizer = type(model.optimizer).from_config(model.optimizer.get_config())
    clone.compile(optimizer=optimizer, loss=model.loss)
    return clone


def _digits(rng, n=_N):
    """28x28x1 digit-like images in [0, 1] (MNIST divided by 255) and their one-hot class."""
    protos = _digit_prototypes(rng)
    c = rng.integers(0, 10, n)
    keep = rng.random((n, 784)) > 0.2  # strokes vary from one example to the next
    x = np.clip(protos[c] * keep + 0.1 * rng.random((n, 784)), 0.0, 1.0).astype("float32")
    return x.reshape(n, 28, 28, 1), np.eye(10, dtype="float32")[c]


def _hourly_load(rng, hours):
    """An hourly electricity load series (daily and weekly cycle, temperature effect, noise) with the
    temperature series that drives it."""
    t = np.arange(hours)
    hour, day = t % 24, t // 24
    temp = 12 + 6 * np.sin(2 * np.pi * (day - 100) / 365) + 4 * np.sin(2 * np.pi * (hour - 9) / 24)
    temp = temp + rng.normal(0, 1.5, hours)
    load = (6000 + 1500 * np.sin(2 * np.pi * (hour - 8) / 24) - 900 * (day % 7 >= 5) + 60 * temp
            + 400 * np.sin(2 * np.pi * t / 97.0) + rng.normal(0, 150, hours))
    return load, temp, hour, day


# ---- 1. MAPE divided by targets that are exactly zero ---------------------------------------------------


def _mape_unguarded(y_true, y_pred):
    """The objective of keras-team/keras#333 as first submitted: ``abs((y_true - y_pred) / y_true)``, times
    100 (here averaged over the last axis, per example)."""
    return 100.0 * ops.mean(ops.abs((y_true - y_pred) / y_true), axis=-1)


def _mape_nonzero(y_true, y_pred):
    """keras-team/keras#2908's MAPE: examples whose label is 0 are left out of the percentage error."""
    nonzero = ops.cast(ops.not_equal(y_true, 0.0), y_pred.dtype)
    safe = ops.where(ops.equal(y_true, 0.0), ops.ones_like(y_true), y_true)
    err = ops.sum(nonzero * ops.abs((y_true - y_pred) / safe), axis=-1)
    return 100.0 * err / ops.maximum(ops.sum(nonzero, axis=-1), 1.0)


def _load_mlp(buggy):
    """keras-team/keras#333, "Add MAPE objective" (a load-forecasting user's mean absolute percentage error,
    ``abs((y_true - y_pred) / y_true).mean() * 100``), where fchollet points out that labels are very often 0
    and "In this case 0 labels would trigger a NaN", and keras-team/keras#2908, "mape loss if the
    label is 0", whose author's load targets contain zeros and who wants them left out. Here an hourly-load
    regressor (Dense(64, relu), Dense(64, relu), Dense(1), adam; the PR shows no model) on MinMax-scaled load
    with metering gaps recorded as 0: one zero label in a batch makes the loss infinite and its gradient NaN.
    Fix (#2908): leave the zero labels out of the percentage error."""
    inp = keras.Input((6,), name="features")
    h = layers.Dense(64, activation="relu", name="dense")(inp)
    h = layers.Dense(64, activation="relu", name="dense_1")(h)
    out = layers.Dense(1, name="dense_2")(h)
    m = keras.Model(inp, out, name="load_mlp")
    m.compile(optimizer="adam", loss=_mape_unguarded if buggy else _mape_nonzero)
    return m


def _load_with_gaps(rng):
    """Six features per hour (hour of day as sin/cos, weekend flag, standardised temperature, the load one hour
    and one day before) and the load of that hour, MinMax-scaled to [0, 1]; one hour in 47 is a metering gap
    recorded as 0."""
    load, temp, hour, day = _hourly_load(rng, _N + 24)
    load[np.arange(len(load)) % 47 == 0] = 0.0
    load = (load - load.min()) / (load.max() - load.min())  # MinMaxScaler: the gaps map to exactly 0
    t = np.arange(24, _N + 24)
    x = np.stack([np.sin(2 * np.pi * hour[t] / 24), np.cos(2 * np.pi * hour[t] / 24), (day[t] % 7 >= 5),
                  (temp[t] - temp.mean()) / temp.std(), load[t - 1], load[t - 24]], axis=1)
    return x.astype("float32"), load[t][:, None].astype("float32")


def _loss_not_finite(model, x, y):
    """The compiled loss of the untrained model on the first 128 examples is infinite or NaN."""
    loss = keras.losses.get(model.loss)(tf.constant(y[:128]), tf.constant(_predict(model, x)))
    return bool(not np.isfinite(float(ops.mean(loss))))


# ---- 2. Adadelta's default learning rate: 1.0 in Keras, 0.001 in tf.keras -------------------------------


def _mnist_cnn(buggy):
    """tensorflow/tensorflow#31905, "mnist_cnn.py major performance loss after switching to TF 1.14" (also
    keras-team/keras#13815 and tensorflow/tensorflow#39083): the Keras examples/mnist_cnn.py (Conv2D(32),
    Conv2D(64), MaxPooling2D, Dropout(0.25), Flatten, Dense(128, relu), Dropout(0.5), Dense(10, softmax),
    categorical_crossentropy, ``keras.optimizers.Adadelta()``) reaches under 85% instead of 99.25% with
    tf.keras, whose Adadelta defaults to learning_rate=0.001 where Keras' defaulted to 1.0 (the rate Adadelta's
    unit correction is designed around): every update is about a thousand times too small. Fix (the
    maintainers' answer): ``Adadelta(learning_rate=1.0)``."""
    inp = keras.Input((28, 28, 1), name="image")
    h = layers.Conv2D(32, (3, 3), activation="relu", name="conv2d")(inp)
    h = layers.Conv2D(64, (3, 3), activation="relu", name="conv2d_1")(h)
    h = layers.MaxPooling2D((2, 2), name="max_pooling2d")(h)
    h = layers.Dropout(0.25, name="dropout")(h)
    h = layers.Flatten(name="flatten")(h)
    h = layers.Dense(128, activation="relu", name="dense")(h)
    h = layers.Dropout(0.5, name="dropout_1")(h)
    out = layers.Dense(10, activation="softmax", name="dense_1")(h)
    m = keras.Model(inp, out, name="mnist_cnn")
    opt = keras.optimizers.Adadelta() if buggy else keras.optimizers.Adadelta(learning_rate=1.0)
    m.compile(optimizer=opt, loss="categorical_crossentropy")
    return m


def _weights_barely_move(model, x, y):
    """One epoch of plain ``fit`` on a throwaway copy moves the weights by under 1% of their norm."""
    clone = _throwaway_copy(model)
    before = [np.array(w) for w in clone.get_weights()]
    clone.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    after = clone.get_weights()
    moved = np.sqrt(sum(float(np.sum((a - b) ** 2)) for a, b in zip(after, before)))
    norm = np.sqrt(sum(float(np.sum(b ** 2)) for b in before))
    return bool(moved / norm < 0.01)


# ---- 3. multi-hot rows (texts_to_matrix) fed to an Embedding --------------------------------------------


def _bow_classifier(buggy, vocab=1000):
    """keras-team/keras#2505, "Is there anyway to pass one-hot binary vector as input and embed it?" (and
    keras-team/keras#7607, "Can it be used to embed a tfidf or a one hot encoded version of text?"): the
    Embedding layer takes integer indices; given binary rows it casts the 0/1 entries to indices and embeds
    each of them (braingineer: a (4, 3) binary matrix "will embed all indices", giving (4, 3, d)), so only rows
    0 and 1 of the embedding matrix are ever looked up. Here a sentiment model on the multi-hot output of
    ``Tokenizer.texts_to_matrix(mode='binary')`` (Embedding(1000, 16), GlobalAveragePooling1D, Dense(1,
    sigmoid), adam): after pooling, a review is only the number of distinct words it contains. Fix (the
    answer): multiply the binary vectors by the embedding matrix, i.e. a Dense(16, use_bias=False)."""
    inp = keras.Input((vocab,), name="bag_of_words")
    if buggy:
        h = layers.Embedding(vocab, 16, name="embedding")(inp)
        h = layers.GlobalAveragePooling1D(name="pooling")(h)
    else:
        h = layers.Dense(16, use_bias=False, name="embedding")(inp)
    out = layers.Dense(1, activation="sigmoid", name="dense")(h)
    m = keras.Model(inp, out, name="bow_classifier")
    m.compile(optimizer="adam", loss="binary_crossentropy")
    return m


def _multi_hot_reviews(rng, vocab=1000):
    """Reviews of 40 Zipf-distributed words (index 0 is never used, as with Keras' Tokenizer) as binary rows;
    positive reviews contain three words from ids 20-39, negative ones three from ids 40-59."""
    p = 1.0 / np.arange(1, vocab)
    p /= p.sum()
    words = rng.choice(np.arange(1, vocab), size=(_N, 40), p=p)
    y = rng.integers(0, 2, _N)
    planted = np.where(y[:, None] == 1, rng.integers(20, 40, (_N, 3)), rng.integers(40, 60, (_N, 3)))
    x = np.zeros((_N, vocab), "float32")
    for i in range(_N):
        x[i, words[i]] = 1.0
        x[i, planted[i]] = 1.0
    return x, y.astype("float32")[:, None]


def _embedding_sees_bits(model, x, y):
    """The model embeds its input with an Embedding layer, and the indices it looks up in the first 128
    examples are at most two of its rows (the 0/1 values of the binary rows)."""
    layer = model.get_layer("embedding")
    if not isinstance(layer, layers.Embedding):
        return False
    used = np.unique(x[:128].astype("int32"))
    return len(used) <= 2 and layer.input_dim > 10 * len(used)


# ---- 4. an LSTM fed windows as one time step -------------------------------------------------------------


def _load_lstm(buggy, steps=24, feats=3):
    """dafrie/lstm-load-forecasting#3, "About timesteps": the repository's load-forecasting LSTMs are fed
    each row of lagged features reshaped to ``(samples, timesteps=1, features)``; "if timesteps=[1], the RNN
    only is usual MLP", and the author agrees that "the network does not have knowledge about previous data and
    the whole point of RNN/LSTM would be moot". With one step from a zero state the recurrent weights multiply
    zeros, never act and get no gradient. Here the last 24 hours of (load, temperature, hour) flattened into
    72 features, LSTM(50), Dense(1), mse, adam (kept stateless: a Keras 3 stateful layer needs a fixed batch
    size). Fix (the issue's suggestion): feed the window as 24 time steps of 3 features."""
    inp = keras.Input((steps * feats,), name="window")
    h = layers.Reshape((1, steps * feats) if buggy else (steps, feats), name="reshape")(inp)
    h = layers.LSTM(50, name="lstm")(h)
    out = layers.Dense(1, name="dense")(h)
    m = keras.Model(inp, out, name="load_lstm")
    m.compile(optimizer="adam", loss="mse")
    return m


def _load_windows(rng):
    """The last 24 hours of MinMax-scaled load, scaled temperature and hour/23, interleaved hour by hour into
    72 features, and the next hour's scaled load."""
    load, temp, hour, _ = _hourly_load(rng, _N + 24)
    load = (load - load.min()) / (load.max() - load.min())
    temp = (temp - temp.min()) / (temp.max() - temp.min())
    x = np.stack([np.stack([load[i:i + 24], temp[i:i + 24], hour[i:i + 24] / 23.0], axis=1).reshape(-1)
                  for i in range(_N)])
    return x.astype("float32"), load[24:_N + 24][:, None].astype("float32")


def _recurrent_kernel_idle(model, x, y):
    """The loss's gradient with respect to the LSTM's recurrent kernel is exactly zero."""
    g = _loss_grad(model, x, y, model.get_layer("lstm").cell.recurrent_kernel)
    return bool(np.max(np.abs(np.asarray(g))) == 0.0)


# ---- 5. stacked Dense layers with no activation between them ---------------------------------------------


def _mnist_grid_cnn(buggy, dense_layer_sizes=(64, 64)):
    """keras-team/keras#9286, "keras/examples/mnist_sklearn_wrapper.py line 67": the example's ``make_model``
    adds ``for layer_size in dense_layer_sizes: model.add(Dense(layer_size))`` and only one
    Activation('relu') after the loop; "Multi dense layers should add activation, otherwise one dense layer is
    enough" (the maintainers: "We have updated the code"). The grid's [64, 64] candidate is one linear map of
    rank 64 written as two. Here that candidate with filters=8, kernel 3, pool 2 (Conv2D, relu, Conv2D, relu,
    MaxPooling2D, Dropout(0.25), Flatten, Dense(64), Dense(64), relu, Dropout(0.5), Dense(10), softmax,
    categorical_crossentropy, Adadelta at the Keras default of the time, learning_rate=1.0). Fix: an
    Activation('relu') after every Dense of the loop."""
    inp = keras.Input((28, 28, 1), name="image")
    h = layers.Conv2D(8, (3, 3), padding="valid", name="conv2d")(inp)
    h = layers.Activation("relu", name="activation")(h)
    h = layers.Conv2D(8, (3, 3), name="conv2d_1")(h)
    h = layers.Activation("relu", name="activation_1")(h)
    h = layers.MaxPooling2D(pool_size=(2, 2), name="max_pooling2d")(h)
    h = layers.Dropout(0.25, name="dropout")(h)
    h = layers.Flatten(name="flatten")(h)
    k = 2
    for i, size in enumerate(dense_layer_sizes):
        h = layers.Dense(size, name="dense" if i == 0 else f"dense_{i}")(h)
        if not buggy:
            h = layers.Activation("relu", name=f"activation_{k}")(h)
            k += 1
    if buggy:
        h = layers.Activation("relu", name=f"activation_{k}")(h)
        k += 1
    h = layers.Dropout(0.5, name="dropout_1")(h)
    h = layers.Dense(10, name=f"dense_{len(dense_layer_sizes)}")(h)
    out = layers.Activation("softmax", name=f"activation_{k}")(h)
    m = keras.Model(inp, out, name="mnist_grid_cnn")
    m.compile(optimizer=keras.optimizers.Adadelta(learning_rate=1.0), loss="categorical_crossentropy")
    return m


def _dense_stack_is_linear(model, x, y):
    """The layers from Flatten to the last Dense of the stack compute an affine map of the flattened
    features: g(a + b) - g(a) - g(b) + g(0) vanishes (relative to g(a)) on real examples."""
    names = [layer.name for layer in model.layers]
    stack = model.layers[names.index("flatten") + 1:names.index("dense_1") + 1]
    flat = np.asarray(keras.Model(model.inputs, model.get_layer("flatten").output)(x[:64]))

    def g(h):
        h = tf.constant(h)
        for layer in stack:
            h = layer(h, training=False) if isinstance(layer, layers.Dropout) else layer(h)
        return np.asarray(h)

    a, b = flat[:32], flat[32:64]
    gap = g(a + b) - g(a) - g(b) + g(np.zeros_like(a))
    return float(np.abs(gap).mean() / (np.abs(g(a)).mean() + 1e-12)) < 1e-4


# ---- 6. CIFAR-10 rows reshaped to (32, 32, 3) instead of (3, 32, 32) --------------------------------------


def _cifar_cnn(buggy):
    """Blog post "关于cifar-10数据集读取问题" (blog.csdn.net/weixin_41855385/article/details/84474721, mirrored
    at e-learn.cn/topic/1420849): a row of the CIFAR-10 python batches holds 3072 bytes, the first 1024 the
    red channel, the next 1024 the green, the last 1024 the blue, each plane row by row, and reshaping it
    directly to 32x32x3 garbles the data (使用reshape会发现数据错乱): each "pixel" then holds three
    neighbouring values of one colour plane, and the top, middle and bottom thirds of the image are the red,
    green and blue planes, each squeezed. Here a small CNN on the raw rows (Rescaling(1/255), the reshape,
    Conv2D(32), MaxPooling2D, Conv2D(64), MaxPooling2D, Flatten, Dense(64, relu), Dense(10, softmax), adam).
    Fix (the post's): reshape to (3, 32, 32), then transpose to (32, 32, 3)."""
    inp = keras.Input((3072,), name="pixels")
    h = layers.Rescaling(1.0 / 255, name="rescaling")(inp)
    if buggy:
        h = layers.Reshape((32, 32, 3), name="reshape")(h)
    else:
        h = layers.Reshape((3, 32, 32), name="reshape")(h)
        h = layers.Permute((2, 3, 1), name="permute")(h)
    h = layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2d")(h)
    h = layers.MaxPooling2D(name="max_pooling2d")(h)
    h = layers.Conv2D(64, 3, padding="same", activation="relu", name="conv2d_1")(h)
    h = layers.MaxPooling2D(name="max_pooling2d_1")(h)
    h = layers.Flatten(name="flatten")(h)
    h = layers.Dense(64, activation="relu", name="dense")(h)
    out = layers.Dense(10, activation="softmax", name="dense_1")(h)
    m = keras.Model(inp, out, name="cifar_cnn")
    m.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return m


def _cifar_rows(rng):
    """CIFAR-like 32x32 colour images (a class-coloured blob on a shaded background, bytes 0-255) stored as
    the python batches store them: one row per image, the red plane, then green, then blue."""
    palette = rng.uniform(30, 225, (10, 3))
    c = rng.integers(0, 10, _N)
    r, q = np.mgrid[0:32, 0:32]
    imgs = np.empty((_N, 32, 32, 3), "float32")
    for i in range(_N):
        u, v, w = rng.uniform(8, 24), rng.uniform(8, 24), rng.uniform(4, 9)
        blob = np.exp(-((r - u) ** 2 + (q - v) ** 2) / (2 * w ** 2))[..., None]
        background = rng.uniform(60, 200, 3) * (0.7 + 0.3 * r[..., None] / 31)
        imgs[i] = blob * palette[c[i]] + (1 - blob) * background + rng.normal(0, 4, (32, 32, 3))
    imgs = np.clip(np.round(imgs), 0, 255)
    return imgs.transpose(0, 3, 1, 2).reshape(_N, 3072).astype("float32"), c.astype("int32")


def _conv_sees_scrambled_image(model, x, y):
    """The tensor the first convolution receives is not the picture the row encodes (decoded as the CIFAR
    page documents: planes R, G, B of 32x32, row-major, divided by 255)."""
    seen = np.asarray(keras.Model(model.inputs, model.get_layer("conv2d").input)(x[:64]))
    picture = x[:64].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1) / 255.0
    return float(np.abs(seen - picture).max()) > 1e-3


# ---- 7. a focal loss summed over the mini-batch ------------------------------------------------------------


def _binary_focal_loss(reduce, gamma=2.0, alpha=0.25):
    """umbertogriffo/focal-loss-keras' ``binary_focal_loss`` as of commit f52d2cb (``reduce`` = sum), and as
    fixed by commit 0e23b7b (``reduce`` = mean)."""

    def binary_focal_loss_fixed(y_true, y_pred):
        pt_1 = ops.where(ops.equal(y_true, 1), y_pred, ops.ones_like(y_pred))
        pt_0 = ops.where(ops.equal(y_true, 0), y_pred, ops.zeros_like(y_pred))
        eps = keras.backend.epsilon()
        pt_1 = ops.clip(pt_1, eps, 1.0 - eps)
        pt_0 = ops.clip(pt_0, eps, 1.0 - eps)
        return (-reduce(alpha * ops.power(1.0 - pt_1, gamma) * ops.log(pt_1))
                - reduce((1 - alpha) * ops.power(pt_0, gamma) * ops.log(1.0 - pt_0)))

    return binary_focal_loss_fixed


def _fraud_mlp(buggy):
    """umbertogriffo/focal-loss-keras#5, "different batchsize different loss value" (labelled bug): the
    repository's ``binary_focal_loss`` returned ``-K.sum(alpha * K.pow(1. - pt_1, gamma) * K.log(pt_1)) -
    K.sum(...)``, a sum over every example of the mini-batch, so "the loss value vary from the batchsize" and
    the gradient with it. Here its README usage, ``model.compile(loss=[binary_focal_loss(alpha=.25,
    gamma=2)], optimizer=adam)``, on an imbalanced fraud-detection MLP (30 features, Dense(32, relu),
    Dense(16, relu), Dense(1, sigmoid)). Fix (pull request #10, commit 0e23b7b, "compute mean loss so that it
    is not dependent on batch size"): K.mean instead of K.sum."""
    inp = keras.Input((30,), name="transaction")
    h = layers.Dense(32, activation="relu", name="dense")(inp)
    h = layers.Dense(16, activation="relu", name="dense_1")(h)
    out = layers.Dense(1, activation="sigmoid", name="dense_2")(h)
    m = keras.Model(inp, out, name="fraud_mlp")
    m.compile(optimizer="adam", loss=_binary_focal_loss(ops.sum if buggy else ops.mean))
    return m


def _transactions(rng):
    """Thirty standardised PCA-like features; about 8% of transactions are frauds, shifted along a few of
    them."""
    y = (rng.random(_N) < 0.08).astype("float32")
    x = rng.normal(size=(_N, 30))
    x[:, :5] += 1.5 * y[:, None] * rng.choice([-1, 1], 5)
    return x.astype("float32"), y[:, None]


def _loss_grows_with_batch(model, x, y):
    """The compiled loss of the same 32 predictions, repeated twice as one batch of 64, is more than 1.5
    times the loss of the 32: it is a sum over the batch, not an average."""
    p = tf.constant(_predict(model, x, n=32))
    t = tf.constant(y[:32])
    once = float(model.loss(t, p))
    twice = float(model.loss(tf.concat([t, t], 0), tf.concat([p, p], 0)))
    return twice > 1.5 * once


# ---- 8. GlobalAveragePooling1D over the time axis of a one-feature series --------------------------------


def _fordA_transformer(buggy, head_size=16, num_heads=1, ff_dim=4, num_blocks=1):
    """keras-team/keras-io#1813, "model not converging the sparse categorical accuracy stays same for the
    whole epochs" (also keras-team/keras#20627, keras-team/keras-io#1908, labelled bug): the keras.io example
    "Timeseries classification with a Transformer model" on FordA (500 steps, 1 feature) pools the encoder's
    output with ``GlobalAveragePooling1D(data_format="channels_last")``, which averages over the 500 time steps
    of the single feature and hands the head one number per series (keras-team/keras-io#1733: "model stopped
    learning and training can't progress anymore"; #20627: accuracy about 50%); the series are z-normalised,
    so that number is nearly the same for all of them. Here the example cut to one small block to run on a
    CPU in seconds (head_size 16, 1 head, ff_dim 4, 1 block instead of 256, 4, 4, 4; mlp_units [128], dropout
    0.25/0.4, Adam(1e-4)). Fix (the thread's, keras-team/keras-io#2006): ``data_format="channels_first"``,
    which keeps the 500 values."""
    inp = keras.Input((500, 1), name="series")
    x = inp
    for b in range(num_blocks):
        a = layers.MultiHeadAttention(key_dim=head_size, num_heads=num_heads, dropout=0.25,
                                      name=f"multi_head_attention_{b}")(x, x)
        a = layers.Dropout(0.25, name=f"attention_dropout_{b}")(a)
        a = layers.LayerNormalization(epsilon=1e-6, name=f"attention_norm_{b}")(a)
        res = layers.Add(name=f"attention_residual_{b}")([a, x])
        f = layers.Conv1D(filters=ff_dim, kernel_size=1, activation="relu", name=f"ff_conv1d_{b}")(res)
        f = layers.Dropout(0.25, name=f"ff_dropout_{b}")(f)
        f = layers.Conv1D(filters=1, kernel_size=1, name=f"ff_conv1d_out_{b}")(f)
        f = layers.LayerNormalization(epsilon=1e-6, name=f"ff_norm_{b}")(f)
        x = layers.Add(name=f"ff_residual_{b}")([f, res])
    x = layers.GlobalAveragePooling1D(data_format="channels_last" if buggy else "channels_first",
                                      name="global_average_pooling1d")(x)
    x = layers.Dense(128, activation="relu", name="dense")(x)
    x = layers.Dropout(0.4, name="dropout")(x)
    out = layers.Dense(2, activation="softmax", name="dense_1")(x)
    m = keras.Model(inp, out, name="fordA_transformer")
    m.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-4), loss="sparse_categorical_crossentropy")
    return m


def _engine_noise(rng):
    """FordA-like series: 500 samples of engine noise, z-normalised per series; class 1 carries a burst of a
    second harmonic in the middle third."""
    t = np.arange(500)
    y = rng.integers(0, 2, _N)
    f0 = rng.uniform(0.02, 0.05, _N)[:, None]
    x = np.sin(2 * np.pi * f0 * t + rng.uniform(0, 6.3, (_N, 1))) + 0.5 * rng.normal(size=(_N, 500))
    burst = np.exp(-((t - 250) / 60.0) ** 2) * np.sin(2 * np.pi * 2 * f0 * t)
    x = x + 1.5 * y[:, None] * burst
    x = (x - x.mean(axis=1, keepdims=True)) / x.std(axis=1, keepdims=True)
    return x[..., None].astype("float32"), y.astype("int32")


def _head_sees_one_number(model, x, y):
    """The features the classifier head receives hardly vary from one series to the next: every pooled
    feature has a spread under 1e-3 over the first 128 series."""
    pooled = np.asarray(keras.Model(model.inputs, model.get_layer("global_average_pooling1d").output)(x[:128]))
    return float(pooled.std(axis=0).max()) < 1e-3


FINAL_CASES = [
    Case("mape_on_zero_targets", "keras-team/keras#333, 'Add MAPE objective' (abs((y_true - y_pred) / y_true), "
         "'0 labels would trigger a NaN') and keras-team/keras#2908, 'mape loss if the lable is 0'",
         _load_mlp, _load_with_gaps, ("nan_loss", "load_mlp/dense_2"), _loss_not_finite),
    Case("adadelta_tf_keras_default_lr", "tensorflow/tensorflow#31905, 'mnist_cnn.py major performance loss "
         "after switching to TF 1.14' (tf.keras Adadelta default learning_rate 0.001 instead of 1.0); also "
         "keras-team/keras#13815", _mnist_cnn, _digits, ("vanishing_updates", "mnist_cnn/conv2d"),
         _weights_barely_move),
    Case("multi_hot_rows_into_embedding", "keras-team/keras#2505, 'Is there anyway to pass one-hot binary "
         "vector as input and embed it?' and keras-team/keras#7607 (texts_to_matrix output fed to Embedding)",
         _bow_classifier, _multi_hot_reviews, ("unused_embedding_rows", "bow_classifier/embedding"),
         _embedding_sees_bits),
    Case("lstm_single_timestep", "dafrie/lstm-load-forecasting#3, 'About timesteps' (lag features fed to an "
         "LSTM as (samples, 1, features))", _load_lstm, _load_windows,
         ("dead_recurrent_weights", "load_lstm/lstm"), _recurrent_kernel_idle),
    Case("stacked_dense_without_activation", "keras-team/keras#9286, 'keras/examples/mnist_sklearn_wrapper.py "
         "line 67' (Dense layers added in a loop with no activation between them)", _mnist_grid_cnn, _digits,
         ("collapsed_linear_layers", "mnist_grid_cnn/dense"), _dense_stack_is_linear),
    Case("cifar_rows_reshaped_channels_last", "blog.csdn.net/weixin_41855385/article/details/84474721, "
         "'关于cifar-10数据集读取问题' (CIFAR-10 rows reshaped to 32x32x3 instead of 3x32x32 then transposed)",
         _cifar_cnn, _cifar_rows, ("scrambled_input", "cifar_cnn/reshape"), _conv_sees_scrambled_image),
    Case("focal_loss_summed_over_batch", "umbertogriffo/focal-loss-keras#5, 'different batchsize different "
         "loss value'; fix pull request #10 (commit 0e23b7b, K.mean instead of K.sum)", _fraud_mlp,
         _transactions, ("batch_size_dependent_loss", "fraud_mlp/dense_2"), _loss_grows_with_batch),
    Case("pooling_collapses_series_to_scalar", "keras-team/keras-io#1813, 'model not converging the sparse "
         "categorical accuracy stays same for the whole epochs' (GlobalAveragePooling1D channels_last in the "
         "timeseries Transformer example); also keras-team/keras#20627; fix keras-team/keras-io#2006",
         _fordA_transformer, _engine_noise, ("information_bottleneck", "fordA_transformer/global_average_pooling1d"),
         _head_sees_one_number),
]
