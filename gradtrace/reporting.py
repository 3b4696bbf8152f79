"""Tables of anomalies and of per-layer statistics at an anomaly step."""

from __future__ import annotations

import math
import sys

from tabulate import tabulate

from gradtrace import embeddings
from gradtrace.anomaly import VERDICT
from gradtrace.stats import COL


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.4g}"
    return str(v)


def anomaly_table(anomalies) -> str:
    rows = [
        (a.step, a.epoch, a.detector, a.layer, a.tensor, _fmt(a.value), a.action,
         a.message + (f"\nhint: {a.hint}" if a.hint else "")
         + (f"\n{VERDICT[a.verified]}: {a.verification}" if a.verification else ""))
        for a in anomalies
    ]
    return tabulate(rows, headers=["step", "epoch", "detector", "layer", "tensor", "value", "action", "message"])


def layer_table(table, matrix, blamed=(), columns=None) -> str:
    """Per-layer statistics of one step: one line per captured layer output (blank where
    the statistic was not computed: ``columns``, when given, are those that were)."""

    def col(row, name):
        return float(matrix[row.index][COL[name]]) if columns is None or name in columns else None

    by_path = {}
    for r in table.rows:
        by_path.setdefault(r.path, {})
        by_path[r.path].setdefault(r.kind, []).append(r)
    lines = []
    for r in table.rows:
        if r.kind != "output":
            continue
        entry = by_path.get(r.path, {})
        g = entry.get("gradient", [])
        w = entry.get("weight_gradient", [])
        gnorm = col(g[0], "norm") if g else None
        wnorm = math.sqrt(sum(col(x, "norm") ** 2 for x in w)) if w and col(w[0], "norm") is not None else None
        flags = []
        bad = [x for rows in entry.values() for x in rows
               if matrix[x.index][COL["nan"]] != 0 or matrix[x.index][COL["inf"]] != 0]
        if bad:
            flags.append("non-finite:" + ",".join(sorted({x.kind for x in bad})))
        source = getattr(table, "derived", {}).get(r.index)
        if source is not None:  # its statistics are another row's: the same values, not measured twice
            flags.append(f"derived: = {table.rows[source].path}")
        if r.path in blamed:
            flags.append("<- blamed")
        lines.append(
            (
                r.path,
                r.layer_class,
                str(r.shape),
                _fmt(col(r, "mean")),
                _fmt(col(r, "std")),
                _fmt(col(r, "max")),
                _fmt(col(r, "dead_frac")) if r.relu else "",
                _fmt(gnorm),
                _fmt(wnorm),
                " ".join(flags),
            )
        )
    return tabulate(
        lines,
        headers=["layer path", "class", "output shape", "out mean", "out std", "out max", "dead frac",
                 "out-grad norm", "weight-grad norm", "flags"],
    )


def format_report(run, steps=None) -> str:
    parts = []
    anomalies = run.anomalies
    if not anomalies:
        return "gradtrace: no anomalies."
    dropped = run.log.dropped
    parts.append(f"gradtrace: {run.log.total} anomal{'y' if run.log.total == 1 else 'ies'}"
                 + (f" ({dropped} not kept; counts by detector: {dict(run.log.counts)})" if dropped else ""))
    parts.append(anomaly_table(anomalies if steps is None else [a for a in anomalies if a.step in steps]))
    first = None
    for rec in run.records:
        if rec.table is None or (steps is not None and rec.step not in steps):
            continue
        if steps is None:  # the first anomaly step only (each of its updates, for a step with several)
            first = rec.step if first is None else first
            if rec.step != first:
                break
        update = getattr(rec, "optimizer", "")
        of = f", update of {update}" if update and update != "optimizer" else ""
        parts.append(f"\nPer-layer statistics at step {rec.step} (epoch {rec.epoch}{of}):")
        parts.append(layer_table(rec.table, rec.matrix, blamed={a.layer for a in rec.anomalies},
                                 columns=getattr(rec, "columns", None)))
    if steps is None and hasattr(run, "embedding_tables"):  # the whole run's report: the tables too
        infos = run.embedding_tables()
        if infos:
            parts.append("\nEmbedding tables (ids and rows: this epoch so far):")
            parts.append(embeddings.table_text(infos))
    return "\n".join(parts)


def report(history_or_run, file=None) -> str:
    """Print (and return) the anomalies of a run and the per-layer table at the first anomaly step."""
    run = getattr(history_or_run, "gradtrace", history_or_run)
    if run is None or not hasattr(run, "anomalies"):
        raise TypeError("gradtrace.report expects the History returned by gradtrace.fit (or its .gradtrace run).")
    text = format_report(run)
    print(text, file=file or sys.stdout)
    return text
