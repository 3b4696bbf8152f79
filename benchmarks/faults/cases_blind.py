"""Ten more real training bugs with their fixes, ported blind (without looking at the detectors) to Keras 3
on synthetic data of the originals' shapes and scales, in the ``Case`` format of ``benchmarks/faults/cases.py``.

Each case is about something healthy training keeps: a gradient path from the loss to every trainable
weight, units that differ from one another, updates that move the weights, a penalty that does not swamp
the data term, embedding rows that are used, a recurrent state that still carries the content. ``expected``
is a guess at the detector's name (short snake_case name of the invariant broken) and the layer at fault;
``symptom`` checks the fault with plain Keras/NumPy (a forward pass or the loss's own gradient), true on the
buggy version and false on the fix.
"""

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from benchmarks.faults.cases import Case

_N = 384  # examples per data set, as in cases.py


def _predict(model, x, n=128):
    return np.asarray(model(x[:n], training=False))


def _loss_grad(model, x, y, variables, n=128):
    """The gradient of the compiled loss (mean over ``n`` examples) with respect to ``variables``."""
    loss_fn = keras.losses.get(model.loss)
    with tf.GradientTape() as tape:
        loss = ops.mean(loss_fn(tf.constant(y[:n]), model(x[:n], training=True)))
    return tape.gradient(loss, variables)


def _no_gradient(g):
    return g is None or float(np.max(np.abs(np.asarray(g)))) == 0.0


def _rows_used(model, x, name):
    """Fraction of the rows of Embedding ``name`` that the data ever index."""
    layer = model.get_layer(name)
    ids = np.asarray(keras.Model(model.inputs, layer.input)(x))
    return len(np.unique(ids)) / layer.input_dim


# ---- 1. tf.math.ceil after a PReLU: nothing before it ever gets a gradient ---------------------------------


class Ceil(layers.Layer):
    """``tf.math.ceil`` as a layer; ``straight_through`` is the fix the maintainer pointed to (a custom
    gradient): forward ceil, backward identity."""

    def __init__(self, straight_through=False, **kw):
        super().__init__(**kw)
        self.straight_through = straight_through

    def call(self, x):
        if self.straight_through:
            return x + ops.stop_gradient(ops.ceil(x) - x)
        return ops.ceil(x)


def _ceil_net(buggy):
    """keras-team/keras#15716, "WARNING:tensorflow:Gradients do not exist for variables ['p_re_lu/alpha:0']
    when minimizing the loss": a PReLU with a constant alpha initializer followed by ``tf.math.ceil``; the
    maintainer (haifeng-jin) answered that ceil has no gradient and that a custom gradient is needed.
    Training goes on with a warning while the PReLU and every layer under it stay at their initial values.
    Fix: ceil with a straight-through (identity) gradient."""
    inp = keras.Input((20,))
    h = layers.Dense(32, name="d1")(inp)
    h = layers.PReLU(alpha_initializer=keras.initializers.Constant(0.25), name="prelu")(h)
    h = Ceil(straight_through=not buggy, name="ceil")(h)
    h = layers.Dense(16, activation="relu", name="d2")(h)
    out = layers.Dense(1, activation="sigmoid", name="out")(h)
    m = keras.Model(inp, out, name="ceil_net")
    m.compile(optimizer="adam", loss="binary_crossentropy")
    return m


def _ceil_data(rng):
    x = rng.normal(size=(_N, 20)).astype("float32")
    w = rng.normal(size=(20, 1))
    return x, (x @ w > 0).astype("float32")


def _ceil_symptom(model, x, y):
    return _no_gradient(_loss_grad(model, x, y, model.get_layer("d1").kernel))


# ---- 2. a NoisyDense layer whose noisy kernel is computed once, in build() --------------------------------


