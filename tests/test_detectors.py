"""Injected faults: each detector names the right layer at the right step."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import gradtrace
from gradtrace.stats import COLUMNS
from tests import models as M


@keras.saving.register_keras_serializable(package="gradtrace_tests")
class GradBoostAtStep(layers.Layer):
    """Identity forward; at optimizer step ``at`` the gradient flowing back through it is multiplied by ``factor``."""

    def __init__(self, at, factor=1e7, **kw):
        super().__init__(**kw)
        self.at, self.factor = at, factor

    def build(self, shape):
        self.calls = self.add_weight(shape=(), initializer="zeros", trainable=False, name="calls")

    def call(self, x, training=False):
        if not training:
            return x
        c = tf.identity(self.calls.value)
        self.calls.assign_add(1.0)
        scale = tf.where(tf.equal(c, float(self.at)), self.factor, 1.0)

        @tf.custom_gradient
        def boost(t):
            return tf.identity(t), lambda g: g * scale

        return boost(x)

    def get_config(self):
        return {**super().get_config(), "at": self.at, "factor": self.factor}


class Scale(layers.Layer):
    def __init__(self, factor, **kw):
        super().__init__(**kw)
        self.factor = factor

    def call(self, x):
        return x * self.factor


def _two_embedding(n_users=50, n_items=1000, between_user=None, relu_bias=0.0, name="outer"):
    user = keras.Input((1,), dtype="int32", name="user")
    item = keras.Input((1,), dtype="int32", name="item")
    u = layers.Embedding(n_users, 8, name="user_emb")(user)
    if between_user is not None:
        u = between_user(u)
    u = layers.Flatten(name="user_vec")(u)
    i = layers.Flatten(name="item_vec")(layers.Embedding(n_items, 4, name="item_emb")(item))
    h = layers.Concatenate(name="concat")([u, i])
    h = layers.Dense(16, activation="relu", bias_initializer=keras.initializers.Constant(relu_bias), name="mix")(h)
    inner = keras.Model([user, item], h, name="inner")
    user2 = keras.Input((1,), dtype="int32", name="user")
    item2 = keras.Input((1,), dtype="int32", name="item")
    out = layers.Dense(1, activation="sigmoid", name="out")(layers.Dense(8, activation="relu", name="top")(inner([user2, item2])))
    model = keras.Model([user2, item2], out, name=name)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    return model


def _ids(n, n_users=50, n_items=1000, item_high=None, seed=0):
    rng = np.random.default_rng(seed)
    x = [rng.integers(0, n_users, (n, 1)).astype("int32"),
         rng.integers(0, item_high or n_items, (n, 1)).astype("int32")]
    y = (rng.random((n, 1)) < 0.5).astype("float32")
    return x, y


def _of(history, name):
    return [a for a in history.anomalies if a.detector == name]


def _finite(model):
    return all(np.isfinite(w).all() for w in model.get_weights())


# -- exploding -------------------------------------------------------------------------

def test_exploding_gradient_in_one_of_two_embeddings_is_blamed_at_its_step():
    model = _two_embedding(between_user=GradBoostAtStep(12, name="boost"))
    x, y = _ids(32 * 20)
    h = gradtrace.fit(model, x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    found = _of(h, "exploding")
    assert len(found) == 1, h.anomalies
    a = found[0]
    assert (a.layer, a.step, a.action) == ("outer/inner/user_emb", 12, "halt")
    assert "user_emb" in a.message and "running average" in a.message
    assert not any(a.layer.endswith("item_emb") for a in h.anomalies)  # the healthy table is not blamed
    assert int(model.optimizer.iterations) == 12 and _finite(model)


def test_exploding_absolute_threshold_fires_before_overflow():
    model = _two_embedding(between_user=GradBoostAtStep(3, factor=1e9, name="boost"))
    x, y = _ids(32 * 8)
    h = gradtrace.fit(model, x, y, batch_size=32, epochs=1, shuffle=False, verbose=0,
                      detectors=[gradtrace.Exploding(max_norm=1e6, warmup=100)])
    a = h.anomalies[0]
    assert (a.detector, a.layer, a.step) == ("exploding", "outer/inner/user_emb", 3)
    assert np.isfinite(a.value) and a.value > 1e6 and "max_norm" in a.message


def test_exploding_fires_when_the_norm_overflows_from_finite_values():
    # gradients of ~1e28: every value finite, their squares overflow float32
    model = _two_embedding(between_user=GradBoostAtStep(2, factor=1e30, name="boost"))
    x, y = _ids(32 * 8)
    h = gradtrace.fit(model, x, y, batch_size=32, epochs=1, shuffle=False, verbose=0,
                      detectors=["nan", "exploding"])
    a = h.anomalies[0]
    assert (a.detector, a.layer, a.step) == ("exploding", "outer/inner/user_emb", 2)
    assert int(model.optimizer.iterations) == 2


# -- vanishing -------------------------------------------------------------------------

class ScaledBlockNet(keras.Model):
    """A subclassed model whose second block scales its input by 1e-8: everything below it gets no gradient."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.first = layers.Dense(32, activation="relu", name="first")
        self.second = layers.Dense(32, activation="relu", name="second")
        self.squash = Scale(1e-8, name="squash")
        self.third = layers.Dense(32, activation="relu", name="third")
        self.head = layers.Dense(3, activation="softmax", name="head")

    def call(self, x):
        return self.head(self.third(self.squash(self.second(self.first(x)))))


