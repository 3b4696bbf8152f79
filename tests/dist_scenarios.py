"""gradtrace under tf.distribute, run in a process of its own (logical devices must be set
before TensorFlow starts). ``python -m tests.dist_scenarios mirrored OUT.json`` runs the
MirroredStrategy scenarios on 2 logical CPUs; ``python -m tests.dist_scenarios worker
OUT.json`` is one MultiWorkerMirroredStrategy worker (``TF_CONFIG`` set by the test).
Each scenario records what it saw; tests/test_distribute.py asserts on it."""

import json
import os
import sys
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def _logical_cpus(n):
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)


def _keras():
    import keras

    return keras


def log_model(keras):
    """features -> log (a real op that gives -inf on a 0) -> relu Dense -> Dense."""

    class SafeLog(keras.layers.Layer):
        def call(self, x):
            return keras.ops.log(x)

    inp = keras.Input((6,), name="features")
    h = SafeLog(name="log")(inp)
    h = keras.layers.Dense(12, activation="relu", name="hidden")(h)
    out = keras.layers.Dense(1, name="out")(h)
    return keras.Model(inp, out, name="logmodel")


def log_data(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.5, 2.0, (n, 6)).astype("float32")
    y = rng.normal(size=(n, 1)).astype("float32")
    return x, y


def _weights(model):
    return [np.asarray(v.numpy()) for v in model.weights]


def _max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) if x.size else 0.0 for x, y in zip(a, b))


