"""Pictures of a run: every captured layer (rows, execution order) over every traced step (columns).

``gradtrace.plot(history)`` returns a matplotlib ``Figure`` (it shows inline in a notebook and saves
with ``fig.savefig``): one heatmap per panel, layers top to bottom in execution order with the inner
model they belong to in their label, steps left to right, values on a log colour scale for norms and
ratios, epoch boundaries as dashed lines and every anomaly as a marker at its layer and step.
``gradtrace.plot(snapshot_dir)`` draws one failing step instead: per-layer bars, the blamed layer in
red and non-finite tensors marked. matplotlib is an optional extra: ``pip install "gradtrace[plot]"``.
"""

from __future__ import annotations

import json
import os

import numpy as np

from gradtrace.history import LayerHistory, SavedRun, data_prefix
from gradtrace.stats import SATURATION_LIMITS

# panel name -> (quantities drawn, title, log scale)
PANELS = {
    "gradient_flow": (("gradient_norm",), "output-gradient norm (gradient flow)", True),
    "weight_gradient": (("weight_gradient_norm",), "weight-gradient norm", True),
    "update_ratio": (("update_ratio",), "update ratio (lr * |g| / |w|)", True),
    "dead": (("dead_fraction", "saturated_fraction"), "dead (ReLU) / saturated (sigmoid, tanh) fraction", False),
    "output": (("output_mean",), "output mean", False),
    "embeddings": ((), "Embedding tables: share of rows used, of ids reached, effective rank / min(rows, d)", False),
}
DEFAULT_PANELS = ("gradient_flow", "weight_gradient", "update_ratio", "dead", "embeddings")


def _pyplot():
    try:
        from matplotlib import pyplot as plt  # without a display, matplotlib draws with Agg
    except ImportError:
        raise ImportError('gradtrace.plot needs matplotlib: pip install "gradtrace[plot]" (or pip install '
                          "matplotlib).") from None
    return plt


def _source(obj):
    """``(LayerHistory, anomalies, title)`` from a History, a run, a LayerHistory or a saved report."""
    run = getattr(obj, "gradtrace", obj)
    if isinstance(run, LayerHistory):
        return run, [], ""
    if hasattr(run, "history") and isinstance(run.history, LayerHistory):
        run.drain_history()
        return run.history, list(run.anomalies), getattr(run.model, "name", "")
    if isinstance(obj, (str, os.PathLike)):
        if os.path.exists(data_prefix(obj) + ".meta.json"):  # a saved report (report.html, report.data.json)
            return _source(SavedRun(obj))
        return LayerHistory.load(os.fspath(obj)), [], ""
    raise TypeError(f"gradtrace.plot expects the History returned by gradtrace.fit, its .gradtrace run, a "
                    f"LayerHistory, a saved report or a snapshot directory; got {type(obj).__name__}.")


def _label(path):
    """``outer/inner/dense`` -> ``inner/dense`` (the model's own name dropped; inner models kept)."""
    parts = path.split("/")
    return "/".join(parts[1:]) if len(parts) > 1 else path