class NoisyDense(layers.Layer):
    """The NoisyDense of tensorflow/tensorflow#32729 (factorised-noise layer of a DQN), with
    ``kernel = weight_mu + weight_sigma * weights_eps`` (and the bias likewise) computed in ``build`` when
    ``in_build`` (the bug: a constant tensor read once from the variables) or in ``call`` (the fix)."""

    def __init__(self, units, std_init=0.5, in_build=False, **kw):
        super().__init__(**kw)
        self.units, self.std_init, self.in_build = units, std_init, in_build

    def build(self, input_shape):
        fan_in = input_shape[-1]
        mu_range = 1.0 / np.sqrt(fan_in)
        mu_init = keras.initializers.RandomUniform(-mu_range, mu_range)
        sigma_init = keras.initializers.Constant(self.std_init / np.sqrt(self.units))
        self.weight_mu = self.add_weight(shape=(fan_in, self.units), initializer=mu_init, name="weight_mu")
        self.weight_sigma = self.add_weight(shape=(fan_in, self.units), initializer=sigma_init, name="weight_sigma")
        self.bias_mu = self.add_weight(shape=(self.units,), initializer=mu_init, name="bias_mu")
        self.bias_sigma = self.add_weight(shape=(self.units,), initializer=sigma_init, name="bias_sigma")
        # reset_noise(): factorised Gaussian noise f(x) = sign(x) sqrt(|x|), sampled once here as in the issue
        rng = np.random.default_rng(7)
        f = lambda v: np.sign(v) * np.sqrt(np.abs(v))  # noqa: E731
        eps_in, eps_out = f(rng.normal(size=fan_in)), f(rng.normal(size=self.units))
        self.weights_eps = tf.constant(np.outer(eps_in, eps_out), "float32")
        self.bias_eps = tf.constant(eps_out, "float32")
        if self.in_build:
            self.kernel = self.weight_mu + self.weight_sigma * self.weights_eps
            self.bias = self.bias_mu + self.bias_sigma * self.bias_eps

    def call(self, x):
        if self.in_build:
            kernel, bias = self.kernel, self.bias
        else:
            kernel = self.weight_mu + self.weight_sigma * self.weights_eps
            bias = self.bias_mu + self.bias_sigma * self.bias_eps
        return ops.matmul(x, kernel) + bias


def _noisy_dqn(buggy):
    """tensorflow/tensorflow#32729, "ValueError: Variable 'basic_nstepTD_1/noisy_dense/bias:0' has `None` for
    gradient": a NoisyDense Q-head (3 actions) whose noisy kernel and bias were computed in ``build()``; in
    TF 2.0 this raised, in Keras 3 ``fit`` only warns and trains the layers under it while ``weight_mu`` and
    ``weight_sigma`` never move. Fix (the reporter's): do the two additions in ``call()``."""
    inp = keras.Input((8,))
    h = layers.Dense(64, activation="relu", name="fc1")(inp)
    h = layers.Dense(64, activation="relu", name="fc2")(h)
    out = NoisyDense(3, in_build=buggy, name="noisy")(h)
    m = keras.Model(inp, out, name="dqn")
    m.compile(optimizer="adam", loss="mse")
    return m


def _q_targets(rng):
    s = rng.normal(size=(_N, 8)).astype("float32")  # CartPole-like observations, standardised
    q = np.tanh(s @ rng.normal(0, 0.5, (8, 3))) + 1.0  # n-step TD targets around 1
    return s, q.astype("float32")


def _noisy_symptom(model, x, y):
    return _no_gradient(_loss_grad(model, x, y, model.get_layer("noisy").weight_mu))


# ---- 3. categorical_crossentropy on a single sigmoid unit: the loss is identically zero ------------------


