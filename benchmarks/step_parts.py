"""What a watched step is made of: its compiled train function timed alone, part by part.

    python benchmarks/step_parts.py                                  # deep_mlp, two_embedding, cnn_bn (~4 min)
    python benchmarks/step_parts.py --models deep_mlp --rounds 40

``overhead.py`` times whole ``fit`` calls (the fit loop, callbacks and gradtrace's host work
included). This script calls the compiled train functions themselves, on the same iterator, so
what differs between two variants is the graph alone. Each variant is a ``gradtrace.fit`` of
its own copy of a benchmark model (same seed, same data); after a short fit its compiled
functions are taken from the engine and called directly, interleaved, a few calls each per
round:

- ``plain``: ``model.fit``'s own step (the model's train function, unwatched: the budget's reference);
- ``nan_noguard``: the ``nan`` detector, ``guard=None``: capture and one sum per tensor, nothing waits;
- ``nan``: the same with the step gate (the update waits for every sum): the floor of a traced step;
- ``all_noguard``: every default detector, ``guard=None``;
- ``all``: every default detector, the step gate (``gradtrace.fit``'s default traced step);
- ``guarded``: every default detector's untraced step (the guard alone: what the budget mode pays
  between traced steps).

Ratios are to ``plain`` in the same round, wall and CPU time, min/median/max over rounds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

VARIANTS = {  # name -> (gradtrace.fit keywords, the plan timed)
    "nan_noguard": (dict(detectors=["nan"], guard=None), "traced"),
    "nan": (dict(detectors=["nan"]), "traced"),
    "all_noguard": (dict(guard=None), "traced"),
    "all": ({}, "traced"),
    "guarded": ({}, "untraced"),
}


def functions(model_name, variants):
    """``({variant: train function}, iterator)``: each variant's compiled function, after a short fit."""
    import tensorflow as tf

    import gradtrace
    from gradtrace import session
    from gradtrace.step import plan
    from overhead import _repeat, build

    plans = {"traced": plan.TRACED, "untraced": plan.UNTRACED}
    out = {}
    x = y = batch = None
    for v in variants:
        kw, which = VARIANTS[v]
        model, x, y, batch = build(model_name)
        steps = 8
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # overhead=: the untraced (guarded) variant is compiled too
            gradtrace.fit(model, _repeat(x, steps, batch), _repeat(y, steps, batch), batch_size=batch,
                          epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False, overhead=0.05, **kw)
        engine = session.engine_for(model, *_resolved(kw))
        if "plain" not in out:
            out["plain"] = engine.train_function(plan.PLAIN)
        out[v] = engine.train_function(plans[which])
    data = (tuple(x) if isinstance(x, list) else x, y)
    iterator = iter(tf.data.Dataset.from_tensor_slices(data).batch(batch, drop_remainder=True).repeat())
    return out, iterator


def _resolved(kw):
    """What ``gradtrace.fit(**kw)`` hands ``session.engine_for`` (the cached engine is returned)."""
    from gradtrace import session

    options = session.Options.build(detectors=kw.get("detectors"))
    return options.detectors, options.actions, (), kw.get("guard", "step")


def measure(model_name, variants, rounds, calls):
    fns, iterator = functions(model_name, variants)
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for f in fns.values():  # warm: the first calls after a fit may still build
        for _ in range(3):
            f(iterator)
    for r in range(rounds):
        order = list(fns)[r % len(fns):] + list(fns)[:r % len(fns)]
        for k in order:
            w, c = [], []
            for _ in range(calls):
                t, p = time.perf_counter(), time.process_time()
                fns[k](iterator)
                w.append(time.perf_counter() - t)
                c.append(time.process_time() - p)
            wall[k].append(float(np.median(w)))
            cpu[k].append(float(np.median(c)))
    return wall, cpu


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["deep_mlp", "two_embedding", "cnn_bn"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--calls", type=int, default=3, help="calls of each variant per round")
    args = p.parse_args(argv)
    from tabulate import tabulate

    t0 = time.time()
    rows = []
    for m in args.models:
        wall, cpu = measure(m, args.variants, args.rounds, args.calls)

        def spread(d, v):
            r = np.array(d[v]) / np.array(d["plain"])
            return f"{r.min():.2f}/{np.median(r):.2f}/{r.max():.2f}"

        for v in wall:
            rows.append([m, v, f"{1e3 * np.median(wall[v]):.2f}", spread(wall, v), spread(cpu, v)])
        print(f"done {m} ({time.time() - t0:.0f}s)", file=sys.stderr)
    print(tabulate(rows, headers=["model", "variant", "step ms", "wall / plain min/med/max",
                                  "CPU / plain min/med/max"]))
    print(f"\n{args.rounds} interleaved rounds of {args.calls} calls each; total {time.time() - t0:.0f}s")
    return rows


if __name__ == "__main__":
    main()
