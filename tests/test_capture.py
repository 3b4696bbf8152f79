"""Capture: gradtrace.fit finds every nested layer, names it by its path, and leaves it clean.

Each test trains a tiny real Keras model for one epoch with ``gradtrace.fit``
and inspects the rows of the traced step (``history.gradtrace.engine.tables[True]``)
and, where the batch is the whole data set, the packed statistics of that step
(``history.gradtrace.last_stats``) against NumPy computed from the weights the
model had before the step.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers, ops

import gradtrace
from gradtrace import _keras_compat as compat
from gradtrace import stats as st

PKG = "gradtrace_test_capture"


# -- helpers ------------------------------------------------------------------------
class EveryStatistic(gradtrace.Detector):
    """Never fires; needs every statistic, so that every step computes all of them."""

    name = "every_statistic"
    needs = st.COLUMNS

    def check(self, view):
        return tf.zeros([len(view.table)], tf.bool), tf.zeros([len(view.table)])


def fit(model, x, y, **kw):
    kw.setdefault("detectors", ["nan", "embedding_out_of_range", EveryStatistic()])
    kw.setdefault("epochs", 1)
    kw.setdefault("verbose", 0)
    kw.setdefault("shuffle", False)
    history = gradtrace.fit(model, x, y, **kw)
    assert history.gradtrace is not None
    return history


def table(history):
    rows = history.gradtrace.engine.tables[True].rows
    assert rows, "the traced step recorded no rows"
    assert [r.index for r in rows] == list(range(len(rows)))
    assert {r.kind for r in rows} <= set(st.KINDS)
    return rows


def paths(rows, kind):
    return [r.path for r in rows if r.kind == kind]


def one_row(rows, kind, path, name=None):
    found = [r for r in rows if r.kind == kind and r.path == path and (name is None or r.name == name)]
    assert len(found) == 1, (kind, path, name, [(r.kind, r.path, r.name) for r in rows])
    return found[0]


def stats_of(history, row):
    """The step's packed statistics of ``row`` as ``{column: float}``."""
    matrix = history.gradtrace.last_stats.numpy()
    assert matrix.shape[1] == len(st.COLUMNS)
    return st.row_dict(matrix[row.index])


def np_stats(a):
    a = np.asarray(a, np.float64)
    return {
        "mean": a.mean(),
        "std": a.std(),
        "min": a.min(),
        "max": a.max(),
        "norm": np.sqrt(np.sum(a * a)),
        "zero_frac": np.mean(a == 0),
        "size": float(a.size),
    }


def assert_matches(got, a, keys=("mean", "std", "min", "max", "norm", "size")):
    ref = np_stats(a)
    for k in keys:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-5, err_msg=k)


def assert_clean_and_usable(model, x, y, tmp_path, before_calls=None, reload=False, custom_objects=None):
    """No gradtrace state is left on the model or any layer, and Keras still works."""
    flat = list(compat.flatten_layers(model))
    assert len(flat) > 1
    for layer in flat:
        assert not gradtrace.is_patched(layer), layer.name
        if before_calls is not None:
            assert layer.__dict__.get("call") is before_calls.get(id(layer)), layer.name
    assert "train_step" not in model.__dict__
    # plain Keras: fit, predict, save (and load) all work after gradtrace.fit
    h = model.fit(x, y, epochs=1, verbose=0)
    assert np.isfinite(h.history["loss"][-1])
    pred = model.predict(x, verbose=0)
    n = len(y)
    assert np.asarray(pred).shape[0] == n
    assert np.all(np.isfinite(pred))
    path = tmp_path / "m.keras"
    model.save(path)
    assert path.is_file() and path.stat().st_size > 0
    if reload:
        loaded = keras.models.load_model(path, custom_objects=custom_objects)
        np.testing.assert_allclose(loaded.predict(x, verbose=0), pred, rtol=1e-5, atol=1e-6)


