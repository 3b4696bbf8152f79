"""Score gradtrace on the corpus of real bugs and their fixes (benchmarks/faults/cases.py).

    python benchmarks/faults/score.py              # every case; a table and the three figures
    python benchmarks/faults/score.py --json out.json
    python benchmarks/faults/score.py --corpus blind   # the blind ports (cases_blind.py)
    python benchmarks/faults/score.py --corpus heldout # ten more blind ports (cases_heldout.py)
    python benchmarks/faults/score.py --corpus final   # the never-tuned ports (cases_final.py), or "all"

For each case, first without gradtrace: the symptom must show on the buggy version and not on the fix
(a case whose port lost its fault is reported as invalid, not scored). Then ``gradtrace.fit`` with the
default detectors and ``on_anomaly="warn"`` (so that the whole run is seen): the buggy version for one
epoch, the fix for ``case.epochs``. Scores:

- recall: buggy versions on which the expected detector fired at all;
- culprit accuracy: buggy versions whose FIRST anomaly is the expected detector at the expected layer;
- false alarms: fixed versions on which anything fired;
- first step: the step of the first anomaly on each buggy version.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402


def score_case(case, seed=3):
    import keras

    import gradtrace

    out = {"name": case.name, "source": case.source, "expected": list(case.expected)}
    for buggy in (True, False):
        keras.utils.set_random_seed(seed)
        x, y = case.data(np.random.default_rng(seed))
        model = case.build(buggy)
        symptom = case.symptom(model, x, y)
        h = gradtrace.fit(model, x, y, batch_size=32, epochs=1 if buggy else case.epochs, shuffle=False, verbose=0,
                          on_anomaly="warn")
        found = [(a.detector, a.layer, a.step) for a in h.anomalies]
        out["buggy" if buggy else "fixed"] = {"symptom": symptom, "anomalies": found,
                                              "loss": [float(v) for v in h.history.get("loss", [])]}
    b, f = out["buggy"], out["fixed"]
    out["valid"] = b["symptom"] and not f["symptom"]
    out["caught"] = any(d == case.expected[0] for d, _, _ in b["anomalies"])
    out["culprit"] = bool(b["anomalies"]) and tuple(b["anomalies"][0][:2]) == tuple(case.expected)
    out["first_step"] = b["anomalies"][0][2] if b["anomalies"] else None
    out["false_alarm"] = bool(f["anomalies"])
    return out


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
    p.add_argument("--corpus", choices=("main", "blind", "heldout", "final", "all"), default="main",
                   help="main: cases.py; blind: cases_blind.py (ported without reading gradtrace); heldout: "
                        "cases_heldout.py (ported the same way); final: cases_final.py (ported the same way, scored "
                        "once at the end, never tuned against); all")
    args = p.parse_args(argv)
    CASES = {"main": CASES, "blind": BLIND_CASES, "heldout": HELDOUT_CASES, "final": FINAL_CASES,
             "all": CASES + BLIND_CASES + HELDOUT_CASES + FINAL_CASES}[args.corpus]
    warnings.filterwarnings("ignore", message=".*softmax over axis")  # Keras' own warning on case 1
    results = [score_case(c) for c in CASES if not args.cases or c.name in args.cases]
    rows = []
    for r in results:
        first = r["buggy"]["anomalies"][0] if r["buggy"]["anomalies"] else None
        rows.append((r["name"], "yes" if r["valid"] else "NO", f"{r['expected'][0]} @ {r['expected'][1]}",
                     f"{first[0]} @ {first[1]}, step {first[2]}" if first else "-",
                     "yes" if r["caught"] else "no", "yes" if r["culprit"] else "no",
                     ", ".join(sorted({d for d, _, _ in r["fixed"]["anomalies"]})) or "-"))
    print(tabulate(rows, headers=["case", "symptom verified", "expected first", "gradtrace first", "caught",
                                  "culprit", "fired on the fix"]))
    valid = [r for r in results if r["valid"]]
    n = max(len(valid), 1)
    recall = sum(r["caught"] for r in valid) / n
    culprit = sum(r["culprit"] for r in valid) / n
    false_alarms = sum(r["false_alarm"] for r in valid) / n
    steps = [r["first_step"] for r in valid if r["first_step"] is not None]
    print(f"\n{len(valid)} valid case(s) of {len(results)}: recall {recall:.2f} (goal >= 0.95), culprit accuracy "
          f"{culprit:.2f} (goal >= 0.9), false alarms {false_alarms:.0%} (goal <= 5%), first detection at step "
          f"{int(np.median(steps)) if steps else '-'} (median), {max(steps) if steps else '-'} (max)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"results": results, "recall": recall, "culprit": culprit, "false_alarms": false_alarms}, fh,
                      indent=1)
    return 0 if len(valid) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