def _lstm_one_unit(buggy):
    """Cross Validated 565956, "Confused with binary cross entropy vs categorical cross entropy"
    (https://stats.stackexchange.com/questions/565956): LSTM(256) on (5 timesteps, 10 label-encoded
    features), Dense(1, 'sigmoid'), loss='categorical_crossentropy'; accuracy 26% instead of 98% with
    binary_crossentropy. Keras normalises the output over the last axis (one unit: p/p = 1), so the loss is
    0 for every example and nothing learns. Fix: binary_crossentropy."""
    inp = keras.Input((5, 10))
    h = layers.LSTM(32, recurrent_activation="hard_sigmoid", name="lstm")(inp)
    out = layers.Dense(1, activation="sigmoid", name="out")(h)
    m = keras.Model(inp, out, name="lstm_clf")
    m.compile(optimizer="adam", loss="categorical_crossentropy" if buggy else "binary_crossentropy")
    return m


def _label_encoded_windows(rng):
    x = rng.integers(0, 6, size=(_N, 5, 10)).astype("float32") / 5.0  # label-encoded categories, scaled
    return x, (x[:, -1, :3].sum(axis=1, keepdims=True) > 1.5).astype("float32")


def _flat_loss(model, x, y):
    p = tf.constant(_predict(model, x))
    with tf.GradientTape() as tape:
        tape.watch(p)
        loss = ops.mean(keras.losses.get(model.loss)(tf.constant(y[:128]), p))
    g = tape.gradient(loss, p)
    return g is None or float(np.max(np.abs(g.numpy()))) < 1e-7


# ---- 4. every kernel initialised to zero: the units of a layer stay copies of each other ------------------


def _zero_init_mlp(buggy):
    """AliPakzad/DeepLearning-WeightInitialization-Impact-CIFAR10 (deep_Project_3_2.ipynb): Flatten(32x32x3),
    Dense(50, relu), Dense(50, relu), Dense(10, softmax), all with kernel_initializer=Zeros(), adam; loss
    stuck at 2.3027 and accuracy 0.10 for 50 epochs, the weights still all equal. Fix: the default
    (Glorot uniform) initialiser."""
    init = keras.initializers.Zeros() if buggy else "glorot_uniform"
    inp = keras.Input((32, 32, 3))
    h = layers.Flatten(name="flat")(inp)
    h = layers.Dense(50, activation="relu", kernel_initializer=init, name="dense1")(h)
    h = layers.Dense(50, activation="relu", kernel_initializer=init, name="dense2")(h)
    out = layers.Dense(10, activation="softmax", kernel_initializer=init, name="out")(h)
    m = keras.Model(inp, out, name="cifar_mlp")
    m.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return m


def _cifar_like(rng):
    x = rng.uniform(0, 1, size=(_N, 32, 32, 3)).astype("float32")  # pixels / 255
    x[:, :16, :16, :] += rng.uniform(-0.3, 0.3, size=(_N, 1, 1, 3)).astype("float32")
    y = np.argmax(x[:, :16, :16, :].mean(axis=(1, 2)) @ rng.normal(size=(3, 10)), axis=1)
    return np.clip(x, 0, 1), y.astype("int32")


def _identical_units(model, x, y):
    k = np.asarray(model.get_layer("dense1").kernel)
    return bool(np.ptp(k, axis=1).max() < 1e-7)


# ---- 5. a learning rate of 1e-5 for plain SGD: the weights do not move -------------------------------------


def _sgd_classifier(buggy):
    """"Loss and Accuracy Get Stuck in Keras" (Chen Zhang,
    https://blog.chenzhang.org/post/dev/loss-and-accuracy-get-stuck-in-keras/): a categorical classifier
    trained with SGD(lr=0.00001, decay=1e-6, momentum=0.9, nesterov=True), loss 1.9112 -> 1.9105 and stuck;
    fix: "increase learning from 0.00001 to 0.1". (Keras 3's SGD has no ``decay``; it is left out.)"""
    inp = keras.Input((10,))
    h = layers.Dense(64, activation="relu", name="d1")(inp)
    h = layers.Dense(64, activation="relu", name="d2")(h)
    out = layers.Dense(7, activation="softmax", name="out")(h)
    m = keras.Model(inp, out, name="sgd_clf")
    lr = 1e-5 if buggy else 0.1
    m.compile(optimizer=keras.optimizers.SGD(learning_rate=lr, momentum=0.9, nesterov=True),
              loss="categorical_crossentropy")
    return m