def instance_calls(model):
    return {id(layer): layer.__dict__.get("call") for layer in compat.flatten_layers(model)}


# -- 1. a functional model nested in a functional model, two Embeddings -----------------
N_USERS, N_ITEMS = 10, 12


def nested_embeddings():
    user = keras.Input((1,), dtype="int32", name="user")
    item = keras.Input((1,), dtype="int32", name="item")
    u = layers.Flatten(name="user_vec")(layers.Embedding(N_USERS, 4, name="user_emb")(user))
    i = layers.Flatten(name="item_vec")(layers.Embedding(N_ITEMS, 3, name="item_emb")(item))
    inner = keras.Model([user, item], layers.Concatenate(name="concat")([u, i]), name="inner")
    user2 = keras.Input((1,), dtype="int32", name="user_in")
    item2 = keras.Input((1,), dtype="int32", name="item_in")
    z = layers.Dense(6, activation="relu", name="hidden")(inner([user2, item2]))
    out = layers.Dense(1, name="out")(z)
    return keras.Model([user2, item2], out, name="outer")


def nested_data(n=16):
    rng = np.random.default_rng(0)
    # disjoint ranges, so swapped ids rows would show
    users = rng.integers(0, 5, (n, 1)).astype("int32")
    users[3] = 4
    users[5] = 1
    items = rng.integers(7, N_ITEMS, (n, 1)).astype("int32")
    items[2] = 7
    items[9] = 11
    y = rng.normal(size=(n, 1)).astype("float32")
    return [users, items], y


def test_nested_functional_model_with_two_embeddings(tmp_path):
    model = nested_embeddings()
    model.compile(optimizer="sgd", loss="mse")
    x, y = nested_data()
    # two dead units: a bias no input can overcome (the previous layers are tiny)
    hidden = model.get_layer("hidden")
    hidden.bias.assign(np.array([0, -1e4, 0, 0, -1e4, 0], np.float32))
    probe = keras.Model(model.inputs, hidden.output)
    h_before = probe.predict(x, verbose=0)
    before = instance_calls(model)

    history = fit(model, x, y, batch_size=len(y))
    rows = table(history)

    expected = [
        "outer/inner/user_emb",
        "outer/inner/item_emb",
        "outer/inner/user_vec",
        "outer/inner/item_vec",
        "outer/inner/concat",
        "outer/inner",
        "outer/hidden",
        "outer/out",
    ]
    assert sorted(paths(rows, "output")) == sorted(expected)
    assert sorted(paths(rows, "gradient")) == sorted(expected)
    assert sorted(paths(rows, "ids")) == ["outer/inner/item_emb", "outer/inner/user_emb"]
    # inputs are int ids: no float input rows; one float target
    assert paths(rows, "input") == []
    assert paths(rows, "target") == ["targets"]
    assert paths(rows, "loss") == ["loss"]
    # weights belong to the deepest layer that owns them
    assert sorted((r.path, r.name) for r in rows if r.kind == "weight") == sorted(
        [
            ("outer/inner/user_emb", "embeddings"),
            ("outer/inner/item_emb", "embeddings"),
            ("outer/hidden", "kernel"),
            ("outer/hidden", "bias"),
            ("outer/out", "kernel"),
            ("outer/out", "bias"),
        ]
    )
    assert sorted((r.path, r.name) for r in rows if r.kind == "weight_gradient") == sorted(
        (r.path, r.name) for r in rows if r.kind == "weight"
    )

    # ids rows: the right tensor for the right Embedding, before the lookup
    for path, ids, dim in (("outer/inner/user_emb", x[0], N_USERS), ("outer/inner/item_emb", x[1], N_ITEMS)):
        r = one_row(rows, "ids", path)
        assert r.input_dim == dim
        assert r.layer_class == "Embedding"
        s = stats_of(history, r)
        assert (s["min"], s["max"], s["size"]) == (ids.min(), ids.max(), ids.size)
        assert s["bad"] == 0 and s["bad_index"] == -1

    # execution order follows the data flow
    order = {r.path: r.order for r in rows if r.kind == "output"}
    assert order["outer/inner/user_emb"] < order["outer/inner/user_vec"] < order["outer/inner/concat"]
    assert order["outer/inner/concat"] < order["outer/inner"] < order["outer/hidden"] < order["outer/out"]

    # the ReLU output is flagged and its statistics are those of the real activations
    r = one_row(rows, "output", "outer/hidden")
    assert r.relu and r.layer_class == "Dense"
    assert not one_row(rows, "output", "outer/out").relu
    s = stats_of(history, r)
    assert_matches(s, h_before, keys=("mean", "std", "min", "max", "norm", "zero_frac", "size"))
    dead = np.mean(np.all(h_before == 0, axis=0))
    assert dead >= 2 / 6
    assert s["dead_frac"] == pytest.approx(dead)

    assert_clean_and_usable(model, x, y, tmp_path, before_calls=before, reload=True)


