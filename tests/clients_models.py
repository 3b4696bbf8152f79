"""Models of the client libraries gradtrace is tested against, built from their constructors.

KerasHub (keras-hub) and Keras Recommenders (keras-rs) at small sizes: no preset, no download,
``preprocessor=None``, token ids in, synthetic data made here. Every builder seeds Keras first, so two
calls give the same weights (the parity tests train one copy with ``model.fit`` and one with
``gradtrace.fit``). Dropout is left at each constructor's default unless it says otherwise: the
seed generators of the two copies start alike, so even a random layer must give the same numbers.

Provenance of the keras-rs models: the keras.io Keras Recommenders examples
(https://keras.io/keras_rs/examples/): ``basic_retrieval.py`` (two-tower retrieval; the candidate
table is handed to ``BruteForceRetrieval`` in ``build``), ``dcn.py`` (Deep & Cross Network,
``FeatureCross``) and ``dlrm.py`` (``DotInteraction``), with their MovieLens features replaced by
synthetic ids and ratings.
"""

import keras
import numpy as np

VOCAB, SEQ, HIDDEN = 64, 8, 16


def _compile(model, lr=1e-3, loss=None, **kw):
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=loss, **kw)
    return model


def lm_loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


# -- KerasHub ------------------------------------------------------------------------------------
def bert_classifier(lr=1e-3):
    import keras_hub

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(vocabulary_size=VOCAB, num_layers=1, num_heads=2, hidden_dim=HIDDEN,
                                             intermediate_dim=32, max_sequence_length=SEQ)
    model = keras_hub.models.BertTextClassifier(backbone, num_classes=3, preprocessor=None)
    return _compile(model, lr, keras.losses.SparseCategoricalCrossentropy(from_logits=True))


def gpt2_lm(lr=1e-3):
    import keras_hub

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(vocabulary_size=VOCAB, num_layers=1, num_heads=2, hidden_dim=HIDDEN,
                                             intermediate_dim=32, max_sequence_length=SEQ)
    return _compile(keras_hub.models.GPT2CausalLM(backbone, preprocessor=None), lr, lm_loss(), weighted_metrics=[])


def gemma_lm(lr=1e-3):
    import keras_hub

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GemmaBackbone(vocabulary_size=VOCAB, num_layers=1, num_query_heads=2,
                                              num_key_value_heads=1, hidden_dim=HIDDEN, intermediate_dim=32,
                                              head_dim=8)
    return _compile(keras_hub.models.GemmaCausalLM(backbone, preprocessor=None), lr, lm_loss(), weighted_metrics=[])


def bart_lm(lr=1e-3):
    import keras_hub

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BartBackbone(vocabulary_size=VOCAB, num_layers=1, num_heads=2, hidden_dim=HIDDEN,
                                             intermediate_dim=32, max_sequence_length=SEQ)
    return _compile(keras_hub.models.BartSeq2SeqLM(backbone, preprocessor=None), lr, lm_loss(), weighted_metrics=[])