def _seven_classes(rng):
    x = rng.normal(size=(_N, 10)).astype("float32")
    c = np.argmax(x @ rng.normal(size=(10, 7)), axis=1)
    return x, np.eye(7, dtype="float32")[c]


def _at_chance(model, x, y):
    pred = np.argmax(np.asarray(model(x, training=False)), axis=1)
    true = np.argmax(y, axis=1)
    chance = np.bincount(true).max() / len(true)
    return bool((pred == true).mean() < chance + 0.1)


# ---- 6. an L2 factor far too large: the penalty swamps the data term, the model predicts a constant ------


def _l2_net(buggy):
    """DeepLearning.AI, "Improving Deep Neural Networks", week 1 "Regularization" (2D football-field points,
    LINEAR->RELU->LINEAR->RELU->LINEAR->SIGMOID with [20, 3, 1] units, gradient descent with learning rate
    0.3), and the course thread "Why W will close to 0 when lambd?"
    (https://community.deeplearning.ai/t/why-w-will-close-to-0-when-lambd/188908): with a large lambda "the
    regularization term dominates J and all it does is push the W values to zero ... the model ignores the
    input data and always makes the same prediction". Bug: kernel_regularizer=l2(1.0) (lambda = 2m = 768
    in the course's lambda/(2m) convention); fix: the assignment's lambda = 0.7, i.e. l2(0.7 / (2 * 211))."""
    factor = 1.0 if buggy else 0.7 / (2 * 211)
    reg = keras.regularizers.l2(factor)
    inp = keras.Input((2,))
    h = layers.Dense(20, activation="relu", kernel_regularizer=reg, name="d1")(inp)
    h = layers.Dense(3, activation="relu", kernel_regularizer=reg, name="d2")(h)
    out = layers.Dense(1, activation="sigmoid", kernel_regularizer=reg, name="out")(h)
    m = keras.Model(inp, out, name="l2_net")
    m.compile(optimizer=keras.optimizers.SGD(learning_rate=0.3), loss="binary_crossentropy")
    return m


def _football(rng):
    x = rng.uniform(-0.75, 0.75, size=(_N, 2)).astype("float32")
    y = (x[:, 1] > 0.3 * np.sin(4 * x[:, 0])).astype("float32")[:, None]  # the French / opposing side
    return x, y


def _penalty_swamps(model, x, y):
    xs, ys = tf.constant(x[:128]), tf.constant(y[:128])
    k = model.get_layer("d1").kernel
    with tf.GradientTape(persistent=True) as tape:
        data = ops.mean(keras.losses.get(model.loss)(ys, model(xs, training=True)))
        pen = ops.sum(ops.stack(model.losses))
    gd, gp = tape.gradient(data, k), tape.gradient(pen, k)
    ratio = float(tf.norm(gp)) / max(float(tf.norm(gd)), 1e-12)
    return bool(ratio > 10.0 or _predict(model, x).std() < 1e-3)


# ---- 7. raw MovieLens movie ids fed to an Embedding sized to the largest id -------------------------------

_MOVIE_IDS = np.sort(np.random.default_rng(12345).choice(np.arange(1, 193610), size=300, replace=False))
_N_USERS = 610


class Column(layers.Layer):
    def __init__(self, index, **kw):
        super().__init__(**kw)
        self.index = index

    def call(self, x):
        return x[:, self.index]


