"""TensorBoard output: per-layer scalars and histograms every N steps, anomalies as text.

``gradtrace.fit(..., tensorboard_dir="logs/run1", tensorboard_every=100)`` writes,
with ``tf.summary``, under tags that follow the layer paths:

- scalars ``<path>/output/{mean,std,min,max,zero_frac}`` (plus ``dead_frac`` for
  ReLU-family outputs and ``saturated`` for sigmoid/tanh ones),
  ``<path>/gradient/{norm,mean,std}`` (the gradient of the loss with respect to
  the layer's output), ``<path>/weight_gradient/<weight>/{norm,update_ratio}``,
  ``<path>/weight/<weight>/norm``, ``<path>/ids/{min,max,bad}`` for Embedding
  ids and ``loss/value``;
- histograms ``<path>/output`` and ``<path>/gradient``, computed in the step
  (only the bin counts leave the graph);
- one text event per anomaly, ``gradtrace/anomalies``, at the anomaly's step.

The x axis is the step (``optimizer.iterations`` before the step's update).
Event files are appended to and flushed after every write, so a run that
stops (or is killed) leaves files TensorBoard reads up to the last write.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import tensorflow as tf

from gradtrace import _keras_compat as compat
from gradtrace.stats import COL, SATURATION_LIMITS

# which columns of each kind of row become scalars
SCALARS = {
    "output": ("mean", "std", "min", "max", "zero_frac"),
    "gradient": ("norm", "mean", "std"),
    "weight_gradient": ("norm", "update_ratio"),
    "weight": ("norm",),
    "ids": ("min", "max", "bad"),
    "labels": ("min", "max", "bad"),
    "input": ("mean", "std"),
    "target": ("mean", "std"),
}


def _metadata(plugin):
    """What TensorBoard's own ``scalar``/``histogram``/``text`` summaries attach (plugin data
    version 0, empty content). Written with ``tf.summary.write``, which is part of
    TensorFlow, so gradtrace needs no ``tensorboard`` package to write the files
    (``tf.summary.scalar`` and friends do)."""
    summary_pb2 = compat.summary_pb2()
    meta = summary_pb2.SummaryMetadata()
    meta.plugin_data.plugin_name = plugin
    return meta


def check_dir(logdir):
    """Create ``logdir`` and make sure it can be written, before any training."""
    logdir = os.fspath(logdir)
    if os.path.exists(logdir) and not os.path.isdir(logdir):
        raise ValueError(f"tensorboard_dir={logdir!r} exists and is not a directory. Pass a directory path.")
    try:
        os.makedirs(logdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=logdir):
            pass
    except OSError as e:
        raise ValueError(
            f"tensorboard_dir={logdir!r} cannot be written ({e.strerror or e}). "
            "Pass a directory you can write to, or tensorboard_dir=None."
        ) from None
    return logdir


def tag_of(row, column=None):
    if row.kind == "loss":
        return "loss/value"
    parts = [row.path, row.kind]
    if row.kind in ("weight", "weight_gradient") and row.name:
        parts.append(row.name)
    elif row.kind in ("input", "target") and row.name:
        parts.append(row.name)
    if column:
        parts.append(column)
    return "/".join(parts)


class Writer:
    """Writes one run's summaries; ``every``: the steps between two summary steps."""

    def __init__(self, logdir, every=100, bins=30, write=True):
        """``write=False``: run the summary steps (their collective ops must run on every
        worker of a multi-worker job) but write nothing; only the chief worker writes."""
        self.logdir = check_dir(logdir) if write else os.fspath(logdir)
        self.every = every
        self.bins = bins
        self.write = write
        self._writer = tf.summary.create_file_writer(self.logdir) if write else None
        self._meta = {p: _metadata(p) for p in ("scalars", "histograms", "text")}
        self.written_steps = 0

    def columns_of(self, row):
        cols = list(SCALARS.get(row.kind, ()))
        if row.kind == "output" and row.relu:
            cols.append("dead_frac")
        if row.kind == "output" and row.activation in SATURATION_LIMITS:
            cols.append("saturated")
        return cols

    def write_step(self, step, table, matrix, histogram_rows, histograms):
        if not self.write:
            return
        with self._writer.as_default(step=int(step)):
            for row in table.rows:
                if row.kind == "loss":
                    self._scalar("loss/value", matrix[row.index, COL["mean"]])
                    continue
                for col in self.columns_of(row):
                    self._scalar(tag_of(row, col), matrix[row.index, COL[col]])
            for i, counts in zip(histogram_rows, histograms):
                lo, hi = float(matrix[i, COL["min"]]), float(matrix[i, COL["max"]])
                if not (np.isfinite(lo) and np.isfinite(hi)):
                    lo, hi = 0.0, 1.0
                if hi <= lo:
                    hi = lo + 1.0
                edges = np.linspace(lo, hi, len(counts) + 1)
                buckets = np.stack([edges[:-1], edges[1:], counts], axis=1).astype("float64")
                tf.summary.write(tag_of(table.rows[i]), buckets, metadata=self._meta["histograms"])
        self._writer.flush()
        self.written_steps += 1

    def _scalar(self, tag, value):
        tf.summary.write(tag, tf.constant(float(value), tf.float32), metadata=self._meta["scalars"])

    def write_tables(self, step, infos, layers, bins=30):
        """At an epoch's end, per Embedding table (``infos``: :mod:`gradtrace.embeddings`): its effective
        rank, the ids seen and the rows used this epoch, and a histogram of its row norms (computed where
        the table lives; only the bucket counts come back)."""
        if not self.write:
            return
        with self._writer.as_default(step=int(step)):
            for t in infos:
                base = f"{t.path}/embedding"
                for name, value in (("effective_rank", t.effective_rank), ("rows_used", t.rows_used),
                                    ("max_id", t.max_id), ("min_id", t.min_id), ("lookups", t.lookups),
                                    ("rows_never_learned", t.rows_never_learned)):
                    if value is not None:
                        self._scalar(f"{base}/{name}", value)
                layer = layers.get(t.path)
                if layer is None:
                    continue
                norms = tf.norm(tf.cast(layer.embeddings, tf.float32), axis=1)
                lo, hi = float(tf.reduce_min(norms)), float(tf.reduce_max(norms))
                if not (np.isfinite(lo) and np.isfinite(hi)):
                    continue
                hi = hi if hi > lo else lo + 1.0
                counts = tf.histogram_fixed_width(norms, [lo, hi], nbins=bins).numpy()
                edges = np.linspace(lo, hi, bins + 1)
                buckets = np.stack([edges[:-1], edges[1:], counts], axis=1).astype("float64")
                tf.summary.write(f"{base}/row_norms", buckets, metadata=self._meta["histograms"])
        self._writer.flush()

    def write_anomalies(self, anomalies):
        if not self.write:
            return
        for a in anomalies:
            with self._writer.as_default(step=int(a.step)):
                text = f"**{a.detector}** at `{a.layer}` ({a.tensor}), epoch {a.epoch}: {a.message}"
                if a.hint:
                    text += f"\n\nhint: {a.hint}"
                if a.replicas:
                    text += f" (replicas {', '.join(map(str, a.replicas))})"
                if a.snapshot:
                    text += f"\n\nsnapshot: `{a.snapshot}`"
                tf.summary.write("gradtrace/anomalies", tf.constant(text), metadata=self._meta["text"])
        self._writer.flush()

    def close(self):
        if not self.write:
            return
        self._writer.flush()
        self._writer.close()
