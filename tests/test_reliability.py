"""Reliability: bad input is refused clearly, interruptions keep the model clean and the history
reachable, memory stays bounded over long runs, and a snapshot is whole or absent.

The soak tests (``-m soak``) are the short version of ``benchmarks/soak.py``.
"""

import os
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import gradtrace
from gradtrace import _keras_compat as compat
from tests import models as M

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from soak import rss_mib, soak_data, soak_model  # noqa: E402  (the long version's own model and data)

X = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
Y = (np.arange(16) % 2).reshape(16, 1).astype("float32")


def _tiny(*, dict_input=False, trainable=True, compiled=True):
    """A 2-layer Dense model: cheap enough to build once per case."""
    inp = keras.Input((4,), name="features")
    out = layers.Dense(1, activation="sigmoid", name="out")(layers.Dense(4, activation="relu", name="h")(inp))
    model = keras.Model({"features": inp} if dict_input else inp, out, name="tiny")
    if not trainable:
        model.trainable = False
    if compiled:
        model.compile(optimizer="sgd", loss="binary_crossentropy")
    return model


def _broken_batches():
    raise OSError("shard 3 of the training data is unreadable")
    yield  # pragma: no cover - makes this a generator


def _dataset():
    return tf.data.Dataset.from_tensor_slices((X, Y)).batch(4)


def _keras_fit(model, *args, **kwargs):
    return model.fit(*args, **kwargs)


# Each case: (call(fit, model, tmp_path), model options, error type, message pattern, keras).
# `fit` is gradtrace.fit, or for the twin model.fit. keras: "same" where Keras' own fit validates
# the input (it must raise, and gradtrace raises the same type); "if_raises" where Keras 3.15 trains
# on it silently (gradtrace is stricter; should a later Keras refuse it, the type must match);
# None for gradtrace's own arguments.
BAD_INPUT = [
    pytest.param(lambda fit, m, p: fit(m, X, Y), dict(compiled=False), ValueError,
                 r"not compiled.*model\.compile", None, id="uncompiled_model"),
    pytest.param(lambda fit, m, p: fit(m.get_layer("h"), X, Y), {}, TypeError,
                 r"expects a keras\.Model.*got Dense", None, id="not_a_model"),
    pytest.param(lambda fit, m, p: fit(m, X, Y[:10], verbose=0), {}, ValueError,
                 r"(?s)cardinality.*'x' sizes: 16.*'y' sizes: 10", "same", id="x_y_length_mismatch"),
    pytest.param(lambda fit, m, p: fit(m, {"featurez": X}, Y, verbose=0), dict(dict_input=True), ValueError,
                 r"Missing data for input \"features\".*featurez", "same", id="dict_wrong_input_name"),
    pytest.param(lambda fit, m, p: fit(m, X, Y, batch_size=0, verbose=0), {}, ValueError,
                 r"batch_size=0 is not allowed.*positive integer", "if_raises", id="batch_size_0"),
    pytest.param(lambda fit, m, p: fit(m, X, Y, trace_every=-2), {}, ValueError,
                 r"trace_every=-2 is not allowed.*integer >= 1", None, id="trace_every_negative"),
    pytest.param(lambda fit, m, p: fit(m, X, Y, trace_every=1.5), {}, ValueError,
                 r"trace_every=1\.5 is not allowed.*integer >= 1", None, id="trace_every_float"),
    pytest.param(lambda fit, m, p: fit(m, X, Y, detectors=[gradtrace.Exploding(max_norm=-1.0)]), {}, ValueError,
                 r"max_norm=-1\.0 is out of range", None, id="detector_threshold_out_of_range"),
    pytest.param(lambda fit, m, p: fit(m, X, Y, detectors=["nan", "exploding_grads"]), {}, ValueError,
                 r"Unknown detector 'exploding_grads'.*exploding", None, id="unknown_detector"),
    pytest.param(lambda fit, m, p: fit(m, X, Y, detectors=42), {}, TypeError,
                 r"detectors=42 is not allowed.*list of detector names", None, id="detectors_junk_int"),
    pytest.param(lambda fit, m, p: fit(m, X, Y, detectors={"nan": "halt"}), {}, TypeError,
                 r"detectors=\{'nan': 'halt'\} is not allowed", None, id="detectors_junk_dict"),
    pytest.param(lambda fit, m, p: fit(m, X, Y, on_anomaly="stop"), {}, ValueError,
                 r"on_anomaly='stop' is not an action.*'halt'", None, id="unknown_action"),
    pytest.param(lambda fit, m, p: fit(m, X, Y, snapshot_dir=p / "a_file"), {}, ValueError,
                 r"snapshot_dir=.*a_file.* exists and is not a directory", None, id="snapshot_dir_is_a_file"),
    pytest.param(lambda fit, m, p: fit(m, X, Y, max_snapshots=-1), {}, ValueError,
                 r"max_snapshots=-1 is not allowed.*integer >= 0", None, id="max_snapshots_negative"),
    pytest.param(lambda fit, m, p: fit(m, _dataset(), validation_split=0.2, verbose=0), {}, ValueError,
                 r"validation_split.*only supported for tensors or NumPy arrays", "same",
                 id="validation_split_with_dataset"),
    pytest.param(lambda fit, m, p: fit(m, _dataset().take(0), verbose=0), {}, ValueError,
                 r"empty tf\.data\.Dataset", "if_raises", id="empty_dataset"),
    pytest.param(lambda fit, m, p: fit(m, X[:0], Y[:0], verbose=0), {}, ValueError,
                 r"x holds 0 samples.*\(0, 4\)", "if_raises", id="empty_arrays"),
    pytest.param(lambda fit, m, p: fit(m, (b for b in ()), shuffle=False, verbose=0), {}, ValueError,
                 r"generator must yield at least one batch", "same", id="empty_generator"),
    pytest.param(lambda fit, m, p: fit(m, _broken_batches(), shuffle=False, verbose=0), {}, OSError,
                 r"shard 3 of the training data is unreadable", "same", id="generator_raises"),
    pytest.param(lambda fit, m, p: fit(m, "train.csv", Y, verbose=0), {}, ValueError,
                 r"x='train\.csv' is a string", "same", id="string_x"),
    pytest.param(lambda fit, m, p: fit(m, X, "labels", verbose=0), {}, ValueError,
                 r"y='labels' is a string", "same", id="string_y"),
]


