"""Ten held-out training bugs with their fixes, ported to Keras 3 without reading the debugger (its code,
tests, docs or scorer) and without running it, on synthetic data of the originals' shapes and scales, in the
``Case`` format of ``benchmarks/faults/cases.py``.

Each case is a published program (a Stack Overflow question, a GitHub issue or pull request, a book
notebook) whose training goes wrong for a reason different from the other cases here and from those of
``cases.py`` and ``cases_blind.py``: a dropout rate read as a keep probability, a softmax head on multi-label
targets, an attention mask of the opposite convention that shows the model the token it must predict, an exp
that overflows in the branch a switch discards, BatchNorm moving statistics that lag the batch statistics,
variables a layer never tracks, a VAE whose KL term swamps the reconstruction, the most frequent word masked
as padding, attention scores left unscaled, a model frozen by a flag Keras 3 reads at every step.
``expected`` is a guess at the detector's name (short snake_case name of the property broken) and the layer
at fault; ``symptom`` checks the fault with plain Keras/NumPy (a forward pass, the loss's own gradient, or a
short plain ``fit``), true on the buggy version and false on the fix.
"""

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from benchmarks.faults.cases import Case

_N = 384  # examples per data set, as in cases.py


def _predict(model, x, n=128, training=False):
    return np.asarray(model(x[:n], training=training))


def _loss_grad(model, x, y, variables, n=128):
    """The gradient of the compiled loss (mean over ``n`` examples) with respect to ``variables``."""
    loss_fn = keras.losses.get(model.loss)
    with tf.GradientTape() as tape:
        loss = ops.mean(loss_fn(tf.constant(y[:n]), model(x[:n], training=True)))
    return tape.gradient(loss, variables)


def _digit_prototypes(rng, k=10, d=784, active=150):
    """``k`` MNIST-like sparse stroke patterns over ``d`` pixels, values in [0.5, 1]."""
    protos = np.zeros((k, d), "float32")
    for c in range(k):
        idx = rng.choice(d, active, replace=False)
        protos[c, idx] = rng.uniform(0.5, 1.0, active)
    return protos


def _digits(rng, n=_N):
    """Flattened 28x28 digit-like images in [0, 1] and their integer class."""
    protos = _digit_prototypes(rng)
    c = rng.integers(0, 10, n)
    keep = rng.random((n, 784)) > 0.2  # strokes vary from one example to the next
    x = np.clip(protos[c] * keep + 0.1 * rng.random((n, 784)), 0.0, 1.0).astype("float32")
    return x, c


# ---- 1. Dropout(0.99): the rate is the fraction dropped, not kept -----------------------------------------


def _mnist_mlp(buggy):
    """Stack Overflow 48355700, "Dropout behavior in Keras with rate=1 (dropping all input units) not as
    expected": the Keras MNIST MLP example (Dense(512, relu, use_bias=False), Dropout, Dense(512, relu),
    Dropout, Dense(10, softmax), RMSprop, categorical_crossentropy) with both Dropout rates set to 0.99; the
    answer shows that "effectively no training" then takes place (accuracy 0.11 for 3 epochs). The rate is
    the fraction of units dropped (``tf.nn.dropout``'s old ``keep_prob`` was the fraction kept). Fix: the
    example's Dropout(0.2)."""
    rate = 0.99 if buggy else 0.2
    inp = keras.Input((784,))
    h = layers.Dense(512, activation="relu", use_bias=False, name="dense")(inp)
    h = layers.Dropout(rate, name="dropout")(h)
    h = layers.Dense(512, activation="relu", name="dense_1")(h)
    h = layers.Dropout(rate, name="dropout_1")(h)
    out = layers.Dense(10, activation="softmax", name="dense_2")(h)
    m = keras.Model(inp, out, name="mnist_mlp")
    m.compile(optimizer=keras.optimizers.RMSprop(), loss="categorical_crossentropy")
    return m