# -- 2. a subclassed model: attribute, list and dict sublayers ------------------------
@keras.saving.register_keras_serializable(package=PKG)
class Block(layers.Layer):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.dense_a = layers.Dense(5, activation="relu", name="dense_a")
        self.dense_b = layers.Dense(5, name="dense_b")

    def call(self, x):
        return self.dense_b(self.dense_a(x))


@keras.saving.register_keras_serializable(package=PKG)
class Net(keras.Model):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.block = Block(name="block")
        self.stack = [layers.Dense(4, name="stack_0"), layers.Dense(4, activation="tanh", name="stack_1")]
        self.heads = {"a": layers.Dense(1, name="head_a"), "b": layers.Dense(1, name="head_b")}

    def call(self, x):
        h = self.block(x)
        for layer in self.stack:
            h = layer(h)
        return self.heads["a"](h) + self.heads["b"](h)


def test_subclassed_model_with_attribute_list_and_dict_sublayers(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 3)).astype("float32")
    y = rng.normal(size=(12, 1)).astype("float32")
    model = Net(name="net")
    model.compile(optimizer="sgd", loss="mse")

    history = fit(model, x, y, batch_size=4)
    rows = table(history)

    expected = [
        "net/block/dense_a",
        "net/block/dense_b",
        "net/block",
        "net/stack_0",
        "net/stack_1",
        "net/head_a",
        "net/head_b",
    ]
    assert paths(rows, "output") == expected  # also the execution order
    assert paths(rows, "gradient") == expected
    weights = [(r.path, r.name) for r in rows if r.kind == "weight"]
    assert sorted(weights) == sorted((p, n) for p in expected if p != "net/block" for n in ("kernel", "bias"))
    assert paths(rows, "ids") == []
    assert paths(rows, "input") == ["inputs"]
    assert one_row(rows, "output", "net/block/dense_a").relu
    assert not one_row(rows, "output", "net/stack_1").relu  # tanh is not ReLU-family
    assert one_row(rows, "output", "net/block").layer_class == "Block"
    # the step statistics are of the last batch: inputs row = last 4 examples
    assert_matches(stats_of(history, one_row(rows, "input", "inputs")), x[-4:])

    assert_clean_and_usable(model, x, y, tmp_path, reload=True)


# -- 3 + 4. a shared layer called twice, a multi-output layer -----------------------------
@keras.saving.register_keras_serializable(package=PKG)
class TwoWay(layers.Layer):
    """Two float outputs."""

    def call(self, x):
        return x * 2.0, -x


def shared_and_multi_output():
    a = keras.Input((4,), name="a")
    b = keras.Input((4,), name="b")
    shared = layers.Dense(3, name="shared")
    p, q = TwoWay(name="two")(shared(a))
    r = shared(b)
    cat = layers.Concatenate(name="cat")([p, q, r])
    out = layers.Dense(1, name="head")(cat)
    return keras.Model([a, b], out, name="outer")