def mirrored(out, out_path):
    _logical_cpus(2)
    keras = _keras()
    import gradtrace
    from tests import models as M

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    res = {"replicas": strategy.num_replicas_in_sync}

    # 1. parity with model.fit under the same strategy (two Embeddings in an inner model, sparse gradients)
    x, y = M.two_embedding_data(n=256)
    runs = {}
    for who in ("keras", "gradtrace"):
        keras.utils.set_random_seed(1)
        with strategy.scope():
            m = M.two_embedding()
            m.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy", metrics=["accuracy"])
        kw = dict(batch_size=32, epochs=2, shuffle=False, verbose=0)
        tb = os.path.join(os.path.dirname(os.path.abspath(out_path)), "tb")
        h = m.fit(x, y, **kw) if who == "keras" else gradtrace.fit(m, x, y, tensorboard_dir=tb, tensorboard_every=5, **kw)
        runs[who] = (h.history, _weights(m), int(m.optimizer.iterations.numpy()), getattr(h, "anomalies", []))
    res["parity_weight_diff"] = _max_diff(runs["keras"][1], runs["gradtrace"][1])
    res["parity_loss"] = [runs["keras"][0]["loss"], runs["gradtrace"][0]["loss"]]
    res["parity_iterations"] = [runs["keras"][2], runs["gradtrace"][2]]
    res["parity_anomalies"] = [str(a) for a in runs["gradtrace"][3]]
    from tests.test_tensorboard import read_events

    ev = read_events(tb)
    res["tensorboard"] = {
        "steps": sorted(ev["outer/hidden/output/mean"]),
        "hist_count": float(ev["outer/hidden/output"][0][1][:, 2].sum()),  # the global batch: 32 x 16 units
    }

    # 2. combined statistics equal those of the whole batch on one device
    keras.utils.set_random_seed(2)
    with strategy.scope():
        m = log_model(keras)
        m.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    x, y = log_data(n=64)
    class NeedsAll(gradtrace.Detector):  # never fires; makes the step compute every statistic
        name = "needs_all"
        needs = ("mean", "std", "min", "max", "norm", "zero_frac", "dead_frac", "nan", "inf")

        def check(self, view):
            return view["size"] < 0, view["size"]

    h = gradtrace.fit(m, x, y, batch_size=64, epochs=1, shuffle=False, verbose=0, detectors=[NeedsAll()])
    run = h.gradtrace
    table = run.engine.tables[True]
    got = run.last_stats.numpy()
    from gradtrace.stats import COL

    xs = tf.constant(x)
    with tf.GradientTape(persistent=True) as tape:
        a = tf.math.log(xs)
        tape.watch(a)
        hid = m.get_layer("hidden")(a)
        tape.watch(hid)
        o = m.get_layer("out")(hid)
        loss = tf.reduce_mean(tf.square(o - y))
    expect = {"hidden": hid.numpy(), "out": o.numpy()}
    grads = {"hidden": tape.gradient(loss, hid).numpy(), "out": tape.gradient(loss, o).numpy()}
    wg = tape.gradient(loss, m.get_layer("hidden").kernel)
    checks = {}
    for name, t in expect.items():
        row = got[table.index("output", f"logmodel/{name}")]
        checks[f"output/{name}"] = {
            "mean": [float(row[COL["mean"]]), float(t.mean())],
            "std": [float(row[COL["std"]]), float(t.std())],
            "min": [float(row[COL["min"]]), float(t.min())],
            "max": [float(row[COL["max"]]), float(t.max())],
            "norm": [float(row[COL["norm"]]), float(np.sqrt((t.astype("float64") ** 2).sum()))],
            "size": [float(row[COL["size"]]), float(t.size)],
        }
        g = grads[name]
        grow = got[table.index("gradient", f"logmodel/{name}")]
        checks[f"gradient/{name}"] = {"norm": [float(grow[COL["norm"]]), float(np.sqrt((g.astype("float64") ** 2).sum()))]}
    hrow = got[table.index("output", "logmodel/hidden")]
    dead = float(np.mean(np.all(expect["hidden"] == 0, axis=0)))
    checks["output/hidden"]["dead_frac"] = [float(hrow[COL["dead_frac"]]), dead]
    wrow = [r for r in table.rows if r.kind == "weight_gradient" and r.path == "logmodel/hidden" and "kernel" in r.name][0]
    checks["weight_gradient/hidden/kernel"] = {"sum": [float(got[wrow.index, COL["mean"]] * got[wrow.index, COL["size"]]),
                                                       float(np.sum(wg.numpy()))]}
    res["stats_checks"] = checks

    # 3. a fault on one replica's shard halts every replica at its step, names the layer and the replica
    keras.utils.set_random_seed(3)
    with strategy.scope():
        m = log_model(keras)
        m.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    x, y = log_data(n=256)
    x[32 * 3 + 20, 2] = 0.0  # step 3, second half of the batch: replica 1
    seen = {}

    class Keep(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen["weights"] = _weights(self.model)

    h = gradtrace.fit(m, x, y, batch_size=32, epochs=1, shuffle=False, verbose=0, callbacks=[Keep()])
    res["fault"] = {
        "anomalies": [dict(detector=a.detector, layer=a.layer, step=a.step, replicas=list(a.replicas), text=str(a),
                           min=a.stats.get("min"), inf=a.stats.get("inf")) for a in h.anomalies],
        "iterations": int(m.optimizer.iterations.numpy()),
        "weights_moved_after_halt": _max_diff(seen["weights"], _weights(m)),
    }

    # 4. a model built outside the strategy's scope, trained inside it
    keras.utils.set_random_seed(4)
    outside = log_model(keras)
    outside.compile(optimizer="adam", loss="mse")
    try:
        with strategy.scope():
            gradtrace.fit(outside, x, y, batch_size=32, epochs=1, verbose=0)
        res["outside_scope"] = {"error": None}
    except Exception as e:  # the test asserts on the type and message
        res["outside_scope"] = {"error": type(e).__name__, "message": str(e)[:2000]}

    # 5. a custom train_step with two optimizers (the Keras DCGAN example, tests/custom_models.py):
    # healthy, it trains as model.fit does; with a NaN in the generator, both updates of that step are held
    from tests import custom_models as C

    gx = C.gan_data()
    gans = {}
    with strategy.scope():
        for who, fault in (("keras", None), ("gradtrace", None), ("faulty", 3)):
            g = C.gan(fault_at=fault)
            # Keras' own fit of this model under a strategy needs the optimizers built beforehand
            g.d_optimizer.build(g.discriminator.trainable_variables)
            g.g_optimizer.build(g.generator.trainable_variables)
            gans[who] = g
    hk = gans["keras"].fit(gx, batch_size=16, epochs=1, shuffle=False, verbose=0)
    hg = gradtrace.fit(gans["gradtrace"], gx, batch_size=16, epochs=1, shuffle=False, verbose=0)
    hf = gradtrace.fit(gans["faulty"], gx, batch_size=16, epochs=1, shuffle=False, verbose=0)
    res["gan"] = {
        "weight_diff": _max_diff(_weights(gans["keras"]), _weights(gans["gradtrace"])),
        "loss": [hk.history["g_loss"], hg.history["g_loss"]],
        "healthy_anomalies": [str(a) for a in hg.anomalies],
        "faulty": [[a.detector, a.step, a.layer, a.optimizer] for a in hf.anomalies],
        "iterations": [int(gans["faulty"].d_optimizer.iterations.numpy()),
                       int(gans["faulty"].g_optimizer.iterations.numpy())],
    }

    # 6. halt, snapshot and replay through gradtrace.fit and Watch (tests/replay_matrix.py)
    from tests import replay_matrix

    directory = os.path.join(os.path.dirname(os.path.abspath(out_path)), "matrix")
    res["matrix"] = {f"{entry}-False": replay_matrix.run(entry, False, directory, strategy) for entry in ("fit", "Watch")}
    out.update(res)


def _worker_model(keras, strategy):
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    keras.utils.set_random_seed(5)
    with strategy.scope():
        m = log_model(keras)
        m.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return task, m


def _worker_dataset(x, y):
    """Batches of 16 (8 rows per worker per step); each worker reads its own data, unsharded."""
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    opts = tf.data.Options()
    opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(opts)


def worker(out, out_path):
    """One MultiWorkerMirroredStrategy worker; TF_CONFIG names it. Worker 1's shard holds a 0 -> log -> -inf."""
    keras = _keras()
    import gradtrace

    keras.config.disable_traceback_filtering()
    task, m = _worker_model(keras, tf.distribute.MultiWorkerMirroredStrategy())
    x, y = log_data(n=16 * 12, seed=task)
    if task == 1:
        x[8 * 4 + 3, 0] = 0.0  # each worker takes 8 rows per step (the global batch of 16, split): its step 4
    ds = _worker_dataset(x, y)
    tb = os.path.join(os.path.dirname(os.path.abspath(out_path)), "tb")  # the same directory for both workers
    h = gradtrace.fit(m, ds, epochs=1, verbose=0, tensorboard_dir=tb, tensorboard_every=2)
    out.update({
        "task": task,
        "anomalies": [dict(detector=a.detector, layer=a.layer, step=a.step, replicas=list(a.replicas))
                      for a in h.anomalies],
        "iterations": int(m.optimizer.iterations.numpy()),
        "halted": bool(h.gradtrace.halted),
        "weights_sum": float(sum(np.sum(w) for w in _weights(m))),
    })


def worker_dies(out, out_path):
    """Two MultiWorkerMirroredStrategy workers; worker 1 dies (os._exit) at its step 3.
    Worker 0 records what gradtrace.fit raised, how long it took, and whether the model is clean."""
    import time

    keras = _keras()
    import gradtrace

    task, m = _worker_model(keras, tf.distribute.MultiWorkerMirroredStrategy())
    ds = _worker_dataset(*log_data(n=16 * 40, seed=task))

    class Die(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if task == 1 and batch == 3:
                os._exit(17)

    t0 = time.monotonic()
    try:
        gradtrace.fit(m, ds, epochs=1, verbose=0, callbacks=[Die()])
        out["error"] = None
    except Exception as e:
        out["error"] = type(e).__name__
        out["message"] = (str(e) + "\n".join(getattr(e, "__notes__", [])))[-3000:]
    out["seconds"] = time.monotonic() - t0
    out["iterations"] = int(m.optimizer.iterations.numpy())
    from gradtrace import _keras_compat as compat

    out["clean"] = not any(gradtrace.is_patched(l) for l in compat.flatten_layers(m))


if __name__ == "__main__":
    which, path = sys.argv[1], sys.argv[2]
    result = {}
    try:
        {"mirrored": mirrored, "worker": worker, "worker_dies": worker_dies}[which](result, path)
    except BaseException:
        result["crash"] = traceback.format_exc()
    with open(path, "w") as f:
        json.dump(result, f)
    sys.stdout.flush()
    os._exit(0)  # collective ops can leave threads behind; the test reads the JSON
