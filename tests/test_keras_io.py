"""Published keras-io programs under gradtrace.fit (tests/keras_io_models.py): each trains as it does under
model.fit and gradtrace says nothing on it; and a healthy-at-initialisation MLP blown up by its first
update is blamed on the update, not on its initialisation."""

import warnings

import keras
import numpy as np
import pytest

import gradtrace
from tests import keras_io_models as K


def _fit(model, *args, **kw):
    with warnings.catch_warnings(record=True):  # a finding under the "warn" action is a warning
        warnings.simplefilter("always")
        h = gradtrace.fit(model, *args, verbose=0, **kw)
    return h


def test_translation_transformer_trains_as_under_fit_and_is_silent():
    x, y = K.translation_data(n=64)
    h = _fit(K.translation_transformer(), x, y, batch_size=16, epochs=2)
    plain = K.translation_transformer().fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert h.anomalies == [], [a.message for a in h.anomalies]
    assert h.history["loss"] == plain.history["loss"]  # bit for bit, dropout included


@pytest.mark.parametrize("build", [K.distiller, K.distiller3], ids=["train_step", "compute_loss"])
def test_distillation_is_silent_and_leaves_the_teacher_alone(build):
    x, y = K.digits_data()
    model = build()
    teacher = [v.numpy().copy() for v in model.teacher.weights]
    student = [v.numpy().copy() for v in model.student.weights]
    h = _fit(model, x, y, batch_size=16, epochs=1)
    assert h.anomalies == [], [a.message for a in h.anomalies]
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(teacher, model.teacher.weights))
    assert not all(np.array_equal(a, v.numpy()) for a, v in zip(student, model.student.weights))


def test_wgan_gp_is_silent():
    h = _fit(K.wgan_gp(), K.gan_images(n=32), batch_size=16, epochs=1)
    assert h.anomalies == [], [a.message for a in h.anomalies]
    assert np.isfinite(h.history["d_loss"]).all() and len(h.history["g_loss"]) == 1


def test_a_scale_grown_by_the_first_update_is_blamed_on_the_update_not_the_initialisation():
    x, y = K.regression_data()
    model = K.deep_relu_mlp()
    h = _fit(model, x, y, batch_size=16, epochs=1)
    found = {a.detector for a in h.anomalies}
    assert "scale_growth" not in found
    exploding = [a for a in h.anomalies if a.detector == "exploding"]
    assert exploding and exploding[0].step == 1 and "targets" in exploding[0].message
    # the same model at initialisation scale: healthy at step 0 (what scale_growth judges)
    fresh = K.deep_relu_mlp()
    act = x
    for layer in fresh.layers[:-1]:
        act = layer(act)
    assert float(np.sqrt(np.mean(np.square(keras.ops.convert_to_numpy(act))))) < 10.0
