"""TensorBoard output read back from the event files: tags follow the layer paths, values are the
step's statistics, histograms count every value, anomalies are text events at their step."""

import collections
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradtrace
from gradtrace import _keras_compat as compat
from tests import models as M


def read_events(logdir):
    """{tag: {step: (plugin, value)}} from every event file under ``logdir``."""
    out = collections.defaultdict(dict)
    files = [os.path.join(d, f) for d, _, fs in os.walk(logdir) for f in fs if "tfevents" in f]
    assert files, f"no event file under {logdir}"
    for path in files:
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                out[v.tag][event.step] = (v.metadata.plugin_data.plugin_name, tf.make_ndarray(v.tensor))
    return out


def _compiled():
    model = M.two_embedding()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    return model


def test_scalars_and_histograms_follow_the_layer_paths(tmp_path):
    model = _compiled()
    x, y = M.two_embedding_data(n=256)
    w0 = [w.copy() for w in model.get_weights()]
    h = gradtrace.fit(model, x, y, batch_size=32, epochs=1, shuffle=False, verbose=0,
                      tensorboard_dir=tmp_path, tensorboard_every=3)
    assert h.anomalies == []
    ev = read_events(tmp_path)
    for tag in ("outer/inner/user_emb/output/mean", "outer/inner/item_emb/output/std",
                "outer/hidden/output/dead_frac", "outer/hidden/gradient/norm",
                "outer/hidden/weight_gradient/kernel/norm", "outer/hidden/weight_gradient/kernel/update_ratio",
                "outer/inner/user_emb/weight_gradient/embeddings/norm", "outer/inner/user_emb/ids/max",
                "loss/value"):
        assert tag in ev, f"{tag} missing; tags: {sorted(ev)[:40]}"
        assert sorted(ev[tag]) == [0, 3, 6], tag  # 8 steps, one summary every 3
        assert all(p == "scalars" for p, _ in ev[tag].values()), tag
    for tag in ("outer/hidden/output", "outer/inner/user_emb/gradient", "outer/out/output"):
        assert tag in ev and all(p == "histograms" for p, _ in ev[tag].values()), tag

    # step 0 saw the initial weights and the first 32 examples: recompute the hidden layer there
    keras.utils.set_random_seed(0)
    ref = M.two_embedding(name="ref")
    ref.set_weights(w0)
    hidden = keras.Model(ref.inputs, ref.get_layer("hidden").output)
    want = hidden([x[0][:32], x[1][:32]]).numpy()
    got = {c: float(ev[f"outer/hidden/output/{c}"][0][1]) for c in ("mean", "std", "max", "dead_frac")}
    assert got["mean"] == pytest.approx(want.mean(), rel=1e-5)
    assert got["std"] == pytest.approx(want.std(), rel=1e-4)
    assert got["max"] == pytest.approx(want.max(), rel=1e-6)
    assert got["dead_frac"] == pytest.approx(np.mean(np.all(want == 0, axis=0)))

    buckets = ev["outer/hidden/output"][0][1]  # [bins, 3]: left edge, right edge, count
    assert buckets.shape == (30, 3)
    assert buckets[:, 2].sum() == want.size  # every value counted once
    assert buckets[0, 0] == pytest.approx(want.min(), abs=1e-6) and buckets[-1, 1] == pytest.approx(want.max(), rel=1e-6)
    want_counts, _ = np.histogram(want, bins=buckets[:, 0].tolist() + [buckets[-1, 1]])
    assert np.abs(buckets[:, 2] - want_counts).sum() <= 2  # bin edges agree up to float rounding


def test_anomalies_are_text_events_at_their_step(tmp_path):
    model = M.two_embedding_with_fault(at=5)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    x, y = M.two_embedding_data(n=256)
    h = gradtrace.fit(model, x, y, batch_size=32, epochs=1, verbose=0, tensorboard_dir=tmp_path,
                      tensorboard_every=4)
    assert [a.step for a in h.anomalies] == [5]
    ev = read_events(tmp_path)
    plugin, text = ev["gradtrace/anomalies"][5]
    assert plugin == "text"
    text = text.item().decode() if text.shape == () else text.flatten()[0].decode()
    assert "nan" in text and "outer/inner/faulty" in text
    assert sorted(ev["loss/value"]) == [0, 4]  # halted at step 5: the files hold everything up to it


def test_unwritable_tensorboard_dir_is_refused_before_training(tmp_path):
    model = _compiled()
    x, y = M.two_embedding_data(n=64)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    for bad in (blocker, blocker / "logs"):
        with pytest.raises(ValueError, match="tensorboard_dir=.*(not a directory|cannot be written)"):
            gradtrace.fit(model, x, y, batch_size=32, verbose=0, tensorboard_dir=bad)
    with pytest.raises(ValueError, match="tensorboard_every=0"):
        gradtrace.fit(model, x, y, batch_size=32, verbose=0, tensorboard_dir=tmp_path / "ok", tensorboard_every=0)
    assert int(model.optimizer.iterations) == 0
    assert not any(gradtrace.is_patched(l) for l in compat.flatten_layers(model))


def test_your_own_loop_writes_the_same_summaries(tmp_path):
    """gradtrace.loop(..., tensorboard_dir=): per-layer summaries every tensorboard_every steps, findings as text."""
    import tensorflow as tf

    from tests import replay_matrix as RM

    x, y = RM.data()  # a 0 under a log in batch 2: one finding
    model = RM.build_model(keras, False, tf.distribute.get_strategy())
    opt = model.optimizer
    with gradtrace.loop(model, opt, tensorboard_dir=tmp_path, tensorboard_every=2, on_anomaly="warn",
                         verbose=0) as w:
        @w.step
        @tf.function
        def step(xb, yb):
            with tf.GradientTape() as tape:
                loss = keras.ops.mean(keras.losses.mean_squared_error(yb, model(xb, training=True)))
            opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
            return loss

        for i in range(0, 128, 32):
            step(x[i:i + 32], y[i:i + 32])
    ev = read_events(tmp_path)
    assert sorted(ev["logmodel/hidden/output/mean"]) == [0, 2]
    assert "logmodel/hidden/gradient/norm" in ev and "gradtrace/anomalies" in ev
