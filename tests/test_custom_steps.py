"""Custom training steps and the other ways in: an overridden train_step (GAN, VAE) is watched, not
skipped; gradtrace.Watch inside someone else's fit (KerasTuner); gradtrace.loop around your own loop."""

import tempfile

import numpy as np
import pytest

import gradtrace
from tests import custom_models as C


def _state(model, optimizers):
    return ([np.asarray(v) for v in model.weights],
            [np.asarray(v) for o in optimizers for v in o.variables],
            [np.asarray(v) for v in model.metrics_variables])


def _assert_same_state(a, b):
    for got, want in zip(a, b):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


def test_healthy_gan_and_vae_are_silent_with_the_weights_and_history_of_model_fit():
    for build, data in ((C.gan, C.gan_data), (C.vae, C.vae_data)):
        x = data()
        plain, watched = build(), build()
        hk = plain.fit(x, batch_size=16, epochs=2, shuffle=False, verbose=0)
        hg = gradtrace.fit(watched, x, batch_size=16, epochs=2, shuffle=False, verbose=0)
        assert hg.anomalies == [], [str(a) for a in hg.anomalies]
        assert hk.history.keys() == hg.history.keys()
        for k in hk.history:
            np.testing.assert_allclose(hg.history[k], hk.history[k], rtol=1e-5, err_msg=k)
        for a, b in zip(plain.weights, watched.weights):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
        run = hg.gradtrace
        assert run is not None and run.engine.tables[True] is not None  # it was watched, not skipped


def test_gan_nan_in_the_generator_holds_both_updates_of_its_step_and_names_the_layer():
    x = C.gan_data()
    before, watched = C.gan(fault_at=3), C.gan(fault_at=3)
    before.fit(x, batch_size=16, epochs=1, steps_per_epoch=3, shuffle=False, verbose=0)
    h = gradtrace.fit(watched, x, batch_size=16, epochs=1, shuffle=False, verbose=0)
    first = h.anomalies[0]
    assert (first.detector, first.step, first.layer) == ("nan", 3, "gan/generator/faulty")
    # the discriminator's update is the first the NaN reaches (the fake images feed it), so it is held,
    # and the generator's update after it in the same step is held too
    assert first.optimizer == "d_optimizer"
    assert int(watched.d_optimizer.iterations) == int(watched.g_optimizer.iterations) == 3
    _assert_same_state(_state(watched, [watched.d_optimizer, watched.g_optimizer]),
                       _state(before, [before.d_optimizer, before.g_optimizer]))


def test_vae_exploding_encoder_is_caught_at_its_layer():
    x = C.vae_data()
    h = gradtrace.fit(C.vae(fault_at=4, fault_value=1e4), x, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert h.anomalies, "the exploding encoder went unnoticed"
    a = h.anomalies[0]
    assert a.step == 4 and a.layer.startswith("vae/encoder/"), str(a)


def test_vae_nan_in_the_encoder_halts_before_the_update():
    x = C.vae_data()
    before, watched = C.vae(fault_at=2), C.vae(fault_at=2)
    before.fit(x, batch_size=16, epochs=1, steps_per_epoch=2, shuffle=False, verbose=0)
    h = gradtrace.fit(watched, x, batch_size=16, epochs=1, shuffle=False, verbose=0)
    a = h.anomalies[0]
    assert (a.detector, a.step, a.layer) == ("nan", 2, "vae/encoder/faulty")
    _assert_same_state(_state(watched, [watched.optimizer]), _state(before, [before.optimizer]))


def test_gradients_from_no_tape_are_named_in_one_warning_and_still_checked():
    import keras
    import tensorflow as tf

    class NoTape(keras.Model):
        """Gradients from a closed-form rule, with no tape: nothing to capture."""

        def __init__(self):
            super().__init__(name="no_tape")
            self.dense = keras.layers.Dense(1)

        def call(self, x):
            return self.dense(x)

        def train_step(self, data):
            x, y = data
            pred = self.dense(x)
            err = pred - y
            grads = [tf.matmul(x, err, transpose_a=True) / 16.0, tf.reduce_mean(err, axis=0)]
            self.optimizer.apply_gradients(zip(grads, self.dense.trainable_weights))
            return {"mse": tf.reduce_mean(err ** 2)}

    x = np.random.default_rng(0).normal(size=(32, 3)).astype("float32")
    y = x[:, :1] * 2.0
    m = NoTape()
    m.compile(optimizer=keras.optimizers.SGD(0.1))
    m(x[:1])
    with pytest.warns(UserWarning, match="no tape"):
        h = gradtrace.fit(m, x, y, batch_size=16, epochs=1, verbose=0)
    assert h.anomalies == [] and int(m.optimizer.iterations) == 2


# -- gradtrace.Watch: someone else's fit ------------------------------------------------------------
def _fault_mlp(at, name="mlp"):
    import keras

    from tests import models as M

    keras.utils.set_random_seed(2)
    x = keras.Input((6,))
    h = keras.layers.Dense(8, activation="relu", name="hidden")(x)
    h = M.NaNAtStep(at, name="faulty")(h)
    m = keras.Model(x, keras.layers.Dense(1, name="out")(h), name=name)
    m.compile(optimizer="adam", loss="mse")
    return m


def _xy(n=96):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 6)).astype("float32")
    return x, x[:, :1] * 2.0