def _recommender(buggy):
    """Stack Overflow 60683663, "why before embedding, have to make the item be sequential starting at zero"
    (mirrored at https://example-a.com/answer/60683663), on the blog post "Deep Learning With Keras:
    Recommender Systems" (MovieLens small: 610 users, 9,724 movies whose ids run up to 193,609): without the
    LabelEncoder step the movie Embedding has to be sized to the largest raw id, so almost all of its rows
    are never looked up ("similar to one-hot encoding ... not efficient"). Ported with 300 distinct movies.
    Fix: re-index the ids (an IntegerLookup over the known ids, the LabelEncoder of the post)."""
    inp = keras.Input((2,), dtype="int64")
    user = Column(0, name="user_id")(inp)
    movie = Column(1, name="movie_id")(inp)
    if buggy:
        movie_emb = layers.Embedding(int(_MOVIE_IDS.max()) + 1, 50, name="movie_emb")(movie)
    else:
        idx = layers.IntegerLookup(vocabulary=_MOVIE_IDS.tolist(), name="movie_index")(movie)
        movie_emb = layers.Embedding(len(_MOVIE_IDS) + 1, 50, name="movie_emb")(idx)
    user_emb = layers.Embedding(_N_USERS + 1, 50, name="user_emb")(user)
    h = layers.Concatenate(name="concat")([user_emb, movie_emb])
    h = layers.Dense(10, activation="relu", name="fc")(h)
    out = layers.Dense(1, name="rating")(h)
    m = keras.Model(inp, out, name="recsys")
    m.compile(optimizer=keras.optimizers.Adam(0.001), loss="mse")
    return m


def _ratings(rng, n=2 * _N):
    users = rng.integers(1, _N_USERS + 1, size=n)
    movies = _MOVIE_IDS[rng.integers(0, len(_MOVIE_IDS), size=n)]
    taste = rng.normal(size=_N_USERS + 1)
    quality = dict(zip(_MOVIE_IDS.tolist(), rng.normal(size=len(_MOVIE_IDS))))
    r = 3.5 + 0.6 * taste[users] + 0.6 * np.array([quality[m] for m in movies.tolist()])
    r = np.clip(np.round(2 * r) / 2, 0.5, 5.0)
    return np.stack([users, movies], axis=1).astype("int64"), r[:, None].astype("float32")


def _mostly_unused_rows(name):
    return lambda m, x, y: bool(_rows_used(m, x, name) < 0.2)


# ---- 8. an LSTM reading tweets padded at the end, without a mask ------------------------------------------

_MAXLEN = 93


def _tweet_lstm(buggy):
    """Dwarampudi and Subba Reddy, "Effects of padding on LSTMs and CNNs" (arXiv:1903.07288): word2vec
    vectors of tweets padded to 93 steps; an LSTM fed post-padded sequences stays near 50% where pre-padding
    reaches 80% (also Stack Overflow 46298793, "How does choosing between pre and post zero padding of
    sequences impact results": after the words, the zeros flush the state out). Bug: padding='post' and no
    mask; fix: mask the padding (Masking(0.), as in the Keras masking-and-padding guide), so the LSTM's
    last state is the one after the last word."""
    inp = keras.Input((_MAXLEN, 16))
    h = inp if buggy else layers.Masking(0.0, name="mask")(inp)
    h = layers.LSTM(32, name="lstm")(h)
    out = layers.Dense(1, activation="sigmoid", name="out")(h)
    m = keras.Model(inp, out, name="tweets")
    m.compile(optimizer="adam", loss="binary_crossentropy")
    return m


def _post_padded_tweets(rng):
    lengths = rng.integers(5, 21, size=_N)
    direction = rng.normal(size=16)
    x = np.zeros((_N, _MAXLEN, 16), "float32")
    y = np.zeros((_N, 1), "float32")
    for i, n in enumerate(lengths):
        words = rng.normal(0, 0.5, size=(n, 16))
        y[i] = float(words.mean(axis=0) @ direction > 0)
        x[i, :n] = words  # padding='post'
    return x, y


def _content_forgotten(model, x, y):
    """The prediction hardly depends on the tweet: its spread over examples is tiny."""
    return bool(_predict(model, x).std() < 0.02)


# ---- 9. a "temporal" softmax taken over the last axis, of size 1 -----------------------------------------