def plot(source, what=DEFAULT_PANELS, stat="mean"):
    """A matplotlib ``Figure`` of a run (see the module docstring); ``what``: panel names from
    ``PANELS``; ``stat``: ``mean``, ``min`` or ``max`` of the steps each column merges."""
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(os.fspath(source)):
        return plot_snapshot(source)
    plt = _pyplot()
    from matplotlib.colors import LogNorm, Normalize

    what = (what,) if isinstance(what, str) else tuple(what)
    unknown = [w for w in what if w not in PANELS]
    if unknown:
        raise ValueError(f"unknown panel(s) {unknown}: choose from {', '.join(PANELS)}.")
    hist, anomalies, name = _source(source)
    if not len(hist.count):
        raise ValueError("this run has no traced step to draw yet (train at least one step).")
    run = getattr(source, "gradtrace", source)
    tables = run.embedding_tables() if "embeddings" in what and hasattr(run, "embedding_tables") else []
    panels = []
    for w in what:
        quantities, title, log = PANELS[w]
        if w == "embeddings":
            if tables:
                panels.append((w, title, log, [t.path for t in tables], tables))
            continue
        paths, cols = [], []
        for q in quantities:
            p, data = hist.series(q, stat)
            paths += p
            cols.append(data)
        data = np.concatenate(cols, axis=1) if paths else None
        if paths and np.isfinite(data).any():  # a quantity no detector measured is left out
            panels.append((w, title, log, paths, data))
    if not panels:
        raise ValueError(f"none of the panels {list(what)} has measured values in this run.")
    heights = [max(1.5, (0.5 if p[0] == "embeddings" else 0.22) * len(p[3]) + 0.8) for p in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, sum(heights) + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    steps = hist.steps
    epoch_starts = [b for b in range(1, len(steps)) if hist.epochs[b, 0] != hist.epochs[b - 1, 1]]
    for ax, (w, title, log, paths, data) in zip(axes[:, 0], panels):
        if w == "embeddings":
            _embedding_bars(ax, title, data)
            continue
        image = data.T  # layers x buckets
        finite = image[np.isfinite(image)]
        if log:
            positive = finite[finite > 0]
            norm = LogNorm(vmin=positive.min(), vmax=max(positive.max(), positive.min() * 1.0001)) if len(
                positive) else None
            image = np.where(image > 0, image, np.nan)
        else:
            norm = Normalize(vmin=min(0.0, finite.min()) if len(finite) else 0, vmax=finite.max() if len(
                finite) and finite.max() > 0 else 1.0)
        im = ax.imshow(image, aspect="auto", interpolation="nearest", norm=norm, cmap="viridis")
        im.set_gid(f"panel:{w}")
        fig.colorbar(im, ax=ax, pad=0.01)
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_yticks(range(len(paths)))
        ax.set_yticklabels([_label(p) for p in paths], fontsize=7)
        ticks = np.linspace(0, len(steps) - 1, min(8, len(steps))).astype(int)
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(int(steps[t, 0])) for t in ticks], fontsize=7)
        for b in epoch_starts:
            ax.axvline(b - 0.5, color="white", linestyle="--", linewidth=0.8, gid="epoch")
        xs, ys = [], []
        for a in anomalies:
            if a.layer in paths:
                xs.append(_bucket(steps, a.step))
                ys.append(paths.index(a.layer))
        if xs:
            ax.scatter(xs, ys, marker="x", color="red", s=40, linewidths=1.5, zorder=3, gid="anomalies",
                       label="anomaly")
    heat = [ax for ax, p in zip(axes[:, 0], panels) if p[0] != "embeddings"]
    if heat:
        heat[-1].set_xlabel(f"step ({hist.width} step(s) per column{'; ' + stat if hist.width > 1 else ''})",
                            fontsize=8)
    fig.suptitle(f"gradtrace: {name}" if name else "gradtrace", fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.text(0.01, 0.005, "white cell: not measured at that step (or 0 on a log scale); red x: an anomaly at that "
             "layer and step; dashed line: an epoch starts", fontsize=7, color="dimgray", gid="legend")
    return fig


def _embedding_bars(ax, title, tables):
    """Per table: the share of its rows used this epoch, of its ids reached (highest id seen + 1 over
    input_dim) and its effective rank over min(rows, d); a table far from 1 on the first two is sized
    for ids its data does not have, one low on the third has collapsed."""
    y = np.arange(len(tables))
    parts = [("rows used", lambda t: t.rows_used / t.input_dim if t.rows_used is not None else np.nan),
             ("ids reached", lambda t: (t.max_id + 1) / t.input_dim if t.max_id is not None else np.nan),
             ("effective rank", lambda t: t.effective_rank / min(t.input_dim, t.dim)
              if t.effective_rank is not None else np.nan)]
    for k, (label, value) in enumerate(parts):
        ax.barh(y + (k - 1) * 0.27, [value(t) for t in tables], height=0.25, label=label, gid=f"embeddings:{label}")
    ax.set_xlim(0, 1.05)
    ax.set_xlabel("share (this epoch so far)", fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels([_label(t.path) for t in tables], fontsize=7)
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=9, loc="left")


def _bucket(steps, step):
    """The column (bucket) holding ``step``: the last bucket starting at or before it."""
    return int(max(0, np.searchsorted(steps[:, 0], step, side="right") - 1))


def plot_snapshot(path):
    """One failing step from a snapshot directory: per-layer bars of the output-gradient norm, the
    weight-gradient norm and the dead/saturated fraction, the blamed layer in red, each non-finite
    tensor marked with a red "nan/inf" in its own panel (a layer without weights gets no mark in the
    weight-gradient panel), and a legend saying so."""
    plt = _pyplot()
    from gradtrace.graph import base_path
    from gradtrace.snapshot import read_manifest
    from gradtrace.stats import COL

    manifest = read_manifest(path)
    root = os.fspath(path)
    with open(os.path.join(root, "rows.json")) as f:
        rows = json.load(f)
    with np.load(os.path.join(root, "stats.npz"), allow_pickle=False) as z:
        matrix = z["matrix"]
    blamed = {a.get("layer") for a in manifest.get("anomalies", [])}
    order, values, bad = [], {}, set()  # bad: (layer, panel) whose tensor holds a NaN/Inf
    for r in rows:
        if r["kind"] not in ("output", "gradient", "weight_gradient"):
            continue
        path_ = base_path(r["path"])
        if path_ not in order:
            order.append(path_)
        row = matrix[r["index"]]
        key = {"gradient": "out-grad", "weight_gradient": "weight-grad"}.get(r["kind"])
        if row[COL["nan"]] != 0 or row[COL["inf"]] != 0:
            bad.add((path_, key or "dead/sat"))
        if key:
            values.setdefault((path_, key), []).append(float(row[COL["norm"]]))
        elif r.get("relu") or r.get("activation") in SATURATION_LIMITS:
            values[(path_, "dead/sat")] = [float(row[COL["dead_frac"] if r.get("relu") else COL["saturated"]])]
    panels = ("out-grad", "weight-grad", "dead/sat")
    fig, axes = plt.subplots(1, len(panels), figsize=(12, 0.25 * len(order) + 1.5), sharey=True, squeeze=False)
    y = np.arange(len(order))
    for ax, key in zip(axes[0], panels):
        v = [float(np.sqrt(np.sum(np.square(values[(p, key)])))) if (p, key) in values else 0.0 for p in order]
        v = [x if np.isfinite(x) else 0.0 for x in v]
        colors = ["tab:red" if p in blamed else "tab:blue" for p in order]
        ax.barh(y, v, color=colors, gid=f"bars:{key}")
        if key != "dead/sat" and any(x > 0 for x in v):
            from matplotlib.ticker import LogLocator, NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(numticks=4))  # a few decades labelled: no overlap
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(key, fontsize=9)
        for i, p in enumerate(order):
            if (p, key) in bad:
                ax.text(0.98, i, "nan/inf", color="red", fontsize=7, va="center", ha="right",
                        transform=ax.get_yaxis_transform(), gid="nonfinite")
    axes[0, 0].set_yticks(y)
    axes[0, 0].set_yticklabels([_label(p) for p in order], fontsize=7)
    axes[0, 0].invert_yaxis()
    first = (manifest.get("anomalies") or [{}])[0]
    fig.suptitle(f"gradtrace snapshot: step {manifest.get('step')}, {first.get('detector', '')} at "
                 f"{first.get('layer', '')}", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.text(0.01, 0.01, "red bar: the blamed layer; nan/inf: that tensor holds NaN/Inf (its bar is drawn at 0); "
             "no bar: the layer has no such tensor (no weights, no ReLU/sigmoid/tanh)", fontsize=7,
             color="dimgray", gid="legend")
    return fig
