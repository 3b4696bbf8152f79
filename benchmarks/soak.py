"""Soak: a long gradtrace.fit with every detector on, watching memory and step time for creep.

    python benchmarks/soak.py                  # 50,000 steps (about 2 minutes on 2 CPU cores)
    python benchmarks/soak.py --steps 3000     # a quick check
    python benchmarks/soak.py --smoke          # a few hundred steps, small windows

A small model (an Embedding and four Dense layers, batch 32) trains with every
built-in detector (the six defaults plus ``saturation`` and ``loss_plateau``),
``trace_every=1``. A callback times every step and reads the process RSS
(``VmRSS`` of ``/proc/self/status``) at the end of every window of
``--window`` steps. The table gives, per window, the median step time and the
RSS. The verdict compares the state after warm-up (``--warmup`` steps, by
default a tenth of the run, at least one window) with the rest of the run:

- RSS growth: the highest RSS after warm-up against the RSS at the end of the
  first window after warm-up, in percent;
- step-time creep: the median step of the last window over the median step of
  the first window after warm-up.

It exits 1 when RSS grew by 5% or more or the creep is 1.2 or more. The
shorter version of this check runs in the tests (``pytest -m soak``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

MAX_RSS_GROWTH = 0.05
MAX_CREEP = 1.2
STEPS_PER_EPOCH = 500
BATCH = 32
VOCAB = 500


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status (the soak benchmark needs Linux)")


def soak_model(vocab=VOCAB):
    """A small Embedding + ReLU model (he_normal, so no ReLU is dead at the start)."""
    import keras
    from keras import layers

    ids = keras.Input((4,), dtype="int32", name="ids")
    h = layers.Flatten(name="flat")(layers.Embedding(vocab, 8, name="emb")(ids))
    for k in range(3):
        h = layers.Dense(32, activation="relu", kernel_initializer="he_normal", name=f"dense_{k}")(h)
    model = keras.Model(ids, layers.Dense(1, activation="sigmoid", name="out")(h), name="soak")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    return model


def soak_data(n, vocab=VOCAB, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, vocab, (n, 4)).astype("int32")
    y = ((x.sum(axis=1, keepdims=True) % 3) == 0).astype("float32")
    return x, y


def build():
    import keras

    keras.utils.set_random_seed(0)
    return (soak_model(), *soak_data(STEPS_PER_EPOCH * BATCH))


def make_recorder(total, window):
    import keras

    class Recorder(keras.callbacks.Callback):
        """Times every step, reads RSS at the end of every window, stops after ``total`` steps."""

        def __init__(self):
            super().__init__()
            self.step = 0
            self.chunk: list[float] = []  # step times of the current window only (the script must not grow)
            self.windows: list[dict] = []
            self._t = None

        def on_train_batch_begin(self, batch, logs=None):
            self._t = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.chunk.append(time.perf_counter() - self._t)
            self.step += 1
            if self.step % window == 0 or self.step == total:
                self.windows.append({
                    "window": len(self.windows), "last_step": self.step, "steps": len(self.chunk),
                    "median_ms": 1e3 * float(np.median(self.chunk)), "rss_mib": rss_mib(),
                })
                self.chunk = []
            if self.step >= total:
                self.model.stop_training = True

    return Recorder()


def verdict(windows, warmup_steps):
    after = [w for w in windows if w["last_step"] > warmup_steps]
    if len(after) < 2:
        raise SystemExit(f"only {len(after)} window(s) after the warm-up of {warmup_steps} steps: "
                         "run more steps or use a smaller --window / --warmup")
    base = after[0]
    growth = (max(w["rss_mib"] for w in after) - base["rss_mib"]) / base["rss_mib"]
    creep = after[-1]["median_ms"] / base["median_ms"]
    return {"warmup_steps": warmup_steps, "baseline_window": base["window"], "rss_growth": growth,
            "step_time_creep": creep, "max_rss_growth": MAX_RSS_GROWTH, "max_creep": MAX_CREEP,
            "ok": bool(growth < MAX_RSS_GROWTH and creep < MAX_CREEP)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50000, help="training steps (default 50000)")
    p.add_argument("--window", type=int, default=1000, help="steps per window (default 1000)")
    p.add_argument("--warmup", type=int, default=None,
                   help="steps ignored before the baseline window (default: a tenth of the run, at least one window)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "soak.json"))
    p.add_argument("--smoke", action="store_true", help="300 steps in windows of 50 (checks that the script runs)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.window = 300, 50
    if args.steps < 1 or args.window < 1:
        raise SystemExit("--steps and --window must be positive")
    warmup = args.warmup if args.warmup is not None else max(args.window, args.steps // 10)

    import keras
    import tensorflow as tf

    import gradtrace

    model, x, y = build()
    recorder = make_recorder(args.steps, args.window)
    epochs = -(-args.steps // STEPS_PER_EPOCH)
    detectors = list(gradtrace.BUILTINS)
    rss_start = rss_mib()
    t0 = time.time()
    h = gradtrace.fit(model, x, y, batch_size=BATCH, epochs=epochs, verbose=0, trace_every=1,
                      detectors=detectors, callbacks=[recorder])
    wall = time.time() - t0
    run = h.gradtrace
    result = verdict(recorder.windows, warmup)

    from tabulate import tabulate

    rows = [(w["window"], w["last_step"], w["steps"], f"{w['median_ms']:.2f}", f"{w['rss_mib']:.1f}")
            for w in recorder.windows]
    table = tabulate(rows, headers=["window", "up to step", "steps", "median ms/step", "RSS MiB"])
    print(table)
    print(f"\n{recorder.step} steps in {wall:.0f}s; detectors: {', '.join(detectors)}; "
          f"anomalies: {run.log.total} ({dict(run.log.counts) or 'none'}), {len(run.log)} kept; RSS at start "
          f"{rss_start:.1f} MiB")
    print(f"verdict after a warm-up of {warmup} steps (baseline: window {result['baseline_window']}): "
          f"RSS growth {100 * result['rss_growth']:.2f}% (limit {100 * MAX_RSS_GROWTH:.0f}%), "
          f"step-time creep {result['step_time_creep']:.3f}x (limit {MAX_CREEP}x): "
          f"{'OK' if result['ok'] else 'FAILED'}")
    doc = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "python": platform.python_version(), "tensorflow": tf.__version__,
                    "keras": keras.__version__, "gradtrace": gradtrace.__version__},
        "settings": {"steps": args.steps, "window": args.window, "warmup": warmup, "batch_size": BATCH,
                     "detectors": detectors, "trace_every": 1},
        "steps_run": recorder.step, "wall_s": wall, "rss_start_mib": rss_start,
        "anomalies": {"total": run.log.total, "kept": len(run.log), "counts": dict(run.log.counts)},
        "windows": recorder.windows, "verdict": result, "table": table,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