def _mnist_onehot(rng):
    x, c = _digits(rng)
    return x, np.eye(10, dtype="float32")[c]


def _prediction_is_noise(model, x, y):
    """Two training-mode passes over the same batch disagree: the mean total-variation distance between
    their predicted distributions is large, i.e. what the loss sees is mostly the dropout mask."""
    p1, p2 = _predict(model, x, training=True), _predict(model, x, training=True)
    return float(0.5 * np.abs(p1 - p2).sum(axis=1).mean()) > 0.3


# ---- 2. softmax + categorical_crossentropy on multi-label targets ------------------------------------------


def _multilabel_mlp(buggy):
    """Stack Overflow 44164749, "How does Keras handle multilabel classification?": targets from
    scikit-learn's MultiLabelBinarizer (11 labels, several ones per row, e.g. [0,0,0,1,0,1,0,0,0,0,1]);
    Dense(5000, relu), Dropout(0.1), Dense(600, relu), Dropout(0.1), Dense(11, softmax), SGD(lr=0.01,
    momentum=0.9, nesterov=True), categorical_crossentropy. The softmax makes the 11 outputs compete, so no
    two labels can both be predicted. Fix (the accepted answer): sigmoid output and binary_crossentropy.
    (Keras 3's SGD has no ``decay``; it is left out.)"""
    inp = keras.Input((100,))
    h = layers.Dense(5000, activation="relu", name="dense")(inp)
    h = layers.Dropout(0.1, name="dropout")(h)
    h = layers.Dense(600, activation="relu", name="dense_1")(h)
    h = layers.Dropout(0.1, name="dropout_1")(h)
    out = layers.Dense(11, activation="softmax" if buggy else "sigmoid", name="dense_2")(h)
    m = keras.Model(inp, out, name="multilabel_mlp")
    m.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True),
              loss="categorical_crossentropy" if buggy else "binary_crossentropy")
    return m


def _multilabel(rng):
    y = (rng.random((_N, 11)) < 0.25).astype("float32")
    y[np.arange(_N), rng.integers(0, 11, _N)] = 1.0  # at least one label per row
    x = 0.25 * (y @ rng.normal(0, 1, (11, 100)) + 0.5 * rng.normal(size=(_N, 100)))  # small, tf-idf-like scale
    return x.astype("float32"), y


def _outputs_compete(model, x, y):
    """Every row of the output sums to 1 while the targets have on average well over one positive label."""
    p = _predict(model, x)
    return bool(np.allclose(p.sum(axis=1), 1.0, atol=1e-3) and y.sum(axis=1).mean() > 1.5)


# ---- 3. a look-ahead mask in the tutorial's convention given to keras' MultiHeadAttention ----------------


class TokenAndPositionEmbedding(layers.Layer):
    """Token embedding plus a learned position embedding, as in the keras-io miniature-GPT example."""

    def __init__(self, maxlen, vocab, dim, **kw):
        super().__init__(**kw)
        self.token_emb = layers.Embedding(vocab, dim, name="token_emb")
        self.pos_emb = layers.Embedding(maxlen, dim, name="pos_emb")

    def call(self, x):
        return self.token_emb(x) + self.pos_emb(ops.arange(0, ops.shape(x)[-1]))


class LookAheadMask(layers.Layer):
    """The (batch, T, T) mask handed to MultiHeadAttention. ``tutorial=True`` is the TensorFlow transformer
    tutorial's ``create_look_ahead_mask``, ``1 - band_part(ones, -1, 0)``, where 1 marks a position *not* to
    attend to; keras' ``attention_mask`` uses 1 for the positions that *may* be attended to."""

    def __init__(self, tutorial=False, **kw):
        super().__init__(**kw)
        self.tutorial = tutorial

    def call(self, x):
        t = ops.shape(x)[1]
        lower = ops.tril(ops.ones((t, t), "int32"))
        mask = 1 - lower if self.tutorial else lower
        return ops.broadcast_to(mask[None], (ops.shape(x)[0], t, t))


