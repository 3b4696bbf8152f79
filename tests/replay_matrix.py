"""One fault, three ways in, with and without XLA: halt, snapshot and replay everywhere.

``run(entry, jit, directory, strategy=None)`` trains the same small model (features -> a log -> Dense ->
Dense, a 0 in one example of batch 2 of every epoch: log(0) = -inf) through ``gradtrace.fit``,
``gradtrace.Watch`` or ``gradtrace.loop`` (your own loop), compiled with ``jit_compile`` False or True,
and returns what it saw:

- ``snapshot``: ``on_anomaly="snapshot"`` for two epochs: the fault's two findings, each with its snapshot
  written, the weights and optimizer slots finite, the update count (the two bad updates skipped);
- ``replay``: the first snapshot replayed (in your loop: with your step): its finding, the op
  that made the -inf, the largest difference between the recorded and replayed statistics;
- ``halt``: the default action: the step it stopped at, the update count, the weights finite, its snapshot.

``python -m tests.replay_matrix all OUT.json`` runs every cell without a strategy, in a process of its own
beside the suite; tests/dist_scenarios.py runs the ``fit`` and ``Watch`` cells under MirroredStrategy;
tests/test_replay_matrix.py asserts on both.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import tensorflow as tf

ENTRIES = ("fit", "Watch", "watch")
N, BATCH = 128, 32  # four steps an epoch; the fault sits in batch 2


def build_model(keras, jit, strategy):
    class Log(keras.layers.Layer):
        def call(self, x):
            return keras.ops.log(x)

    with strategy.scope():
        keras.utils.set_random_seed(5)
        inp = keras.Input((6,), name="features")
        h = keras.layers.Dense(12, activation="relu", name="hidden")(Log(name="log")(inp))
        model = keras.Model(inp, keras.layers.Dense(1, name="out")(h), name="logmodel")
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", jit_compile=jit)
    return model


def data():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 2.0, (N, 6)).astype("float32")
    x[2 * BATCH + 5, 1] = 0.0
    return x, rng.normal(size=(N, 1)).astype("float32")


def _train(entry, model, x, y, epochs, strategy, **kw):
    """Train through one entry point; returns ``(anomalies, halted, step function or None)``."""
    import gradtrace

    if entry == "fit":
        h = gradtrace.fit(model, x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0, **kw)
        return h.anomalies, h.gradtrace.halted, None
    if entry == "Watch":
        w = gradtrace.Watch(**kw)
        model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0, callbacks=[w])
        return w.anomalies, w.run.halted, None
    optimizer = model.optimizer
    dataset = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH))
    with gradtrace.loop(model, optimizer, verbose=0, **kw) as w:
        def replica_step(xb, yb):
            with tf.GradientTape() as tape:
                per_example = keras.losses.mean_squared_error(yb, model(xb, training=True))
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=BATCH)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        @w.step
        @tf.function(jit_compile=bool(model.jit_compile))
        def train_step(xb, yb):
            return strategy.reduce("SUM", strategy.run(replica_step, args=(xb, yb)), axis=None)

        for _ in range(epochs):
            for xb, yb in dataset:
                train_step(xb, yb)
                if w.halted:
                    break
            if w.halted:
                break
    return w.anomalies, w.halted, train_step


def run(entry, jit, directory, strategy=None):
    import gradtrace

    strategy = strategy or tf.distribute.get_strategy()
    x, y = data()
    out = {}
    model = build_model(keras, jit, strategy)
    found, _, step = _train(entry, model, x, y, 2, strategy, on_anomaly="snapshot",
                            snapshot_dir=os.path.join(directory, f"{entry}-{jit}-snap"))
    out["snapshot"] = {
        "found": [(a.detector, a.layer, a.step, a.epoch) for a in found],
        "written": [bool(a.snapshot) and a.snapshot_error is None for a in found],
        "finite": bool(all(np.isfinite(v.numpy()).all() for v in model.weights + model.optimizer.variables)),
        "iterations": int(model.optimizer.iterations.numpy()),
    }
    if found and found[0].snapshot:
        kw = {} if step is None else dict(model=model, step=step, optimizer=model.optimizer)
        r = gradtrace.replay(found[0].snapshot, **kw)
        out["replay"] = {"found": [(a.detector, a.layer) for a in r.anomalies],
                         "origin": None if r.origin is None else [r.origin["layer"], r.origin["op_type"]],
                         "difference": r.max_difference()}
    model = build_model(keras, jit, strategy)
    found, halted, _ = _train(entry, model, x, y, 1, strategy, snapshot_dir=os.path.join(directory, f"{entry}-{jit}"))
    out["halt"] = {"found": [(a.detector, a.layer, a.step) for a in found], "halted": bool(halted),
                   "iterations": int(model.optimizer.iterations.numpy()),
                   "finite": bool(all(np.isfinite(v.numpy()).all() for v in model.weights)),
                   "snapshot": bool(found and found[0].snapshot)}
    return out


if __name__ == "__main__":
    import json
    import sys
    import tempfile
    import traceback

    result = {}
    try:
        directory = tempfile.mkdtemp(prefix="gradtrace_matrix_")
        for entry in ENTRIES:
            for jit in (False, True):
                result[f"{entry}-{jit}"] = run(entry, jit, directory)
    except BaseException:
        result["crash"] = traceback.format_exc()
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
