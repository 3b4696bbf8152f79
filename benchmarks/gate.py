"""What an all-or-nothing gate on the optimizer update costs by itself, without gradtrace.

    python benchmarks/gate.py                          # deep_mlp, residual_ln_40, two_embedding, cnn_bn (~3 min)
    python benchmarks/gate.py --models deep_mlp --steps 100 --rounds 8

gradtrace's guarantee (no non-finite update reaches the weights, and a held
step leaves them exactly as they were) needs the update of *every* weight to
wait until *every* weight gradient is known to be finite. ``model.fit`` has no
such wait: each weight's optimizer update can run as soon as its own gradient
exists, beside the rest of the backward pass, and its gradient is freed then.
This script measures that wait alone, in one hand-written compiled step per
variant, on the benchmark models of ``overhead.py`` (same seed, same data):

- ``apply``: ``optimizer.apply(grads)`` (what ``model.fit``'s step does);
- ``apply_again``: the same a second time (the A/A noise);
- ``wait_all``: the update waits for every gradient (a control dependency, no check);
- ``gate``: one sum per weight gradient, and the update in a ``tf.cond`` on their finiteness (the floor of
  gradtrace's guarded step);
- ``gate_loss``: the ``tf.cond`` on the loss alone (known before the backward pass: nothing waits);
- ``keras_lossscale``: Keras' own skip-on-non-finite, ``LossScaleOptimizer`` (its ``apply`` checks every
  gradient and updates in a ``tf.cond``; the loss is scaled as mixed precision does).

Steps are timed in interleaved rounds (wall and CPU time, as ratios to ``apply`` in the same round:
min/median/max). Memory: with TensorFlow's BFC allocator on the CPU, the peak bytes allocated during a
round's ``--steps`` steps above the resting state before them, the median over rounds, per variant (which
ops run side by side moves the peak from round to round).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

VARIANTS = ["apply", "apply_again", "wait_all", "gate", "gate_loss", "keras_lossscale"]


def make_step(variant, model, loss_fn):
    import keras
    import tensorflow as tf

    opt = model.optimizer
    if variant == "keras_lossscale":
        opt = keras.optimizers.LossScaleOptimizer(opt)
    opt.build(model.trainable_variables)
    tvars = model.trainable_variables

    def grads_of(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(loss_fn(y, model(x, training=True)))
            scaled = opt.scale_loss(loss) if variant == "keras_lossscale" else loss
        return loss, tape.gradient(scaled, tvars)

    def apply(grads):
        opt.apply(grads, tvars)
        return tf.constant(True)

    @tf.function
    def step(iterator):
        x, y = next(iterator)
        loss, grads = grads_of(x, y)
        if variant == "wait_all":
            with tf.control_dependencies(grads):
                grads = [tf.identity(g) for g in grads]
            return apply(grads)
        if variant == "gate":
            sums = tf.stack([tf.reduce_sum(g) for g in grads] + [loss])
            return tf.cond(tf.reduce_all(tf.math.is_finite(sums)), lambda: apply(grads), lambda: tf.constant(False))
        if variant == "gate_loss":
            return tf.cond(tf.math.is_finite(loss), lambda: apply(grads), lambda: tf.constant(False))
        return apply(grads)

    return step


def measure(model_name, steps, rounds):
    import keras
    import tensorflow as tf

    import overhead as O

    steps_fns, iters = {}, {}
    for v in VARIANTS:
        model, x, y, batch = O.build(model_name)
        data = tf.data.Dataset.from_tensor_slices((tuple(x) if isinstance(x, list) else x, y))
        iters[v] = iter(data.batch(batch, drop_remainder=True).repeat())
        steps_fns[v] = make_step(v, model, keras.losses.get(model.loss))
        for _ in range(3):  # trace, build the optimizer's slots, warm up
            steps_fns[v](iters[v]).numpy()
    wall = {v: [] for v in VARIANTS}
    cpu = {v: [] for v in VARIANTS}
    peak = {v: [] for v in VARIANTS}
    for r in range(rounds):
        gc.collect()
        for v in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]:
            fn, it = steps_fns[v], iters[v]
            rest = memory("current")
            if rest is not None:
                tf.config.experimental.reset_memory_stats("CPU:0")
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                fn(it).numpy()
            wall[v].append((time.perf_counter() - t0) / steps)
            cpu[v].append((time.process_time() - c0) / steps)
            if rest is not None:
                peak[v].append((memory("peak") - rest) / 2 ** 20)
    return wall, cpu, {v: float(np.median(p)) if p else float("nan") for v, p in peak.items()}


def memory(which):
    """TensorFlow's count of allocated CPU bytes; None where TensorFlow was imported before this module
    could turn its BFC allocator on (then it raises, or counts nothing: zeros)."""
    import tensorflow as tf

    try:
        info = tf.config.experimental.get_memory_info("CPU:0")
    except ValueError:
        return None
    return info[which] if info["current"] > 0 else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["deep_mlp", "residual_ln_40", "two_embedding", "cnn_bn"])
    p.add_argument("--steps", type=int, default=60, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args(argv)
    # before TensorFlow is imported (here, not at import: a process that imports this module keeps its allocator)
    if "tensorflow" not in sys.modules:
        os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"  # get_memory_info("CPU:0") then counts every tensor
    from tabulate import tabulate

    t0 = time.time()
    rows = []
    for m in args.models:
        wall, cpu, peak = measure(m, args.steps, args.rounds)

        def spread(d, v):
            r = np.array(d[v]) / np.array(d["apply"])
            return f"{r.min():.2f}/{np.median(r):.2f}/{r.max():.2f}"

        for v in VARIANTS:
            rows.append([m, v, f"{1e3 * np.median(wall[v]):.2f}", spread(wall, v), spread(cpu, v),
                         f"{peak[v]:.2f}", f"{peak[v] / peak['apply']:.2f}" if peak["apply"] > 0 else "-"])
        print(f"done {m} ({time.time() - t0:.0f}s)", file=sys.stderr)
    print(tabulate(rows, headers=["model", "variant", "step ms", "wall ratio min/med/max",
                                  "CPU ratio min/med/max", "peak MB above rest", "peak ratio"]))
    print(f"\n{args.steps} steps x {args.rounds} interleaved rounds; total {time.time() - t0:.0f}s")
    return rows


if __name__ == "__main__":
    main()