def _tiny_gpt(buggy, vocab=30, maxlen=19):
    """tensorflow/text#894, "Attention warning": a reader of the TensorFlow "Transformer model for language
    understanding" tutorial replaced its hand-written MultiHeadAttention by tf.keras.layers.MultiHeadAttention
    but kept the tutorial's ``create_look_ahead_mask``; the two use opposite mask conventions, so "my model
    literally paying attention to every future token and ignoring every token it has already seen [...]
    attaining a concerning 100% accuracy and near-zero loss quickly": the token to predict is in view. Here a
    one-block decoder (token + position embedding, MultiHeadAttention(2 heads, key_dim 16), residual,
    LayerNormalization, Dense(vocab, softmax)) on next-token prediction. Fix: give keras the lower-triangular
    mask (1 - the tutorial's mask, i.e. ``use_causal_mask=True``)."""
    inp = keras.Input((maxlen,), dtype="int32")
    h = TokenAndPositionEmbedding(maxlen, vocab, 32, name="embedding")(inp)
    mask = LookAheadMask(tutorial=buggy, name="look_ahead_mask")(inp)
    a = layers.MultiHeadAttention(num_heads=2, key_dim=16, name="mha")(h, h, attention_mask=mask)
    h = layers.LayerNormalization(name="layernorm")(layers.Add(name="add")([h, a]))
    out = layers.Dense(vocab, activation="softmax", name="logits")(h)
    m = keras.Model(inp, out, name="tiny_gpt")
    m.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return m


def _markov_text(rng, vocab=30):
    """Token streams of 20 tokens from a Markov chain (the next token is (7 * prev + 3) mod 30 four times in
    five, otherwise random); inputs are tokens 0..18, targets tokens 1..19."""
    seq = np.zeros((_N, 20), "int32")
    seq[:, 0] = rng.integers(0, vocab, _N)
    for t in range(1, 20):
        rule = (7 * seq[:, t - 1] + 3) % vocab
        seq[:, t] = np.where(rng.random(_N) < 0.8, rule, rng.integers(0, vocab, _N))
    return seq[:, :-1], seq[:, 1:]


def _sees_the_future(model, x, y):
    """Changing the input token at position 10 changes the predictions at positions 0..9: the prediction of
    a token depends on tokens that come after it (among them the token it must predict)."""
    x2 = x[:64].copy()
    x2[:, 10] = (x2[:, 10] + 1) % 30
    p1, p2 = _predict(model, x, n=64), _predict(model, x2, n=64)
    return float(np.abs(p1[:, :10] - p2[:, :10]).max()) > 1e-4


# ---- 4. a hand-written ELU via K.switch: exp overflows in the branch that is not taken --------------------


def _elu_switch(x):
    """The issue's custom_activation: ``K.switch(x > 0, x, K.exp(x) - 1)``."""
    return ops.where(ops.greater(x, 0), x, ops.exp(x) - 1.0)


def _elu_safe(x):
    """The same ELU with exp evaluated on min(x, 0) only (as the built-in ``elu`` does)."""
    return ops.where(ops.greater(x, 0), x, ops.exp(ops.minimum(x, 0.0)) - 1.0)


def _mnist_elu(buggy):
    """keras-team/keras#11057, "Custom activation function not training": a re-implementation of ELU,
    ``K.switch(K.greater(x, 0), x, K.exp(x) - 1)``, after Dense(128) on raw MNIST pixels (0-255, never
    divided by 255), then Dense(10, softmax), categorical_crossentropy, SGD; "the rebuilt ELU doesn't train
    at all". The pre-activations reach the hundreds, exp overflows to inf in the discarded branch, and the
    switch's gradient is 0 * inf = NaN, which the first update writes into the kernel. Fix: take exp of
    min(x, 0) (or use the built-in elu), so the discarded branch stays finite."""
    inp = keras.Input((784,))
    h = layers.Dense(128, name="dense")(inp)
    h = layers.Activation(_elu_switch if buggy else _elu_safe, name="activation")(h)
    h = layers.Dropout(0.2, name="dropout")(h)
    out = layers.Dense(10, activation="softmax", name="dense_1")(h)
    m = keras.Model(inp, out, name="mnist_elu")
    m.compile(optimizer=keras.optimizers.SGD(1e-3), loss="categorical_crossentropy")
    return m


