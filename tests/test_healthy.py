"""Precision: the default detectors say nothing on ordinary, well-configured models.

Each test trains a small seeded model on synthetic data with a learnable signal
for at least 3 epochs of 20-30 steps (so dead_relu's patience of 20 and
vanishing's patience of 5 are reached many times over, and exploding's warm-up
of 10 steps is long past) and asserts that

- ``history.anomalies == []`` (the anomalies are printed on failure),
- every epoch ran and every step was applied (nothing halted),
- the loss went down (the model really trained),
- the detectors had something to look at: the ReLU outputs, the weight
  gradients of at least two layers, the Embedding ids (so a capture regression
  cannot make this suite pass vacuously).
"""

import keras
import numpy as np
from keras import layers

import gradtrace
from gradtrace.detectors import DEFAULT
from tests import models as M

HE = "he_normal"


# -- helpers ----------------------------------------------------------------------------
def _train(model, x, y, loss, *, epochs=3, batch_size=32, lr=1e-3, detectors=None):
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=loss)
    history = gradtrace.fit(
        model, x, y, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0, detectors=detectors
    )
    n = len(y) if not isinstance(y, (list, tuple)) else len(y[0])
    return history, epochs * -(-n // batch_size)


def _describe(anomalies):
    return "\n".join(
        f"  {a.detector} layer={a.layer} tensor={a.tensor} step={a.step} epoch={a.epoch} "
        f"value={a.value:.6g}\n    {a.message}\n    stats={a.stats}"
        for a in anomalies
    )


def _rows(history):
    """The rows of the traced step's statistics table (what the detectors saw)."""
    return history.gradtrace.engine.tables[True].rows


def _assert_healthy(model, history, steps, min_drop=0.1, relu_paths=(), ids_paths=()):
    anomalies = history.anomalies
    assert anomalies == [], f"{len(anomalies)} anomalies on a healthy model:\n{_describe(anomalies)}"
    assert [d.name for d in history.gradtrace.engine.detectors][: len(DEFAULT)] == list(DEFAULT)
    loss = history.history["loss"]
    assert len(loss) == history.params["epochs"], f"training stopped early: {loss}"
    assert int(model.optimizer.iterations) == steps, "some steps were not applied"
    assert np.all(np.isfinite(loss)), loss
    assert loss[-1] < (1.0 - min_drop) * loss[0], f"the loss did not go down enough: {loss}"

    rows = _rows(history)
    wg_layers = {r.path for r in rows if r.kind == "weight_gradient"}
    assert len(wg_layers) >= 2, f"vanishing needs >= 2 layers with weight gradients, saw {wg_layers}"
    relu_outputs = {r.path for r in rows if r.kind == "output" and r.relu}
    assert set(relu_paths) <= relu_outputs, f"ReLU outputs seen by dead_relu: {sorted(relu_outputs)}"
    ids = {r.path for r in rows if r.kind == "ids"}
    assert set(ids_paths) <= ids, f"Embedding ids seen: {sorted(ids)}"
    return rows


def _blobs(n, d, classes, seed, scale=1.0):
    """Gaussian inputs, labels from a fixed random linear map (learnable, roughly balanced)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    w = rng.normal(size=(d, classes))
    y = np.argmax(scale * x @ w + 0.3 * rng.normal(size=(n, classes)), axis=1).astype("int32")
    return x, y


# -- models -----------------------------------------------------------------------------
def test_mlp_relu_he_init():
    x, y = _blobs(960, 20, 4, seed=1)
    inp = keras.Input((20,))
    h = inp
    for i in range(4):
        h = layers.Dense(32, activation="relu", kernel_initializer=HE, name=f"dense_{i}")(h)
    out = layers.Dense(4, activation="softmax", name="head")(h)
    model = keras.Model(inp, out, name="mlp")
    history, steps = _train(model, x, y, "sparse_categorical_crossentropy")  # 30 steps/epoch
    _assert_healthy(model, history, steps, min_drop=0.3, relu_paths=[f"mlp/dense_{i}" for i in range(4)])


def _image_data(n, seed):
    """12x12 noise with a bright 4x4 patch in one of four quadrants: the quadrant is the class."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 0.5, size=(n, 12, 12, 1)).astype("float32")
    y = rng.integers(0, 4, n).astype("int32")
    for k, c in enumerate(y):
        r, s = divmod(int(c), 2)
        x[k, 1 + 6 * r : 5 + 6 * r, 1 + 6 * s : 5 + 6 * s, 0] += 1.5
    return x, y


def test_cnn_batchnorm_dropout():
    x, y = _image_data(640, seed=2)
    inp = keras.Input((12, 12, 1))
    # conv -> BN -> ReLU: the conv bias gradient is 0 by construction (BN removes the mean)
    h = layers.Conv2D(8, 3, padding="same", kernel_initializer=HE, name="conv1")(inp)
    h = layers.BatchNormalization(name="bn1")(h)
    h = layers.Activation("relu", name="relu1")(h)
    h = layers.MaxPooling2D(name="pool1")(h)
    # conv(ReLU) -> BN
    h = layers.Conv2D(16, 3, padding="same", activation="relu", kernel_initializer=HE, name="conv2")(h)
    h = layers.BatchNormalization(name="bn2")(h)
    h = layers.MaxPooling2D(name="pool2")(h)
    h = layers.Dropout(0.25, name="drop")(h)
    h = layers.Flatten(name="flat")(h)
    h = layers.Dense(32, activation="relu", kernel_initializer=HE, name="fc")(h)
    h = layers.Dropout(0.25, name="drop_fc")(h)
    out = layers.Dense(4, activation="softmax", name="head")(h)
    model = keras.Model(inp, out, name="cnn")
    history, steps = _train(model, x, y, "sparse_categorical_crossentropy")  # 20 steps/epoch
    _assert_healthy(model, history, steps, min_drop=0.3, relu_paths=["cnn/relu1", "cnn/conv2", "cnn/fc"])


def _seq_data(n, vocab, maxlen, seed):
    """Padded sequences of ids 1..vocab (0 = padding); label: more low ids than high ids."""
    rng = np.random.default_rng(seed)
    x = rng.integers(1, vocab + 1, (n, maxlen)).astype("int32")
    lengths = rng.integers(3, maxlen + 1, n)
    y = np.zeros((n, 1), "float32")
    for r, ln in enumerate(lengths):
        x[r, ln:] = 0
        seq = x[r, :ln]
        y[r, 0] = float(np.sum(seq <= vocab // 2) > np.sum(seq > vocab // 2))
    return x, y


def test_lstm_over_masked_embedding():
    vocab, maxlen = 40, 12
    x, y = _seq_data(640, vocab, maxlen, seed=3)
    assert (x == 0).any() and x.max() == vocab
    inp = keras.Input((maxlen,), dtype="int32")
    h = layers.Embedding(vocab + 1, 16, mask_zero=True, name="tok_emb")(inp)  # id 0 = padding
    h = layers.LSTM(16, name="lstm")(h)
    out = layers.Dense(1, activation="sigmoid", name="out")(h)
    model = keras.Model(inp, out, name="seq")
    history, steps = _train(model, x, y, "binary_crossentropy", lr=5e-3)  # 20 steps/epoch
    _assert_healthy(model, history, steps, min_drop=0.1, ids_paths=["seq/tok_emb"])


class ResBlock(layers.Layer):
    def __init__(self, units, **kw):
        super().__init__(**kw)
        self.dense_a = layers.Dense(units, activation="relu", kernel_initializer=HE, name="dense_a")
        self.dense_b = layers.Dense(units, kernel_initializer=HE, name="dense_b")
        self.norm = layers.LayerNormalization(name="norm")

    def call(self, x):
        return self.norm(x + self.dense_b(self.dense_a(x)))


class ResNet(keras.Model):
    def __init__(self, classes, **kw):
        super().__init__(**kw)
        self.stem = layers.Dense(32, activation="relu", kernel_initializer=HE, name="stem")
        self.block_0 = ResBlock(32, name="block_0")
        self.block_1 = ResBlock(32, name="block_1")
        self.block_2 = ResBlock(32, name="block_2")
        self.head = layers.Dense(classes, activation="softmax", name="head")

    def call(self, x, training=False):
        h = self.stem(x)
        h = self.block_0(h)
        h = self.block_1(h)
        h = self.block_2(h)
        return self.head(h)


def test_subclassed_residual():
    x, y = _blobs(960, 16, 3, seed=4)
    model = ResNet(3, name="resnet")
    history, steps = _train(model, x, y, "sparse_categorical_crossentropy")  # 30 steps/epoch
    rows = _assert_healthy(
        model, history, steps, min_drop=0.3,
        relu_paths=["resnet/stem"] + [f"resnet/block_{i}/dense_a" for i in range(3)],
    )
    assert {r.path for r in rows if r.kind == "weight_gradient"} >= {
        "resnet/block_2/dense_b", "resnet/block_0/norm", "resnet/head"
    }


def test_shared_layer_called_twice():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(960, 8)).astype("float32")
    b = rng.normal(size=(960, 8)).astype("float32")
    w = rng.normal(size=(8,))
    y = (a @ w > b @ w).astype("float32")[:, None]  # which side scores higher
    in_a, in_b = keras.Input((8,), name="a"), keras.Input((8,), name="b")
    shared = layers.Dense(32, activation="relu", kernel_initializer=HE, name="shared")
    h = layers.Concatenate(name="pair")([shared(in_a), shared(in_b)])
    h = layers.Dense(16, activation="relu", kernel_initializer=HE, name="mix")(h)
    out = layers.Dense(1, activation="sigmoid", name="out")(h)
    model = keras.Model([in_a, in_b], out, name="siamese")
    history, steps = _train(model, [a, b], y, "binary_crossentropy")  # 30 steps/epoch
    _assert_healthy(
        model, history, steps, min_drop=0.3, relu_paths=["siamese/shared", "siamese/shared#2", "siamese/mix"]
    )


def test_two_embedding_nested_model_with_covered_ids():
    n_users, n_items, n, batch = 200, 80, 1280, 64
    rng = np.random.default_rng(6)
    users = rng.integers(0, n_users, (n, 1)).astype("int32")  # uniform over the full tables
    items = rng.integers(0, n_items, (n, 1)).astype("int32")
    user_bias, item_bias = rng.normal(size=n_users), rng.normal(size=n_items)
    y = (user_bias[users[:, 0]] + item_bias[items[:, 0]] > 0).astype("float32")[:, None]
    # every epoch makes >= 3x input_dim lookups per table, so unused_embedding really checks
    assert n >= 3 * n_users and n >= 3 * n_items
    assert len(np.unique(users)) > 0.95 * n_users and len(np.unique(items)) == n_items
    model = M.two_embedding(n_users, n_items, name="outer")
    history, steps = _train(model, [users, items], y, "binary_crossentropy", batch_size=batch, lr=1e-2)
    _assert_healthy(
        model, history, steps, min_drop=0.1, relu_paths=["outer/hidden"],
        ids_paths=["outer/inner/user_emb", "outer/inner/item_emb"],
    )


def test_softmax_classifier():
    x, y = _blobs(960, 20, 10, seed=7, scale=3.0)
    inp = keras.Input((20,))
    h = layers.Dense(64, activation="relu", kernel_initializer=HE, name="hidden")(inp)
    logits = layers.Dense(10, name="logits")(h)
    out = layers.Softmax(name="softmax")(logits)
    model = keras.Model(inp, out, name="softmax_clf")
    history, steps = _train(model, x, y, "sparse_categorical_crossentropy", epochs=4, lr=3e-3)
    _assert_healthy(model, history, steps, min_drop=0.4, relu_paths=["softmax_clf/hidden"])


def test_tanh_mlp_with_saturation_and_loss_plateau():
    # loss_plateau (off by default) on top of the defaults (saturation among them). 50 steps/epoch
    # x 5 epochs = 250 steps: past loss_plateau's window of 200 and saturation's patience of 20, so
    # both have a real chance to fire.
    x, y = _blobs(1600, 20, 4, seed=8)
    inp = keras.Input((20,))
    h = inp
    for i in range(3):
        h = layers.Dense(32, activation="tanh", name=f"tanh_{i}")(h)
    out = layers.Dense(4, activation="softmax", name="head")(h)
    model = keras.Model(inp, out, name="tanh_mlp")
    extra = ["loss_plateau"]
    history, steps = _train(
        model, x, y, "sparse_categorical_crossentropy", epochs=5, detectors=list(DEFAULT) + extra
    )
    assert steps > 200
    assert {d.name for d in history.gradtrace.engine.detectors} == set(DEFAULT) | set(extra)
    rows = _assert_healthy(model, history, steps, min_drop=0.3)
    assert {r.path for r in rows if r.kind == "output" and r.activation == "tanh"} == {
        f"tanh_mlp/tanh_{i}" for i in range(3)
    }
    assert [r.path for r in rows if r.kind == "loss"] == ["loss"]


def test_small_transformer_encoder():
    # An attention key projection gets tiny gradients at initialisation (its bias none at all):
    # a single small layer between healthy ones is not a vanishing gradient.
    vocab, maxlen, dim = 40, 12, 16
    x, y = _seq_data(640, vocab, maxlen, seed=5)
    tok = keras.Input((maxlen,), dtype="int32")
    h = layers.Embedding(vocab + 1, dim, name="tok_emb")(tok)
    for k in range(2):
        a = layers.MultiHeadAttention(2, dim // 2, name=f"mha{k}")(h, h)
        h = layers.LayerNormalization(name=f"ln{k}a")(layers.Add(name=f"res{k}a")([h, a]))
        f = layers.Dense(dim * 2, activation="relu", kernel_initializer=HE, name=f"ff{k}a")(h)
        h = layers.LayerNormalization(name=f"ln{k}b")(layers.Add(name=f"res{k}b")([h, layers.Dense(dim, name=f"ff{k}b")(f)]))
    out = layers.Dense(1, activation="sigmoid", name="out")(layers.GlobalAveragePooling1D(name="pool")(h))
    model = keras.Model(tok, out, name="enc")
    history, steps = _train(model, x, y, "binary_crossentropy", lr=3e-3)
    rows = _assert_healthy(model, history, steps, min_drop=0.05, ids_paths=["enc/tok_emb"])
    assert any(r.path == "enc/mha0/key" for r in rows if r.kind == "weight_gradient")


class _PositionalEmbedding(layers.Layer):
    def __init__(self, seq_len, vocab, dim, **kw):
        super().__init__(**kw)
        self.token_embeddings = layers.Embedding(vocab, dim)
        self.position_embeddings = layers.Embedding(seq_len, dim)

    def call(self, x):
        return self.token_embeddings(x) + self.position_embeddings(keras.ops.arange(0, keras.ops.shape(x)[-1]))


class _Block(layers.Layer):
    """The example's TransformerEncoder (``cross=False``) and TransformerDecoder (causal self-attention, then
    attention over the encoder's output)."""

    def __init__(self, dim, ff, heads, cross, **kw):
        super().__init__(**kw)
        self.cross = cross
        self.attention_1 = layers.MultiHeadAttention(num_heads=heads, key_dim=dim)
        self.attention_2 = layers.MultiHeadAttention(num_heads=heads, key_dim=dim) if cross else None
        self.dense_proj = keras.Sequential([layers.Dense(ff, activation="relu"), layers.Dense(dim)])
        self.norms = [layers.LayerNormalization() for _ in range(3 if cross else 2)]

    def call(self, x, enc=None):
        h = self.norms[0](x + self.attention_1(query=x, value=x, key=x, use_causal_mask=self.cross))
        if self.cross:
            h = self.norms[1](h + self.attention_2(query=h, value=enc, key=enc))
        return self.norms[-1](h + self.dense_proj(h))


def test_encoder_decoder_transformer():
    """Keras example "English-to-Spanish translation with a sequence-to-sequence Transformer" (fchollet),
    shrunk, on a copy-and-reverse task. The encoder runs first but reaches the loss only through the
    decoder's cross-attention, beside the decoder's own embeddings: "below" comes from the graph."""
    vocab, seq, dim = 60, 10, 16
    rng = np.random.default_rng(21)
    src = rng.integers(1, vocab, (640, seq)).astype("int32")
    y = src[:, ::-1].copy()
    tgt = np.concatenate([np.ones((640, 1), "int32"), y[:, :-1]], axis=1)
    enc_in = keras.Input((seq,), dtype="int32", name="encoder_inputs")
    encoder = keras.Model(enc_in, _Block(dim, 32, 2, False, name="encoder")(
        _PositionalEmbedding(seq, vocab, dim, name="enc_emb")(enc_in)), name="enc")
    dec_in = keras.Input((seq,), dtype="int32", name="decoder_inputs")
    enc_seq = keras.Input((seq, dim), name="decoder_state_inputs")
    h = _Block(dim, 32, 2, True, name="decoder")(_PositionalEmbedding(seq, vocab, dim, name="dec_emb")(dec_in), enc_seq)
    decoder = keras.Model([dec_in, enc_seq], layers.Dense(vocab, activation="softmax", name="probs")(
        layers.Dropout(0.1, name="drop")(h)), name="dec")
    model = keras.Model([enc_in, dec_in], decoder([dec_in, encoder(enc_in)]), name="s2s")
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    history = gradtrace.fit(model, [src, tgt], y, batch_size=32, epochs=3, verbose=0)
    _assert_healthy(model, history, 60, min_drop=0.05, ids_paths=["s2s/enc/enc_emb/token_embeddings"])
    graph = history.gradtrace.engine.tables[True].graph
    # paths by the attributes the code holds the layers in (Keras' automatic names kept as aliases)
    enc_tok, dec_tok = "s2s/enc/enc_emb/token_embeddings", "s2s/dec/dec_emb/token_embeddings"
    cross, self_attention = "s2s/dec/decoder/attention_2", "s2s/dec/decoder/attention_1"
    assert graph.feeds(enc_tok, "s2s/dec/probs") and graph.feeds(enc_tok, f"{cross}/value")
    assert not graph.feeds(enc_tok, f"{self_attention}/value") and graph.feeds(dec_tok, f"{self_attention}/value")
    assert not graph.feeds(enc_tok, dec_tok) and not graph.feeds(dec_tok, enc_tok)
    assert graph.depth("s2s/dec/probs") == 0 and graph.depth(enc_tok) > graph.depth("s2s/enc/encoder")


# -- more of what real programs look like: small batches, Keras' default (Glorot) initialisation,
#    sigmoid networks, 2 and 10 classes, unstandardised regression targets, a few hundred steps

import pytest  # noqa: E402


@pytest.mark.parametrize("batch_size", [4, 16])
def test_small_batches_binary_classifier_with_default_init(batch_size):
    """Glorot (the Keras default), a sigmoid head with binary_crossentropy; at batch 4, 300 steps."""
    x, y = _blobs(400, 12, 2, seed=11, scale=2.0)
    inp = keras.Input((12,))
    h = layers.Dense(16, activation="relu", name="h1")(inp)
    h = layers.Dense(16, activation="relu", name="h2")(h)
    model = keras.Model(inp, layers.Dense(1, activation="sigmoid", name="out")(h), name="small")
    history, steps = _train(model, x, y.astype("float32")[:, None], "binary_crossentropy", batch_size=batch_size,
                            lr=1e-2)
    _assert_healthy(model, history, steps, min_drop=0.2, relu_paths=["small/h1", "small/h2"])


def test_regression_on_unstandardised_targets():
    """Prices in thousands (mean 300, std 100) from standardised features, a linear head and mse."""
    rng = np.random.default_rng(12)
    x = rng.normal(size=(640, 8)).astype("float32")
    y = (300.0 + x @ rng.normal(0, 35.0, (8, 1))).astype("float32")
    inp = keras.Input((8,))
    h = layers.Dense(32, activation="relu", name="h1")(inp)
    h = layers.Dense(32, activation="relu", name="h2")(h)
    model = keras.Model(inp, layers.Dense(1, name="price")(h), name="prices")
    history, steps = _train(model, x, y, "mse", lr=3e-2)
    _assert_healthy(model, history, steps, min_drop=0.3, relu_paths=["prices/h1", "prices/h2"])


def test_sigmoid_network_binary():
    """Three sigmoid hidden layers (the pre-ReLU way), a sigmoid head."""
    x, y = _blobs(640, 10, 2, seed=13, scale=2.0)
    inp = keras.Input((10,))
    h = inp
    for i in range(3):
        h = layers.Dense(24, activation="sigmoid", name=f"s{i}")(h)
    model = keras.Model(inp, layers.Dense(1, activation="sigmoid", name="out")(h), name="sig")
    history, steps = _train(model, x, y.astype("float32")[:, None], "binary_crossentropy", epochs=4, lr=1e-2)
    _assert_healthy(model, history, steps, min_drop=0.2)


def test_deep_relu_ten_classes_he_init():
    """Eight ReLU layers with He initialisation (the scale stays near 1 through the depth), 10 classes."""
    x, y = _blobs(960, 20, 10, seed=14, scale=3.0)
    inp = keras.Input((20,))
    h = inp
    for i in range(8):
        h = layers.Dense(48, activation="relu", kernel_initializer=HE, name=f"d{i}")(h)
    model = keras.Model(inp, layers.Dense(10, activation="softmax", name="head")(h), name="deep10")
    history, steps = _train(model, x, y, "sparse_categorical_crossentropy", lr=2e-3)
    _assert_healthy(model, history, steps, min_drop=0.2, relu_paths=[f"deep10/d{i}" for i in range(8)])


def test_logits_head_with_from_logits_loss():
    """A linear head with a crossentropy told it gets logits: the right way to skip the softmax."""
    x, y = _blobs(640, 16, 5, seed=15, scale=3.0)
    inp = keras.Input((16,))
    h = layers.Dense(32, activation="relu", name="h")(inp)
    model = keras.Model(inp, layers.Dense(5, name="logits")(h), name="logit_clf")
    history, steps = _train(model, x, y, keras.losses.SparseCategoricalCrossentropy(from_logits=True), lr=1e-2)
    _assert_healthy(model, history, steps, min_drop=0.3, relu_paths=["logit_clf/h"])