class TemporalSoftmax(layers.Layer):
    """The TemporalSoftmax of the Keras guide "Understanding masking & padding"; keras-team/keras-io#1904
    points out that it sums over axis=-1 (the single score of each timestep) instead of over time."""

    def __init__(self, axis=-1, **kw):
        super().__init__(**kw)
        self.axis = axis
        self.supports_masking = True

    def call(self, inputs, mask=None):
        broadcast_float_mask = ops.expand_dims(ops.cast(mask, "float32"), -1)
        inputs_exp = ops.exp(inputs) * broadcast_float_mask
        inputs_sum = ops.sum(inputs_exp * broadcast_float_mask, axis=self.axis, keepdims=True)
        return inputs_exp / inputs_sum


class WeightedSum(layers.Layer):
    def call(self, inputs, mask=None):
        values, weights = inputs
        return ops.sum(values * weights, axis=1)

    def compute_mask(self, inputs, mask=None):
        return None


def _attention_classifier(buggy):
    """keras-team/keras-io#1904, "Correct minor issue in the guide 'Understanding masking & padding'": the
    guide's attention-style block Embedding(mask_zero=True) -> Dense(1) -> TemporalSoftmax computes the
    softmax over axis=-1, of size 1, so every weight is exactly 1, the pooling is a plain sum and the
    scoring Dense(1) gets no gradient. Ported into a pooled review classifier. Fix: the softmax over time
    (axis=1), as in the pull request."""
    inp = keras.Input((40,), dtype="int32")
    emb = layers.Embedding(500, 16, mask_zero=True, name="emb")(inp)
    score = layers.Dense(1, name="score")(emb)
    weights = TemporalSoftmax(axis=-1 if buggy else 1, name="temporal_softmax")(score)
    pooled = WeightedSum(name="pool")([emb, weights])
    out = layers.Dense(1, activation="sigmoid", name="out")(pooled)
    m = keras.Model(inp, out, name="attn_clf")
    m.compile(optimizer="adam", loss="binary_crossentropy")
    return m


def _reviews(rng):
    x = rng.integers(1, 500, size=(_N, 40)).astype("int32")  # no padding: every step unmasked
    y = ((x < 50).sum(axis=1) > (x >= 450).sum(axis=1)).astype("float32")[:, None]
    return x, y


def _weights_all_one(model, x, y):
    w = np.asarray(keras.Model(model.inputs, model.get_layer("temporal_softmax").output)(x[:128]))
    return bool(np.all(np.abs(w - 1.0) < 1e-6))


# ---- 10. Embedding sized to len(word_index) + 1 while the Tokenizer keeps only num_words ------------------

_NUM_WORDS, _FULL_VOCAB, _SEQ = 5000, 40000, 100


def _text_classifier(buggy):
    """BrambleXu/nlp-beginner-guide-keras ("num_words ... But in practice, the vocabulary contains all
    words": ``word_index`` holds the whole vocabulary while ``texts_to_sequences`` keeps only the num_words
    most frequent), on the pattern of Real Python's "Practical Text Classification With Python and Keras":
    Tokenizer(num_words=5000), ``vocab_size = len(tokenizer.word_index) + 1``, Embedding(vocab_size, 50),
    pad_sequences(padding='post', maxlen=100), Flatten, Dense(10, relu), Dense(1, sigmoid). With a corpus of
    40,000 distinct words, seven eighths of the rows can never be looked up. Fix: Embedding(num_words, 50)."""
    inp = keras.Input((_SEQ,), dtype="int32")
    h = layers.Embedding((_FULL_VOCAB + 1) if buggy else _NUM_WORDS, 50, name="emb")(inp)
    h = layers.Flatten(name="flat")(h)
    h = layers.Dense(10, activation="relu", name="fc")(h)
    out = layers.Dense(1, activation="sigmoid", name="out")(h)
    m = keras.Model(inp, out, name="text_clf")
    m.compile(optimizer="adam", loss="binary_crossentropy")
    return m