def _raw_pixels(rng):
    x, c = _digits(rng)
    return np.round(255.0 * x).astype("float32"), np.eye(10, dtype="float32")[c]


def _nan_gradient(model, x, y):
    g = _loss_grad(model, x, y, model.get_layer("dense").kernel)
    return bool(not np.all(np.isfinite(np.asarray(g))))


# ---- 5. BatchNormalization(momentum=0.99) after a few dozen updates: inference != training ----------------


def _bn_cnn(buggy):
    """keras-team/keras#7265, "Batch Normalization layer gives significant difference between train and
    validation loss on the exact same data": a small CNN with BatchNormalization (center=False, scale=False)
    on one batch of MNIST, whose loss in inference mode is far above its training-mode loss on the same
    images. The moving mean/variance start at 0/1 and move by 1% per update (Keras' default momentum 0.99),
    so after a few dozen steps they are still far from the batch statistics the network was trained with.
    Fix (keras-team/keras#10666, #3949): momentum=0.9, as in Chainer/Torch."""
    mom = 0.99 if buggy else 0.9
    inp = keras.Input((28, 28, 1))
    h = layers.Conv2D(32, 3, name="conv2d")(inp)
    h = layers.BatchNormalization(momentum=mom, center=False, scale=False, name="batch_normalization")(h)
    h = layers.Activation("relu", name="relu")(h)
    h = layers.MaxPooling2D(name="max_pooling2d")(h)
    h = layers.Conv2D(64, 3, name="conv2d_1")(h)
    h = layers.BatchNormalization(momentum=mom, center=False, scale=False, name="batch_normalization_1")(h)
    h = layers.Activation("relu", name="relu_1")(h)
    h = layers.MaxPooling2D(name="max_pooling2d_1")(h)
    h = layers.Flatten(name="flatten")(h)
    out = layers.Dense(10, activation="softmax", name="dense")(h)
    m = keras.Model(inp, out, name="bn_cnn")
    m.compile(optimizer="adam", loss="categorical_crossentropy")
    return m


def _mnist_images(rng):
    x, c = _digits(rng)
    return x.reshape(-1, 28, 28, 1), np.eye(10, dtype="float32")[c]


def _inference_disagrees(model, x, y):
    """After four epochs (48 updates) of plain ``fit``, the loss on the training images in inference mode
    (moving statistics) is more than twice the loss in training mode (batch statistics)."""
    model.fit(x, y, batch_size=32, epochs=4, shuffle=False, verbose=0)
    loss_fn = keras.losses.get(model.loss)
    train = float(ops.mean(loss_fn(y[:128], model(x[:128], training=True))))
    infer = float(ops.mean(loss_fn(y[:128], model(x[:128], training=False))))
    return infer > 2.0 * train + 0.1


# ---- 6. tf.Variable objects appended to a list in a custom layer: never tracked, never trained -------------


