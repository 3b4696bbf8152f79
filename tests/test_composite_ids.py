"""Ragged and sparse ids into an Embedding (variable-length histories, multi-hot features): trained
exactly as model.fit trains them, with the id checks working on their values."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import gradtrace


def _model():
    inp = keras.Input((None,), dtype="int32", ragged=True, name="history")
    h = layers.Embedding(100, 8, name="items")(inp)
    h = keras.ops.mean(h, axis=1)
    m = keras.Model(inp, layers.Dense(1, name="out")(h), name="seq")
    m.compile(optimizer="adam", loss="mse")
    return m


def _ragged_data(bad_at=None):
    rng = np.random.default_rng(0)
    lens = rng.integers(1, 6, 64)
    vals = rng.integers(0, 100, int(lens.sum())).astype("int32")
    if bad_at is not None:  # an id past the table in batch `bad_at` (of 16 examples)
        vals[int(lens[: 16 * bad_at].sum()) + 2] = 100
    ids = tf.RaggedTensor.from_row_lengths(vals, lens)
    y = rng.random((64, 1)).astype("float32")
    return tf.data.Dataset.from_tensor_slices((ids, y)).batch(16)


def test_ragged_ids_train_exactly_as_model_fit():
    weights = {}
    for who in ("keras", "gradtrace"):
        keras.utils.set_random_seed(0)
        m = _model()
        kw = dict(verbose=0, shuffle=False)
        h = m.fit(_ragged_data(), **kw) if who == "keras" else gradtrace.fit(m, _ragged_data(), **kw)
        weights[who] = m.get_weights()
        if who == "gradtrace":
            assert h.anomalies == []
            assert [r.path for r in h.gradtrace.engine.tables[True].rows if r.kind == "ids"] == ["seq/items"]
    assert all(np.array_equal(a, b) for a, b in zip(weights["keras"], weights["gradtrace"]))


def test_an_out_of_range_id_in_a_ragged_batch_halts_at_its_step():
    keras.utils.set_random_seed(0)
    m = _model()
    h = gradtrace.fit(m, _ragged_data(bad_at=2), verbose=0, shuffle=False)
    found = [a for a in h.anomalies if a.detector == "embedding_out_of_range"]
    assert [(a.layer, a.step) for a in found] == [("seq/items", 2)] and "got id 100" in found[0].message
    assert int(m.optimizer.iterations) == 2 and all(np.isfinite(w).all() for w in m.get_weights())


@pytest.mark.parametrize("bad", [False, True])
def test_sparse_ids_are_checked_on_their_values(bad):
    """Sparse ids (a multi-hot feature) reach the Embedding as a SparseTensor, as model.fit allows."""

    class SparseLookup(layers.Layer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.emb = layers.Embedding(50, 4, name="emb")

        def call(self, ids):
            return keras.ops.sum(self.emb(ids), axis=1)

    rng = np.random.default_rng(1)
    dense = rng.integers(1, 50, (32, 6)).astype("int64")
    if bad:
        dense[20, 1] = 77
    x = tf.sparse.from_dense(tf.constant(dense))
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,), sparse=True, dtype="int64", name="ids")
    m = keras.Model(inp, layers.Dense(1, name="out")(SparseLookup(name="lookup")(inp)), name="sp")
    m.compile(optimizer="adam", loss="mse")
    h = gradtrace.fit(m, x, rng.random((32, 1)).astype("float32"), batch_size=16, shuffle=False, verbose=0)
    found = [(a.detector, a.layer, a.step) for a in h.anomalies if a.detector == "embedding_out_of_range"]
    assert found == ([("embedding_out_of_range", "sp/lookup/emb", 1)] if bad else [])
    assert int(m.optimizer.iterations) == (1 if bad else 2)


@pytest.mark.parametrize("wired_wrong", [True, False])
def test_two_tables_that_never_part_are_reported(wired_wrong):
    """A two-tower recommender (a dot product of a user and an item vector) whose tables were made with
    the same seeded initialiser. Wired wrong, the item table is fed the user ids: the dot product gives
    both tables the same gradients and they stay equal, reported at the epoch's end. Wired right, they
    part: silent."""
    init = lambda: keras.initializers.RandomUniform(-0.05, 0.05, seed=7)  # noqa: E731
    user = keras.Input((1,), dtype="int32", name="user")
    item = keras.Input((1,), dtype="int32", name="item")
    u = layers.Flatten()(layers.Embedding(100, 8, embeddings_initializer=init(), name="user_emb")(user))
    i = layers.Flatten()(layers.Embedding(100, 8, embeddings_initializer=init(), name="item_emb")(
        user if wired_wrong else item))
    out = layers.Activation("sigmoid", name="out")(layers.Dot(axes=1, name="dot")([u, i]))
    m = keras.Model([user, item], out, name="rec")
    m.compile(optimizer="adam", loss="binary_crossentropy")
    rng = np.random.default_rng(0)
    x = [rng.integers(0, 100, (256, 1)).astype("int32"), rng.integers(0, 100, (256, 1)).astype("int32")]
    y = (rng.random((256, 1)) < 0.5).astype("float32")
    h = gradtrace.fit(m, x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    found = [(a.layer, a.stage) for a in h.anomalies if a.detector == "embedding_twins"]
    assert found == ([("rec/user_emb", "epoch_end")] if wired_wrong else [])
