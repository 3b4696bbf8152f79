"""gradtrace.fit is a drop-in model.fit: parity, halting, cleanup, bad input."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradtrace
from gradtrace import _keras_compat as compat
from tests import models as M


def _compile(model, loss, metrics=("accuracy",), **kw):
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=loss, metrics=list(metrics), **kw)
    return model


def _twin(factory, loss, metrics=("accuracy",), **kw):
    keras.utils.set_random_seed(1)
    a = _compile(factory(), loss, metrics, **kw)
    keras.utils.set_random_seed(1)
    b = _compile(factory(), loss, metrics, **kw)
    return a, b


def _assert_same_run(h_keras, h_gt, m_keras, m_gt):
    assert set(h_keras.history) == set(h_gt.history)
    for k, v in h_keras.history.items():
        np.testing.assert_allclose(h_gt.history[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    for a, b in zip(M.weights_of(m_keras), M.weights_of(m_gt)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    assert int(m_keras.optimizer.iterations) == int(m_gt.optimizer.iterations)


PARITY_CASES = {
    "two_embedding": (M.two_embedding, "binary_crossentropy", M.two_embedding_data,
                      dict(validation_split=0.25)),
    "subclassed": (M.subclassed, "sparse_categorical_crossentropy", M.dense_data,
                   dict(class_weight={0: 1.0, 1: 2.0, 2: 0.5})),
    "cnn_bn_dropout": (M.cnn, "sparse_categorical_crossentropy", M.image_data,
                       dict(validation_data="holdout")),
    "lstm_masked": (M.lstm, "binary_crossentropy", M.seq_data, dict(sample_weight="random")),
}


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_parity_with_model_fit(case):
    factory, loss, data, extra = PARITY_CASES[case]
    x, y = data()
    kw = dict(batch_size=32, epochs=2, shuffle=False, verbose=0)
    for k, v in extra.items():
        if v == "holdout":
            kw[k] = data(n=64, seed=5)
        elif v == "random":
            kw[k] = np.random.default_rng(3).uniform(0.2, 2.0, len(y)).astype("float32")
        else:
            kw[k] = v
    m_keras, m_gt = _twin(factory, loss)
    h_keras = m_keras.fit(x, y, **kw)
    h_gt = gradtrace.fit(m_gt, x, y, **kw)
    _assert_same_run(h_keras, h_gt, m_keras, m_gt)
    assert h_gt.anomalies == []


def test_parity_with_dataset_and_trace_every():
    x, y = M.dense_data()
    ds = M.tf_dataset(x, y, 16)
    m_keras, m_gt = _twin(M.subclassed, "sparse_categorical_crossentropy")
    h_keras = m_keras.fit(ds, epochs=2, verbose=0, shuffle=False)
    h_gt = gradtrace.fit(m_gt, ds, epochs=2, verbose=0, shuffle=False, trace_every=4)
    _assert_same_run(h_keras, h_gt, m_keras, m_gt)


@pytest.mark.parametrize("mode", ["run_eagerly", "jit_compile"])
def test_parity_in_other_compile_modes(mode):
    x, y = M.dense_data(n=96)
    kw = {"run_eagerly": dict(run_eagerly=True), "jit_compile": dict(jit_compile=True)}[mode]
    m_keras, m_gt = _twin(M.subclassed, "sparse_categorical_crossentropy", **kw)
    h_keras = m_keras.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    h_gt = gradtrace.fit(m_gt, x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert m_gt.steps_per_execution == m_keras.steps_per_execution
    _assert_same_run(h_keras, h_gt, m_keras, m_gt)


def test_nan_inside_inner_model_is_caught_at_its_step_and_layer():
    model = M.two_embedding_with_fault(at=5)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    x, y = M.two_embedding_data()
    h = gradtrace.fit(model, x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
    assert len(h.anomalies) == 1
    a = h.anomalies[0]
    assert (a.detector, a.layer, a.tensor, a.step, a.epoch) == ("nan", "outer/inner/faulty", "output", 5, 0)
    assert a.action == "halt"
    assert "outer/inner/faulty" in a.message and "NaN" in a.message
    # the bad update never reached the model: iterations not advanced, every variable finite
    assert int(model.optimizer.iterations) == 5
    assert all(np.isfinite(w).all() for w in M.weights_of(model))
    assert all(np.isfinite(np.array(v)).all() for v in model.optimizer.variables)
    # BatchNorm's moving statistics and the layer's own counter were restored too
    assert float(model.get_layer("inner").get_layer("faulty").calls.numpy()) == 5.0
    assert len(h.history["loss"]) == 1  # halted in the first epoch


def test_halted_step_leaves_state_exactly_as_before_it():
    x, y = M.two_embedding_data()
    keras.utils.set_random_seed(2)
    faulty = M.two_embedding_with_fault(at=3)
    faulty.compile(optimizer="adam", loss="binary_crossentropy")
    keras.utils.set_random_seed(2)
    clean = M.two_embedding_with_fault(at=10**6)
    clean.compile(optimizer="adam", loss="binary_crossentropy")
    gradtrace.fit(faulty, x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    clean.fit([x[0][:96], x[1][:96]], y[:96], batch_size=32, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(M.weights_of(faulty), M.weights_of(clean)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(faulty.optimizer.variables, clean.optimizer.variables):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-6, atol=1e-7)


def test_nan_in_targets_blames_the_data():
    model = _compile(M.two_embedding(), "binary_crossentropy")
    x, y = M.two_embedding_data()
    y = y.copy()
    y[2 * 32 + 7] = np.nan  # in the batch of step 2
    h = gradtrace.fit(model, x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    a = h.anomalies[0]
    assert (a.detector, a.layer, a.tensor, a.step) == ("nan", "targets", "target", 2)
    assert "data" in a.message
    assert all(np.isfinite(w).all() for w in M.weights_of(model))


def test_raise_carries_anomalies_and_leaves_pre_step_weights():
    model = M.two_embedding_with_fault(at=4)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    x, y = M.two_embedding_data()
    seen = {}

    class Keep(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen["w"] = M.weights_of(self.model)

    with pytest.raises(gradtrace.AnomalyError) as err:
        gradtrace.fit(model, x, y, batch_size=32, epochs=1, shuffle=False, verbose=0,
                      on_anomaly="raise", callbacks=[Keep()])
    assert [a.layer for a in err.value.anomalies] == ["outer/inner/faulty"]
    assert err.value.anomalies[0].step == 4
    for a, b in zip(M.weights_of(model), seen["w"]):  # weights after step 3 == weights now
        np.testing.assert_array_equal(a, b)
    _assert_clean(model)


def test_warn_records_and_continues(capsys):
    model = M.two_embedding_with_fault(at=2)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    x, y = M.two_embedding_data()
    h = gradtrace.fit(model, x, y, batch_size=32, epochs=1, shuffle=False, verbose=1, on_anomaly="warn")
    assert (h.anomalies[0].step, h.anomalies[0].layer) == (2, "outer/inner/faulty")
    assert int(model.optimizer.iterations) == 8  # trained on: the user asked for warn
    # the update of step 2 was applied, so every later step is non-finite too, and reported
    assert [a.step for a in h.anomalies] == list(range(2, 8))
    assert "outer/inner/faulty" in capsys.readouterr().out


def test_trace_every_still_halts_on_a_nan_loss():
    model = M.two_embedding_with_fault(at=5)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    x, y = M.two_embedding_data()
    h = gradtrace.fit(model, x, y, batch_size=32, epochs=1, shuffle=False, verbose=0, trace_every=4)
    a = h.anomalies[0]
    # step 5 is not traced: the outputs are not captured, but the weight gradients are summed, so the
    # update is refused; the held step is then traced, committing nothing, to name the layer
    assert (a.detector, a.layer, a.tensor, a.step) == ("nan", "outer/inner/faulty", "output", 5)
    assert h.gradtrace.tracing() == {"calls": 6, "traced_calls": 2}
    assert int(model.optimizer.iterations) == 5
    assert all(np.isfinite(w).all() for w in M.weights_of(model))


def test_report_prints_anomalies_and_layer_table(capsys):
    model = M.two_embedding_with_fault(at=1)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    x, y = M.two_embedding_data()
    h = gradtrace.fit(model, x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    text = gradtrace.report(h)
    assert "outer/inner/faulty" in text and "<- blamed" in text
    for path in ("outer/inner/user_emb", "outer/inner/item_emb", "outer/hidden", "outer/bn", "outer/out"):
        assert path in text
    assert text in capsys.readouterr().out


# -- the model is plain again ---------------------------------------------------------

def _assert_clean(model, tmp_path=None):
    assert not any(gradtrace.is_patched(l) for l in compat.flatten_layers(model))
    assert "train_step" not in model.__dict__
    x = [np.zeros((4, 1), "int32"), np.zeros((4, 1), "int32")]
    model.fit(x, np.zeros((4, 1), "float32"), verbose=0)
    assert model.predict(x, verbose=0).shape == (4, 1)
    if tmp_path is not None:
        model.save(tmp_path / "m.keras")
        keras.models.load_model(tmp_path / "m.keras")


def test_model_is_plain_after_fit(tmp_path):
    model = _compile(M.two_embedding(), "binary_crossentropy")
    x, y = M.two_embedding_data()
    gradtrace.fit(model, x, y, batch_size=64, epochs=1, verbose=0)
    _assert_clean(model, tmp_path)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_model_is_plain_after_an_exception_in_a_callback(exc, tmp_path):
    model = _compile(M.two_embedding(), "binary_crossentropy")
    x, y = M.two_embedding_data()

    class Boom(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:
                raise exc("stop here")

    with pytest.raises(exc):
        gradtrace.fit(model, x, y, batch_size=32, epochs=1, verbose=0, callbacks=[Boom()])
    assert int(model.optimizer.iterations) == 3
    _assert_clean(model, tmp_path)


# -- bad input -----------------------------------------------------------------------

def test_bad_input_is_refused_before_training():
    x, y = M.two_embedding_data()
    uncompiled = M.two_embedding()
    with pytest.raises(ValueError, match="not compiled.*model.compile"):
        gradtrace.fit(uncompiled, x, y)
    model = _compile(M.two_embedding(), "binary_crossentropy")
    with pytest.raises(ValueError, match="Unknown detector 'nann'.*nan"):
        gradtrace.fit(model, x, y, detectors=["nann"])
    with pytest.raises(ValueError, match="on_anomaly='stop'.*'halt'"):
        gradtrace.fit(model, x, y, on_anomaly="stop")
    with pytest.raises(ValueError, match="trace_every=-1"):
        gradtrace.fit(model, x, y, trace_every=-1)
    with pytest.raises(TypeError, match="keras.Model"):
        gradtrace.fit("model", x, y)
    frozen = _compile(M.two_embedding(), "binary_crossentropy")
    frozen.trainable = False
    frozen.compile(optimizer="adam", loss="binary_crossentropy")
    with warnings.catch_warnings(record=True) as caught:  # Keras' own step warns too
        warnings.simplefilter("always")
        h = gradtrace.fit(frozen, x, y, epochs=1, verbose=0)
    assert any("no trainable weights" in str(w.message) and "as model.fit does" in str(w.message) for w in caught)
    assert h.anomalies == [] and np.isfinite(h.history["loss"][0])
    assert int(model.optimizer.iterations) == 0
    _assert_clean(model)


def test_model_call_failure_is_reraised_with_the_layers_that_ran():
    a = keras.Input((4,))
    b = keras.Input((3,))

    class BadConcat(keras.layers.Layer):
        def call(self, inputs):
            return tf.concat([inputs[0], tf.transpose(inputs[1])], axis=1)

        def compute_output_shape(self, shapes):
            return (shapes[0][0], 7)

    h = keras.layers.Dense(4, name="left")(a)
    out = keras.layers.Dense(1, name="head")(BadConcat(name="joiner")([h, b]))
    model = keras.Model([a, b], out, name="twoway")
    model.compile(optimizer="adam", loss="mse")
    x = [np.ones((8, 4), "float32"), np.ones((8, 3), "float32")]
    with pytest.raises(Exception) as err:
        gradtrace.fit(model, x, np.ones((8, 1), "float32"), batch_size=8, verbose=0)
    msg = str(err.value)
    assert "twoway/joiner" in msg and "twoway/left" in msg and "failed" in msg
    _assert_clean_generic(model)


def _assert_clean_generic(model):
    assert not any(gradtrace.is_patched(l) for l in compat.flatten_layers(model))
    assert "train_step" not in model.__dict__


class _EveryTen(gradtrace.Detector):
    """A periodic host check that notes the step counter at each of its calls."""

    name = "every_ten"
    reports_at = ("periodic",)
    every = 10

    def __init__(self):
        super().__init__()
        self.at = []

    def periodic(self, ctx):
        self.at.append(int(ctx.optimizers[0].iterations.numpy()))
        return []


class _TwoUpdates(keras.Sequential):
    """A custom train_step that applies two updates per call (two half batches)."""

    def train_step(self, data):
        x, y = data
        for half in (slice(None, 4), slice(4, None)):
            with tf.GradientTape() as tape:
                loss = self.compute_loss(x=x[half], y=y[half], y_pred=self(x[half], training=True))
            self.optimizer.apply(tape.gradient(loss, self.trainable_variables), self.trainable_variables)
        return {"loss": loss}


@pytest.mark.parametrize("case", ["plain", "steps_per_execution", "two_updates_per_call"])
def test_periodic_checks_run_on_time_and_read_the_step_counter_only_near_a_period(case, monkeypatch):
    keras.utils.set_random_seed(0)
    layers = [keras.Input((6,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)]
    model = _TwoUpdates(layers) if case == "two_updates_per_call" else keras.Sequential(layers)
    model.compile(optimizer="sgd", loss="mse", steps_per_execution=4 if case == "steps_per_execution" else 1)
    x, y = np.random.default_rng(0).normal(size=(8 * 40, 6)).astype("float32"), np.zeros((8 * 40, 1), "float32")
    reads = []
    real = gradtrace.run.Run.current_step
    monkeypatch.setattr(gradtrace.run.Run, "current_step", lambda self: reads.append(1) or real(self))
    det = _EveryTen()
    gradtrace.fit(model, x, y, batch_size=8, epochs=1, verbose=0, shuffle=False, detectors=["nan", det])
    per_call = 2 if case == "two_updates_per_call" else 1
    # each period is checked once, in the call that reached it (4 steps per call: up to 3 steps late)
    late = 3 if case == "steps_per_execution" else per_call - 1
    assert len(det.at) == 4 * per_call and all(0 <= at - 10 * (k + 1) <= late for k, at in enumerate(det.at)), det.at
    if case != "steps_per_execution":  # 40 calls: the counter is not read in each (3 first reads, then about
        # one to find a period's end and one for the checks' own step)
        assert len(reads) <= 3 + 2 * len(det.at) + 4 < 40, len(reads)
