"""Parity suite: a broad set of ``fit`` behaviours under ``model.fit`` and ``gradtrace.fit``.

Each case trains two identical models, one with each, and compares what a
callback sees (every batch and epoch event, in order, with its logs), the
History and the weights. Swapping one line must change nothing else.

The stock callbacks not run here: ``RemoteMonitor`` (a network endpoint) and
``SwapEMAWeights`` (an optimizer with ``use_ema``).
"""

import csv
import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradtrace
from gradtrace import _keras_compat as compat
from tests import models as M


class Events(keras.callbacks.Callback):
    """Every batch and epoch event with its logs."""

    def __init__(self):
        super().__init__()
        self.events = []

    def on_train_batch_end(self, batch, logs=None):
        self.events.append(("batch", batch, dict(logs or {})))

    def on_epoch_end(self, epoch, logs=None):
        self.events.append(("epoch", epoch, dict(logs or {})))


def _dense(inputs=6, name="m"):
    x = keras.Input((inputs,), name="x")
    h = keras.layers.Dense(8, activation="relu", name="hidden")(x)
    return keras.Model(x, keras.layers.Dense(1, activation="sigmoid", name="out")(h), name=name)


def _dict_model():
    a, b = keras.Input((4,), name="a"), keras.Input((2,), name="b")
    h = keras.layers.Dense(6, activation="relu")(keras.layers.Concatenate()([a, b]))
    return keras.Model({"a": a, "b": b}, keras.layers.Dense(1, activation="sigmoid")(h))


