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