def test_shared_layer_and_multi_output_layer(tmp_path):
    rng = np.random.default_rng(2)
    n = 8
    xa = rng.normal(size=(n, 4)).astype("float32")
    xb = (10.0 + 3.0 * rng.normal(size=(n, 4))).astype("float32")  # a different scale from xa
    y = rng.normal(size=(n, 1)).astype("float32")
    model = shared_and_multi_output()
    model.compile(optimizer="sgd", loss="mse")
    W, bias = (v.numpy().astype(np.float64) for v in model.get_layer("shared").weights)
    Wh, bh = (v.numpy().astype(np.float64) for v in model.get_layer("head").weights)

    history = fit(model, [xa, xb], y, batch_size=n)  # one step on the whole data set
    rows = table(history)

    expected = ["outer/shared", "outer/two:0", "outer/two:1", "outer/shared#2", "outer/cat", "outer/head"]
    assert paths(rows, "output") == expected
    assert paths(rows, "gradient") == expected
    assert "outer/two" not in paths(rows, "output")
    # one weight row per variable, under the layer's own path (not "#2")
    assert [(r.path, r.name) for r in rows if r.kind == "weight" and "shared" in r.path] == [
        ("outer/shared", "kernel"),
        ("outer/shared", "bias"),
    ]
    assert [r.name for r in rows if r.kind == "input"] == ["0", "1"]
    two0 = one_row(rows, "output", "outer/two:0")
    assert two0.order == one_row(rows, "output", "outer/two:1").order
    assert two0.layer_class == "TwoWay"

    # forward: each call's own output, from the weights before the step
    s1 = xa @ W + bias
    s2 = xb @ W + bias
    assert_matches(stats_of(history, one_row(rows, "output", "outer/shared")), s1)
    assert_matches(stats_of(history, one_row(rows, "output", "outer/shared#2")), s2)
    assert_matches(stats_of(history, one_row(rows, "output", "outer/two:0")), 2 * s1)
    assert_matches(stats_of(history, one_row(rows, "output", "outer/two:1")), -s1)

    # backward: mse = mean((pred - y)^2) over the batch
    cat = np.concatenate([2 * s1, -s1, s2], axis=1)
    pred = cat @ Wh + bh
    loss = np.mean((pred - y) ** 2)
    assert stats_of(history, one_row(rows, "loss", "loss"))["mean"] == pytest.approx(loss, rel=1e-5)
    g_cat = (2.0 / n) * (pred - y) @ Wh.T
    g_p, g_q, g_r = g_cat[:, :3], g_cat[:, 3:6], g_cat[:, 6:]
    assert_matches(stats_of(history, one_row(rows, "gradient", "outer/cat")), g_cat)
    assert_matches(stats_of(history, one_row(rows, "gradient", "outer/two:0")), g_p)
    assert_matches(stats_of(history, one_row(rows, "gradient", "outer/two:1")), g_q)
    assert_matches(stats_of(history, one_row(rows, "gradient", "outer/shared#2")), g_r)
    # the first call's output feeds both TwoWay outputs: d/ds (2s, -s)
    assert_matches(stats_of(history, one_row(rows, "gradient", "outer/shared")), 2 * g_p - g_q)
    # the shared kernel's gradient sums both calls
    g_W = xa.T @ (2 * g_p - g_q) + xb.T @ g_r
    assert_matches(stats_of(history, one_row(rows, "weight_gradient", "outer/shared", "kernel")), g_W)

    assert_clean_and_usable(model, [xa, xb], y, tmp_path, reload=True)


# -- 5. MultiHeadAttention: sublayers created in build() ------------------------------
@keras.saving.register_keras_serializable(package=PKG)
class AttentionNet(keras.Model):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.mha = layers.MultiHeadAttention(num_heads=2, key_dim=3, name="mha")
        self.pool = layers.GlobalAveragePooling1D(name="pool")
        self.head = layers.Dense(1, name="head")

    def call(self, x):
        return self.head(self.pool(self.mha(x, x)))


