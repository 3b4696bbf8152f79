"""Small cases of "invisible when healthy, lossless when not", found on client programs: Keras' optional
inputs given as None, a step whose ids were replaced to complete (held whatever the action), exact NaN
counts on a step that was committed, and a Watch that prints only what fit prints."""

import warnings

import keras
import numpy as np
import pytest
from keras import layers

import gradtrace


def _optional_inputs_model():
    """Keras' own ``model_test._get_model_optional_inputs``: an optional input that may be None."""

    class OptionalInputLayer(layers.Layer):
        def __init__(self):
            super().__init__()
            self.dense = layers.Dense(2)

        def call(self, x, o=None):
            return self.dense(x if o is None else x + o)

    keras.utils.set_random_seed(0)
    x = keras.Input((2,), name="x")
    o = keras.Input((2,), name="o", optional=True)
    model = keras.Model({"x": x, "o": o}, OptionalInputLayer()(x, o))
    model.compile(loss="mse", optimizer="adam")
    return model


@pytest.mark.parametrize("given", ["none", "tensor"])
def test_an_optional_input_given_as_none_trains_as_under_fit(given):
    x, y = np.arange(8.0, dtype="float32").reshape(4, 2) / 8, np.ones((4, 2), "float32")
    o = None if given == "none" else np.full((4, 2), 0.5, "float32")

    def batches():
        for k in range(2):
            yield {"x": x[2 * k: 2 * k + 2], "o": None if o is None else o[2 * k: 2 * k + 2]}, y[2 * k: 2 * k + 2]

    plain, watched = _optional_inputs_model(), _optional_inputs_model()
    plain.fit(x={"x": x, "o": o}, y=y, batch_size=2, shuffle=False, verbose=0)
    plain.fit(batches(), steps_per_epoch=2, shuffle=False, verbose=0)
    h1 = gradtrace.fit(watched, x={"x": x, "o": o}, y=y, batch_size=2, shuffle=False, verbose=0)
    h2 = gradtrace.fit(watched, batches(), steps_per_epoch=2, shuffle=False, verbose=0)
    assert h1.anomalies == [] and h2.anomalies == []
    for a, b in zip(plain.weights, watched.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)


def _table_model():
    keras.utils.set_random_seed(0)
    ids = keras.Input((4,), dtype="int32")
    h = layers.GlobalAveragePooling1D()(layers.Embedding(10, 4, name="emb")(ids))
    model = keras.Model(ids, layers.Dense(1, name="out")(h), name="tab")
    model.compile("sgd", "mse")
    return model


def test_a_step_whose_bad_ids_were_replaced_is_held_even_under_warn():
    """An id past the table is replaced so that the step can complete (and be measured); its update would
    be computed from rows the data never asked for, so it is not applied, whatever the action."""
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 10, (8, 4)).astype("int32"), rng.normal(size=(8, 1)).astype("float32")
    x[5, 2] = 12  # in the second batch of 4
    model = _table_model()
    before = None

    class Keep(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            nonlocal before
            if batch == 0:
                before = [np.array(v) for v in model.weights]

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        h = gradtrace.fit(model, x, y, batch_size=4, shuffle=False, verbose=0, on_anomaly="warn", callbacks=[Keep()])
    found = [a for a in h.anomalies if a.detector == "embedding_out_of_range"]
    assert found and found[0].step == 1 and found[0].layer == "tab/emb" and "12" in found[0].message
    for a, v in zip(before, model.weights):  # the second step was held
        np.testing.assert_array_equal(a, np.asarray(v), err_msg=v.path)
    assert int(model.optimizer.iterations) == 1


def test_a_warning_on_a_committed_step_counts_every_nan():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 16)).astype("float32"), rng.normal(size=(64, 1)).astype("float32")
    x[3, [1, 4, 9]] = np.nan
    x[40, [0, 2, 7]] = np.nan
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16,)), layers.Dense(4, name="d"), layers.Dense(1, name="out")], name="m")
    model.compile("sgd", "mse")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        h = gradtrace.fit(model, x, y, batch_size=64, verbose=0, on_anomaly="warn", detectors=["nan"])
    assert h.anomalies, "the NaN inputs were not found"
    message = h.anomalies[0].message
    assert "6 NaN" in message and "of 1024" in message, message


@pytest.mark.parametrize("verbose", [0, 2])
def test_watch_prints_what_fit_prints(verbose, capsys):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 4)).astype("float32"), rng.normal(size=(16, 1)).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), layers.Dense(1)])
    model.compile("sgd", "mse")
    model.fit(x, y, batch_size=8, verbose=verbose, callbacks=[gradtrace.Watch()])
    out = capsys.readouterr().out
    assert (out == "") == (verbose == 0), out
