"""Every action at every stage, detectors that fail, and a second run in the same process.

An action means something for each kind of finding: at a step (with its batch, before its update)
and at the end of an epoch (a check that reads the whole epoch, with no batch). A detector that
raises gives one error naming it and the stage, and leaves the model clean. The TensorBoard writer,
the snapshot directory and replay survive a second run in the same process.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import gradtrace
from gradtrace._keras_compat import all_layers
from tests import models as M

VOCAB, SEEN = 5000, 50


def wide_embedding():
    """An Embedding sized for 5000 ids that the data only ever feeds ids below 50 (a real
    vocabulary mismatch: unused_embedding finds it at the end of each epoch)."""
    inp = keras.Input((20,), dtype="int32", name="tokens")
    h = layers.Embedding(VOCAB, 4, name="tok_emb")(inp)
    h = layers.GlobalAveragePooling1D(name="pool")(h)
    out = layers.Dense(1, name="out")(h)
    m = keras.Model(inp, out, name="wide")
    m.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    return m


def wide_data():
    rng = np.random.default_rng(0)
    x = rng.integers(0, SEEN, (800, 20)).astype("int32")  # 16,000 lookups: > 3 x 5000
    return x, rng.normal(size=(800, 1)).astype("float32")


FIT = dict(batch_size=100, shuffle=False, verbose=0)


def test_snapshot_action_on_an_epoch_end_finding_records_it_and_trains_on(tmp_path):
    model = wide_embedding()
    h = gradtrace.fit(model, *wide_data(), epochs=2, on_anomaly="snapshot", snapshot_dir=tmp_path, **FIT)
    assert len(h.history["loss"]) == 2 and int(model.optimizer.iterations.numpy()) == 16
    found = [a for a in h.anomalies if a.detector == "unused_embedding"]
    assert [(a.stage, a.epoch, a.layer) for a in found] == [("epoch_end", 0, "wide/tok_emb"), ("epoch_end", 1, "wide/tok_emb")]
    # nothing to snapshot at an epoch's end: the finding is recorded as a warning and training goes on
    assert all(a.action == "warn" and a.snapshot is None for a in found)
    assert "end of epoch 0" in str(found[0])
    assert not os.listdir(tmp_path)


def test_snapshot_asked_of_an_epoch_end_detector_is_refused_up_front():
    with pytest.raises(ValueError, match=r"UnusedEmbedding\(action=...\)='snapshot' is not possible.*end of an epoch"):
        gradtrace.UnusedEmbedding(action="snapshot")


def test_halt_on_an_epoch_end_finding_stops_after_that_epoch_and_says_its_updates_stayed(capsys):
    model = wide_embedding()
    h = gradtrace.fit(model, *wide_data(), epochs=3, detectors=["nan", gradtrace.UnusedEmbedding(action="halt")],
                      **dict(FIT, verbose=1))
    assert len(h.history["loss"]) == 1 and int(model.optimizer.iterations.numpy()) == 8  # epoch 0, all applied
    assert [(a.stage, a.action) for a in h.anomalies] == [("epoch_end", "halt")]
    out = capsys.readouterr().out
    assert "halted at step 8; at the end of epoch 0: the check reads the whole epoch, so that epoch's updates were applied" in out
    assert "was not applied" not in out


def test_raise_on_an_epoch_end_finding_says_what_was_applied():
    model = wide_embedding()
    with pytest.raises(gradtrace.AnomalyError, match="end of epoch 0.*updates were applied") as info:
        gradtrace.fit(model, *wide_data(), epochs=3, detectors=[gradtrace.UnusedEmbedding(action="raise")], **FIT)
    assert [a.stage for a in info.value.anomalies] == ["epoch_end"]
    assert int(model.optimizer.iterations.numpy()) == 8
    assert info.value.history is not None and len(info.value.history.history["loss"]) == 1


# -- detectors that fail --------------------------------------------------------------------------

class FailsWhenTraced(gradtrace.Detector):
    name = "fails_when_traced"

    def check(self, view):
        raise RuntimeError("a bug in the check")


class FailsAtStep2(gradtrace.Detector):
    """Warns on the loss row every step; its check fails when it runs on step 2."""
    name = "fails_at_step_2"

    def check(self, view):
        ok = tf.debugging.assert_less(view.step, tf.cast(2, view.step.dtype), message="detector bug at step 2")
        with tf.control_dependencies([ok]):
            hit = tf.range(len(view.table)) == view.table.index("loss", "loss")
        return hit, tf.cast(hit, tf.float32)


class FailsToExplain(gradtrace.Detector):
    name = "fails_to_explain"
    default_action = "halt"

    def check(self, view):
        hit = tf.logical_and(tf.equal(view.step, 1), tf.range(len(view.table)) == view.table.index("loss", "loss"))
        return hit, tf.cast(hit, tf.float32)

    def explain(self, rows, fired, values, matrix, table):
        raise KeyError("no such row")


class FailsAtEpochEnd(gradtrace.Detector):
    name = "fails_at_epoch_end"

    def check(self, view):
        return tf.zeros([len(view.table)], tf.bool), tf.zeros([len(view.table)])

    def epoch_end(self, ctx):
        raise ValueError("epoch bookkeeping broke")


@pytest.mark.parametrize("detector, stage, iterations, found", [
    (FailsWhenTraced(), "check", 0, 0),            # compiling the step: nothing ran
    (FailsAtStep2(), "check", 2, 2),               # running the step: step 2 not applied
    (FailsToExplain(), "explain", 1, 0),           # it fired (halt): step 1 held, then explaining failed
    (FailsAtEpochEnd(), "epoch_end", 4, 0),        # after the epoch's 4 updates
], ids=["check-trace", "check-run", "explain", "epoch-end"])
def test_a_failing_detector_is_named_with_its_stage_and_the_model_stays_clean(detector, stage, iterations, found):
    keras.utils.set_random_seed(0)
    x, y = M.dense_data(n=128)
    inp = keras.Input((10,))
    h = layers.Dense(16, activation="relu", name="hidden")(inp)
    h = layers.BatchNormalization(name="bn")(h)
    model = keras.Model(inp, layers.Dense(3, activation="softmax", name="head")(h), name="mlp")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    w0 = [w.copy() for w in model.get_weights()]
    with pytest.raises(gradtrace.DetectorError) as info:
        gradtrace.fit(model, x, y, batch_size=32, epochs=2, shuffle=False, verbose=0,
                      detectors=["nan", detector])
    e = info.value
    assert (e.detector, e.stage) == (detector.name, stage)
    assert f"detector {detector.name!r} failed" in str(e) and "not of the model" in str(e)
    assert len(e.anomalies) == found and e.gradtrace is not None
    assert int(model.optimizer.iterations.numpy()) == iterations
    if iterations == 0:  # weights, BatchNorm statistics
        assert all(np.array_equal(a, b) for a, b in zip(w0, model.get_weights()))
    assert all(np.isfinite(w).all() for w in model.get_weights())
    assert not any(gradtrace.is_patched(layer) for layer in all_layers(model))
    # the same model trains on, watched, with working detectors
    h = gradtrace.fit(model, x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    assert h.anomalies == [] and np.isfinite(h.history["loss"]).all()


# -- a second run in the same process ---------------------------------------------------------------

def test_tensorboard_snapshots_and_replay_survive_a_second_run_in_the_same_process(tmp_path):
    """Two models, one after the other, into one TensorBoard directory and one snapshot directory,
    both failing at the same step: two event files that each hold their own run, two snapshots, and
    each replays its own model's step exactly."""
    x, y = M.two_embedding_data(n=96)
    runs = []
    for name in ("first", "second"):
        keras.utils.set_random_seed(len(runs))
        model = M.two_embedding_with_fault(at=2, name=name)
        model.compile(optimizer="adam", loss="binary_crossentropy")
        h = gradtrace.fit(model, x, y, batch_size=32, epochs=1, shuffle=False, verbose=0, on_anomaly="halt",
                          snapshot_dir=tmp_path / "snaps", tensorboard_dir=tmp_path / "tb", tensorboard_every=2)
        runs.append(h)
    files = [f for f in os.listdir(tmp_path / "tb") if "tfevents" in f]
    assert len(files) == 2
    for f, name in zip(sorted(files, key=lambda f: os.path.getmtime(tmp_path / "tb" / f)), ("first", "second")):
        tags = read_events_file(tmp_path / "tb" / f)
        assert any(t.startswith(f"{name}/") for t in tags) and not any(
            t.startswith("second/" if name == "first" else "first/") for t in tags)
    snaps = [h.anomalies[0].snapshot for h in runs]
    assert len(set(snaps)) == 2 and all(os.path.isdir(s) for s in snaps)
    for h, s in zip(runs, snaps):
        r = gradtrace.replay(s)
        assert r.step == 2 and r.loss == pytest.approx(r.recorded_loss, rel=1e-6, abs=1e-7)
        assert r.anomalies[0].layer == h.anomalies[0].layer


def read_events_file(path):
    return {v.tag for e in tf.compat.v1.train.summary_iterator(str(path)) for v in e.summary.value}