MHA_DENSE = ("query", "key", "value", "attention_output")


def test_multi_head_attention_sublayers_built_during_fit(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 5, 4)).astype("float32")
    y = rng.normal(size=(8, 1)).astype("float32")
    model = AttentionNet(name="attn")
    model.compile(optimizer="sgd", loss="mse")
    # nothing is built yet: the query/key/value layers do not exist before fit
    assert not model.built
    assert not model.mha.built

    history = fit(model, x, y, batch_size=4)
    rows = table(history)

    out = paths(rows, "output")
    for name in MHA_DENSE:
        p = f"attn/mha/{name}"
        assert p in out, (p, out)
        assert p in paths(rows, "gradient")
        assert one_row(rows, "output", p).layer_class == "EinsumDense"
        for var in ("kernel", "bias"):
            one_row(rows, "weight", p, var)
            one_row(rows, "weight_gradient", p, var)
    for p in ("attn/mha", "attn/pool", "attn/head"):
        assert p in out and p in paths(rows, "gradient")
    order = {r.path: r.order for r in rows if r.kind == "output"}
    assert order["attn/mha/query"] < order["attn/mha/attention_output"] < order["attn/mha"] < order["attn/pool"]
    # no weight is attributed to the MultiHeadAttention layer itself or the model
    assert not {"attn/mha", "attn"} & set(paths(rows, "weight"))
    assert len(paths(rows, "weight")) == len(model.trainable_variables)

    assert_clean_and_usable(model, x, y, tmp_path)


# -- 6. non-float tensors are not differentiated --------------------------------------
@keras.saving.register_keras_serializable(package=PKG)
class Bucketize(layers.Layer):
    """Float features -> int ids in [0, 10)."""

    def call(self, x):
        return ops.cast(ops.clip(ops.floor(ops.abs(x) * 3.0), 0, 9), "int32")


@keras.saving.register_keras_serializable(package=PKG)
class FloatAndIds(layers.Layer):
    """Two outputs: a float tensor and int ids."""

    def call(self, x):
        return x + 0.5, ops.cast(ops.clip(ops.floor(ops.abs(x) * 2.0), 0, 5), "int32")


def int_outputs_model():
    x = keras.Input((3,), name="x")
    ids = Bucketize(name="bucket")(x)
    e = layers.Flatten(name="flat")(layers.Embedding(10, 2, name="emb")(ids))
    f, ids2 = FloatAndIds(name="split")(x)
    e2 = layers.Flatten(name="flat2")(layers.Embedding(6, 2, name="emb2")(ids2))
    h = layers.Concatenate(name="cat")([e, f, e2])
    return keras.Model(x, layers.Dense(1, name="head")(h), name="outer")


def test_non_float_outputs_are_not_differentiated(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(10, 3)).astype("float32")
    y = rng.normal(size=(10, 1)).astype("float32")
    model = int_outputs_model()
    model.compile(optimizer="sgd", loss="mse")

    history = fit(model, x, y, batch_size=10)
    rows = table(history)

    # the int-only layer has no output or gradient rows at all
    assert not [r for r in rows if r.path.startswith("outer/bucket")]
    # the mixed layer: its float output (index 0) is captured, its int output (index 1) is not
    assert "outer/split:0" in paths(rows, "output")
    assert "outer/split:0" in paths(rows, "gradient")
    assert not [r for r in rows if r.path in ("outer/split:1", "outer/split")]
    # Embeddings: ids rows and float output/gradient rows
    assert sorted(paths(rows, "ids")) == ["outer/emb", "outer/emb2"]
    for p in ("outer/emb", "outer/emb2", "outer/flat", "outer/flat2", "outer/cat", "outer/head"):
        assert p in paths(rows, "output") and p in paths(rows, "gradient"), p
    # every gradient row belongs to a float output row of the same path, and vice versa
    assert sorted(paths(rows, "gradient")) == sorted(paths(rows, "output"))

    # the ids rows hold the ids the layers produced, before the lookup
    ids = np.clip(np.floor(np.abs(x.astype(np.float64)) * 3.0), 0, 9)
    ids2 = np.clip(np.floor(np.abs(x.astype(np.float64)) * 2.0), 0, 5)
    for p, ref, dim in (("outer/emb", ids, 10), ("outer/emb2", ids2, 6)):
        r = one_row(rows, "ids", p)
        assert r.input_dim == dim and r.shape == (10, 3)
        s = stats_of(history, r)
        assert (s["min"], s["max"], s["size"], s["bad"]) == (ref.min(), ref.max(), ref.size, 0.0)
    assert_matches(stats_of(history, one_row(rows, "output", "outer/split:0")), x + 0.5)

    assert_clean_and_usable(
        model, x, y, tmp_path, reload=True,
        custom_objects={"Bucketize": Bucketize, "FloatAndIds": FloatAndIds},
    )