class _SumIds(keras.layers.Layer):
    """Embeds ragged or sparse ids and sums them per example."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.emb = keras.layers.Embedding(30, 4, name="emb")

    def call(self, ids):
        rows = self.emb(ids)
        if isinstance(rows, tf.SparseTensor):
            return tf.sparse.reduce_sum(rows, axis=1)
        return tf.reduce_sum(rows, axis=1)


class _Composite(keras.Model):
    def __init__(self):
        super().__init__(name="composite")
        self.ids = _SumIds(name="sum_ids")
        self.out = keras.layers.Dense(1, activation="sigmoid", name="out")

    def call(self, x):
        return self.out(self.ids(x))


def _xy(n=48, inputs=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, inputs)).astype("float32")
    return x, (x[:, :1] > 0).astype("float32")


def _twins(build, optimizer=lambda: keras.optimizers.Adam(0.01), **compile_kw):
    out = []
    for _ in range(2):
        keras.utils.set_random_seed(3)
        m = build()
        m.compile(optimizer=optimizer(), loss="binary_crossentropy", metrics=["accuracy"], **compile_kw)
        out.append(m)
    return out


def _weights(model):
    return [np.asarray(v) for v in model.weights]


def _same_events(a, b):
    assert [(k, i) for k, i, _ in a] == [(k, i) for k, i, _ in b]
    for (kind, i, la), (_, _, lb) in zip(a, b):
        assert set(la) == set(lb), (kind, i)
        for key in la:
            np.testing.assert_allclose(lb[key], la[key], rtol=1e-4, atol=1e-6, err_msg=f"{kind} {i} {key}")


def _run_both(build, data, fit_kw, compile_kw=None, optimizer=None, callbacks=lambda: []):
    """Train twins with model.fit and gradtrace.fit; compare events, History and weights."""
    twins = _twins(build, **(compile_kw or {})) if optimizer is None else _twins(build, optimizer, **(compile_kw or {}))
    results = []
    for m, fit in zip(twins, (lambda m, *a, **k: m.fit(*a, **k), gradtrace.fit)):
        ev = Events()
        h = fit(m, *data(), callbacks=[ev] + callbacks(), verbose=0, **fit_kw)
        results.append((m, ev.events, h))
    (mk, ek, hk), (mg, eg, hg) = results
    _same_events(ek, eg)
    assert hk.history.keys() == hg.history.keys()
    for k in hk.history:
        np.testing.assert_allclose(hg.history[k], hk.history[k], rtol=1e-4, atol=1e-6, err_msg=k)
    for a, b in zip(_weights(mk), _weights(mg)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    assert hg.anomalies == []
    return results


class _Seq(keras.utils.PyDataset):
    def __init__(self, x, y, batch):
        super().__init__()
        self.x, self.y, self.batch = x, y, batch

    def __len__(self):
        return int(np.ceil(len(self.x) / self.batch))

    def __getitem__(self, i):
        s = slice(i * self.batch, (i + 1) * self.batch)
        return self.x[s], self.y[s]


def _gen(x, y, batch):
    while True:
        for i in range(0, len(x), batch):
            yield x[i:i + batch], y[i:i + batch]


def _ragged_data(sparse=False, n=40):
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 5, n)
    values = rng.integers(0, 30, lengths.sum())
    ids = tf.RaggedTensor.from_row_lengths(values, lengths)
    y = (np.array([v.numpy().sum() for v in ids]) % 2).astype("float32")[:, None]
    if sparse:
        ids = ids.to_sparse()
    return tf.data.Dataset.from_tensor_slices((ids, y)).batch(8)


CASES = {
    # data
    "arrays_validation_initial_epoch": (_dense, lambda: _xy(), dict(
        batch_size=10, epochs=3, initial_epoch=1, validation_split=0.25, shuffle=False)),
    "dicts_sample_and_class_weights": (_dict_model, lambda: (
        {"a": _xy(40, 4)[0], "b": _xy(40, 2, seed=2)[0]}, _xy(40, 4)[1]), dict(
        batch_size=8, epochs=2, shuffle=False, class_weight={0: 1.0, 1: 3.0})),
    "dataset_steps_per_epoch_no_repeat": (_dense, lambda: (tf.data.Dataset.from_tensor_slices(_xy()).batch(10),),
                                          dict(epochs=1, steps_per_epoch=3, shuffle=False)),
    "dataset_repeat_steps_per_epoch": (_dense, lambda: (tf.data.Dataset.from_tensor_slices(_xy()).batch(10).repeat(),),
                                       dict(epochs=3, steps_per_epoch=7, shuffle=False)),
    "generator": (_dense, lambda: (_gen(*_xy(), 16),), dict(epochs=2, steps_per_epoch=4, shuffle=False)),
    "pydataset": (_dense, lambda: (_Seq(*_xy(), 16),), dict(epochs=2, shuffle=False)),
    "ragged_ids": (_Composite, lambda: (_ragged_data(),), dict(epochs=2, shuffle=False)),
    "sparse_ids": (_Composite, lambda: (_ragged_data(sparse=True),), dict(epochs=2, shuffle=False)),
    "validation_data_freq": (_dense, lambda: _xy(), dict(
        batch_size=12, epochs=3, validation_data=_xy(20, seed=4), validation_freq=2, shuffle=False)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity(case):
    build, data, fit_kw = CASES[case]
    _run_both(build, data, fit_kw)


@pytest.mark.parametrize("spe", [1, 3, 32])
def test_parity_steps_per_execution(spe):
    # 50 examples in batches of 8: a partial last batch, and (spe=32) an execution longer than the epoch
    results = _run_both(_dense, lambda: _xy(50), dict(batch_size=8, epochs=2, shuffle=False),
                        compile_kw=dict(steps_per_execution=spe))
    m = results[1][0]
    assert m.steps_per_execution == spe
    batches = [i for kind, i, _ in results[1][1] if kind == "batch"]
    assert len(batches) == {1: 7, 3: 3, 32: 1}[spe] * 2  # one call per execution, as under model.fit


def test_parity_stop_training_from_a_callback():
    class StopAt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:
                self.model.stop_training = True

    results = _run_both(_dense, lambda: _xy(), dict(batch_size=8, epochs=3, shuffle=False),
                        callbacks=lambda: [StopAt()])
    assert [(k, i) for k, i, _ in results[1][1]] == [("batch", 0), ("batch", 1), ("batch", 2), ("epoch", 0)]


def test_parity_every_stock_callback(tmp_path):
    def stock(tag):
        d = tmp_path / tag
        d.mkdir()
        return [
            keras.callbacks.CSVLogger(str(d / "log.csv")),
            keras.callbacks.EarlyStopping(monitor="loss", patience=0, min_delta=10.0),  # stops after 2 epochs
            keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr * 0.5),
            keras.callbacks.ModelCheckpoint(str(d / "best.weights.h5"), save_weights_only=True, monitor="loss"),
            keras.callbacks.ReduceLROnPlateau(monitor="loss", patience=0, min_delta=10.0, factor=0.5),
            keras.callbacks.TerminateOnNaN(),
            keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: None),
            keras.callbacks.ProgbarLogger(),
            keras.callbacks.BackupAndRestore(str(d / "backup")),
            keras.callbacks.TensorBoard(str(d / "tb"), write_graph=False),
            keras.callbacks.History(),
        ]

    tags = iter(["keras", "gt"])
    results = _run_both(_dense, lambda: _xy(), dict(batch_size=12, epochs=4, shuffle=False),
                        callbacks=lambda: stock(next(tags)))
    assert [k for k, _, _ in results[0][1]].count("epoch") == 2  # EarlyStopping acted alike
    for name in ("log.csv",):
        rows = []
        for t in ("keras", "gt"):
            with open(tmp_path / t / name) as f:
                rows.append(list(csv.reader(f)))
        assert rows[0][0] == rows[1][0] and len(rows[0]) == len(rows[1]) == 3
        for a, b in zip(rows[0][1:], rows[1][1:]):
            assert [c == "NA" for c in a] == [c == "NA" for c in b]
            np.testing.assert_allclose([float(c) for c in b if c != "NA"], [float(c) for c in a if c != "NA"],
                                       rtol=1e-4)
    assert os.path.exists(tmp_path / "gt" / "best.weights.h5")
    assert float(results[1][0].optimizer.learning_rate) == pytest.approx(float(results[0][0].optimizer.learning_rate))


class TrainerDense(compat.trainer_class(), keras.layers.Dense):
    """Keras' own pattern: a Trainer that is a Dense layer, not a keras.Model."""

    def __init__(self, units):
        keras.layers.Dense.__init__(self, units=units, activation="sigmoid", name="trainer_dense")
        compat.trainer_class().__init__(self)


