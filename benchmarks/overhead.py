"""Overhead of gradtrace against plain ``model.fit`` and the debugging tools people use today.

    python benchmarks/overhead.py                       # every model, default settings (< 10 min on 2 cores)
    python benchmarks/overhead.py --models two_embedding --steps 30 --rounds 3
    python benchmarks/overhead.py --smoke                # a few steps of one model (what the tests run)
    python benchmarks/overhead.py --gpu                  # on a GPU: every step, budget, guard only, each
                                                         # guard, jit_compile False and True, peak GPU memory

Step time: every in-process contender trains the same model architecture
(same seed, same data, same ``jit_compile``) in rounds, interleaved
A, B, C, A, B, C, ... so that drift of this shared machine hits all alike; a
callback times every step; the first step of each ``fit`` call is reported
apart (tracing and compilation) and the median of the others is the step
time. Ratios are to plain ``model.fit`` measured in the same process.
``tf.debugging.enable_check_numerics`` and Debugger V2's dump modes change
TensorFlow globally, so each runs in a subprocess with its own interleaved
baseline. Peak memory: each contender trains in a fresh subprocess with
TensorFlow's BFC allocator on the CPU, which counts every tensor allocation;
the peak of allocated bytes during training steps is reported (process RSS
would mostly measure TensorFlow itself).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

# keras_again: plain model.fit a second time in each round, timed like any contender: its ratio to the first
# is this machine's noise (an A/A comparison), the spread any other ratio must beat to mean something
IN_PROCESS = ["keras", "keras_again", "gradtrace", "gradtrace_budget5", "gradtrace_guard", "terminate_on_nan",
              "tensorboard_hist"]
# on request (--contenders ...): gradtrace with the six default detectors of the first release, to
# measure side by side what the later default detectors (head_mismatch, scale_growth, no_gradient and
# the per-unit dead_relu) cost per step
# gradtrace_prev10: the ten default detectors before divergence, labels_out_of_range, saturation (now on),
# embedding_rows and embedding_collapse (now on) joined them, to measure what those five cost per step
# gradtrace_nohistory: every default detector, without the per-layer history's device buffer (gradtrace.history),
# to measure what keeping the history costs per step
# gradtrace_nan: the nan detector alone (capture, one sum per tensor, the gate): the floor of a traced step;
# gradtrace_nan_noguard: the same with guard=None (capture and sums, nothing waits): the floor without the gate
# gradtrace_guard: only the first step traced, every other step guarded (the loss, ids, labels and one sum per
# weight gradient checked for NaN/Inf): what the budget mode costs at its least
# gradtrace_every16: trace_every=16
# gradtrace_warn: every default detector with on_anomaly="warn": no update is ever held, so the step has no gate
# (tf.cond) and keeps no copy of the state it would restore
# gradtrace_prev15: the fifteen default detectors before identical_units, gradient_cut, penalties and
# no_progress joined them, to measure what those four cost per step
# gradtrace_prev19: every default detector but update_size (a host-side read of a sample of the weights every
# 5 steps), to measure what it costs per step
# gradtrace_variable / gradtrace_budget5_variable / gradtrace_guard_variable: the same with guard="variable" (each
# variable's update waits only for its own gradient's NaN/Inf check); gradtrace_noguard: every step with guard=None
GUARDS = ["gradtrace_variable", "gradtrace_budget5_variable", "gradtrace_guard_variable", "gradtrace_noguard"]
OPTIONAL = GUARDS + ["gradtrace_first6", "gradtrace_prev10", "gradtrace_prev15", "gradtrace_prev19",
                     "gradtrace_nohistory", "gradtrace_nan", "gradtrace_nan_noguard", "gradtrace_every16",
                     "gradtrace_warn"]
FIRST6 = ["nan", "embedding_out_of_range", "exploding", "vanishing", "dead_relu", "unused_embedding"]
PREV10 = ["nan", "embedding_out_of_range", "head_mismatch", "scale_growth", "no_gradient", "exploding", "vanishing",
          "dead_relu", "unused_embedding", "embedding_twins"]
NEW4 = ("identical_units", "gradient_cut", "penalties", "no_progress")
SUBPROCESS = ["check_numerics", "dump_curt_health", "dump_full_health"]
MODELS = ["two_embedding", "two_tower_8", "deep_mlp", "residual_ln_40", "cnn_bn", "transformer", "depth_10",
          "depth_50", "depth_200"]
SWEEP = ("depth_10", "depth_50", "depth_200")  # the depth sweep compares gradtrace with model.fit only
MEMORY = ("keras", "gradtrace")  # peak memory is measured for these
SWEEP_CONTENDERS = ("keras", "keras_again", "gradtrace", "gradtrace_budget5")  # the depth sweep runs these
# today's tools (TerminateOnNaN, TensorBoard histograms, and those that change TensorFlow globally, which run
# in a subprocess each) run by default on these models only (--all-contenders: every model)
TOOL_MODELS = ("two_embedding", "cnn_bn")
TODAY = ("terminate_on_nan", "tensorboard_hist")
GPU_CONTENDERS = ("keras", "keras_again", "gradtrace", "gradtrace_variable", "gradtrace_budget5",
                  "gradtrace_budget5_variable", "gradtrace_guard", "gradtrace_guard_variable")


# -- models and data ------------------------------------------------------------------------

def build(name, jit_compile=False):
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    if name == "two_embedding":
        n_users, n_items, batch = 20000, 5000, 256
        user, item = keras.Input((1,), dtype="int32", name="user"), keras.Input((1,), dtype="int32", name="item")
        u = layers.Flatten()(layers.Embedding(n_users, 64, name="user_emb")(user))
        i = layers.Flatten()(layers.Embedding(n_items, 32, name="item_emb")(item))
        inner = keras.Model([user, item], layers.Concatenate()([u, i]), name="inner")
        user2, item2 = keras.Input((1,), dtype="int32", name="user"), keras.Input((1,), dtype="int32", name="item")
        h = inner([user2, item2])
        for k in range(4):
            h = layers.Dense(256, activation="relu", name=f"hidden_{k}")(h)
        model = keras.Model([user2, item2], layers.Dense(1, activation="sigmoid", name="head")(h), name="outer")
        n = batch * 8
        x = [rng.integers(0, n_users, (n, 1)).astype("int32"), rng.integers(0, n_items, (n, 1)).astype("int32")]
        y = (rng.random((n, 1)) < 0.3).astype("float32")
        loss = "binary_crossentropy"
    elif name == "two_tower_8":
        # a two-tower recommender: 4 user-side and 4 item-side tables (ids, categories, hashed features)
        batch = 256
        sizes = {"user": 20000, "user_age": 10, "user_city": 500, "user_hash": 4096,
                 "item": 8000, "item_cat": 200, "item_brand": 1000, "item_hash": 4096}
        inputs = {k: keras.Input((1,), dtype="int32", name=k) for k in sizes}

        def tower(side):
            keys = [k for k in sizes if k.startswith(side)]
            ins = [keras.Input((1,), dtype="int32", name=k) for k in keys]
            vecs = [layers.Flatten()(layers.Embedding(sizes[k], 32, name=f"{k}_emb")(i)) for k, i in zip(keys, ins)]
            h = layers.Dense(128, activation="relu", name=f"{side}_d0")(layers.Concatenate()(vecs))
            h = layers.Dense(64, name=f"{side}_d1")(h)
            return keras.Model(ins, h, name=f"{side}_tower")

        towers = {side: tower(side) for side in ("user", "item")}
        u = towers["user"]([inputs[k] for k in sizes if k.startswith("user")])
        i = towers["item"]([inputs[k] for k in sizes if k.startswith("item")])
        score = layers.Dense(1, activation="sigmoid", name="head")(layers.Concatenate()([u, i, layers.Multiply()([u, i])]))
        model = keras.Model(list(inputs.values()), score, name="two_tower")
        n = batch * 8
        x = [rng.integers(0, sizes[k], (n, 1)).astype("int32") for k in sizes]
        y = (rng.random((n, 1)) < 0.3).astype("float32")
        loss = "binary_crossentropy"
    elif name == "residual_ln_40":
        # many small layers: 20 residual blocks of two Dense(64) layers with LayerNorm (40 Dense layers)
        batch, width = 128, 64
        inp = keras.Input((32,))
        h = layers.Dense(width, name="stem")(inp)
        for k in range(20):
            f = layers.Dense(width, activation="relu", name=f"b{k}_a")(h)
            f = layers.Dense(width, name=f"b{k}_b")(f)
            h = layers.LayerNormalization(name=f"b{k}_ln")(layers.Add(name=f"b{k}_add")([h, f]))
        model = keras.Model(inp, layers.Dense(10, activation="softmax", name="head")(h), name=name)
        n = batch * 8
        x = rng.normal(size=(n, 32)).astype("float32")
        y = rng.integers(0, 10, n).astype("int32")
        loss = "sparse_categorical_crossentropy"
    elif name == "deep_mlp" or name.startswith("depth_"):
        depth, width, batch = (24, 128, 128) if name == "deep_mlp" else (int(name.split("_")[1]), 64, 128)
        inp = keras.Input((32,))
        h = inp
        for k in range(depth):
            h = layers.Dense(width, activation="relu", kernel_initializer="he_normal", name=f"d{k}")(h)
        model = keras.Model(inp, layers.Dense(10, activation="softmax")(h), name=name)
        n = batch * 8
        x = rng.normal(size=(n, 32)).astype("float32")
        y = rng.integers(0, 10, n).astype("int32")
        loss = "sparse_categorical_crossentropy"
    elif name == "cnn_bn":
        batch = 64
        inp = keras.Input((32, 32, 3))
        h = inp
        for k, f in enumerate((16, 32, 64)):
            h = layers.Conv2D(f, 3, padding="same", name=f"conv{k}")(h)
            h = layers.BatchNormalization(name=f"bn{k}")(h)
            h = layers.ReLU(name=f"relu{k}")(h)
            h = layers.MaxPooling2D(name=f"pool{k}")(h)
        h = layers.Dropout(0.2)(layers.GlobalAveragePooling2D()(h))
        model = keras.Model(inp, layers.Dense(10, activation="softmax")(h), name=name)
        n = batch * 8
        x = rng.normal(size=(n, 32, 32, 3)).astype("float32")
        y = rng.integers(0, 10, n).astype("int32")
        loss = "sparse_categorical_crossentropy"
    elif name == "transformer":
        batch, seq, vocab, dim = 64, 32, 5000, 64
        tok = keras.Input((seq,), dtype="int32")
        h = layers.Embedding(vocab, dim, name="tok_emb")(tok)
        pos = layers.Embedding(seq, dim, name="pos_emb")(keras.ops.arange(seq)[None, :] * keras.ops.ones_like(tok))
        h = layers.Add()([h, pos])
        for k in range(4):
            a = layers.MultiHeadAttention(4, dim // 4, name=f"mha{k}")(h, h)
            h = layers.LayerNormalization(name=f"ln{k}a")(layers.Add()([h, a]))
            f = layers.Dense(dim * 2, activation="relu", name=f"ff{k}a")(h)
            f = layers.Dense(dim, name=f"ff{k}b")(f)
            h = layers.LayerNormalization(name=f"ln{k}b")(layers.Add()([h, f]))
        out = layers.Dense(2, activation="softmax")(layers.GlobalAveragePooling1D()(h))
        model = keras.Model(tok, out, name=name)
        n = batch * 8
        x = rng.integers(0, vocab, (n, seq)).astype("int32")
        y = rng.integers(0, 2, n).astype("int32")
        loss = "sparse_categorical_crossentropy"
    else:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    model.compile(optimizer="adam", loss=loss, jit_compile=jit_compile)
    return model, x, y, batch


# -- running one contender ---------------------------------------------------------------------

class StepTimer:
    def __init__(self):
        import keras

        class CB(keras.callbacks.Callback):
            def on_train_batch_begin(cb, batch, logs=None):
                self._t = time.perf_counter()
                self._c = time.process_time()

            def on_train_batch_end(cb, batch, logs=None):
                self.times.append(time.perf_counter() - self._t)
                self.cpu.append(time.process_time() - self._c)

        self.times = []
        self.cpu = []  # CPU time of the process per step: less disturbed by other load on a shared machine
        self.callback = CB()


TRACING = []  # gradtrace_budget5: what each fit's budget did (gradtrace's Run.tracing())


def run_fit(contender, model, x, y, batch, steps, logdir):
    import keras

    import gradtrace

    timer = StepTimer()
    cbs = [timer.callback]
    kw = dict(batch_size=batch, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
    if contender == "terminate_on_nan":
        cbs.append(keras.callbacks.TerminateOnNaN())
    if contender == "tensorboard_hist":
        cbs.append(keras.callbacks.TensorBoard(log_dir=logdir, histogram_freq=1, write_graph=False))
    if contender.startswith("gradtrace"):
        from gradtrace import session

        every = 10 ** 9 if contender.startswith("gradtrace_guard") else 16 if contender == "gradtrace_every16" else 1
        budget = 0.05 if contender.startswith("gradtrace_budget5") else None
        guard = "variable" if contender.endswith("_variable") else None if contender.endswith("_noguard") else "step"
        prev15 = [d for d in gradtrace.detectors.DEFAULT if d not in NEW4]
        prev19 = [d for d in gradtrace.detectors.DEFAULT if d != "update_size"]
        detectors = {"gradtrace_first6": FIRST6, "gradtrace_prev10": PREV10, "gradtrace_prev15": prev15,
                     "gradtrace_prev19": prev19, "gradtrace_nan": ["nan"], "gradtrace_nan_noguard": ["nan"]}.get(contender)
        on_anomaly = "warn" if contender == "gradtrace_warn" else None
        if contender == "gradtrace_nohistory":
            # the engine gradtrace.fit will take from its cache, without the history's device buffer
            options = session.Options.build(detectors=detectors, on_anomaly=on_anomaly)
            session.engine_for(model, options.detectors, options.actions).keep_history = False
        import warnings

        with warnings.catch_warnings(record=True) as said:  # the budget's verdict, kept with its figures
            warnings.simplefilter("always")
            h = gradtrace.fit(model, x, y, callbacks=cbs, trace_every=every, detectors=detectors, overhead=budget,
                              on_anomaly=on_anomaly, guard=guard, **kw)
        if budget is not None:
            TRACING.append((contender, h.gradtrace.tracing()))
        for w in said:
            if "cannot be kept" in str(w.message):
                print(f"  {contender}: {w.message}", file=sys.stderr)
        if h.anomalies:
            print(f"  note: {contender} reported {len(h.anomalies)} anomalies, first: {h.anomalies[0]}", file=sys.stderr)
    else:
        model.fit(x, y, callbacks=cbs, **kw)
    return timer.times, timer.cpu


def _repeat(x, steps, batch):
    """Enough rows for ``steps`` batches (the data is tiled, never resampled)."""
    need = steps * batch

    def tile(a):
        reps = -(-need // len(a))
        return np.concatenate([a] * reps)[:need]

    return [tile(a) for a in x] if isinstance(x, list) else tile(x)


def _gpu_peak(reset=False):
    """Peak bytes allocated on the first GPU since the last reset (None without a GPU)."""
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        return None
    if reset:
        tf.config.experimental.reset_memory_stats("GPU:0")
        return None
    return tf.config.experimental.get_memory_info("GPU:0")["peak"]


def interleaved(model_name, contenders, steps, rounds, logdir, jit_compile=False):
    models = {}
    data = None
    for c in contenders:
        models[c], x, y, batch = build(model_name, jit_compile)
        data = (x, y, batch)
    x, y, batch = data
    x, y = _repeat(x, steps, batch), _repeat(y, steps, batch)
    first = {c: [] for c in contenders}
    steady = {c: [] for c in contenders}
    steady_cpu = {c: [] for c in contenders}
    per_round = {c: [] for c in contenders}  # (median step, median CPU) of each round
    peak = {c: 0 for c in contenders}  # on a GPU: the most bytes allocated during a fit
    for r in range(rounds):
        # each round starts with another contender (the first fit of a round measured slower here), after
        # a garbage collection (not timed)
        gc.collect()
        for c in contenders[r % len(contenders):] + contenders[:r % len(contenders)]:
            _gpu_peak(reset=True)
            t, cpu = run_fit(c, models[c], x, y, batch, steps, logdir)
            peak[c] = max(peak[c], _gpu_peak() or 0)
            first[c].append(t[0])
            steady[c].extend(t[2:])  # the second step may still finish tracing a partial path
            steady_cpu[c].extend(cpu[2:])
            per_round[c].append((float(np.median(t[2:])), float(np.median(cpu[2:]))))
    out = {}
    for c in contenders:
        # the ratio to model.fit in each round (the same round's baseline): min / median / max
        step_r = [a[0] / b[0] for a, b in zip(per_round[c], per_round["keras"])]
        cpu_r = [a[1] / b[1] for a, b in zip(per_round[c], per_round["keras"])]
        out[c] = {"step_ms": 1e3 * float(np.median(steady[c])), "cpu_ms": 1e3 * float(np.median(steady_cpu[c])),
                  "first_step_s": float(first[c][0]),
                  "first_step_refit_s": float(np.median(first[c][1:])) if rounds > 1 else None,
                  "steps_timed": len(steady[c]),
                  "round_step_ratios": step_r, "round_cpu_ratios": cpu_r}
        if peak[c]:
            out[c]["gpu_peak_mb"] = peak[c] / 2 ** 20
    return out


def subprocess_contender(model_name, contender, steps, rounds):
    """A debugger mode that changes TensorFlow globally: switched on first thing in a process of its own.

    (Switching Debugger V2 dumping on and off around an interleaved baseline in one
    process crashed TensorFlow here, so these are measured alone and compared with
    the baseline of the main process, measured just before.)
    """
    code = f"""