def test_watch_callback_under_plain_fit_halts_like_gradtrace_fit():
    from gradtrace import _keras_compat as compat

    x, y = _xy()
    m = _fault_mlp(at=3)
    w = gradtrace.Watch()
    h = m.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[w])
    assert [(a.detector, a.step, a.layer) for a in w.anomalies] == [("nan", 3, "mlp/faulty")]
    assert h.anomalies == w.anomalies and h.gradtrace is w.run
    assert int(m.optimizer.iterations) == 3 and all(np.isfinite(np.asarray(v)).all() for v in m.weights)
    assert not any(gradtrace.is_patched(layer) for layer in compat.flatten_layers(m))
    m.fit(x, y, batch_size=16, epochs=1, verbose=0)  # plain Keras again: nothing of gradtrace is left
    assert int(m.optimizer.iterations) > 3


def test_watch_callback_with_a_custom_detector_under_keras_tuner():
    import keras_tuner
    import tensorflow as tf

    class BigLoss(gradtrace.Detector):
        """Fires when the loss exceeds a bound (a user's own detector)."""

        name = "big_loss"
        needs = ("max",)

        def check(self, view):
            fired = tf.logical_and(view.mask(kinds=("loss",)), view["max"] > 1e3)
            return fired, view["max"]

        def message(self, row, value, stats_row):
            return f"the loss reached {value:.3g}"

    def build(hp):
        m = _fault_mlp(at=2, name=f"trial_{hp.Int('units', 4, 8, step=4)}")
        m.layers[-1].bias.assign([hp.Choice("bias", [1e4])])
        return m

    x, y = _xy()
    w = gradtrace.Watch(detectors=["nan", BigLoss()], on_anomaly="warn", verbose=0)
    with tempfile.TemporaryDirectory() as d:
        tuner = keras_tuner.RandomSearch(build, objective="loss", max_trials=2, directory=d, project_name="p",
                                         overwrite=True, seed=1)
        tuner.search(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[w])
    assert len(w.runs) == 2  # one run per trial, although the tuner deep-copies the callbacks
    for run in w.runs:
        found = {(a.detector, a.step) for a in run.anomalies}
        assert ("big_loss", 0) in found and ("nan", 2) in found, found


# -- gradtrace.loop: your own loop -----------------------------------------------------------------
def test_the_former_name_watch_still_works_and_says_it_was_renamed():
    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    with pytest.warns(DeprecationWarning, match="renamed gradtrace.loop"):
        w = gradtrace.watch(model, keras.optimizers.SGD(0.1), verbose=0)
    assert isinstance(w, gradtrace.loop)


@pytest.mark.parametrize("compiled", [True, False])
def test_watch_your_own_loop_halts_before_the_bad_update(compiled):
    import keras
    import tensorflow as tf

    x, y = _xy()
    model = _fault_mlp(at=4)
    optimizer = keras.optimizers.SGD(0.01)
    loss_fn = keras.losses.MeanSquaredError()
    steps = 0
    with gradtrace.loop(model, optimizer, verbose=0) as w:
        def train_step(xb, yb):
            with tf.GradientTape() as tape:
                loss = loss_fn(yb, model(xb, training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        step = w.step(tf.function(train_step) if compiled else train_step)
        for i in range(0, len(x), 16):
            out = step(x[i:i + 16], y[i:i + 16])
            steps += 1
            if w.halted:
                break
    assert [(a.detector, a.step, a.layer) for a in w.anomalies] == [("nan", 4, "mlp/faulty")]
    assert steps == 5 and int(optimizer.iterations) == 4
    assert np.ndim(out) == 0 and not np.isfinite(float(out))  # the step returns what yours returns: the loss
    assert all(np.isfinite(np.asarray(v)).all() for v in model.weights)
    # your own loop keeps the per-layer history too (drained when the block ends)
    assert int(w.run.history.steps[-1, 1]) == 4 and "mlp/faulty" in w.run.history.layers("gradient_norm")


def test_a_custom_step_with_one_optimizer_snapshots_and_replays_exactly(tmp_path):
    x = C.vae_data()
    h = gradtrace.fit(C.vae(fault_at=2), x, batch_size=16, epochs=1, shuffle=False, verbose=0,
                      snapshot_dir=tmp_path / "snaps")
    a = h.anomalies[0]
    assert a.snapshot and a.snapshot_error is None, a.snapshot_error
    r = gradtrace.replay(a.snapshot, model=C.vae(fault_at=2))  # a subclassed model: given, as for any
    assert r.step == 2
    assert np.isnan(r.loss) == np.isnan(r.recorded_loss)
    assert [(x.detector, x.layer) for x in r.anomalies][:1] == [("nan", "vae/encoder/faulty")]
    assert r.max_difference() < 1e-5


def test_watch_close_leaves_the_model_plain_after_a_fit_another_callback_broke():
    import keras

    from gradtrace import _keras_compat as compat

    class Boom(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                raise KeyboardInterrupt

    x, y = _xy()
    m = _fault_mlp(at=100)
    w = gradtrace.Watch()
    with pytest.raises(KeyboardInterrupt):
        m.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[w, Boom()])
    assert any(gradtrace.is_patched(layer) for layer in compat.flatten_layers(m))  # on_train_end never ran
    w.close()
    assert not any(gradtrace.is_patched(layer) for layer in compat.flatten_layers(m))
    m.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert int(m.optimizer.iterations) == 2 + 6


def test_a_custom_step_computing_its_own_loss_gets_the_head_checks():
    # keras.io's DCGAN with the discriminator's sigmoid left out: a linear output feeding
    # BinaryCrossentropy(from_logits=False), a loss the step calls itself (nothing compiled)
    h = gradtrace.fit(C.gan(d_activation=None), C.gan_data(), batch_size=16, epochs=2, shuffle=False, verbose=0)
    found = [(a.detector, a.step, a.layer) for a in h.anomalies]
    assert found == [("head_mismatch", 0, "gan/discriminator/d_out")], [str(a) for a in h.anomalies]
    assert "from_logits=True" in h.anomalies[0].hint
