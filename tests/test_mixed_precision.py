"""Mixed precision ("mixed_float16" with Keras' LossScaleOptimizer): statistics are unscaled, the
optimizer's own skipped overflow steps are not faults unless they keep coming, and a float16
overflow in a layer's output is still caught and blamed."""

import keras
import numpy as np
import pytest

import gradtrace
from gradtrace.stats import COL


@pytest.fixture(autouse=True)
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _model(kernel="glorot_uniform", lr=0.01):
    inp = keras.Input((16,), name="features")
    h = keras.layers.Dense(32, activation="relu", name="hidden", kernel_initializer=kernel)(inp)
    out = keras.layers.Dense(1, name="out", dtype="float32")(h)  # float32 head, as Keras recommends
    model = keras.Model(inp, out, name="mp")
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    return model


def _data(n=64, target=0.0, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (n, 16)).astype("float32"), (target + rng.normal(size=(n, 1))).astype("float32")


def test_statistics_are_unscaled():
    model = _model(lr=0.0)
    x, y = _data(n=32)
    h = gradtrace.fit(model, x, y, batch_size=32, epochs=1, verbose=0, detectors=["nan", "exploding"])
    assert h.anomalies == []
    scale = float(model.optimizer.dynamic_scale.numpy())
    assert scale >= 2 ** 10  # the loss really was scaled
    run = h.gradtrace
    row = run.engine.tables[True].index("gradient", "mp/out")
    got = float(run.last_stats.numpy()[row, COL["norm"]])
    want = float(np.linalg.norm(2.0 * (model.predict(x, verbose=0) - y) / len(y)))  # d mse / d output
    assert got == pytest.approx(want, rel=1e-2)


def test_overflow_steps_the_optimizer_skips_are_not_faults():
    model = _model(lr=1e-4)
    x, y = _data(n=8 * 40, target=200.0)  # scaled float16 gradients overflow until the scale is lowered
    h = gradtrace.fit(model, x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    assert [a for a in h.anomalies if a.detector == "nan"] == []
    assert not h.gradtrace.halted
    skipped = h.gradtrace.calls - int(model.optimizer.iterations.numpy())
    assert skipped >= 2  # the LossScaleOptimizer did skip steps ...
    assert float(model.optimizer.dynamic_scale.numpy()) < 2 ** 15  # ... and lowered its scale
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_overflow_that_keeps_happening_is_reported():
    model = _model()
    x, y = _data(n=8 * 40, target=3e9)  # overflows at any scale the optimizer can reach in 20 steps
    h = gradtrace.fit(model, x, y, batch_size=8, epochs=1, verbose=0, shuffle=False,
                      detectors=[gradtrace.detectors.NaN(loss_scale_patience=6)])
    nan = [a for a in h.anomalies if a.detector == "nan"]
    assert len(nan) == 1 and h.gradtrace.halted
    assert h.gradtrace.calls == 6  # reported on the 6th overflow in a row
    assert nan[0].tensor in ("gradient", "weight_gradient")
    assert "in a row" in nan[0].message


def test_float16_overflow_in_a_layer_output_is_caught_and_blamed():
    model = _model()
    x, y = _data(n=8 * 6)
    x[8 * 3 + 2] = 60000.0  # representable in float16, but 60000 x (sum of a unit's weights) > 65504 for some unit
    before = {}

    class Keep(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            before["w"] = [w.copy() for w in self.model.get_weights()]

    h = gradtrace.fit(model, x, y, batch_size=8, epochs=1, verbose=0, shuffle=False, callbacks=[Keep()])
    assert len(h.anomalies) >= 1
    a = h.anomalies[0]
    assert (a.detector, a.layer, a.tensor, a.step) == ("nan", "mp/hidden", "output", 3)
    assert a.stats["inf"] > 0
    for w0, w1 in zip(before["w"], model.get_weights()):
        np.testing.assert_array_equal(w0, w1)
