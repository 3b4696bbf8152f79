"""Embedding health: the row- and table-level checks on real fits, inside nested inner models with two or
more tables of which only one is faulty; and a healthy recommender with every kind of table people use
(Zipf-distributed item ids, a table sized exactly to a small dataset's vocabulary, hashed ids, a table
used twice, token + position tables, mask_zero padding) on which nothing fires."""

import keras
import numpy as np
import pytest
from keras import layers, ops

import gradtrace


def _zipf(rng, n, vocab, s=1.1, size=1):
    p = np.arange(1, vocab + 1, dtype=np.float64) ** -s
    return rng.choice(vocab, size=(n, size), p=p / p.sum()).astype("int32")


class TokenAndPosition(layers.Layer):
    """The Keras text-classification-with-Transformer example's TokenAndPositionEmbedding."""

    def __init__(self, vocab, maxlen, dim, **kw):
        super().__init__(**kw)
        self.token_emb = layers.Embedding(vocab, dim, name="tok_emb")
        self.pos_emb = layers.Embedding(maxlen, dim, name="pos_emb")

    def call(self, x):
        return self.token_emb(x) + self.pos_emb(ops.arange(0, ops.shape(x)[-1]))


def _healthy_model():
    user, friend = keras.Input((1,), dtype="int32", name="user"), keras.Input((1,), dtype="int32", name="friend")
    item = keras.Input((1,), dtype="int32", name="item")
    history = keras.Input((6,), dtype="int32", name="history")  # item ids, 0 = padding
    category = keras.Input((1,), dtype="int64", name="category")  # raw ids up to 10^6, hashed
    text = keras.Input((8,), dtype="int32", name="text")
    users = layers.Embedding(300, 8, name="user_emb")  # sized exactly to the data's 300 users
    u = layers.Flatten(name="u")(layers.Add(name="u_and_friend")([users(user), users(friend)]))  # used twice
    i = layers.Flatten(name="i")(layers.Embedding(2000, 16, name="item_emb")(item))
    h = layers.GlobalAveragePooling1D(name="h")(layers.Embedding(2000, 8, mask_zero=True, name="hist_emb")(history))
    c = layers.Flatten(name="c")(layers.Embedding(64, 4, name="cat_emb")(layers.Hashing(64, name="hash")(category)))
    t = layers.GlobalAveragePooling1D(name="t")(TokenAndPosition(500, 8, 8, name="tok_pos")(text))
    inner = keras.Model([user, friend, item, history, category, text], layers.Concatenate(name="features")(
        [u, i, h, c, t]), name="inner")
    ins = [keras.Input(t.shape[1:], dtype=t.dtype, name=t.name) for t in inner.inputs]
    z = layers.Dense(32, activation="relu", kernel_initializer="he_normal", name="hidden")(inner(ins))
    model = keras.Model(ins, layers.Dense(1, activation="sigmoid", name="click")(z), name="rec")
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="binary_crossentropy")
    return model


def _healthy_data(n=640, seed=0):
    rng = np.random.default_rng(seed)
    user, friend = rng.integers(0, 300, (n, 1)).astype("int32"), rng.integers(0, 300, (n, 1)).astype("int32")
    item = _zipf(rng, n, 2000)
    history = _zipf(rng, n, 2000, size=6) + 1
    history[:, 4:][rng.random((n, 2)) < 0.5] = 0  # padded histories
    category = rng.integers(0, 10**6, (n, 1)).astype("int64")
    text = rng.integers(1, 500, (n, 8)).astype("int32")
    logit = (item[:, 0] < 20) * 1.5 + (user[:, 0] % 3 == 0) - 0.8 + 0.002 * (text.sum(axis=1) - 2000)
    y = (rng.random((n, 1)) < 1 / (1 + np.exp(-logit[:, None]))).astype("float32")
    return [user, friend, item, history, category, text], y


def test_healthy_recommender_with_every_kind_of_table_is_silent():
    keras.utils.set_random_seed(1)
    model = _healthy_model()
    x, y = _healthy_data()
    detectors = [d for d in gradtrace.DEFAULT if d != "embedding_collapse"] + [gradtrace.EmbeddingCollapse(every=15)]
    h = gradtrace.fit(model, x, y, batch_size=32, epochs=3, verbose=0, detectors=detectors)
    assert h.anomalies == [], "\n".join(map(str, h.anomalies))
    assert h.history["loss"][-1] < h.history["loss"][0]
    rows = h.gradtrace.engine.tables[True].rows
    ids = {r.path for r in rows if r.kind == "ids"}
    assert {f"rec/inner/{t}" for t in ("user_emb", "item_emb", "hist_emb", "cat_emb", "tok_pos/tok_emb",
                                       "tok_pos/pos_emb")} <= ids
    assert "rec/inner/user_emb#2" in ids  # the shared table's second call
    collapse = next(d for d in h.gradtrace.engine.detectors if d.name == "embedding_collapse")
    steps = [s for s, _ in collapse.history["rec/inner/item_emb"]]
    assert {15, 30, 45} <= set(steps) and 20 in steps  # every 15 steps, and at the end of each 20-step epoch
    width = {path: min(layer.embeddings.shape) for path, layer in
             ((f"rec/inner/{n}", model.get_layer("inner").get_layer(n)) for n in ("item_emb", "hist_emb"))}
    for path, w in width.items():  # measured: stays near a random table's effective rank
        assert min(r for _, r in collapse.history[path]) > 0.6 * w


