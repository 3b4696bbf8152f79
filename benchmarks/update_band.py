"""The update-to-weight ratio of healthy and buggy runs: the source of ``update_size``'s thresholds.

    python benchmarks/update_band.py            # every case of benchmarks/faults (fixed and buggy)
    python benchmarks/update_band.py --json out.json

For each case of the fault corpus (``cases.py`` and ``cases_blind.py``), the fixed and the buggy program
are trained with plain ``model.train_on_batch`` (no gradtrace), batch 32, and after every step each layer's
measured update ratio ``|w_after - w_before| / |w_before|`` (over the layer's trainable weights together)
is recorded. Printed per run: the median over steps of the largest layer ratio and of the smallest, and the
largest ratio any layer kept for 5 steps in a row (the lowest of 5 consecutive steps).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def _layers(model):
    """``[(name, trainable weights)]`` of the layers that hold weights of their own (no sublayers)."""
    from gradtrace import _keras_compat as compat

    out = []
    for layer in compat.flatten_layers(model)[1:]:
        ws = list(layer.trainable_weights)
        if ws and len(compat.flatten_layers(layer)) == 1:
            out.append((layer.name, ws))
    return out


def measure(case, buggy, seed=3, epochs=None):
    import keras

    keras.utils.set_random_seed(seed)
    x, y = case.data(np.random.default_rng(seed))
    model = case.build(buggy)
    layers = _layers(model)
    ratios = []  # [steps, layers]
    losses = []
    for _ in range(epochs or (1 if buggy else case.epochs)):
        for i in range(0, len(x), 32):
            before = [np.concatenate([np.ravel(w.numpy()) for w in ws]) for _, ws in layers]
            loss = model.train_on_batch(x[i:i + 32], y[i:i + 32])
            after = [np.concatenate([np.ravel(w.numpy()) for w in ws]) for _, ws in layers]
            losses.append(float(np.ravel(loss)[0]))
            ratios.append([np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30) for a, b in zip(after, before)])
    r = np.asarray(ratios)
    finite = np.isfinite(r).all(axis=1)
    r = r[finite]
    if not len(r):
        return {"case": case.name, "buggy": buggy, "steps": 0}
    kept5 = max((np.min(r[i:i + 5], axis=0).max() for i in range(max(len(r) - 4, 1))), default=np.nan)
    return {"case": case.name, "buggy": buggy, "steps": int(len(r)),
            "max_layer_median": float(np.median(r.max(axis=1))),
            "min_layer_median": float(np.median(r.min(axis=1))),
            "kept5_max": float(kept5),
            "worst_layer": layers[int(np.argmax(np.median(r, axis=0)))][0],
            "loss_first_last": [losses[0], losses[-1]]}


def main(argv=None):
    from tabulate import tabulate

    from benchmarks.faults.cases import CASES
    from benchmarks.faults.cases_blind import BLIND_CASES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json")
    p.add_argument("--cases", nargs="*")
    args = p.parse_args(argv)
    out = []
    for case in CASES + BLIND_CASES:
        if args.cases and case.name not in args.cases:
            continue
        for buggy in (False, True):
            try:
                out.append(measure(case, buggy))
            except Exception as e:  # a program that fails in plain Keras (an id out of range on a CPU)
                out.append({"case": case.name, "buggy": buggy, "steps": 0, "error": type(e).__name__})
            print(out[-1], flush=True)
    rows = [(o["case"], "buggy" if o["buggy"] else "fixed", o.get("steps"), f"{o.get('max_layer_median', np.nan):.3g}",
             f"{o.get('min_layer_median', np.nan):.3g}", f"{o.get('kept5_max', np.nan):.3g}", o.get("worst_layer"))
            for o in out]
    print(tabulate(rows, headers=["case", "version", "steps", "median max-layer", "median min-layer",
                                  "largest kept 5 steps", "layer"]))
    healthy = [o["kept5_max"] for o in out if not o["buggy"] and o.get("steps")]
    print(f"\nfixed programs: largest ratio kept 5 steps: max {max(healthy):.3g}, "
          f"median {np.median(healthy):.3g}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
