"""Snapshots and replay: the failing step kept whole, replayed exactly, traced to its op."""

import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import gradtrace
from gradtrace import _keras_compat as compat
from gradtrace import snapshot as snapshot_module
from gradtrace.stats import COL
from tests import models as M
from tests.test_detectors import GradBoostAtStep


def dropout_model_with_fault(at, boost_at=None):
    """The mission's model with Dropout (so replay must restore seed states) and a fault."""
    user = keras.Input((1,), dtype="int32", name="user")
    item = keras.Input((1,), dtype="int32", name="item")
    u = layers.Embedding(200, 8, name="user_emb")(user)
    if boost_at is not None:
        u = GradBoostAtStep(boost_at, name="boost")(u)
    u = layers.Flatten(name="user_vec")(u)
    i = layers.Flatten(name="item_vec")(layers.Embedding(80, 4, name="item_emb")(item))
    c = layers.Dropout(0.3, name="drop")(layers.Concatenate(name="concat")([u, i]))
    inner = keras.Model([user, item], M.NaNAtStep(at, name="faulty")(c), name="inner")
    user2 = keras.Input((1,), dtype="int32", name="user")
    item2 = keras.Input((1,), dtype="int32", name="item")
    z = layers.Dense(16, activation="relu", name="hidden")(inner([user2, item2]))
    z = layers.Dropout(0.2, name="drop2")(z)
    out = layers.Dense(1, activation="sigmoid", name="out")(z)
    model = keras.Model([user2, item2], out, name="outer")
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    return model


def _train(model, tmp_path, n=256, **kw):
    x, y = M.two_embedding_data(n=n)
    kw.setdefault("snapshot_dir", tmp_path / "snaps")
    return gradtrace.fit(model, x, y, batch_size=32, epochs=1, shuffle=False, verbose=0, **kw)


def test_nan_fault_snapshot_replays_exactly_with_dropout(tmp_path):
    model = dropout_model_with_fault(at=4)
    h = _train(model, tmp_path)
    a = h.anomalies[0]
    assert (a.detector, a.layer, a.step) == ("nan", "outer/inner/faulty", 4)
    assert a.snapshot and os.path.isdir(a.snapshot) and a.snapshot_error is None
    assert sorted(os.listdir(tmp_path / "snaps")) == ["step_00000004"]

    r = gradtrace.replay(a.snapshot)
    assert r.step == 4
    assert r.loss == pytest.approx(r.recorded_loss, rel=1e-6, abs=1e-7)
    assert r.max_difference() < 1e-5  # every statistic of every row, Dropout masks included
    assert [(x.detector, x.layer) for x in r.anomalies] == [("nan", "outer/inner/faulty")]
    # every layer's output and gradient is there, in full
    out = r.outputs["outer/inner/faulty"].numpy()
    assert out.shape == (32, 12) and np.isnan(out).all()
    assert r.outputs["outer/inner/concat"].shape == (32, 12) and np.isfinite(r.outputs["outer/inner/concat"]).all()
    assert "outer/hidden" in r.gradients
    assert "outer/inner/faulty" in r.table() and "<- blamed" in r.table()


def test_replay_names_the_op_and_the_source_line(tmp_path):
    model = dropout_model_with_fault(at=2)
    h = _train(model, tmp_path)
    r = gradtrace.replay(h.anomalies[0].snapshot)
    o = r.origin
    assert o["layer"] == "outer/inner/faulty" and o["pass"] == "forward"
    assert o["op_type"] in ("SelectV2", "Select", "Mul")
    with open(M.__file__) as f:
        src_line = next(i for i, line in enumerate(f, 1) if "factor = ops.where" in line)
    assert o["source"].startswith(f"{M.__file__}:{src_line}")
    assert "ops.where" in o["code"]
    assert "First non-finite value" in str(r)


def test_exploding_fault_snapshot_replays(tmp_path):
    model = dropout_model_with_fault(at=10**6, boost_at=12)
    h = _train(model, tmp_path, n=32 * 16)
    a = [x for x in h.anomalies if x.detector == "exploding"][0]
    assert (a.layer, a.step) == ("outer/inner/user_emb", 12)
    r = gradtrace.replay(a.snapshot)
    assert r.loss == pytest.approx(r.recorded_loss, rel=1e-6)
    g_rec = r.snapshot.matrix[r.rows.index("gradient", "outer/inner/user_emb")][COL["norm"]]
    assert r.stats("gradient", "outer/inner/user_emb")["norm"] == pytest.approx(float(g_rec), rel=1e-5)
    assert r.origin is None  # nothing non-finite


