"""guard=: how an update waits for the checks ("step": held whole; "variable": each variable on its own
gradient; None: nothing held). Real models, a NaN gradient in one variable, parity with model.fit."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradtrace


@tf.custom_gradient
def _nan_gradient(w):
    return tf.identity(w), lambda dy: dy * float("nan")


class _OneBadGradient(keras.layers.Layer):
    """x @ k, plus 0 * sum(w): the output and the loss stay finite, but w's gradient is NaN."""

    def build(self, shape):
        self.k = self.add_weight(shape=(shape[-1], 4), initializer="glorot_uniform", name="k")
        self.w = self.add_weight(shape=(4,), initializer="zeros", name="w")

    def call(self, x):
        return x @ self.k + 0.0 * tf.reduce_sum(_nan_gradient(self.w))


def _model(bad=True, optimizer="adam"):
    keras.utils.set_random_seed(1)
    inp = keras.Input((8,))
    h = keras.layers.Dense(16, activation="relu", name="d0")(inp)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = _OneBadGradient(name="odd")(h) if bad else keras.layers.Dense(4, name="odd")(h)
    model = keras.Model(inp, keras.layers.Dense(1, name="head")(h))
    model.compile(optimizer=optimizer, loss="mse")
    return model


_X = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
_Y = np.random.default_rng(1).normal(size=(64, 1)).astype("float32")


def _state(model):
    return {v.path: v.numpy().copy() for v in model.weights + model.optimizer.variables}


@pytest.mark.parametrize("guard", ["step", "variable", None])
def test_a_nan_gradient_in_one_variable_under_each_guard(guard):
    model = _model()
    before = _state(model)
    h = gradtrace.fit(model, _X, _Y, batch_size=16, verbose=0, detectors=["nan"], guard=guard)
    a = h.anomalies[0]
    assert (a.detector, a.step, a.layer.split("/")[-1]) == ("nan", 0, "odd")
    after = _state(model)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    finite = all(np.isfinite(v).all() for v in after.values())
    if guard == "step":  # held whole: nothing moved
        assert not changed and int(model.optimizer.iterations) == 0
    elif guard == "variable":  # w and its slots untouched and finite; the others updated; BatchNorm put back
        assert finite and int(model.optimizer.iterations) == 1
        assert "odd/w" not in changed and not any("odd_w" in k for k in changed)
        assert {"d0/kernel", "odd/k", "head/kernel"} <= changed
        assert "bn/moving_mean" not in changed
    else:  # nothing held: the NaN reached w, named at the step it appeared
        assert "odd/w" in changed and not np.isfinite(after["odd/w"]).all()
    assert h.gradtrace.halted  # nan halts in every mode; the message says what happened to the update
    how = {"step": "was not applied", "variable": "the other variables of the step were", None: "was applied"}
    assert how[guard] in gradtrace.anomaly.stopped_how("step", None, guard)


@pytest.mark.parametrize("guard", ["variable", None])
def test_on_a_healthy_model_every_guard_trains_as_model_fit(guard):
    plain, watched = _model(bad=False), _model(bad=False)
    plain.fit(_X, _Y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    h = gradtrace.fit(watched, _X, _Y, batch_size=16, epochs=2, verbose=0, shuffle=False, guard=guard)
    assert not h.anomalies
    a = [v.numpy() for v in plain.weights + plain.optimizer.variables]
    b = [v.numpy() for v in watched.weights + watched.optimizer.variables]
    assert len(a) == len(b) and all(np.array_equal(u, v) for u, v in zip(a, b))


def test_guard_arguments_are_checked_and_an_optimizer_it_cannot_split_is_held_whole(tmp_path):
    with pytest.raises(ValueError, match=r"guard='all' is not allowed.*'step'.*'variable'.*None"):
        gradtrace.fit(_model(), _X, _Y, verbose=0, guard="all")
    with pytest.raises(ValueError, match=r"guard='variable' and snapshots do not go together"):
        gradtrace.fit(_model(), _X, _Y, verbose=0, guard="variable", snapshot_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"guard=None and verify_hints=True do not go together"):
        gradtrace.fit(_model(), _X, _Y, verbose=0, guard=None, verify_hints=True)
    # a LossScaleOptimizer skips non-finite steps itself: the step gate, said once
    model = _model(optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.01)))
    with pytest.warns(UserWarning, match=r"guard='variable' needs an optimizer that updates one variable"):
        gradtrace.fit(model, _X, _Y, batch_size=16, verbose=0, detectors=["nan"], guard="variable")
    assert all(np.isfinite(w).all() for w in model.get_weights())  # (it skipped the step itself)