# -- 7. the model is left clean even when fit fails --------------------------------
def test_clean_after_anomaly_error(tmp_path):
    model = nested_embeddings()
    model.compile(optimizer="sgd", loss="mse")
    x, y = nested_data()
    y_bad = y.copy()
    y_bad[0] = np.nan
    before = instance_calls(model)
    with pytest.raises(gradtrace.AnomalyError):
        gradtrace.fit(model, x, y_bad, epochs=1, verbose=0, batch_size=len(y), on_anomaly="raise")
    assert_clean_and_usable(model, x, y, tmp_path, before_calls=before)


@keras.saving.register_keras_serializable(package=PKG)
class Boom(layers.Layer):
    """Raises inside its own ``call`` during training, while ``armed``."""

    armed = False

    def call(self, x, training=None):
        if training and self.armed:
            raise ValueError("boom: deliberate failure")
        return x


@keras.saving.register_keras_serializable(package=PKG)
class Holder(layers.Layer):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.boom = Boom(name="boom")

    def call(self, x, training=None):
        return self.boom(x, training=training)


def failing_model(nested):
    i = keras.Input((3,), name="x")
    h = layers.Dense(3, name="dense")(i)
    h = Holder(name="holder")(h) if nested else Boom(name="boom")(h)
    model = keras.Model(i, layers.Dense(1, name="head")(h), name="m")
    model.compile(optimizer="sgd", loss="mse")
    boom = model.get_layer("holder").boom if nested else model.get_layer("boom")
    return model, boom


@pytest.mark.parametrize("nested", [False, True], ids=["direct", "nested"])
def test_clean_after_a_layer_fails_inside_the_step(tmp_path, nested):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 3)).astype("float32")
    y = rng.normal(size=(4, 1)).astype("float32")
    model, boom = failing_model(nested)
    before = instance_calls(model)
    boom.armed = True
    with pytest.raises(ValueError, match="boom: deliberate failure"):
        gradtrace.fit(model, x, y, epochs=1, verbose=0)
    boom.armed = False
    assert_clean_and_usable(model, x, y, tmp_path, before_calls=before)


def _failure_text(nested):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 3)).astype("float32")
    y = rng.normal(size=(4, 1)).astype("float32")
    model, boom = failing_model(nested)
    boom.armed = True
    with pytest.raises(ValueError, match="boom: deliberate failure") as info:
        gradtrace.fit(model, x, y, epochs=1, verbose=0)
    return str(info.value) + "".join(getattr(info.value, "__notes__", []))


@pytest.mark.parametrize("nested", [False, True], ids=["direct", "nested"])
def test_failed_layer_is_named_by_its_innermost_path(nested):
    # Keras re-creates the exception in every Layer.__call__ on the way out, so
    # the failing layer must be found by the tap, not by attributes on the exception.
    path = "m/holder/boom" if nested else "m/boom"
    text = _failure_text(nested)
    assert f"failed in layer '{path}' (Boom)" in text