class ColumnDense(layers.Layer):
    """A dense layer built column by column, as in the issue's toy layer: ``tracked=False`` appends raw
    ``tf.Variable`` objects to a list started empty (the bug), ``tracked=True`` uses ``self.add_weight``
    (the fix the issue names)."""

    def __init__(self, units, tracked=True, **kw):
        super().__init__(**kw)
        self.units, self.tracked = units, tracked

    def build(self, input_shape):
        d = input_shape[-1]
        init = keras.initializers.GlorotUniform(seed=11)
        full = np.asarray(init((d, self.units)))
        self.columns = []
        for j in range(self.units):
            if self.tracked:
                self.columns.append(self.add_weight(shape=(d,), initializer=keras.initializers.Constant(
                    full[:, j]), name=f"column_{j}"))
            else:
                self.columns.append(tf.Variable(full[:, j], name=f"column_{j}"))

    def call(self, x):
        return ops.stack([ops.matmul(x, ops.convert_to_tensor(c)) for c in self.columns], axis=-1)


def _toy_model(buggy):
    """keras-team/keras#16797, "Unpredictable behaviour of tracked variables in subclassing layers and
    models": in a subclassed Layer, tf.Variables appended to a list that started empty are not tracked, "and
    this has an impact because untracked variables are not trained" (the reporter's toy layer and model "make
    no sense"; here a column-by-column dense layer between two Dense layers, regression, adam). In Keras 3 no
    tf.Variable is tracked by a Layer at all; the columns stay at their random initial values. Fix (from the
    issue): create them with ``self.add_weight``."""
    inp = keras.Input((16,))
    h = layers.Dense(32, activation="relu", name="dense")(inp)
    h = ColumnDense(8, tracked=not buggy, name="my_layer")(h)
    h = layers.Activation("relu", name="relu")(h)
    out = layers.Dense(1, name="dense_1")(h)
    m = keras.Model(inp, out, name="toy_model")
    m.compile(optimizer="adam", loss="mse")
    return m


def _toy_regression(rng):
    x = rng.normal(size=(_N, 16)).astype("float32")
    y = np.tanh(x @ rng.normal(0, 0.5, (16, 4))) @ rng.normal(0, 1, (4, 1)) + 0.1 * rng.normal(size=(_N, 1))
    return x, y.astype("float32")


def _layer_weights_untracked(model, x, y):
    """The layer multiplies by its columns, but none of them is among the weights ``fit`` trains."""
    layer = model.get_layer("my_layer")
    trained = {id(v) for v in model.trainable_variables}
    return bool(layer.columns) and not any(id(c) in trained for c in layer.columns)


# ---- 7. VAE: per-pixel mean reconstruction loss next to a summed KL: the latent code collapses ------------