def test_snapshot_action_keeps_training_exactly_as_if_uninterrupted(tmp_path):
    class AtStep(gradtrace.Detector):
        name = "at_step"
        default_action = "snapshot"
        needs = ("size",)

        def check(self, view):
            return view.mask(kinds=("loss",)) & tf.equal(view.step, 2), view["size"]

    x, y = M.two_embedding_data()
    keras.utils.set_random_seed(3)
    plain = dropout_model_with_fault(at=10**6)
    keras.utils.set_random_seed(3)
    watched = dropout_model_with_fault(at=10**6)
    h_plain = plain.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    h = gradtrace.fit(watched, x, y, batch_size=32, epochs=1, shuffle=False, verbose=0,
                      detectors=["nan", AtStep()], snapshot_dir=tmp_path / "s")
    assert [(a.detector, a.step) for a in h.anomalies] == [("at_step", 2)]
    assert os.path.isdir(h.anomalies[0].snapshot)
    for a, b in zip(plain.get_weights(), watched.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(h.history["loss"], h_plain.history["loss"], rtol=1e-6)


def test_snapshot_cap_holds(tmp_path):
    model = dropout_model_with_fault(at=1)
    h = _train(model, tmp_path, on_anomaly="snapshot", max_snapshots=2)
    # snapshot keeps training but skips each bad update, the layer's call counter with it: the fault
    # repeats at every later batch, and no NaN ever reaches a weight
    assert int(model.optimizer.iterations) == 1
    assert all(np.isfinite(w).all() for w in model.get_weights())
    assert len(os.listdir(tmp_path / "snaps")) == 2
    assert [a.snapshot is not None for a in h.anomalies][:2] == [True, True]
    assert all(a.snapshot is None and "cap of 2" in a.snapshot_error for a in h.anomalies[2:])
    assert len(h.anomalies) > 2


def test_snapshot_action_skips_the_bad_update_and_snapshots_the_faults_repeat(tmp_path):
    """``on_anomaly="snapshot"``: the failing step is written, its update skipped (no NaN reaches a weight
    or an optimizer slot), training goes on, and the same fault one epoch later is written too."""
    keras.utils.set_random_seed(0)
    model = dropout_model_with_fault(at=10**6)
    x, y = M.two_embedding_data(n=128)
    y[70] = np.nan  # a bad label in batch 2 of every epoch
    h = gradtrace.fit(model, x, y, batch_size=32, epochs=2, shuffle=False, verbose=0, on_anomaly="snapshot",
                      snapshot_dir=tmp_path / "s")
    assert [(a.detector, a.layer, a.step, a.epoch) for a in h.anomalies] == [
        ("nan", "targets", 2, 0), ("nan", "targets", 5, 1)]
    assert all(a.snapshot and a.snapshot_error is None for a in h.anomalies)
    assert int(model.optimizer.iterations) == 6  # 8 batches, the two bad updates skipped
    assert all(np.isfinite(v.numpy()).all() for v in model.optimizer.variables)
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_snapshot_action_defaults_to_a_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = dropout_model_with_fault(at=1)
    x, y = M.two_embedding_data()
    h = gradtrace.fit(model, x, y, batch_size=32, verbose=0, on_anomaly="snapshot", max_snapshots=1)
    assert h.anomalies[0].snapshot.startswith(snapshot_module.DEFAULT_DIR)
    assert os.listdir(tmp_path / snapshot_module.DEFAULT_DIR) == ["step_00000001"]


def test_a_failed_write_leaves_nothing_and_says_why(tmp_path, monkeypatch):
    real = np.savez
    calls = {"n": 0}

    def failing(path, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # batch and state written, then the disk "fills"
            raise OSError(28, "No space left on device")
        return real(path, *a, **kw)

    monkeypatch.setattr(snapshot_module.np, "savez", failing)
    model = dropout_model_with_fault(at=3)
    h = _train(model, tmp_path)
    a = h.anomalies[0]
    assert a.snapshot is None and "No space left on device" in a.snapshot_error
    assert os.listdir(tmp_path / "snaps") == []  # no partial snapshot, no temporary directory
    assert int(model.optimizer.iterations) == 3  # and the halt still happened
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_replay_onto_a_mismatching_model_fails_clearly(tmp_path):
    h = _train(dropout_model_with_fault(at=2), tmp_path)
    other = M.two_embedding(n_users=300)
    other.compile(optimizer="adam", loss="binary_crossentropy")
    with pytest.raises(gradtrace.SnapshotError, match=r"(?s)do not match.*user_emb/embeddings: the model has shape \(300, 8\), the snapshot \(200, 8\)"):
        gradtrace.replay(h.anomalies[0].snapshot, model=other)


def test_replay_onto_the_same_architecture_given_as_model(tmp_path):
    h = _train(dropout_model_with_fault(at=2), tmp_path)
    fresh = dropout_model_with_fault(at=2)
    r = gradtrace.replay(h.anomalies[0].snapshot, model=fresh)
    assert r.loss == pytest.approx(r.recorded_loss, rel=1e-6)


def test_cli_replays_and_shows_in_a_fresh_process(tmp_path):
    h = _train(dropout_model_with_fault(at=2), tmp_path)
    path = h.anomalies[0].snapshot
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": os.getcwd()}
    # three fresh processes, run side by side (each spends most of its time importing TensorFlow)
    procs = [subprocess.Popen([sys.executable, "-m", "gradtrace", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
             for args in (["replay", path, "--json", "--import", "tests.models"], ["show", path, "--json"],
                          ["replay", path])]
    done = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    out, show, bad = done
    assert out.returncode == 0, out.stderr[-2000:]
    def bare(token):
        raise AssertionError(f"not JSON: a bare {token} in the output")

    doc = json.loads(out.stdout, parse_constant=bare)  # strict JSON: JSON.parse would reject NaN
    assert any(row["nan"] == "NaN" or row["mean"] == "NaN" for row in doc["layers"])  # non-finite, as strings
    assert doc["step"] == 2 and doc["anomalies"][0]["layer"] == "outer/inner/faulty"
    assert doc["loss"] == pytest.approx(doc["recorded_loss"], rel=1e-6)
    assert doc["origin"]["layer"] == "outer/inner/faulty"
    assert show.returncode == 0, show.stderr[-2000:]
    assert json.loads(show.stdout, parse_constant=bare)["manifest"]["step"] == 2
    # without the module that defines the custom layer, it says exactly what to pass
    assert bad.returncode == 1
    assert "NaNAtStep" in bad.stderr and "custom_objects" in bad.stderr and "Traceback" not in bad.stderr


# -- hostile and broken snapshots: one-line errors, nothing run ---------------------------

@pytest.fixture(scope="module")
def _recorded_snapshot(tmp_path_factory):
    h = _train(dropout_model_with_fault(at=2), tmp_path_factory.mktemp("recorded"))
    return h.anomalies[0].snapshot


@pytest.fixture
def snap(_recorded_snapshot, tmp_path):
    """A fresh copy of one real snapshot, for each test to damage as it likes."""
    return str(shutil.copytree(_recorded_snapshot, tmp_path / os.path.basename(_recorded_snapshot)))


def _one_line(err):
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def test_pickled_object_array_is_refused(snap):
    arr = np.array([{"evil": 1}], dtype=object)
    np.savez(os.path.join(snap, "batch.npz"), a0=arr, a1=arr, a2=arr)  # np.savez pickles object arrays
    with pytest.raises(gradtrace.SnapshotError) as err:
        gradtrace.replay(snap)
    assert "pickle" in _one_line(err)


@pytest.mark.parametrize("change", ["extra", "missing", "version"])
def test_bad_manifest_is_refused(snap, change):
    p = os.path.join(snap, "manifest.json")
    with open(p) as f:
        m = json.load(f)
    if change == "extra":
        m["run_this"] = "import os"
    elif change == "missing":
        del m["variables"]
    else:
        m["format_version"] = 99
    with open(p, "w") as f:
        json.dump(m, f)
    with pytest.raises(gradtrace.SnapshotError) as err:
        gradtrace.replay(snap)
    msg = _one_line(err)
    assert {"extra": "run_this", "missing": "variables", "version": "format version 99"}[change] in msg


def test_symlink_out_of_the_snapshot_is_refused(snap, tmp_path):
    outside = tmp_path / "elsewhere.npz"
    os.replace(os.path.join(snap, "batch.npz"), outside)
    os.symlink(outside, os.path.join(snap, "batch.npz"))
    with pytest.raises(gradtrace.SnapshotError) as err:
        gradtrace.replay(snap)
    assert "outside the snapshot directory" in _one_line(err)


def test_dotdot_in_the_manifest_is_refused(snap):
    p = os.path.join(snap, "manifest.json")
    with open(p) as f:
        m = json.load(f)
    m["files"].append("../../etc/passwd")
    with open(p, "w") as f:
        json.dump(m, f)
    with pytest.raises(gradtrace.SnapshotError) as err:
        gradtrace.replay(snap)
    assert "outside the snapshot directory" in _one_line(err)


@pytest.mark.parametrize("name", ["state.npz", "manifest.json"])
def test_truncated_file_is_refused(snap, name):
    p = os.path.join(snap, name)
    with open(p, "rb") as f:
        data = f.read()
    with open(p, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(gradtrace.SnapshotError) as err:
        gradtrace.replay(snap)
    assert name in _one_line(err)


def test_missing_or_partial_snapshot_is_refused(snap, tmp_path):
    with pytest.raises(gradtrace.SnapshotError, match="no such snapshot"):
        gradtrace.replay(tmp_path / "nope")
    os.remove(os.path.join(snap, "stats.npz"))
    with pytest.raises(gradtrace.SnapshotError, match="stats.npz is missing"):
        gradtrace.replay(snap)


def test_lambda_layer_is_not_deserialised_without_safe_mode_false(tmp_path):
    inp = keras.Input((4,))
    h = layers.Lambda(lambda t: t * 2.0, name="double")(inp)
    h = M.NaNAtStep(1, name="faulty")(h)
    model = keras.Model(inp, layers.Dense(1, name="out")(h), name="lam")
    model.compile(optimizer="sgd", loss="mse")
    x = np.ones((64, 4), "float32")
    hist = gradtrace.fit(model, x, x[:, :1], batch_size=32, verbose=0, snapshot_dir=tmp_path / "s")
    path = hist.anomalies[0].snapshot
    with pytest.raises(gradtrace.SnapshotError) as err:
        gradtrace.replay(path)
    assert "safe_mode=False" in _one_line(err)
    r = gradtrace.replay(path, safe_mode=False)  # the user trusts it: then it runs
    assert r.anomalies[0].layer == "lam/faulty"


# -- capture and summary: one batch, every nested layer ------------------------------------

def test_capture_and_summary_reach_every_nested_layer():
    model = M.two_embedding()
    model.compile(optimizer="adam", loss="binary_crossentropy")
    x, y = M.two_embedding_data(n=8)
    before = [w.copy() for w in model.get_weights()]
    c = gradtrace.capture(model, x, y)
    assert list(c.outputs) == ["outer/inner/item_emb", "outer/inner/user_emb", "outer/inner/user_vec",
                               "outer/inner/item_vec", "outer/inner/concat", "outer/inner", "outer/hidden",
                               "outer/out"]
    assert c.outputs["outer/inner/user_emb"].shape == (8, 1, 8)
    emb = model.get_layer("inner").get_layer("user_emb").embeddings.numpy()
    np.testing.assert_allclose(c.outputs["outer/inner/user_emb"].numpy()[:, 0], emb[x[0][:, 0]], rtol=1e-6)
    assert c.gradients["outer/hidden"].shape == (8, 16)
    assert "outer/out" not in c.gradients  # sigmoid + BCE: Keras takes the loss from the logits
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    text = gradtrace.summary(model, x, print_fn=None)
    assert "outer/inner/user_emb" in text and "1,600" in text and "Embedding" in text
    assert not any(gradtrace.is_patched(l) for l in compat.flatten_layers(model))


def test_replay_weight_gradients_are_keyed_by_layer_path(tmp_path):
    """Two inner models with a layer of the same name: every trainable variable keeps its own gradient."""
    keras.utils.set_random_seed(0)

    def tower(name):
        inp = keras.Input((4,))
        return keras.Model(inp, layers.Dense(3, name="proj")(inp), name=name)

    inp = keras.Input((4,))
    h = layers.Concatenate(name="cat")([tower("tower_a")(inp), tower("tower_b")(inp)])
    out = layers.Dense(1, name="out")(M.NaNAtStep(1, name="faulty")(h))
    model = keras.Model(inp, out, name="outer")
    model.compile("sgd", "mse")
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    h = gradtrace.fit(model, x, x[:, :1], batch_size=32, verbose=0, shuffle=False, snapshot_dir=tmp_path / "s")
    r = gradtrace.replay(h.anomalies[0].snapshot)
    assert sorted(r.weight_gradients) == sorted(
        f"outer/{layer}/{w}" for layer in ("tower_a/proj", "tower_b/proj", "out") for w in ("kernel", "bias"))
    assert len(r.weight_gradients) == len(model.trainable_variables)


def test_watch_refuses_snapshot_with_several_steps_per_execution(tmp_path):
    """A callback cannot fall back to one step per execution as gradtrace.fit does: it says what to do."""
    model = dropout_model_with_fault(at=10**6)
    model.compile(optimizer="adam", loss="binary_crossentropy", steps_per_execution=2)
    x, y = M.two_embedding_data(n=64)
    with pytest.raises(ValueError, match="steps_per_execution=1 .the model has 2.*gradtrace.fit"):
        model.fit(x, y, batch_size=32, verbose=0, callbacks=[gradtrace.Watch(on_anomaly="snapshot",
                                                                              snapshot_dir=tmp_path)])
    assert not any(gradtrace.is_patched(layer) for layer in compat.flatten_layers(model))
    model.fit(x, y, batch_size=32, verbose=0)  # the model trains as before
