"""The process stays usable: after each way a gradtrace.fit can end, the same process trains as a fresh one.

Run in processes of their own (2 logical CPUs must be set before TensorFlow starts):

- ``python -m tests.process_scenarios fresh OUT.json``: what a fresh process gets, per context, from a
  plain ``model.fit`` of a new model (the reference), and the random streams after it;
- ``python -m tests.process_scenarios sequence OUT.json``: in ONE process, as a notebook or a sweep
  would, every event below in every context, each followed by
  (a) a plain ``model.fit`` of a new model, (b) a ``gradtrace.fit`` of a new model, both to compare
  with the fresh process, and (c) a ``gradtrace.fit`` that goes on training the same model, compared
  with a plain ``model.fit`` from the same state.

Events: a healthy fit, a halt (NaN batch), a raise (NaN batch), a snapshot, a KeyboardInterrupt and a
failing callback. Contexts: no strategy, ``mixed_float16``, and ``MirroredStrategy`` on 2 replicas where
the follow-ups run under the event's strategy object and under a new one. tests/test_process.py asserts.
"""

import json
import os
import random
import shutil
import sys
import tempfile
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

SEED = 7
EVENTS = ("healthy", "halt", "raise", "snapshot", "interrupt", "failing_callback")
CONTEXTS = ("none", "mixed_float16", "mirrored")


def _logical_cpus(n):
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)


def model(keras):
    inp = keras.Input((4,), name="x")
    h = keras.layers.Dense(8, activation="relu", name="hidden")(inp)
    h = keras.layers.BatchNormalization(name="bn")(h)
    out = keras.layers.Dense(1, name="out", dtype="float32")(h)
    m = keras.Model(inp, out, name="mlp")
    m.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return m


def data(nan_at=None):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5], [0.0]], "float32")).astype("float32")
    if nan_at is not None:
        x[16 * nan_at + 3, 1] = np.nan  # batch ``nan_at`` of 16
    return x, y


FIT = dict(batch_size=16, epochs=1, shuffle=False, verbose=0)


def weights(m):
    return [np.asarray(v.numpy(), "float64") for v in m.weights]


def max_diff(a, b):
    if len(a) != len(b):
        return float("inf")
    return max(float(np.max(np.abs(x - y))) if x.size else 0.0 for x, y in zip(a, b))


def settings(keras):
    """The global settings gradtrace must leave as it found them."""
    from gradtrace import _keras_compat as compat

    return {
        "op_callbacks": compat.op_callback_count(),  # tf.debugging check-numerics and dump-debug-info hooks
        "dtype_policy": keras.config.dtype_policy().name,
        "floatx": keras.config.floatx(),
        "functions_run_eagerly": tf.config.functions_run_eagerly(),
        "has_strategy": tf.distribute.has_strategy(),
        "strategy": type(tf.distribute.get_strategy()).__name__,
        "jit": bool(tf.config.optimizer.get_jit()),
        "traceback_filtering": keras.config.is_traceback_filtering_enabled(),
    }


def random_draws(keras):
    """The next number of every random stream a user might read after a fit."""
    return [float(np.random.rand()), random.random(), float(tf.random.uniform([])),
            float(keras.random.uniform(()))]


class Context:
    """Enters a context (policy or strategy) for one event or one follow-up."""

    def __init__(self, keras, name, strategy=None):
        self.keras, self.name, self.strategy = keras, name, strategy

    def new_strategy(self):
        return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

    def build(self, strategy=None):
        keras = self.keras
        keras.utils.set_random_seed(SEED)
        if self.name == "mirrored":
            with strategy.scope():
                return model(keras)
        return model(keras)


def plain_fit(keras, ctx, strategy):
    m = ctx.build(strategy)
    h = m.fit(*data(), **FIT)
    return m, h.history["loss"]


def event(keras, gradtrace, ctx, name, strategy, snapdir):
    """Run one event on a new model; return (model, outcome)."""
    m = ctx.build(strategy)
    out = {"error": None}

    class Stop(keras.callbacks.Callback):
        def __init__(self, exc):
            super().__init__()
            self.exc = exc

        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                raise self.exc

    class FireAt(gradtrace.Detector):
        """Fires once, on the loss row of the third step it checks: a deterministic finding on healthy data."""
        name = "fire_at_third_call"
        default_action = "snapshot"

        def check(self, view):
            n = len(view.table)
            calls = self.state(view, "calls")
            seen = calls.assign_add(tf.ones_like(calls))[0]
            hit = tf.logical_and(tf.equal(seen, 3.0), tf.range(n) == view.table.index("loss", "loss"))
            return hit, tf.cast(hit, tf.float32)

    kw = dict(FIT)
    try:
        if name == "healthy":
            h = gradtrace.fit(m, *data(), **kw)
        elif name == "halt":
            h = gradtrace.fit(m, *data(nan_at=2), **kw)
        elif name == "raise":
            h = gradtrace.fit(m, *data(nan_at=2), on_anomaly="raise", **kw)
        elif name == "snapshot":
            h = gradtrace.fit(m, *data(), detectors=["nan", FireAt()], snapshot_dir=snapdir, **kw)
        elif name == "interrupt":
            h = gradtrace.fit(m, *data(), callbacks=[Stop(KeyboardInterrupt())], **kw)
        else:
            h = gradtrace.fit(m, *data(), callbacks=[Stop(ValueError("a callback failed"))], **kw)
        out["anomalies"] = [str(a) for a in h.anomalies]
        out["snapshots"] = [a.snapshot for a in h.anomalies if a.snapshot]
    except BaseException as e:  # noqa: B036 - the events raise KeyboardInterrupt on purpose
        out["error"] = type(e).__name__
        out["anomalies"] = [str(a) for a in getattr(e, "anomalies", [])]
    out["iterations"] = int(m.optimizer.iterations.numpy())
    out["finite"] = all(np.isfinite(w).all() for w in weights(m))
    return m, out


