"""Small real models shared by the tests (each built from a fixed seed)."""

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops


def two_embedding(n_users=200, n_items=80, name="outer"):
    """The mission's model: an outer model around an inner model with two Embedding layers."""
    user = keras.Input((1,), dtype="int32", name="user")
    item = keras.Input((1,), dtype="int32", name="item")
    u = layers.Flatten(name="user_vec")(layers.Embedding(n_users, 8, name="user_emb")(user))
    i = layers.Flatten(name="item_vec")(layers.Embedding(n_items, 4, name="item_emb")(item))
    inner = keras.Model([user, item], layers.Concatenate(name="concat")([u, i]), name="inner")
    user2 = keras.Input((1,), dtype="int32", name="user")
    item2 = keras.Input((1,), dtype="int32", name="item")
    z = layers.Dense(16, activation="relu", name="hidden")(inner([user2, item2]))
    out = layers.Dense(1, activation="sigmoid", name="out")(z)
    return keras.Model([user2, item2], out, name=name)


def two_embedding_data(n=256, n_users=200, n_items=80, seed=0):
    rng = np.random.default_rng(seed)
    x = [rng.integers(0, n_users, (n, 1)).astype("int32"), rng.integers(0, n_items, (n, 1)).astype("int32")]
    y = (rng.random((n, 1)) < 0.4).astype("float32")
    return x, y


class Block(layers.Layer):
    def __init__(self, units, **kw):
        super().__init__(**kw)
        self.dense_a = layers.Dense(units, activation="relu", name="dense_a")
        self.dense_b = layers.Dense(units, name="dense_b")
        self.norm = layers.LayerNormalization(name="norm")

    def call(self, x):
        return self.norm(x + self.dense_b(self.dense_a(x)))


class Subclassed(keras.Model):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.stem = layers.Dense(16, name="stem")
        self.blocks = [Block(16, name="block_0"), Block(16, name="block_1")]
        self.head = layers.Dense(3, activation="softmax", name="head")

    def call(self, x, training=False):
        h = self.stem(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def subclassed():
    return Subclassed(name="net")


def dense_data(n=240, d=10, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    y = rng.integers(0, classes, (n,)).astype("int32")
    return x, y


def cnn():
    inp = keras.Input((12, 12, 1))
    h = layers.Conv2D(8, 3, activation="relu", name="conv1")(inp)
    h = layers.BatchNormalization(name="bn1")(h)
    h = layers.MaxPooling2D(name="pool")(h)
    h = layers.Dropout(0.3, name="drop")(h)
    h = layers.Flatten(name="flat")(h)
    out = layers.Dense(3, activation="softmax", name="head")(h)
    return keras.Model(inp, out, name="cnn")


def image_data(n=192, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 12, 12, 1)).astype("float32")
    y = rng.integers(0, 3, (n,)).astype("int32")
    return x, y


def lstm(vocab=60):
    inp = keras.Input((10,), dtype="int32")
    h = layers.Embedding(vocab, 8, mask_zero=True, name="tok_emb")(inp)
    h = layers.LSTM(12, name="lstm")(h)
    out = layers.Dense(1, activation="sigmoid", name="out")(h)
    return keras.Model(inp, out, name="seq")


def seq_data(n=160, vocab=60, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(1, vocab, (n, 10)).astype("int32")
    lengths = rng.integers(3, 11, n)
    for r, ln in enumerate(lengths):
        x[r, ln:] = 0  # padding
    y = (rng.random((n, 1)) < 0.5).astype("float32")
    return x, y


@keras.saving.register_keras_serializable(package="gradtrace_tests")
class NaNAtStep(layers.Layer):
    """Identity, except that at optimizer step ``at`` it multiplies its input by NaN.

    The step is read from a counter that this layer increments at every call in
    training, so the fault appears at a known step and nowhere else.
    """

    def __init__(self, at, value=float("nan"), **kw):
        super().__init__(**kw)
        self.at = at
        self.value = value

    def build(self, shape):
        self.calls = self.add_weight(shape=(), initializer="zeros", trainable=False, name="calls")

    def call(self, x, training=False):
        if not training:
            return x
        c = tf.identity(self.calls.value)  # read before the increment
        self.calls.assign_add(1.0)
        factor = ops.where(ops.equal(c, float(self.at)), self.value, 1.0)
        return x * ops.cast(factor, x.dtype)

    def get_config(self):
        return {**super().get_config(), "at": self.at, "value": self.value}


def two_embedding_with_fault(at, name="outer"):
    """The mission's model with a NaN injected inside the inner model at step ``at``."""
    user = keras.Input((1,), dtype="int32", name="user")
    item = keras.Input((1,), dtype="int32", name="item")
    u = layers.Flatten(name="user_vec")(layers.Embedding(200, 8, name="user_emb")(user))
    i = layers.Flatten(name="item_vec")(layers.Embedding(80, 4, name="item_emb")(item))
    c = layers.Concatenate(name="concat")([u, i])
    inner = keras.Model([user, item], NaNAtStep(at, name="faulty")(c), name="inner")
    user2 = keras.Input((1,), dtype="int32", name="user")
    item2 = keras.Input((1,), dtype="int32", name="item")
    z = layers.Dense(16, activation="relu", name="hidden")(inner([user2, item2]))
    z = layers.BatchNormalization(name="bn")(z)
    out = layers.Dense(1, activation="sigmoid", name="out")(z)
    return keras.Model([user2, item2], out, name=name)


def weights_of(model):
    return [np.array(w) for w in model.get_weights()]


def tf_dataset(x, y, batch):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)