def test_vanishing_blames_the_earliest_starved_layer_after_patience():
    model = ScaledBlockNet(name="net")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    x, y = M.dense_data(n=320)
    h = gradtrace.fit(model, x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    found = _of(h, "vanishing")
    assert len(found) == 1, h.anomalies
    a = found[0]
    assert (a.layer, a.tensor, a.step) == ("net/first", "weight_gradient", 4)  # patience 5: steps 0..4
    assert "1 more layer(s)" in a.message  # net/second is starved too


# -- dead ReLU ---------------------------------------------------------------------------

def test_dead_relu_inside_inner_model():
    model = _two_embedding(relu_bias=-50.0)  # inner/mix can never fire
    x, y = _ids(32 * 25)
    h = gradtrace.fit(model, x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    found = _of(h, "dead_relu")
    # wholly dead: reported once 64 examples (quick) went by with every unit at 0, i.e. after step 1
    assert [(a.layer, a.step, a.stage) for a in found] == [("outer/inner/mix", 1, "step")]
    assert "all of its 16 units output 0 for at least 64 examples" in found[0].message
    assert "its own weights and bias" in found[0].message and "learning rate" in found[0].hint
    # outer/top dies of mix's zeros: named as a consequence, not blamed
    assert "after it also dead: outer/top" in found[0].message


@pytest.mark.parametrize("batch, step", [(8, 7), (64, 0)])
def test_dead_relu_counts_examples_not_batches(batch, step):
    """The same dead layer is reported after the same number of examples (64) at any batch size."""
    model = _two_embedding(relu_bias=-50.0)
    x, y = _ids(128)
    h = gradtrace.fit(model, x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0, detectors=["dead_relu"])
    assert [(a.layer, a.step) for a in h.anomalies] == [("outer/inner/mix", step)]


def test_dead_relu_window_is_configurable_and_a_run_too_short_for_it_is_reported_at_its_end():
    model = _two_embedding(relu_bias=-50.0)
    x, y = _ids(32 * 3)
    h = gradtrace.fit(model, x, y, batch_size=32, epochs=1, shuffle=False, verbose=0,
                      detectors=[gradtrace.DeadReLU(quick=1000, window=1000)])
    # 96 examples: too few for either rule during the run; reported when it ends
    assert [(a.layer, a.stage) for a in h.anomalies] == [("outer/inner/mix", "fit_end")]
    assert "100% of its 16 units output 0 for every one of the 96 examples of this run" in h.anomalies[0].message
    assert "end of training" in str(h.anomalies[0])


# -- embeddings ------------------------------------------------------------------------

def test_unused_embedding_rows_name_the_mismatched_table():
    model = _two_embedding(n_users=50, n_items=1000)
    x, y = _ids(3200, item_high=50)  # item ids only ever reach 49: the table is 20x too big
    h = gradtrace.fit(model, x, y, batch_size=128, epochs=2, shuffle=False, verbose=0)
    found = _of(h, "unused_embedding")
    assert [(a.layer, a.epoch) for a in found] == [("outer/inner/item_emb", 0), ("outer/inner/item_emb", 1)]
    assert "only 50 of its 1000 rows" in found[0].message and "highest id seen 49" in found[0].message
    assert found[0].value == pytest.approx(0.95)


def test_unused_embedding_on_a_small_dataset_reads_the_id_range():
    """640 lookups into 1000 rows: too few to count unused rows, but ids that never pass 49 in 640
    lookups are no accident (0.05 ** 640): the table is sized for a vocabulary the data does not have."""
    model = _two_embedding(n_users=50, n_items=1000)
    x, y = _ids(640, item_high=50)
    h = gradtrace.fit(model, x, y, batch_size=64, epochs=1, shuffle=False, verbose=0)
    found = _of(h, "unused_embedding")
    assert [(a.layer, a.stage) for a in found] == [("outer/inner/item_emb", "epoch_end")]
    assert "highest id seen in 640 lookups this epoch is 49, but input_dim=1000" in found[0].message
    assert "input_dim=50" in found[0].hint


def test_unused_embedding_is_silent_when_the_epoch_is_too_short_to_tell():
    model = _two_embedding(n_users=50, n_items=1000)
    x, y = _ids(64)  # 64 lookups spread over all 1000 rows: most rows unused, by chance only
    h = gradtrace.fit(model, x, y, batch_size=64, epochs=1, shuffle=False, verbose=0)
    assert _of(h, "unused_embedding") == []


@pytest.mark.parametrize("bad_id", [1000, -1])
def test_embedding_id_out_of_range_halts_at_its_step(bad_id):
    model = _two_embedding(n_users=50, n_items=1000)
    x, y = _ids(32 * 8)
    x[1] = x[1].copy()
    x[1][3 * 32 + 17, 0] = bad_id  # step 3, example 17
    h = gradtrace.fit(model, x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    found = _of(h, "embedding_out_of_range")
    assert len(found) == 1
    a = found[0]
    assert (a.layer, a.tensor, a.step, a.value, a.action) == ("outer/inner/item_emb", "input", 3, bad_id, "halt")
    assert f"got id {bad_id}" in a.message and "input_dim=1000" in a.message
    assert "batch example 17, position (0,)" in a.message
    assert int(model.optimizer.iterations) == 3 and _finite(model)


def test_embedding_id_out_of_range_is_caught_on_untraced_steps_too():
    model = _two_embedding(n_users=50, n_items=1000)
    x, y = _ids(32 * 8)
    x[0] = x[0].copy()
    x[0][5 * 32, 0] = 50
    h = gradtrace.fit(model, x, y, batch_size=32, epochs=1, shuffle=False, verbose=0, trace_every=4)
    a = _of(h, "embedding_out_of_range")[0]
    assert (a.layer, a.step) == ("outer/inner/user_emb", 5)


def test_saturation_on_a_tanh_layer_with_huge_weights():
    inp = keras.Input((10,))
    h = layers.Dense(32, activation="tanh", kernel_initializer=keras.initializers.Constant(50.0), name="squashed")(inp)
    out = layers.Dense(1, name="out")(h)
    model = keras.Model(inp, out, name="sat")
    model.compile(optimizer="sgd", loss="mse")
    x = np.abs(np.random.default_rng(0).normal(size=(160, 10))).astype("float32")
    h = gradtrace.fit(model, x, x[:, :1], batch_size=32, epochs=1, shuffle=False, verbose=0,
                      detectors=[gradtrace.Saturation(patience=3)])
    assert [(a.detector, a.layer, a.step) for a in h.anomalies] == [("saturation", "sat/squashed", 2)]


# -- off-by-default detectors --------------------------------------------------------------

def test_loss_plateau_when_nothing_learns():
    model = _compile_lr0()
    x, y = M.dense_data(n=32)
    ds = tf.data.Dataset.from_tensors((x, y)).repeat(15)
    h = gradtrace.fit(model, ds, epochs=1, verbose=0, shuffle=False, detectors=[gradtrace.LossPlateau(window=10)])
    assert [(a.detector, a.layer, a.step) for a in h.anomalies] == [("loss_plateau", "loss", 10)]


def _compile_lr0():
    model = M.subclassed()
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="sparse_categorical_crossentropy")
    return model


# -- NaN inside a subclassed block -------------------------------------------------------------

class FaultyBlockNet(keras.Model):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.stem = layers.Dense(16, name="stem")
        self.block = M.Block(16, name="block")
        self.block.fault = M.NaNAtStep(6, name="fault")
        self.head = layers.Dense(3, activation="softmax", name="head")

    def call(self, x, training=False):
        return self.head(self.block.fault(self.block(self.stem(x)), training=training))


def test_nan_in_a_subclassed_block():
    model = FaultyBlockNet(name="net")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    x, y = M.dense_data()
    h = gradtrace.fit(model, x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    a = h.anomalies[0]
    assert (a.detector, a.layer, a.step) == ("nan", "net/block/fault", 6)


# -- a custom detector, written here without touching gradtrace (under 30 lines) ----------------

class HugeActivation(gradtrace.Detector):
    """Fires when any layer output's largest value exceeds ``limit``."""

    name = "huge_activation"
    default_action = "warn"
    needs = ("max",)

    def __init__(self, limit=1e3, action=None):
        super().__init__(action)
        self.limit = self.check_range("limit", limit, 0.0, float("inf"), low_open=True)

    def check(self, view):
        return view.mask(kinds=("output",)) & (view["max"] > self.limit), view["max"]

    def message(self, row, value, stats_row):
        return f"{row.path} output reached {value:.3g} (limit {self.limit:g})."


def test_custom_detector_plugs_in_without_engine_changes():
    inp = keras.Input((4,))
    h = layers.Dense(8, name="a")(inp)
    h = Scale(1e5, name="amplify")(h)
    model = keras.Model(inp, layers.Dense(1, name="b")(h), name="m")
    model.compile(optimizer="sgd", loss="mse")
    x = np.ones((32, 4), "float32")
    h = gradtrace.fit(model, x, x[:, :1], batch_size=32, epochs=1, verbose=0,
                      detectors=["nan", HugeActivation(limit=100.0)])
    hits = {a.layer for a in h.anomalies if a.detector == "huge_activation"}
    assert "m/amplify" in hits and "m/a" not in hits


# -- bad detector configuration --------------------------------------------------------

@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: gradtrace.DeadReLU(threshold=1.5), r"threshold=1.5 is out of range.*\[0.0, 1.0\)"),
        (lambda: gradtrace.DeadReLU(window=0), r"window=0 is out of range.*integer >= 1"),
        (lambda: gradtrace.Exploding(factor=0.5), r"factor=0.5 is out of range"),
        (lambda: gradtrace.Vanishing(ratio=0), r"ratio=0 is out of range"),
        (lambda: gradtrace.UnusedEmbedding(max_unused=-0.1), r"max_unused=-0.1"),
        (lambda: gradtrace.NaN(action="explode"), r"action.*'explode'.*'halt'"),
    ],
)
def test_bad_thresholds_are_refused_with_the_allowed_range(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_detector_needing_an_unknown_statistic_is_refused_before_training():
    class NeedsKurtosis(HugeActivation):
        name = "needs_kurtosis"
        needs = ("kurtosis",)

    model = _two_embedding()
    x, y = _ids(64)
    with pytest.raises(ValueError, match=r"needs statistic\(s\) \['kurtosis'\].*Available statistics: mean"):
        gradtrace.fit(model, x, y, detectors=[NeedsKurtosis()], verbose=0)
    assert int(model.optimizer.iterations) == 0
    assert "kurtosis" not in COLUMNS


# -- labels ------------------------------------------------------------------------------

def _classifier(loss):
    inp = keras.Input((6,))
    h = layers.Dense(8, activation="relu", name="h")(inp)
    model = keras.Model(inp, layers.Dense(3, activation="softmax", name="out")(h), name="clf")
    model.compile(optimizer="adam", loss=loss)
    return model


def test_a_label_past_the_output_units_halts_at_its_step_and_the_process_trains_on():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(96, 6)).astype("float32"), rng.integers(0, 3, 96).astype("int32")
    y[70] = 3  # in the batch of step 2 (batch 32): TF on CPU would abort the step
    model = _classifier("sparse_categorical_crossentropy")
    h = gradtrace.fit(model, x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    assert [(a.detector, a.layer, a.step) for a in h.anomalies] == [("labels_out_of_range", "targets", 2)]
    assert "label 3" in h.anomalies[0].message and "batch example 6" in h.anomalies[0].message
    assert int(model.optimizer.iterations) == 2 and _finite(model)
    # a label the loss is told to ignore is a valid label
    y[70] = -1
    model = _classifier(keras.losses.SparseCategoricalCrossentropy(ignore_class=-1))
    h = gradtrace.fit(model, x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    assert h.anomalies == [] and int(model.optimizer.iterations) == 3


def test_a_nan_already_in_a_weight_is_blamed_on_the_weight():
    """Under 'warn' a NaN update is applied; the steps after it blame the weight that holds it, not the first
    layer whose output it spoils (nor an 'infinite derivative')."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((8,))
    h = layers.Dense(16, activation="relu", name="d1")(inp)
    h = M.NaNAtStep(2, name="faulty")(h)
    h = layers.Dense(8, activation="relu", name="d2")(h)
    model = keras.Model(inp, layers.Dense(1, name="out")(h), name="m")
    model.compile("adam", "mse")
    x = np.random.default_rng(0).normal(size=(128, 8)).astype("float32")
    h = gradtrace.fit(model, x, x[:, :1], batch_size=32, epochs=1, shuffle=False, verbose=0, on_anomaly="warn",
                      detectors=["nan"])
    first, then = h.anomalies[0], h.anomalies[1]
    assert (first.layer, first.tensor, first.step) == ("m/faulty", "output", 2)
    assert (then.layer, then.tensor, then.step) == ("m/d1", "weight", 3), str(then)
    assert "already holds" in then.message and "first nan finding" in then.hint
