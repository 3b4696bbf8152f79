"""The ``gradtrace`` command.

    gradtrace demo                     a real fault, caught and explained
    gradtrace replay PATH [--json]     replay a snapshot: anomalies, first bad op, per-layer table
    gradtrace show PATH [--json]       a snapshot's manifest and the shapes of its batch

``--import MODULE`` (repeatable) imports the module that defines and registers
custom layers before the model is rebuilt.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _shapes(value):
    import numpy as np

    if value is None:
        return None
    if isinstance(value, dict):
        return {k: _shapes(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_shapes(v) for v in value]
    if hasattr(value, "shape"):
        return f"{value.dtype.name if hasattr(value.dtype, 'name') else value.dtype}{list(value.shape)}"
    return str(np.asarray(value).shape)


def _strict(value):
    """``value`` as strict JSON can hold it: NaN and +-Inf become the strings "NaN", "Infinity" and
    "-Infinity" (``JSON.parse`` and every strict parser reject the bare tokens), NumPy scalars and
    arrays become numbers and lists."""
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if isinstance(value, np.ndarray):
        return _strict(value.tolist())
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if np.isnan(v):
            return "NaN"
        return v if np.isfinite(v) else ("Infinity" if v > 0 else "-Infinity")
    return value


def _show(path, as_json):
    from gradtrace import snapshot
    from gradtrace.anomaly import VERDICT

    snap = snapshot.load(path)
    m = dict(snap.manifest)
    batch = _shapes(snap.data)
    if as_json:
        print(json.dumps(_strict({"manifest": m, "batch_shapes": batch}), indent=1, allow_nan=False))
        return 0
    print(f"snapshot {snap.path}")
    print(f"  step {m['step']}, epoch {m['epoch']}, model {m['model']!r}")
    print(f"  written by gradtrace {m['gradtrace']} (TensorFlow {m['tensorflow']}, Keras {m['keras']}), "
          f"format {m['format_version']}")
    print(f"  detectors: {', '.join(m['detectors'])}")
    print(f"  batch: {batch}")
    print(f"  {len(m['variables'])} model variables, {len(m['optimizer_variables'])} optimizer variables")
    for a in m["anomalies"]:
        print(f"  [{a['detector']}] {a['layer']} ({a['tensor']}): {a['message']}")
        if a.get("hint"):
            print(f"      hint: {a['hint']}")
        if a.get("verification"):
            print(f"      {VERDICT[a.get('verified')]}: {a['verification']}")
    return 0


def _replay(path, as_json):
    from gradtrace.replaying import replay

    r = replay(path)
    if as_json:
        print(json.dumps(_strict(r.to_dict()), indent=1, allow_nan=False))
    else:
        print(r)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="gradtrace", description="Keras training-loop debugger.")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train a two-embedding inner model with a real fault and watch gradtrace catch it")
    d.add_argument("which", nargs="?", choices=["embeddings"], help="embeddings: a mis-sized item table")
    r = sub.add_parser("report", help="rebuild the HTML report of a saved run (gradtrace.save_report)")
    r.add_argument("run", help="the saved run: report.html, or its report.data.json next to it")
    r.add_argument("-o", "--output", required=True, help="the HTML file to write")
    for name, text in (("replay", "replay a snapshotted step and explain it"),
                       ("show", "print a snapshot's manifest and batch shapes")):
        p = sub.add_parser(name, help=text)
        p.add_argument("path", help="a snapshot directory (gradtrace_snapshots/step_00000037)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                       help="import MODULE first (where custom layers are defined and registered)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from gradtrace import demo

        return demo.main([args.which] if args.which else [])
    if args.command == "report":
        from gradtrace.html import write_html

        try:
            print(write_html(args.run, args.output))
        except (FileNotFoundError, ValueError, OSError) as e:
            print(f"gradtrace report: {e}", file=sys.stderr)
            return 1
        return 0
    from gradtrace.snapshot import SnapshotError

    sys.path.insert(0, os.getcwd())
    try:
        for module in args.imports:
            importlib.import_module(module)
        return (_replay if args.command == "replay" else _show)(args.path, args.json)
    except (SnapshotError, ImportError, TypeError) as e:
        print(f"gradtrace {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