def _tokenised_reviews(rng):
    ranks = np.arange(1, _FULL_VOCAB + 1)
    p = 1.0 / ranks
    p /= p.sum()
    x = np.zeros((_N, _SEQ), "int32")
    y = np.zeros((_N, 1), "float32")
    for i in range(_N):
        words = rng.choice(ranks, size=rng.integers(10, 60), p=p)
        y[i] = float(np.isin(words, np.arange(2, 40, 2)).sum() > np.isin(words, np.arange(3, 40, 2)).sum())
        kept = words[words < _NUM_WORDS][:_SEQ]  # texts_to_sequences drops the rarer words
        x[i, : len(kept)] = kept  # padding='post'
    return x, y


BLIND_CASES = [
    Case("ceil_after_prelu", "keras-team/keras#15716, 'Gradients do not exist for variables "
         "[p_re_lu/alpha:0] when minimizing the loss' (tf.math.ceil in the model)",
         _ceil_net, _ceil_data, ("gradient_cut", "ceil_net/ceil"), _ceil_symptom),
    Case("noisy_kernel_built_once", "tensorflow/tensorflow#32729, 'Variable noisy_dense/bias:0 has None for "
         "gradient' (NoisyDense kernel computed in build())",
         _noisy_dqn, _q_targets, ("gradient_cut", "dqn/noisy"), _noisy_symptom),
    Case("categorical_crossentropy_one_unit", "Cross Validated 565956, 'Confused with binary cross entropy vs "
         "categorical cross entropy' (https://stats.stackexchange.com/questions/565956)",
         _lstm_one_unit, _label_encoded_windows, ("head_mismatch", "lstm_clf/out"), _flat_loss),
    Case("zero_init_cifar_mlp", "AliPakzad/DeepLearning-WeightInitialization-Impact-CIFAR10 "
         "(deep_Project_3_2.ipynb: every kernel initialised with Zeros())",
         _zero_init_mlp, _cifar_like, ("identical_units", "cifar_mlp/dense1"), _identical_units),
    Case("sgd_learning_rate_1e-5", "'Loss and Accuracy Get Stuck in Keras' "
         "(https://blog.chenzhang.org/post/dev/loss-and-accuracy-get-stuck-in-keras/)",
         _sgd_classifier, _seven_classes, ("no_progress", "sgd_clf/d1"), _at_chance),
    Case("l2_factor_too_large", "DeepLearning.AI, Improving Deep Neural Networks wk1 'Regularization', and "
         "'Why W will close to 0 when lambd?' (community.deeplearning.ai/t/188908)",
         _l2_net, _football, ("penalties", "l2_net/d1"), _penalty_swamps),
    Case("raw_movie_ids_embedding", "Stack Overflow 60683663, 'why before embedding, have to make the item be "
         "sequential starting at zero' (Deep Learning With Keras: Recommender Systems)",
         _recommender, _ratings, ("unused_embedding", "recsys/movie_emb"), _mostly_unused_rows("movie_emb")),
    Case("lstm_post_padding_unmasked", "Dwarampudi and Subba Reddy, 'Effects of padding on LSTMs and CNNs' "
         "(arXiv:1903.07288); Stack Overflow 46298793",
         _tweet_lstm, _post_padded_tweets, ("vanishing", "tweets/lstm"), _content_forgotten, epochs=6),
    Case("temporal_softmax_last_axis", "keras-team/keras-io#1904, 'Correct minor issue in the guide "
         "Understanding masking & padding' (TemporalSoftmax over axis=-1)",
         _attention_classifier, _reviews, ("gradient_cut", "attn_clf/temporal_softmax"), _weights_all_one),
    Case("embedding_sized_to_word_index", "BrambleXu/nlp-beginner-guide-keras (Tokenizer num_words vs "
         "word_index); Real Python, 'Practical Text Classification With Python and Keras'",
         _text_classifier, _tokenised_reviews, ("unused_embedding", "text_clf/emb"), _mostly_unused_rows("emb")),
]