def test_healthy_text_model_behind_max_pooling_is_silent_although_most_rows_get_no_gradient():
    """GlobalMaxPooling1D passes each channel's gradient to one position: most looked-up rows of a
    healthy text model get no gradient in an epoch. Only a table cut off whole is a finding."""
    rng = np.random.default_rng(5)
    x = rng.integers(1, 5000, (640, 100)).astype("int32")
    y = (x[:, 0] < 2500).astype("float32")
    inp = keras.Input((100,), dtype="int32")
    h = layers.GlobalMaxPooling1D(name="pool")(layers.Embedding(5000, 16, name="emb")(inp))
    model = keras.Model(inp, layers.Dense(1, activation="sigmoid", name="out")(h), name="text")
    model.compile(optimizer="adam", loss="binary_crossentropy")
    h = gradtrace.fit(model, x, y, batch_size=32, epochs=1, verbose=0)
    assert h.anomalies == [], h.anomalies
    table = h.gradtrace.embedding_tables()[0]
    assert table.rows_never_learned > 0.5 * table.rows_used


def _two_tables(item_between=None, item_initializer="uniform", head_units=16):
    user, item = keras.Input((1,), dtype="int32", name="user"), keras.Input((1,), dtype="int32", name="item")
    u = layers.Flatten(name="u")(layers.Embedding(400, 16, name="user_emb")(user))
    i = layers.Embedding(300, 16, embeddings_initializer=item_initializer, name="item_emb")(item)
    i = layers.Flatten(name="i")(item_between(i) if item_between is not None else i)
    inner = keras.Model([user, item], [u, i], name="inner")
    a, b = keras.Input((1,), dtype="int32", name="user"), keras.Input((1,), dtype="int32", name="item")
    uu, ii = inner([a, b])
    z = layers.Concatenate(name="both")([layers.Dense(head_units, activation="relu", name="user_tower")(uu), ii])
    model = keras.Model([a, b], layers.Dense(1, activation="sigmoid", name="click")(z), name="rec")
    return model


def _two_table_data(n, seed=0, hot=True):
    rng = np.random.default_rng(seed)
    user = rng.integers(0, 400, (n, 1)).astype("int32")
    item = _zipf(rng, n, 300, s=1.3) if hot else rng.integers(0, 300, (n, 1)).astype("int32")
    y = (rng.random((n, 1)) < 0.4).astype("float32")
    return [user, item], y


def test_exploding_rows_of_the_item_table_are_named_with_their_ids():
    """Plain SGD at a learning rate far too high for the hot item ids (Zipf-distributed): every lookup
    adds to their rows, which run away (measured without gradtrace: 0.12 -> 100 in 8 steps) while the
    user rows stay near their start."""
    keras.utils.set_random_seed(2)
    model = _two_tables()
    model.compile(optimizer=keras.optimizers.SGD(15.0), loss="binary_crossentropy")
    x, y = _two_table_data(640)
    h = gradtrace.fit(model, x, y, batch_size=32, epochs=1, verbose=0, shuffle=False, on_anomaly="warn")
    # (at the epoch's end the user rows have stopped learning too: the user tower's ReLUs died)
    found = [a for a in h.anomalies if a.detector == "embedding_rows" and a.stage == "step"]
    assert [a.layer for a in found] == ["rec/inner/item_emb"], h.anomalies
    worst = found[0].message.split("worst ids: ")[1].rstrip(".").split(", ")
    assert 0 < found[0].step < 12 and {"0", "1"} & set(worst)  # the most frequent ids
    assert "MaxNorm" in found[0].hint


class Detach(layers.Layer):
    """A feature transform written with ``stop_gradient`` ("the embedding is only an input here")."""

    def call(self, x):
        return ops.stop_gradient(x)