def state_of(m):
    return [v.numpy() for v in m.variables], [v.numpy() for v in m.optimizer.variables]


def restore(m, state):
    for v, val in zip(m.variables, state[0]):
        v.assign(val)
    for v, val in zip(m.optimizer.variables, state[1]):
        v.assign(val)


def follow_ups(keras, gradtrace, ctx, m, strategy_of, index):
    """(a), (b), (c) after the ``index``-th event; ``strategy_of(kind)`` gives the strategy for a follow-up.

    Under a strategy, (a) and (b) run one under the event's strategy object and one under a new
    one, swapped from one event to the next, so each pairing is covered by half of the events."""
    res = {}
    kinds = ("-", "-")
    if ctx.name == "mirrored":
        kinds = ("same", "new") if index % 2 == 0 else ("new", "same")
    s = strategy_of(kinds[0])
    a, loss_a = plain_fit(keras, ctx, s)
    res["plain_new_model"] = {"weights": [w.tolist() for w in weights(a)], "loss": loss_a, "strategy": kinds[0]}
    b = ctx.build(strategy_of(kinds[1]))
    hb = gradtrace.fit(b, *data(), **FIT)
    res["gradtrace_new_model"] = {"weights": [w.tolist() for w in weights(b)], "loss": hb.history["loss"],
                                  "anomalies": [str(x) for x in hb.anomalies], "strategy": kinds[1]}
    # (c) the same model trains on, exactly as model.fit would from the same state
    before = state_of(m)
    hc = gradtrace.fit(m, *data(), **FIT)
    w_gradtrace = weights(m)
    restore(m, before)
    hk = m.fit(*data(), **FIT)
    res["same_model"] = {"diff": max_diff(w_gradtrace, weights(m)), "loss": [hc.history["loss"], hk.history["loss"]],
                         "anomalies": [str(x) for x in hc.anomalies]}
    return res


def _enter(keras, name):
    if name == "mixed_float16":
        keras.config.set_dtype_policy("mixed_float16")


def _leave(keras, name):
    keras.config.set_dtype_policy("float32")


def fresh(out, out_path):
    _logical_cpus(2)
    import keras

    for name in CONTEXTS:
        _enter(keras, name)
        ctx = Context(keras, name)
        s = ctx.new_strategy() if name == "mirrored" else None
        m, loss = plain_fit(keras, ctx, s)
        out[name] = {"weights": [w.tolist() for w in weights(m)], "loss": loss, "draws": random_draws(keras)}
        _leave(keras, name)


def sequence(out, out_path, contexts=CONTEXTS):
    _logical_cpus(2)
    import keras

    import gradtrace

    out["settings_before"] = settings(keras)
    snapdir = tempfile.mkdtemp(prefix="gradtrace_process_")
    for name in contexts:
        _enter(keras, name)
        ctx = Context(keras, name)
        expected = settings(keras)
        for index, ev in enumerate(EVENTS):
            key = f"{name}/{ev}"
            try:
                s = ctx.new_strategy() if name == "mirrored" else None
                m, outcome = event(keras, gradtrace, ctx, ev, s, snapdir)
                outcome["settings"] = settings(keras)
                outcome["settings_expected"] = expected
                if ev == "healthy":
                    outcome["draws"] = random_draws(keras)
                outcome.update(follow_ups(keras, gradtrace, ctx, m,
                                          lambda kind, s=s: s if kind == "same" else ctx.new_strategy(), index))
            except BaseException:  # noqa: B036 - recorded for the test to show
                outcome = {"crash": traceback.format_exc()[-3000:]}
            out[key] = outcome
        _leave(keras, name)
    out["settings_after"] = settings(keras)
    shutil.rmtree(snapdir, ignore_errors=True)


if __name__ == "__main__":
    which, path = sys.argv[1], sys.argv[2]
    result = {}
    try:
        if which == "fresh":
            fresh(result, path)
        else:  # sequence [CONTEXT ...]
            sequence(result, path, tuple(sys.argv[3:]) or CONTEXTS)
    except BaseException:  # noqa: B036 - reported to the test
        result["crash"] = traceback.format_exc()[-4000:]
    with open(path, "w") as f:
        json.dump(result, f)