def test_parity_trainer_that_is_not_a_model():
    def build():
        m = TrainerDense(1)
        m.build((None, 6))
        return m

    _run_both(build, lambda: _xy(), dict(batch_size=8, epochs=2, shuffle=False))


def test_parity_model_without_trainable_weights():
    def build():
        m = _dense()
        m.trainable = False
        return m

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = _run_both(build, lambda: _xy(), dict(batch_size=8, epochs=2, shuffle=False))
    assert any("no update to watch" in str(w.message) for w in caught)  # gradtrace says nothing can be watched
    assert results[1][2].history["loss"][0] > 0


class MultiOptimizer(keras.optimizers.Optimizer):
    """One optimizer per group of layers, as in tf-keras' MultiOptimizer: it has no single learning rate."""

    def __init__(self, pairs):
        super().__init__(learning_rate=0.0, name="multi_optimizer")
        self.pairs = pairs  # [(optimizer, layer name)]
        self.model = None

    @property
    def learning_rate(self):
        raise ValueError("Learning rate cannot be accessed on a MultiOptimizer.")

    def build(self, variables):
        super().build(variables)
        for opt, name in self.pairs:
            opt.build(self.model.get_layer(name).trainable_variables)

    def apply(self, grads, trainable_variables=None):
        by_id = {id(v): g for g, v in zip(grads, trainable_variables)}
        for opt, name in self.pairs:
            vs = self.model.get_layer(name).trainable_variables
            opt.apply([by_id[id(v)] for v in vs], vs)
        self.iterations.assign_add(1)