def test_a_detached_table_is_found_at_the_first_step_with_the_op_that_cuts_it():
    keras.utils.set_random_seed(3)
    model = _two_tables(item_between=Detach(name="detach"))
    model.compile(optimizer="adam", loss="binary_crossentropy")
    x, y = _two_table_data(640, hot=False)
    with pytest.warns(UserWarning, match="Gradients do not exist"):  # Keras' own warning says which variable
        h = gradtrace.fit(model, x, y, batch_size=64, epochs=1, verbose=0)
    # the table cut off whole is gradient_cut's, at the first step, naming the op that cuts it
    found = [(a.detector, a.layer, a.stage, a.step) for a in h.anomalies]
    assert found == [("gradient_cut", "rec/inner/item_emb", "step", 0)], h.anomalies
    assert "StopGradient" in h.anomalies[0].message and "no gradient reaches embeddings" in h.anomalies[0].message
    rows = next(d for d in h.gradtrace.engine.detectors if d.name == "embedding_rows")
    assert not rows.moved()["rec/inner/item_emb"].any()  # the report's "rows that learned": none


def test_collapsed_item_table_is_caught_by_the_periodic_check(tmp_path, capsys):
    """The item table initialised with a constant (every row the same vector, a copied "warm start"):
    training moves each row a little, but the rows span about one direction; the user table, initialised
    by Keras' default, keeps its rank."""
    keras.utils.set_random_seed(4)
    model = _two_tables(item_initializer=keras.initializers.Constant(0.05))
    model.compile(optimizer="adam", loss="binary_crossentropy")
    x, y = _two_table_data(640, hot=False)
    h = gradtrace.fit(model, x, y, batch_size=32, epochs=1, verbose=0, tensorboard_dir=tmp_path,
                      detectors=["unused_embedding", "embedding_rows", gradtrace.EmbeddingCollapse(every=10)])
    found = [(a.detector, a.layer, a.stage, a.step) for a in h.anomalies]
    assert found == [("embedding_collapse", "rec/inner/item_emb", "periodic", 10)], h.anomalies
    assert "effective rank" in h.anomalies[0].message
    # every table at a glance: in the report, and in TensorBoard at the epoch's end
    tables = {t.path: t for t in h.gradtrace.embedding_tables()}
    item, user = tables["rec/inner/item_emb"], tables["rec/inner/user_emb"]
    assert (item.input_dim, item.dim, item.lookups, item.max_id) == (300, 16, 640, int(x[1].max()))
    assert item.rows_used == len(np.unique(x[1])) and item.rows_never_learned == 0
    assert item.effective_rank < 2.0 < 12.0 < user.effective_rank
    text = gradtrace.report(h)
    assert "Embedding tables" in text and "300 x 16" in text and "400 x 16" in text
    from tests.test_tensorboard import read_events

    events = read_events(tmp_path)
    rank = events["rec/inner/item_emb/embedding/effective_rank"]
    assert list(rank) == [20] and float(rank[20][1]) == pytest.approx(item.effective_rank, rel=1e-3)
    plugin, buckets = events["rec/inner/user_emb/embedding/row_norms"][20]
    assert plugin == "histograms" and buckets[:, 2].sum() == 400
    summary = gradtrace.summary(model, [a[:32] for a in x], print_fn=None)
    assert "Embedding" in summary and "effective rank" in summary and "300 x 16" in summary


def test_embeddings_demo_catches_the_mis_sized_item_table(capsys):
    from gradtrace import demo

    assert demo.embeddings_demo() == 0
    out = capsys.readouterr().out
    assert "input_dim=50000" in out and "input_dim=478 would do" in out and "50000 x 16" in out


def test_lookup_batch_lays_every_lookup_of_a_step_end_to_end():
    # what the embedding detectors reduce with one scatter per step: three lookups, one table twice,
    # a mask_zero table, ids out of range on both sides
    import tensorflow as tf

    from gradtrace.embeddings import LookupBatch

    b = LookupBatch([("m/user", 5, tf.constant([[0, 4], [7, 1]])),
                     ("m/words", 3, tf.constant([0, 2, -1])),
                     ("m/user", 5, tf.constant([3]))])
    assert b.paths == ["m/user", "m/words"] and b.dims == [5, 3] and b.total == 8
    assert b.ids.numpy().tolist() == [0, 4, 7, 1, 0, 2, -1, 3]
    assert b.lookup.numpy().tolist() == [0, 0, 0, 0, 1, 1, 1, 2]
    assert b.table.numpy().tolist() == [0, 0, 0, 0, 1, 1, 1, 0]
    assert b.in_range.numpy().tolist() == [True, True, False, True, True, True, False, True]
    assert b.padding([False, True, False]).numpy().tolist() == [False] * 4 + [True, False, False, False]
    assert not b.padding([False, False, False]).numpy().any()
    # user rows 0..4, words rows 5..7; out-of-range ids clipped into their own table
    assert b.row.numpy().tolist() == [0, 4, 4, 1, 5, 7, 5, 3]
    split = b.per_table(np.arange(8))
    assert split["m/user"].tolist() == [0, 1, 2, 3, 4] and split["m/words"].tolist() == [5, 6, 7]