@pytest.mark.parametrize("nested", [False, True], ids=["direct", "nested"])
def test_failure_table_lists_the_layers_that_ran_before(nested):
    text = _failure_text(nested)
    assert "Layers that ran before it" in text
    assert "m/dense" in text  # the model's first layer completed before the failing one


def test_user_instance_call_is_restored():
    # A layer whose ``call`` is already an instance attribute keeps exactly that function.
    rng = np.random.default_rng(6)
    model = Net(name="net")
    model.compile(optimizer="sgd", loss="mse")
    layer = model.stack[0]
    plain = layer.call
    seen = []

    def custom_call(inputs):
        seen.append(1)
        return plain(inputs)

    object.__setattr__(layer, "call", custom_call)
    x = rng.normal(size=(4, 3)).astype("float32")
    y = rng.normal(size=(4, 1)).astype("float32")
    history = fit(model, x, y)
    assert "net/stack_0" in paths(table(history), "output")  # still captured through the wrapper
    assert seen  # and the user's function ran
    assert layer.__dict__["call"] is custom_call
    assert not gradtrace.is_patched(layer)


def test_second_fit_finds_the_same_rows():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(8, 3)).astype("float32")
    y = rng.normal(size=(8, 1)).astype("float32")
    model = Net(name="net")
    model.compile(optimizer="sgd", loss="mse")
    first = [(r.kind, r.path, r.name) for r in table(fit(model, x, y, batch_size=4))]
    second = [(r.kind, r.path, r.name) for r in table(fit(model, x, y, batch_size=4))]
    assert first == second
    assert ("output", "net/block/dense_a", "") in first
    assert not any(gradtrace.is_patched(layer) for layer in compat.flatten_layers(model))


# -- 8. more containers; Embedding on empty sequences ----------------------------------
class SequentialAndTuple(keras.Model):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.seq = keras.Sequential([layers.Dense(3, name="s0"), layers.Dense(2, name="s1")], name="seq")
        self.pair = (layers.Dense(2, name="t0"), layers.Dense(1, name="t1"))

    def call(self, x):
        return self.pair[1](self.pair[0](self.seq(x)))


def test_nested_sequential_and_tuple_sublayers():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(4, 3)).astype("float32")
    y = rng.normal(size=(4, 1)).astype("float32")
    model = SequentialAndTuple(name="top")
    model.compile(optimizer="sgd", loss="mse")
    rows = table(fit(model, x, y))
    expected = ["top/seq/s0", "top/seq/s1", "top/seq", "top/t0", "top/t1"]
    assert paths(rows, "output") == expected
    assert paths(rows, "gradient") == expected
    assert sorted(set(paths(rows, "weight"))) == ["top/seq/s0", "top/seq/s1", "top/t0", "top/t1"]
    assert not any(gradtrace.is_patched(layer) for layer in compat.flatten_layers(model))


def empty_sequence_model():
    ids = keras.Input((0,), dtype="int32", name="ids")
    feats = keras.Input((2,), name="feats")
    e = layers.Flatten(name="flat")(layers.Embedding(5, 2, name="emb")(ids))
    out = layers.Dense(1, name="head")(layers.Concatenate(name="cat")([e, feats]))
    model = keras.Model([ids, feats], out, name="m")
    model.compile(optimizer="sgd", loss="mse")
    return model


def test_embedding_on_empty_sequences_trains():
    rng = np.random.default_rng(9)
    x = [np.zeros((4, 0), np.int32), rng.normal(size=(4, 2)).astype("float32")]
    y = rng.normal(size=(4, 1)).astype("float32")
    plain = empty_sequence_model()
    assert np.isfinite(plain.fit(x, y, verbose=0).history["loss"][0])  # Keras itself is fine
    model = empty_sequence_model()
    rows = table(fit(model, x, y))
    r = one_row(rows, "ids", "m/emb")
    assert tuple(r.shape)[1:] == (0,)  # the batch dim may be unknown at trace time