import sys, json, os, tempfile
sys.path.insert(0, {os.path.dirname(HERE)!r}); sys.path.insert(0, {HERE!r})
import tensorflow as tf
tmp = tempfile.mkdtemp()
c = {contender!r}
if c == "check_numerics":
    tf.debugging.enable_check_numerics()
else:
    mode = "CURT_HEALTH" if c == "dump_curt_health" else "FULL_HEALTH"
    tf.debugging.experimental.enable_dump_debug_info(os.path.join(tmp, "dump"), tensor_debug_mode=mode,
                                                     circular_buffer_size=-1)
import overhead as O, numpy as np
model, x, y, batch = O.build({model_name!r})
x, y = O._repeat(x, {steps}, batch), O._repeat(y, {steps}, batch)
first, steady = [], []
for r in range({rounds}):
    t, _ = O.run_fit("keras", model, x, y, batch, {steps}, tmp)
    first.append(t[0]); steady.extend(t[2:])
print("RESULT" + json.dumps({{"step_ms": 1e3 * float(np.median(steady)), "first_step_s": first[0]}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[6:])
    raise RuntimeError(f"{contender} on {model_name} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")


def peak_memory(model_name, contender, steps):
    """Peak bytes allocated by TensorFlow during training steps, per allocation.

    In a fresh process with TensorFlow's BFC allocator on the CPU
    (``TF_CPU_ALLOCATOR_USE_BFC=true``, which makes
    ``tf.config.experimental.get_memory_info("CPU:0")`` count every tensor
    allocation): one fit to build and trace everything, then the allocator's
    peak is reset and a second fit of ``steps`` steps is measured. Process RSS
    would mostly measure TensorFlow itself.
    """
    code = f"""
import sys, tempfile, os
sys.path.insert(0, {os.path.dirname(HERE)!r}); sys.path.insert(0, {HERE!r})
import overhead as O
import tensorflow as tf
model, x, y, batch = O.build({model_name!r})
x, y = O._repeat(x, {steps}, batch), O._repeat(y, {steps}, batch)
O.run_fit({contender!r}, model, x, y, batch, 2, tempfile.mkdtemp())
tf.config.experimental.reset_memory_stats("CPU:0")
O.run_fit({contender!r}, model, x, y, batch, {steps}, tempfile.mkdtemp())
print("RESULT", tf.config.experimental.get_memory_info("CPU:0")["peak"])
"""
    env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT"):
            return float(line.split()[1]) / 2 ** 20
    raise RuntimeError(f"memory of {contender} on {model_name} failed:\n{out.stderr[-3000:]}")


# -- main ----------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--contenders", default=",".join(IN_PROCESS + SUBPROCESS))
    p.add_argument("--steps", type=int, default=16, help="steps per fit call")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--all-contenders", action="store_true", help="every contender on the depth sweep too")
    p.add_argument("--out", default=os.path.join(HERE, "results", "overhead.json"))
    p.add_argument("--smoke", action="store_true", help="a few steps of one small model, no subprocesses")
    p.add_argument("--jit", default="false", choices=["false", "true", "both"],
                   help="jit_compile of every model (both: each model twice)")
    p.add_argument("--gpu", action="store_true",
                   help="on a GPU: two_embedding, deep_mlp and cnn_bn; every step, the budget and the guard alone, "
                        "with each guard; jit_compile False and True; peak GPU memory per contender")
    args = p.parse_args(argv)
    if args.gpu:
        import tensorflow as tf

        if not tf.config.list_physical_devices("GPU"):
            print("--gpu: TensorFlow sees no GPU here (tf.config.list_physical_devices('GPU') is empty). The same "
                  "table on this machine: --models two_embedding,deep_mlp,cnn_bn --jit both --contenders "
                  + ",".join(GPU_CONTENDERS), file=sys.stderr)
            return 2
        args.models, args.jit, args.no_memory = "two_embedding,deep_mlp,cnn_bn", "both", True
        args.contenders = ",".join(GPU_CONTENDERS)
    if args.smoke:
        args.models, args.steps, args.rounds, args.no_memory, args.all_contenders = "depth_10", 4, 1, True, True
        args.contenders = "keras,gradtrace,gradtrace_budget5,gradtrace_every16,terminate_on_nan"
    models = args.models.split(",")
    contenders = args.contenders.split(",")
    local = [c for c in contenders if c in IN_PROCESS + OPTIONAL]
    remote = [c for c in contenders if c in SUBPROCESS]
    unknown = [c for c in contenders if c not in IN_PROCESS + OPTIONAL + SUBPROCESS]
    if unknown:
        raise SystemExit(f"unknown contender(s) {unknown}; choose from {', '.join(IN_PROCESS + OPTIONAL + SUBPROCESS)}")
    if "keras" not in local:
        local.insert(0, "keras")
    if "tensorboard_hist" in local:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            print("note: tensorboard is not installed (pip install -e '.[bench]'); skipping tensorboard_hist",
                  file=sys.stderr)
            local.remove("tensorboard_hist")

    import keras
    import tensorflow as tf

    import gradtrace

    logdir = tempfile.mkdtemp(prefix="gradtrace_bench_")
    results = {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                           "cpus": os.cpu_count(), "python": platform.python_version(),
                           "tensorflow": tf.__version__, "keras": keras.__version__,
                           "gradtrace": gradtrace.__version__},
               "settings": {"steps": args.steps, "rounds": args.rounds}, "models": {}}
    t0 = time.time()
    jits = {"false": (False,), "true": (True,), "both": (False, True)}[args.jit]
    for m, jit in [(m, j) for m in models for j in jits]:
        here = [c for c in local if args.all_contenders or (c in SWEEP_CONTENDERS if m in SWEEP else
                                                             c not in TODAY or m in TOOL_MODELS)]
        print(f"[{time.time() - t0:6.0f}s] {m}: {', '.join(here)} interleaved", file=sys.stderr, flush=True)
        # the depth sweep's traces are long (200 layers): one round fewer there
        rounds = min(args.rounds, max(2, args.rounds - 1)) if m in SWEEP else args.rounds
        TRACING.clear()
        res = interleaved(m, here, args.steps, rounds, logdir, jit)
        for c in {c for c, _ in TRACING}:
            runs = [t for name, t in TRACING if name == c]
            res[c]["traced_share"] = sum(t["traced_calls"] for t in runs) / max(sum(t["calls"] for t in runs), 1)
            res[c]["intervals"] = [t["interval"] for t in runs]
            res[c]["budget"] = runs[-1]
        label = f"{m} (jit)" if jit else m
        base = res["keras"]
        for c in remote if (m in TOOL_MODELS or args.all_contenders) else ():
            print(f"[{time.time() - t0:6.0f}s] {m}: {c} (subprocess)", file=sys.stderr, flush=True)
            try:
                res[c] = subprocess_contender(m, c, 8, 1)
                res[c]["separate_process"] = True
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                print(f"  {c} on {m} failed; left out of the table: {str(e)[:300]}", file=sys.stderr)
        if not args.no_memory and (m not in SWEEP or args.all_contenders):
            for c in [c for c in here if c in MEMORY]:
                print(f"[{time.time() - t0:6.0f}s] {m}: peak memory of {c}", file=sys.stderr, flush=True)
                res[c]["peak_mb"] = peak_memory(m, c, 4)
        for c, r in res.items():
            r["step_ratio"] = r["step_ms"] / base["step_ms"]
            if "cpu_ms" in r:
                r["cpu_ratio"] = r["cpu_ms"] / base["cpu_ms"]
            r["first_ratio"] = r["first_step_s"] / base["first_step_s"]
            if "peak_mb" in r and base.get("peak_mb"):
                r["memory_ratio"] = r["peak_mb"] / base["peak_mb"]
        results["models"][label] = res
    shutil.rmtree(logdir, ignore_errors=True)

    from tabulate import tabulate

    def spread(values):
        return "/".join(f"{v:.2f}" for v in (min(values), float(np.median(values)), max(values)))

    rows = []
    for m, res in results["models"].items():
        for c, r in res.items():
            star = "*" if r.get("separate_process") else ""
            name = c + star + (f" ({100 * r['traced_share']:.0f}% traced)" if "traced_share" in r else "")
            memory = f"{r['memory_ratio']:.2f}x" if "memory_ratio" in r else ""
            if "gpu_peak_mb" in r and res["keras"].get("gpu_peak_mb"):
                memory = f"{r['gpu_peak_mb'] / res['keras']['gpu_peak_mb']:.2f}x ({r['gpu_peak_mb']:.0f} MB GPU)"
            rows.append((m, name, f"{r['step_ms']:.2f}",
                         spread(r["round_step_ratios"]) if "round_step_ratios" in r else f"{r['step_ratio']:.2f}",
                         spread(r["round_cpu_ratios"]) if "round_cpu_ratios" in r else "",
                         f"{r['first_ratio']:.2f}x", memory))
    table = tabulate(rows, headers=["model", "contender", "step ms", "step / fit (min/med/max)",
                                    "cpu / fit (min/med/max)", "first step / fit", "peak mem / fit"])
    print(table)
    print(f"\n{results['machine']}; {args.steps} steps x {args.rounds} interleaved rounds; total {time.time() - t0:.0f}s")
    results["table"] = table
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