def token_data(n=32, vocab=VOCAB, seed=0, low=1):
    """Token ids in ``[low, vocab)`` with a padding mask, and the next-token targets."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(low, vocab, size=(n, SEQ)).astype("int32")
    mask = np.ones_like(ids, dtype=bool)
    mask[:, -2:] = rng.random((n, 2)) < 0.5  # some padding at the end
    return {"token_ids": ids, "padding_mask": mask}, np.roll(ids, -1, axis=1)


def bert_data(n=32, vocab=VOCAB, seed=0):
    x, _ = token_data(n, vocab, seed)
    x["segment_ids"] = np.zeros_like(x["token_ids"])
    return x, np.random.default_rng(seed + 1).integers(0, 3, size=(n,)).astype("int32")


def seq2seq_data(n=32, vocab=VOCAB, seed=0):
    enc, _ = token_data(n, vocab, seed)
    dec, target = token_data(n, vocab, seed + 1)
    x = {"encoder_token_ids": enc["token_ids"], "encoder_padding_mask": enc["padding_mask"],
         "decoder_token_ids": dec["token_ids"], "decoder_padding_mask": dec["padding_mask"]}
    return x, target


# -- Keras Recommenders --------------------------------------------------------------------------
class RetrievalModel(keras.Model):
    """The two-tower model of keras.io's ``basic_retrieval`` example: a user table (the query tower), a
    candidate table (the candidate tower, looked up in ``compute_loss``) and a ``BruteForceRetrieval``
    layer handed the candidate table itself (one variable, two layers), used for predictions only."""

    def __init__(self, num_users, num_candidates, embedding_dimension=8, **kwargs):
        import keras_rs

        super().__init__(**kwargs)
        self.user_embedding = keras.layers.Embedding(num_users, embedding_dimension)
        self.candidate_embedding = keras.layers.Embedding(num_candidates, embedding_dimension)
        self.retrieval = keras_rs.layers.BruteForceRetrieval(k=5, return_scores=False)
        self.loss_fn = keras.losses.MeanSquaredError()

    def build(self, input_shape):
        self.user_embedding.build(input_shape)
        self.candidate_embedding.build(input_shape)
        self.retrieval.candidate_embeddings = self.candidate_embedding.embeddings
        self.retrieval.build(input_shape)
        super().build(input_shape)

    def call(self, inputs, training=False):
        result = {"user_embeddings": self.user_embedding(inputs)}
        if not training:
            result["predictions"] = self.retrieval(result["user_embeddings"])
        return result

    def compute_loss(self, x, y, y_pred, sample_weight, training=True):
        candidates = self.candidate_embedding(y["movie_id"])
        scores = keras.ops.sum(y_pred["user_embeddings"] * candidates, axis=1, keepdims=True)
        return self.loss_fn(keras.ops.expand_dims(y["rating"], -1), scores, sample_weight)


USERS, MOVIES = 40, 30


def two_tower(plus_one=True, lr=0.1):
    """``plus_one=False`` is the fault: ids start at 1, so a table of ``count`` rows misses the last id."""
    keras.utils.set_random_seed(0)
    extra = 1 if plus_one else 0
    model = RetrievalModel(USERS + extra, MOVIES + extra)
    model.compile(optimizer=keras.optimizers.Adagrad(learning_rate=lr))
    return model


def retrieval_data(n=64, seed=0):
    """User ids in ``[1, USERS]`` and movie ids in ``[1, MOVIES]`` (MovieLens ids start at 1); the
    highest movie id comes at the third batch of 16."""
    rng = np.random.default_rng(seed)
    users = rng.integers(1, USERS + 1, size=(n,)).astype("int32")
    movies = rng.integers(1, MOVIES, size=(n,)).astype("int32")
    movies[40] = MOVIES
    rating = ((rng.integers(1, 6, size=(n,)) - 1) / 4.0).astype("float32")
    return users, {"movie_id": movies, "rating": rating}


FEATURES = {"movie_id": 30, "user_id": 40, "user_gender": 2, "user_occupation": 21}


def _feature_embeddings(dim, vocab_of=None):
    vocab_of = vocab_of or {}
    return {name: keras.layers.Embedding(vocab_of.get(name, size), dim, name=f"{name}_embedding")
            for name, size in FEATURES.items()}


def dcn(lr=1e-3, vocab_of=None):
    """keras.io ``dcn.py``: one Embedding per categorical feature, concatenated, two ``FeatureCross``
    layers (a cross network on the embeddings), a deep Dense tower and a rating head (MSE)."""
    import keras_rs

    keras.utils.set_random_seed(0)
    inputs = {name: keras.Input((), dtype="int32", name=name) for name in FEATURES}
    embeddings = _feature_embeddings(8, vocab_of)
    x0 = keras.layers.Concatenate()([embeddings[n](inputs[n]) for n in FEATURES])
    x = keras_rs.layers.FeatureCross(name="cross_1")(x0, x0)
    x = keras_rs.layers.FeatureCross(name="cross_2")(x0, x)
    x = keras.layers.Dense(16, activation="relu", name="deep_1")(x)
    x = keras.layers.Dense(8, activation="relu", name="deep_2")(x)
    model = keras.Model(inputs, keras.layers.Dense(1, name="rating")(x), name="dcn")
    return _compile(model, lr, "mse")


def dlrm(lr=1e-3, vocab_of=None):
    """keras.io ``dlrm.py``: a bottom MLP on the dense features, one Embedding per categorical feature,
    ``DotInteraction`` over all of them, a top MLP and a rating head (MSE)."""
    import keras_rs

    keras.utils.set_random_seed(0)
    dense_in = keras.Input((3,), name="dense_features")
    cat_in = {name: keras.Input((), dtype="int32", name=name) for name in FEATURES}
    bottom = keras.layers.Dense(16, activation="relu", name="bottom_1")(dense_in)
    bottom = keras.layers.Dense(8, activation="relu", name="bottom_2")(bottom)
    embeddings = _feature_embeddings(8, vocab_of)
    interaction = keras_rs.layers.DotInteraction(name="interaction")(
        [bottom] + [embeddings[n](cat_in[n]) for n in FEATURES])
    top = keras.layers.Concatenate()([bottom, interaction])
    top = keras.layers.Dense(16, activation="relu", name="top_1")(top)
    model = keras.Model({"dense_features": dense_in, **cat_in}, keras.layers.Dense(1, name="rating")(top),
                        name="dlrm")
    return _compile(model, lr, "mse")


def ranking_data(n=64, seed=0, dense=True):
    """Categorical ids per feature (and, for DLRM, three dense features) and a rating to regress."""
    rng = np.random.default_rng(seed)
    x = {name: rng.integers(0, size, size=(n,)).astype("int32") for name, size in FEATURES.items()}
    noise = rng.normal(size=(n, 3)).astype("float32")
    if dense:
        x["dense_features"] = noise
    y = ((x["movie_id"] % 5) / 4.0 + 0.1 * noise[:, 0]).astype("float32")[:, None]
    return x, y
