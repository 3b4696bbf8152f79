"""Every Embedding table of a run at a glance: its size, the ids it saw, the rows it used, the rows that
never learned, and its effective rank. Read from what the embedding detectors already keep (nothing is
recomputed per step); the effective rank is measured when asked for, from the table's d x d Gram matrix."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from tabulate import tabulate


@dataclass
class TableInfo:
    path: str
    input_dim: int
    dim: int
    trainable: bool
    lookups: int | None = None  # this epoch, so far
    min_id: int | None = None
    max_id: int | None = None
    rows_used: int | None = None
    rows_never_learned: int | None = None
    effective_rank: float | None = None


def rank_of_gram(gram) -> float:
    """exp(entropy of the normalised singular values) of a table, from its d x d Gram matrix (Roy &
    Vetterli 2007): the singular values are the square roots of the Gram matrix's eigenvalues."""
    s = np.sqrt(np.clip(np.linalg.eigvalsh(np.asarray(gram, np.float64)), 0.0, None))
    if s.sum() <= 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def effective_rank(embeddings) -> float | None:
    """The effective rank of a table, from its d x d Gram matrix computed where the table lives (a large
    table is never copied to the host). None for a non-finite table."""
    table = tf.cast(embeddings, tf.float64)
    gram = tf.matmul(table, table, transpose_a=True).numpy()
    return rank_of_gram(gram) if np.all(np.isfinite(gram)) else None


def tables(run) -> list[TableInfo]:
    """One :class:`TableInfo` per Embedding layer of ``run``'s model, in path order."""
    layers = sorted(run.embedding_layers(), key=lambda t: t[0])
    by_name = {d.name: d for d in run.engine.detectors}
    seen = by_name["unused_embedding"].seen() if "unused_embedding" in by_name else {}
    used = by_name["unused_embedding"].used() if "unused_embedding" in by_name else {}
    moved = by_name["embedding_rows"].moved() if "embedding_rows" in by_name else {}
    out = []
    for path, layer in layers:
        n, d = (int(v) for v in layer.embeddings.shape)
        never = None
        if path in used and path in moved:  # looked up, never given a gradient (the padding row aside)
            stuck = used[path] & ~moved[path]
            if getattr(layer, "mask_zero", False):
                stuck[0] = False
            never = int(np.count_nonzero(stuck))
        info = TableInfo(path, n, d, bool(layer.trainable), rows_never_learned=never,
                         effective_rank=effective_rank(layer.embeddings))
        if path in seen:
            info.lookups, low, high, info.rows_used = seen[path]
            info.min_id, info.max_id = (low, high) if high >= 0 else (None, None)
        out.append(info)
    return out


def table_text(infos) -> str:
    def v(x, fmt="{}"):
        return "" if x is None else fmt.format(x)

    rows = [(t.path, f"{t.input_dim} x {t.dim}", "yes" if t.trainable else "no", v(t.lookups),
             f"{t.min_id}..{t.max_id}" if t.max_id is not None else "", v(t.rows_used), v(t.rows_never_learned),
             v(t.effective_rank, "{:.3g}") + (f" of {min(t.input_dim, t.dim)}" if t.effective_rank is not None else ""))
            for t in infos]
    return tabulate(rows, headers=["table", "input_dim x d", "trainable", "lookups", "ids seen", "rows used",
                                   "never learned", "effective rank"])


class LookupBatch:
    """Every Embedding lookup of one step laid end to end, so that a detector reduces all of them with one
    scatter and a few segment reductions per step instead of a dozen ops per lookup (a recommender has
    tens of tables). Made once per step and update, and shared by the detectors that read it
    (:meth:`gradtrace.stats.StatsView.lookup_batch`).

    ``items``: ``[(table path, input_dim, ids)]``, one per lookup (a table called twice has two). The
    distinct tables, in first-seen order, share one *row space*: table ``t``'s row ``r`` is
    ``offsets[t] + r``. Per id, in lookup order:

    - ``ids`` (int32, flattened), ``lookup`` (its lookup's index) and ``table`` (its table's index);
    - ``in_range``: ``0 <= id < input_dim``;
    - ``row``: its row in the row space (an id out of range is clipped into its own table).
    """

    def __init__(self, items):
        self.paths, self.dims = [], []
        table_of = []
        for path, dim, _ in items:
            if path not in self.paths:
                self.paths.append(path)
                self.dims.append(int(dim))
            table_of.append(self.paths.index(path))
        self.offsets = np.concatenate([[0], np.cumsum(self.dims)[:-1]]).astype(np.int64)
        self.total = int(sum(self.dims))
        self.key = tuple(zip(self.paths, self.dims))
        flats = [tf.reshape(tf.cast(ids, tf.int32), [-1]) for _, _, ids in items]
        sizes = [f.shape[0] for f in flats]
        if all(s is not None for s in sizes):  # static shapes: the per-id indices are constants
            self.lookup = tf.constant(np.repeat(np.arange(len(items), dtype=np.int32), sizes))
        else:
            self.lookup = tf.concat([tf.fill(tf.shape(f), j) for j, f in enumerate(flats)], 0)
        self.ids = flats[0] if len(flats) == 1 else tf.concat(flats, 0)
        self.table = tf.gather(tf.constant(table_of, tf.int32), self.lookup)
        dim = tf.gather(tf.constant(self.dims, tf.int32), self.table)
        self.in_range = (self.ids >= 0) & (self.ids < dim)
        index_dtype = tf.int64 if self.total >= 2 ** 31 else tf.int32
        self.row = (tf.cast(tf.clip_by_value(self.ids, 0, dim - 1), index_dtype)
                    + tf.gather(tf.constant(self.offsets, index_dtype), self.table))

    def padding(self, masked):
        """Per id: id 0 of a lookup whose table pads with it (``masked``: one bool per lookup, the layer's
        ``mask_zero``)."""
        if not any(masked):
            return tf.zeros_like(self.in_range)
        return tf.gather(tf.constant([bool(m) for m in masked]), self.lookup) & tf.equal(self.ids, 0)

    def per_table(self, values):
        """``{path: values[rows of that table]}`` of a host array over the row space."""
        return {p: values[o:o + d] for p, o, d in zip(self.paths, self.offsets, self.dims)}