def _keras_error(call, options, tmp_path):
    """The type of the exception model.fit raises on a twin model given the same input, or None."""
    twin = _tiny(**options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras warns ("ran out of data") where it does not raise
        try:
            call(_keras_fit, twin, tmp_path)
        except Exception as e:  # noqa: BLE001 - the type is what is compared
            return type(e)
    return None


def _assert_untouched(model):
    assert not any(gradtrace.is_patched(layer) for layer in [model] + compat.all_layers(model))
    assert "train_step" not in model.__dict__ and model.train_function is None
    if getattr(model, "optimizer", None) is not None:
        assert int(model.optimizer.iterations) == 0


@pytest.mark.parametrize("call, options, error, match, keras_checks", BAD_INPUT)
def test_bad_input_is_refused_before_training_with_a_clear_error(call, options, error, match, keras_checks, tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    model = _tiny(**options)
    with pytest.raises(error, match=match) as err:
        call(gradtrace.fit, model, tmp_path)
    assert type(err.value) is error  # not a subclass from deep inside TensorFlow
    _assert_untouched(model)
    if keras_checks is not None:
        keras_type = _keras_error(call, options, tmp_path)
        if keras_checks == "same":
            assert keras_type is not None, "model.fit is expected to refuse this input too"
        if keras_type is not None:
            assert type(err.value) is keras_type


def test_int32_targets_with_a_float_loss_train_exactly_as_in_keras():
    x, y = M.two_embedding_data()
    y = y.astype("int32")
    models = []
    for _ in range(2):
        keras.utils.set_random_seed(1)
        m = M.two_embedding()
        m.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
        models.append(m)
    m_keras, m_gt = models
    h_keras = m_keras.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    h_gt = gradtrace.fit(m_gt, x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    np.testing.assert_allclose(h_gt.history["loss"], h_keras.history["loss"], rtol=1e-5)
    for a, b in zip(M.weights_of(m_keras), M.weights_of(m_gt)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    assert int(m_gt.optimizer.iterations) == int(m_keras.optimizer.iterations) == 16
    assert h_gt.anomalies == []


# -- interruptions: the model is clean, the History so far is kept --------------------------------

class EveryStep(gradtrace.Detector):
    """Fires on the loss row at every step (a warning the run must keep count of)."""

    name = "every_step"
    default_action = "warn"
    needs = ("size",)

    def check(self, view):
        return view.mask(kinds=("loss",)), view["size"]


class EvenStep(EveryStep):
    """Fires on the loss row at even steps."""

    name = "even_step"

    def check(self, view):
        even = tf.equal(tf.math.floormod(tf.cast(view.step, tf.int64), 2), 0)
        return view.mask(kinds=("loss",)) & even, view["size"]


class Interrupt(keras.callbacks.Callback):
    """Raises ``exc`` from on_train_batch_end of batch ``batch`` (0-based) of epoch ``epoch``."""

    def __init__(self, exc, epoch, batch):
        super().__init__()
        self.exc, self.at, self.epoch = exc, (epoch, batch), 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise self.exc("interrupted by the test")


def _two_embedding():
    model = M.two_embedding()
    model.compile(optimizer="adam", loss="binary_crossentropy")
    return model


def _assert_clean_and_usable(model, tmp_path):
    assert not any(gradtrace.is_patched(layer) for layer in [model] + compat.all_layers(model))
    assert "train_step" not in model.__dict__
    x = [np.zeros((4, 1), "int32"), np.zeros((4, 1), "int32")]
    before = int(model.optimizer.iterations)
    model.fit(x, np.zeros((4, 1), "float32"), verbose=0)
    assert int(model.optimizer.iterations) == before + 1
    assert model.predict(x, verbose=0).shape == (4, 1)
    model.save(tmp_path / "m.keras")
    assert keras.models.load_model(tmp_path / "m.keras").predict(x, verbose=0).shape == (4, 1)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_interrupt_mid_epoch_leaves_the_model_clean_and_the_run_reachable(exc, tmp_path):
    model = _two_embedding()
    x, y = M.two_embedding_data()  # 8 batches of 32
    with pytest.raises(exc, match="interrupted by the test") as err:
        gradtrace.fit(model, x, y, batch_size=32, epochs=2, verbose=0, detectors=["nan", EveryStep()],
                      callbacks=[Interrupt(exc, epoch=0, batch=2)])  # after the third batch
    e = err.value
    assert int(model.optimizer.iterations) == 3
    run = e.gradtrace
    assert run.calls == 3
    assert e.history is model.history  # this fit's History, no epoch finished yet
    assert e.history.epoch == [] and e.history.history == {}
    assert e.history.gradtrace is run
    assert [(a.detector, a.step) for a in e.history.anomalies] == [("every_step", s) for s in range(3)]
    assert run.log.total == 3 and run.log.counts == {"every_step": 3}
    _assert_clean_and_usable(model, tmp_path)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_history_of_finished_epochs_survives_an_interrupt(exc):
    x, y = M.two_embedding_data()
    keras.utils.set_random_seed(4)
    plain = _two_embedding()
    keras.utils.set_random_seed(4)
    watched = _two_embedding()
    h_plain = plain.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    with pytest.raises(exc) as err:
        gradtrace.fit(watched, x, y, batch_size=32, epochs=3, shuffle=False, verbose=0,
                      callbacks=[Interrupt(exc, epoch=1, batch=2)])
    h = err.value.history
    assert int(watched.optimizer.iterations) == 8 + 3
    assert h.epoch == [0]
    np.testing.assert_allclose(h.history["loss"], h_plain.history["loss"], rtol=1e-5)
    assert h.anomalies == [] and h.gradtrace.calls == 11


def test_a_generator_failing_mid_epoch_surfaces_its_own_error(tmp_path):
    x, y = M.two_embedding_data()

    def batches():
        for i in range(3):
            yield (x[0][i * 32:(i + 1) * 32], x[1][i * 32:(i + 1) * 32]), y[i * 32:(i + 1) * 32]
        raise OSError("shard 3 of the training data is unreadable")

    def run(fit, model):
        with pytest.raises(Exception) as err:
            fit(model, batches(), steps_per_epoch=8, epochs=1, verbose=0)
        return err.value

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras' shuffle-ignored warning for generators
        keras_error = run(_keras_fit, _two_embedding())
        model = _two_embedding()
        e = run(gradtrace.fit, model)
    assert type(e) is type(keras_error)
    assert "shard 3 of the training data is unreadable" in str(e)
    assert e.gradtrace.calls == int(model.optimizer.iterations)
    assert e.history is model.history
    _assert_clean_and_usable(model, tmp_path)


# -- soak: bounded memory over long runs ----------------------------------------------------------

class RssSampler(keras.callbacks.Callback):
    def __init__(self, every=100):
        super().__init__()
        self.every, self.step, self.samples = every, 0, []  # (steps done, RSS MiB)

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step % self.every == 0:
            self.samples.append((self.step, rss_mib()))


def _growth_after(samples, warmup):
    base = next(rss for step, rss in samples if step >= warmup)
    peak = max(rss for step, rss in samples if step >= warmup)
    return (peak - base) / base


@pytest.mark.soak
def test_soak_2000_steps_with_every_detector_keeps_memory_flat():
    model = soak_model()
    x, y = soak_data(500 * 32)
    sampler = RssSampler(every=100)
    h = gradtrace.fit(model, x, y, batch_size=32, epochs=4, verbose=0, trace_every=1, callbacks=[sampler])
    assert int(model.optimizer.iterations) == 2000
    assert h.anomalies == []  # a healthy model: nothing fires, every detector ran every step
    assert len(sampler.samples) == 20
    growth = _growth_after(sampler.samples, warmup=500)
    assert growth < 0.05, f"RSS grew {growth:.1%} after step 500: {sampler.samples}"


@pytest.mark.soak
def test_soak_a_warning_on_every_step_keeps_bounded_records_and_exact_counts():
    model = soak_model()
    x, y = soak_data(1500 * 8)
    sampler = RssSampler(every=100)
    h = gradtrace.fit(model, x, y, batch_size=8, epochs=1, verbose=0, callbacks=[sampler],
                      detectors=["nan", EveryStep(), EvenStep()])
    run = h.gradtrace
    assert int(model.optimizer.iterations) == 1500  # warn: training went on
    assert run.log.total == 1500 + 750
    assert dict(run.log.counts) == {"every_step": 1500, "even_step": 750}
    assert len(run.log) == len(h.anomalies) == 2 * run.log.keep == 1000
    assert run.log.dropped == 2250 - 1000
    assert (h.anomalies[0].step, h.anomalies[-1].step) == (0, 1499)  # the first 500 and the last 500 kept
    assert len(run.records) == run.keep_records == 20
    growth = _growth_after(sampler.samples, warmup=500)
    assert growth < 0.05, f"RSS grew {growth:.1%} after step 500: {sampler.samples}"


# -- a snapshot write failing half-way: nothing left behind ------------------------------------

@pytest.mark.parametrize("action", ["halt", "snapshot"])
def test_a_snapshot_write_failing_half_way_leaves_nothing(action, tmp_path, monkeypatch):
    real = keras.Model.save_weights
    written = []

    def save_weights_then_fill_the_disk(self, filepath, *args, **kwargs):
        real(self, filepath, *args, **kwargs)
        written.append(sorted(os.listdir(os.path.dirname(filepath))))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(keras.Model, "save_weights", save_weights_then_fill_the_disk)
    model = M.two_embedding_with_fault(at=3)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    x, y = M.two_embedding_data()  # 8 batches of 32
    snaps = tmp_path / "snaps"
    h = gradtrace.fit(model, x, y, batch_size=32, epochs=1, shuffle=False, verbose=0,
                      on_anomaly=action, snapshot_dir=snaps)
    assert written and written[0] == ["batch.npz", "model.weights.h5"]  # it failed half-way
    a = h.anomalies[0]
    assert (a.detector, a.layer, a.step, a.action) == ("nan", "outer/inner/faulty", 3, action)
    assert all(x.snapshot is None and "No space left on device" in x.snapshot_error for x in h.anomalies)
    assert os.listdir(snaps) == []  # no partial snapshot, no temporary directory
    if action == "halt":
        assert int(model.optimizer.iterations) == 3 and len(h.anomalies) == 1
        assert all(np.isfinite(w).all() for w in model.get_weights())
    else:
        # training went on to the end, each bad update skipped: the fault's layer counts its calls in a
        # variable the skipped step puts back, so batches 3..7 all meet it, at step 3, and none is applied
        assert int(model.optimizer.iterations) == 3 and [a.step for a in h.anomalies] == [3] * 5
        assert len(written) == 5 and all(np.isfinite(w).all() for w in model.get_weights())