def test_parity_multi_optimizer():
    def build():
        m = _dense()
        return m

    def optimizer():
        return MultiOptimizer([(keras.optimizers.SGD(0.1), "hidden"), (keras.optimizers.Adam(0.01), "out")])

    twins = _twins(build, optimizer)
    for m in twins:
        m.optimizer.model = m
    x, y = _xy()
    hk = twins[0].fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    hg = gradtrace.fit(twins[1], x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    np.testing.assert_allclose(hg.history["loss"], hk.history["loss"], rtol=1e-4)
    for a, b in zip(_weights(twins[0]), _weights(twins[1])):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    assert hg.anomalies == [] and int(twins[1].optimizer.iterations) == 12


# -- a held step leaves the state as before it, and the user's callbacks keep their contract ---------
def _fault_twins(at, spe):
    """A regression MLP with BatchNormalization whose hidden output turns NaN at step ``at``
    (so the loss is NaN there, under model.fit too)."""
    twins = []
    for _ in range(2):
        keras.utils.set_random_seed(5)
        x = keras.Input((6,), name="x")
        h = keras.layers.Dense(8, activation="relu", name="hidden")(x)
        h = keras.layers.BatchNormalization(name="bn")(h)
        h = M.NaNAtStep(at, name="faulty")(h)
        m = keras.Model(x, keras.layers.Dense(1, name="out")(h), name="outer")
        m.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", metrics=["mae"], steps_per_execution=spe)
        twins.append(m)
    return twins


def _state(model):
    return ([np.asarray(v) for v in model.weights], [np.asarray(v) for v in model.optimizer.variables],
            [np.asarray(v) for v in model.metrics_variables])


@pytest.mark.parametrize("spe", [1, 4])
def test_halted_step_leaves_weights_optimizer_metrics_and_batchnorm_as_before_it(spe):
    # the fault is at step 5: with steps_per_execution=4, in the middle of the second execution
    x, y = _xy(16 * 12)
    before, watched = _fault_twins(at=5, spe=1)[0], _fault_twins(at=5, spe=spe)[1]
    before.fit(x, y, batch_size=16, epochs=1, steps_per_epoch=5, shuffle=False, verbose=0)
    ev = Events()
    h = gradtrace.fit(watched, x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[ev])
    assert [(a.detector, a.step, a.layer) for a in h.anomalies][:1] == [("nan", 5, "outer/faulty")]
    assert int(watched.optimizer.iterations) == 5
    for got, want in zip(_state(watched), _state(before)):
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
    # the callbacks saw the batch counts model.fit gives them, and the held step's real loss
    batches = [(i, logs["loss"]) for kind, i, logs in ev.events if kind == "batch"]
    assert len(batches) == (6 if spe == 1 else 2)  # one call per execution (the index Keras passes varies by version)
    assert np.isnan(batches[-1][1]) and all(np.isfinite(loss) for _, loss in batches[:-1])
    epoch_logs = [logs for kind, _, logs in ev.events if kind == "epoch"][0]
    assert np.isnan(epoch_logs["loss"])


def test_terminate_on_nan_and_csv_logger_see_the_held_step(tmp_path):
    import inspect

    x, y = _xy(16 * 8)
    m = _fault_twins(at=3, spe=1)[0]
    if "raise_error" in inspect.signature(keras.callbacks.TerminateOnNaN.__init__).parameters:  # Keras >= 3.11
        with pytest.raises(RuntimeError, match="NaN|nan|Inf"):
            gradtrace.fit(m, x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                          callbacks=[keras.callbacks.TerminateOnNaN(raise_error=True)])
    else:  # older Keras: TerminateOnNaN only stops; it must have seen the NaN loss to print its message
        class Seen(keras.callbacks.TerminateOnNaN):
            def on_batch_end(self, batch, logs=None):
                super().on_batch_end(batch, logs)
                self.seen = np.isnan(logs["loss"])

        seen = Seen()
        gradtrace.fit(m, x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[seen])
        assert seen.seen
    assert int(m.optimizer.iterations) == 3
    m = _fault_twins(at=3, spe=1)[0]
    log = tmp_path / "log.csv"
    gradtrace.fit(m, x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                  callbacks=[keras.callbacks.CSVLogger(str(log))])
    with open(log) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["loss"] == "nan"


def test_the_watched_step_is_traced_once_whatever_the_batch_shapes():
    # 50 examples in batches of 8: a partial last batch in each of 3 epochs. Keras' train function
    # takes the iterator, so the batch shape is not part of its signature; the compile metrics are
    # built before the first trace, so it is not traced a second time either
    keras.utils.set_random_seed(3)
    m = _dense()
    m.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    h = gradtrace.fit(m, *_xy(50), batch_size=8, epochs=3, verbose=0)
    from gradtrace.step import TRACED

    assert h.gradtrace.engine.variants[TRACED].traces == 1
