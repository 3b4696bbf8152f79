"""How many hinted fixes hold up: ``gradtrace.fit(..., verify_hints=True)`` on every buggy program of the corpus.

    python benchmarks/faults/verify_hints.py --corpus all [--json out.json]

Each buggy version trains as ``score.py`` trains it (seed 3, batch 32, one epoch, no shuffle) with the
detectors' default actions, so that a halting detector halts, and ``verify_hints=True``. For every halting
anomaly it reports the hint, the fixes tried, the verdict (``verified``: True, False, or None when the hint
names no setting) and the one line of evidence, and the seconds verification took. The figures in
docs/detectors.md come from this script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402


def verify_case(case, seed=3):
    import keras

    import gradtrace

    keras.utils.set_random_seed(seed)
    x, y = case.data(np.random.default_rng(seed))
    model = case.build(True)
    start = time.perf_counter()
    h = gradtrace.fit(model, x, y, batch_size=32, epochs=1, shuffle=False, verbose=0, verify_hints=True)
    wall = time.perf_counter() - start
    halting = [a for a in h.anomalies if a.stage == "step" and a.action in ("halt", "raise")]
    return {"name": case.name, "halted": bool(h.gradtrace.halted), "fit_s": wall,
            "verify_s": h.gradtrace.verification_seconds,
            "anomalies": [{"detector": a.detector, "layer": a.layer, "step": a.step, "hint": a.hint,
                           "verified": a.verified, "verification": a.verification} for a in halting]}


def main(argv=None):
    import warnings

    from tabulate import tabulate

    from benchmarks.faults.cases import CASES
    from benchmarks.faults.cases_blind import BLIND_CASES
    from benchmarks.faults.cases_final import FINAL_CASES
    from benchmarks.faults.cases_heldout import HELDOUT_CASES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--cases", nargs="*", help="only these cases")
    p.add_argument("--corpus", choices=("main", "blind", "heldout", "final", "all"), default="all")
    args = p.parse_args(argv)
    cases = {"main": CASES, "blind": BLIND_CASES, "heldout": HELDOUT_CASES, "final": FINAL_CASES,
             "all": CASES + BLIND_CASES + HELDOUT_CASES + FINAL_CASES}[args.corpus]
    warnings.filterwarnings("ignore")
    results = []
    for c in cases:
        if args.cases and c.name not in args.cases:
            continue
        try:
            results.append(verify_case(c))
        except Exception as e:  # a case that cannot run under a halt is reported, not scored
            results.append({"name": c.name, "error": f"{type(e).__name__}: {e}", "anomalies": []})
        r = results[-1]
        for a in r["anomalies"]:
            print(f"{r['name']}: {a['detector']} @ {a['layer']} step {a['step']}: verified={a['verified']} "
                  f"{a['verification'][:160]}", flush=True)
    rows, counts = [], {True: 0, False: 0, None: 0}
    for r in results:
        for a in r["anomalies"]:
            counts[a["verified"]] += 1
            rows.append((r["name"], f"{a['detector']} @ {a['layer']}", a["step"],
                         {True: "yes", False: "no", None: "-"}[a["verified"]], a["verification"][:90]))
    print(tabulate(rows, headers=["case", "halting anomaly", "step", "verified", "evidence"]))
    times = [r["verify_s"] for r in results if r.get("verify_s")]
    print(f"\n{sum(counts.values())} halting anomalies in {len(results)} buggy programs: {counts[True]} fixes "
          f"confirmed, {counts[False]} tried without help, {counts[None]} not tried (no setting in the hint); "
          f"verification took {np.median(times) if times else 0:.1f} s (median), {max(times) if times else 0:.1f} s "
          "(max) per halted fit")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