class Sampling(layers.Layer):
    """z = z_mean + exp(z_log_var / 2) * eps, adding the example's KL divergence to N(0, I) (summed over the
    latent dimensions, as in the example) to the model's losses."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seed_generator = keras.random.SeedGenerator(5)

    def call(self, inputs):
        z_mean, z_log_var = inputs
        kl = -0.5 * ops.sum(1 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var), axis=-1)
        self.add_loss(ops.mean(kl))
        eps = keras.random.normal(ops.shape(z_mean), seed=self.seed_generator)
        return z_mean + ops.exp(0.5 * z_log_var) * eps


def _vae(buggy):
    """keras-team/keras#3373, "Variational Autoencoder example not working correctly": after commit f6bcaffe
    the examples/variational_autoencoder.py loss was ``binary_crossentropy(x, x_decoded_mean)`` (a mean over
    the 784 pixels) plus the KL term summed over the latent dimensions; "all locations from the latent space
    are producing the same output". The KL term swamps a reconstruction term 784 times too small and the
    encoder collapses onto the prior. Fix (pull request #3383): multiply the cross-entropy by original_dim.
    (Dense(256) "h", latent_dim 2, Dense(256) "decoder_h", Dense(784, sigmoid) "decoder_mean", rmsprop; the
    KL term is added by the sampling layer, since a Keras 3 loss cannot see z_mean.)"""
    inp = keras.Input((784,))
    h = layers.Dense(256, activation="relu", name="h")(inp)
    z_mean = layers.Dense(2, name="z_mean")(h)
    z_log_var = layers.Dense(2, name="z_log_var")(h)
    z = Sampling(name="z")([z_mean, z_log_var])
    d = layers.Dense(256, activation="relu", name="decoder_h")(z)
    out = layers.Dense(784, activation="sigmoid", name="decoder_mean")(d)
    m = keras.Model(inp, out, name="vae")
    if buggy:
        loss = "binary_crossentropy"
    else:
        def loss(x, x_decoded_mean):  # noqa: E306
            return 784.0 * keras.losses.binary_crossentropy(x, x_decoded_mean)
    m.compile(optimizer="rmsprop", loss=loss)
    return m


def _blob_images(rng):
    """MNIST-sized images of a bright blob whose position and width vary: two latent factors."""
    u, v = rng.uniform(5, 23, _N), rng.uniform(5, 23, _N)
    w = rng.uniform(1.5, 4.0, _N)
    r, c = np.mgrid[0:28, 0:28]
    img = np.exp(-((r[None] - u[:, None, None]) ** 2 + (c[None] - v[:, None, None]) ** 2) / (2 * w[:, None, None] ** 2))
    x = np.clip(img + 0.05 * rng.random((_N, 28, 28)), 0, 1).reshape(_N, 784).astype("float32")
    return x, x.copy()


def _latent_collapsed(model, x, y):
    """After three epochs of plain ``fit``, the encoder's mean code hardly depends on the image: its spread
    over the examples is tiny next to the prior's unit spread."""
    model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
    zm = np.asarray(keras.Model(model.inputs, model.get_layer("z_mean").output)(x[:256]))
    return float(zm.std(axis=0).max()) < 0.2


# ---- 8. gensim word vectors (index 0 = the most frequent word) in an Embedding with mask_zero=True -------


def _w2v_lstm(buggy, vocab=2000, dim=100):
    """piskvorky/gensim#1900, "Seems Word2VecKeyedVectors.get_keras_embedding should take care of
    'mask_zero'" (labelled bug): gensim's KeyedVectors index words from 0, the most frequent word first, so
    an Embedding built from them with mask_zero=True (the usual setting in front of an LSTM) masks every
    occurrence of that word as if it were padding ("missing all the first word"). Here: frozen word2vec
    vectors, LSTM(32), Dense(1, sigmoid), on unpadded reviews of 40 words whose label depends on that word.
    Fix: index 0 is a real word, so no mask_zero (the alternative, shifting every id by one, changes the
    data)."""
    vectors = np.random.default_rng(17).normal(0, 0.3, (vocab, dim)).astype("float32")
    inp = keras.Input((40,), dtype="int32")
    e = layers.Embedding(vocab, dim, embeddings_initializer=keras.initializers.Constant(vectors),
                         mask_zero=buggy, trainable=False, name="embedding")(inp)
    h = layers.LSTM(32, name="lstm")(e)
    out = layers.Dense(1, activation="sigmoid", name="dense")(h)
    m = keras.Model(inp, out, name="w2v_lstm")
    m.compile(optimizer="adam", loss="binary_crossentropy")
    return m


def _zipf_reviews(rng, vocab=2000):
    p = 1.0 / np.arange(1, vocab + 1)
    p /= p.sum()  # Zipf: word 0 (gensim's first) is ~12% of all tokens
    x = rng.choice(vocab, size=(_N, 40), p=p).astype("int32")
    score = (x == 0).sum(axis=1) - 0.5 * np.isin(x, np.arange(1, 6)).sum(axis=1)
    return x, (score > np.median(score)).astype("float32")[:, None]


def _real_words_masked(model, x, y):
    """The reviews have no padding, yet the Embedding's mask hides more than 5% of their words."""
    mask = model.get_layer("embedding").compute_mask(tf.constant(x[:128]))
    return mask is not None and float(1.0 - np.asarray(mask).mean()) > 0.05


# ---- 9. layers.Attention(use_scale=True): the scale starts at 1, not 1/sqrt(d) ----------------------------


def _attn_regressor(buggy, d=256):
    """keras-team/keras#16916 (and keras-team/tf-keras#480), "Attention Layer Scaling": the trainable scale
    of tf.keras.layers.Attention(use_scale=True) is initialised to 1.0, while "SOTA methods usually use
    scale=1/sqrt(num_features) for better convergence" (as MultiHeadAttention hard-codes). With d=256
    projected features the dot-product scores have a spread of about 16 and the softmax over the 20 keys is
    one-hot: the attention weights saturate and pass no gradient. Fix (the issue's proposal): start the scale
    at 1/sqrt(d)."""
    inp = keras.Input((20, d))
    q = layers.Dense(d, name="query")(inp)
    v = layers.Dense(d, name="value")(inp)
    att = layers.Attention(use_scale=True, name="attention")
    h = att([q, v])
    h = layers.GlobalAveragePooling1D(name="pool")(h)
    out = layers.Dense(1, name="out")(h)
    m = keras.Model(inp, out, name="attn_regressor")
    if not buggy:
        att.scale.assign(1.0 / np.sqrt(d))
    m.compile(optimizer="adam", loss="mse")
    return m


def _token_features(rng):
    x = rng.normal(size=(_N, 20, 256)).astype("float32")
    y = x[:, :, :8].mean(axis=(1, 2))[:, None] * 4.0  # a sequence-level average: wants spread attention
    return x, y.astype("float32")


def _attention_saturated(model, x, y):
    """The attention weights are nearly one-hot: on average the largest weight of a query is above 0.75
    (about 0.2 when the scores are scaled)."""
    qv = keras.Model(model.inputs, [model.get_layer("query").output, model.get_layer("value").output])
    q, v = qv(x[:64])
    _, scores = model.get_layer("attention")([q, v], return_attention_scores=True)
    return float(np.asarray(scores).max(axis=-1).mean()) > 0.75


# ---- 10. a GAN discriminator frozen after compile: Keras 3 reads `trainable` at every step ----------------


def _discriminator(buggy):
    """ageron/handson-ml3#252, "[bug] Training loop error in GANs" (chapter 17, cell 54): the notebook compiles
    the discriminator (Flatten, Dense(150, selu), Dense(100, selu), Dense(1, sigmoid), binary_crossentropy,
    rmsprop), then sets ``discriminator.trainable = False`` before compiling the combined GAN, as Keras 2
    allowed; with Keras 3 the flag is read at every step, ``discriminator.train_on_batch`` warns "The model
    does not have any trainable weights" and the discriminator never learns. Fix (the issue's workaround, a
    GAN class whose train_step updates each network's own weights): keep the discriminator trainable when
    it is trained."""
    inp = keras.Input((28, 28))
    h = layers.Flatten(name="flatten")(inp)
    h = layers.Dense(150, activation="selu", name="dense")(h)
    h = layers.Dense(100, activation="selu", name="dense_1")(h)
    out = layers.Dense(1, activation="sigmoid", name="dense_2")(h)
    m = keras.Model(inp, out, name="discriminator")
    m.compile(loss="binary_crossentropy", optimizer="rmsprop")
    if buggy:
        m.trainable = False
    return m


def _real_and_fake(rng):
    """Half Fashion-MNIST-like images (a bright garment-shaped block), half generator output at its start
    (noise around 0.5); label 1 for real, 0 for fake."""
    n = _N // 2
    real = np.zeros((n, 28, 28), "float32")
    for i in range(n):
        t, b = rng.integers(2, 8), rng.integers(20, 27)
        l, r = rng.integers(4, 10), rng.integers(18, 25)
        real[i, t:b, l:r] = rng.uniform(0.6, 1.0)
    real = np.clip(real + 0.05 * rng.random(real.shape), 0, 1)
    fake = np.clip(0.5 + 0.2 * rng.normal(size=(n, 28, 28)), 0, 1).astype("float32")
    x = np.concatenate([real, fake])
    y = np.concatenate([np.ones((n, 1)), np.zeros((n, 1))]).astype("float32")
    order = rng.permutation(_N)
    return x[order].astype("float32"), y[order]


def _nothing_trains(model, x, y):
    """One epoch of plain ``fit`` leaves every weight of the model where it was."""
    before = [np.array(w) for w in model.get_weights()]
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    return all(np.array_equal(b, np.array(a)) for b, a in zip(before, model.get_weights()))


HELDOUT_CASES = [
    Case("dropout_rate_0.99", "Stack Overflow 48355700, 'Dropout behavior in Keras with rate=1 (dropping all "
         "input units) not as expected' (Keras MNIST MLP with Dropout(0.99))",
         _mnist_mlp, _mnist_onehot, ("excessive_dropout", "mnist_mlp/dropout"), _prediction_is_noise),
    Case("softmax_on_multilabel_targets", "Stack Overflow 44164749, 'How does Keras handle multilabel "
         "classification?' (softmax + categorical_crossentropy on MultiLabelBinarizer targets)",
         _multilabel_mlp, _multilabel, ("head_mismatch", "multilabel_mlp/dense_2"), _outputs_compete),
    Case("look_ahead_mask_inverted", "tensorflow/text#894, 'Attention warning' (the tutorial's "
         "create_look_ahead_mask passed to tf.keras.layers.MultiHeadAttention, whose mask convention is the "
         "opposite)", _tiny_gpt, _markov_text, ("label_leakage", "tiny_gpt/mha"), _sees_the_future),
    Case("elu_switch_exp_overflow", "keras-team/keras#11057, 'Custom activation function not training' "
         "(ELU rebuilt with K.switch(x > 0, x, K.exp(x) - 1) on raw MNIST pixels)",
         _mnist_elu, _raw_pixels, ("nan", "mnist_elu/activation"), _nan_gradient),
    Case("batchnorm_momentum_0.99", "keras-team/keras#7265, 'Batch Normalization layer gives significant "
         "difference between train and validation loss on the exact same data'; fix from #10666 / #3949",
         _bn_cnn, _mnist_images, ("train_inference_mismatch", "bn_cnn/batch_normalization"),
         _inference_disagrees, epochs=5),
    Case("untracked_tf_variables", "keras-team/keras#16797, 'Unpredictable behaviour of tracked variables in "
         "subclassing layers and models' (tf.Variable appended to a list in a custom Layer)",
         _toy_model, _toy_regression, ("untracked_weights", "toy_model/my_layer"), _layer_weights_untracked),
    Case("vae_reconstruction_not_scaled", "keras-team/keras#3373, 'Variational Autoencoder example not "
         "working correctly'; fix keras-team/keras#3383 (multiply the cross-entropy by original_dim)",
         _vae, _blob_images, ("posterior_collapse", "vae/z_mean"), _latent_collapsed),
    Case("mask_zero_on_gensim_index", "piskvorky/gensim#1900, 'Seems Word2VecKeyedVectors.get_keras_embedding "
         "should take care of mask_zero' (word 0 masked as padding)",
         _w2v_lstm, _zipf_reviews, ("masked_tokens", "w2v_lstm/embedding"), _real_words_masked),
    Case("attention_scale_init_1", "keras-team/keras#16916 / keras-team/tf-keras#480, 'Attention Layer "
         "Scaling' (Attention(use_scale=True) starts at 1, not 1/sqrt(d))",
         _attn_regressor, _token_features, ("saturation", "attn_regressor/attention"), _attention_saturated),
    Case("gan_discriminator_frozen", "ageron/handson-ml3#252, '[bug] Training loop error in GANs' "
         "(discriminator.trainable = False after compile, read at every step by Keras 3)",
         _discriminator, _real_and_fake, ("frozen", "discriminator/dense"), _nothing_trains),
]
