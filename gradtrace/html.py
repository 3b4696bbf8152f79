"""One self-contained HTML report of a run, to attach to a bug report or a pull request.

``gradtrace.save_report(history, "report.html")`` writes ``report.html`` (no network, no external
asset: the pictures are embedded PNGs) and, next to it, the run as data: ``report.data.npz`` and
``report.data.json`` (the per-layer history) and ``report.data.meta.json`` (anomalies, per-layer
tables, the model's layer paths, versions). No pickle. ``gradtrace report report.data.json -o
report.html`` rebuilds the page from the data later.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import platform

from gradtrace.history import LayerHistory, SavedRun, data_prefix


def save_report(history, path):
    """Write ``path`` (HTML) and the run's data next to it; returns the HTML path."""
    import keras
    import tensorflow as tf

    import gradtrace
    from gradtrace.reporting import anomaly_table, layer_table

    run = getattr(history, "gradtrace", history)
    if not hasattr(run, "history") or not isinstance(run.history, LayerHistory):
        raise TypeError("gradtrace.save_report expects the History returned by gradtrace.fit (or its .gradtrace run).")
    run.drain_history()
    path = os.fspath(path)
    if not path.endswith((".html", ".htm")):
        path += ".html"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    prefix = data_prefix(path)
    run.history.save(prefix)
    tables = []
    for rec in run.records:
        if rec.table is not None:
            tables.append({"step": rec.step, "epoch": rec.epoch, "update": getattr(rec, "optimizer", ""),
                           "text": layer_table(rec.table, rec.matrix, blamed={a.layer for a in rec.anomalies},
                                               columns=getattr(rec, "columns", None))})
    embeddings = ""
    if hasattr(run, "embedding_tables"):
        from gradtrace.embeddings import table_text

        infos = run.embedding_tables()
        embeddings = table_text(infos) if infos else ""
    meta = {
        "model": run.model.name,
        "anomalies": [{k: v for k, v in a.to_dict().items() if k != "stats"} for a in run.anomalies],
        "anomaly_table": anomaly_table(run.anomalies) if run.anomalies else "",
        "step_tables": tables[:10],
        "layers": [[p, type(layer).__name__] for p, layer in sorted(
            ((run.engine.tap.paths.get(lid, layer.name), layer) for lid, layer in run.engine.tap.layers.items()),
            key=lambda t: t[0])],
        "embeddings": embeddings,
        "versions": {"gradtrace": gradtrace.__version__, "tensorflow": tf.__version__, "keras": keras.__version__,
                     "python": platform.python_version(), "platform": platform.platform()},
    }
    with open(prefix + ".meta.json", "w") as f:
        json.dump(meta, f, indent=1, default=_json_default)
    return write_html(prefix, path)


def _json_default(o):
    try:
        return o.item()
    except AttributeError:
        return str(o)


def write_html(prefix, path):
    """(Re)build the HTML page from the saved data at ``prefix`` (``report.data``)."""
    saved = SavedRun(prefix)
    meta = saved.meta
    picture = ""
    try:
        from gradtrace.pictures import plot

        fig = plot(saved)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        from matplotlib import pyplot as plt

        plt.close(fig)
        picture = (f'<img id="gradtrace-picture" alt="per-layer statistics over the run" '
                   f'src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">')
    except ImportError as e:
        picture = f"<p>No picture: {html.escape(str(e))}</p>"
    except ValueError as e:  # nothing traced yet
        picture = f"<p>No picture: {html.escape(str(e))}</p>"
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(a.get(k, '')))}</td>" for k in
                         ("step", "epoch", "detector", "layer", "tensor", "action", "message", "hint",
                          "verification")) + "</tr>"
        for a in meta["anomalies"])
    anomalies = ("<table id=\"anomalies\"><thead><tr>" + "".join(
        f"<th>{h}</th>" for h in ("step", "epoch", "detector", "layer", "tensor", "action", "message", "hint",
                                  "verification"))
        + f"</tr></thead><tbody>{rows}</tbody></table>") if meta["anomalies"] else "<p>No anomalies.</p>"
    steps = "".join(f"<h3>Step {t['step']} (epoch {t['epoch']}{', update of ' + t['update'] if t['update'] and t['update'] != 'optimizer' else ''})</h3>"
                    f"<pre class=\"layer-table\">{html.escape(t['text'])}</pre>" for t in meta["step_tables"])
    layers = "".join(f"<li><code>{html.escape(p)}</code> ({html.escape(c)})</li>" for p, c in meta["layers"])
    versions = ", ".join(f"{k} {html.escape(str(v))}" for k, v in meta["versions"].items())
    emb = f"<h2>Embedding tables</h2><pre>{html.escape(meta['embeddings'])}</pre>" if meta.get("embeddings") else ""
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>gradtrace report: {html.escape(meta['model'])}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85em; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.5em; vertical-align: top; text-align: left; }}
pre {{ font-size: 0.75em; overflow-x: auto; background: #f7f7f7; padding: 0.5em; }}
img {{ max-width: 100%; }}
</style></head>
<body>
<h1>gradtrace report: {html.escape(meta['model'])}</h1>
<p>{len(meta['anomalies'])} anomal{'y' if len(meta['anomalies']) == 1 else 'ies'}. {versions}.</p>
<h2>Every layer over the run</h2>
{picture}
<h2>Anomalies</h2>
{anomalies}
<h2>Per-layer statistics at each anomaly step</h2>
{steps or '<p>None kept.</p>'}
{emb}
<h2>Model: layer paths</h2>
<ul id="layers">{layers}</ul>
</body></html>
"""
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path
