"""``embedding_twins`` and ``embedding_collapse``: whole-table checks of Embedding layers at epoch end."""

from __future__ import annotations

import numpy as np

from gradtrace import embeddings
from gradtrace.detectors.base import Detector


def _tables(ctx):
    """``[(path, layer)]`` for every Embedding layer of the run's model, in path order. The tables stay
    where they are: the checks below reduce them in TensorFlow and bring back only small results (a
    table of a million rows is never copied to the host)."""
    return sorted(ctx.embedding_layers(), key=lambda t: t[0])


class EmbeddingTwins(Detector):
    """At each epoch's end, fires for two different Embedding tables of the same shape that hold exactly
    the same values, when at least one of them is trainable: after an epoch of training, two tables that
    are fed different ids get different gradients and part. Equal tables mean a shared or copied
    initialiser that training never moved, or the same data wired into both by mistake. One shared
    layer used twice is one table and is never compared with itself; two frozen copies of one
    pretrained matrix are left alone.

    Blame rule: the second table in path order (the likely copy), naming the first.
    """

    name = "embedding_twins"
    default_action = "warn"
    needs = ()
    reports_at = ("epoch_end",)

    def epoch_end(self, ctx):
        import tensorflow as tf

        tables = _tables(ctx)
        # a cheap fingerprint first (sum and sum of squares), full equality only where they agree
        prints = {path: tuple(float(v) for v in (tf.reduce_sum(layer.embeddings), tf.reduce_sum(
            tf.square(layer.embeddings)))) for path, layer in tables}
        reported = set()
        for i, (path_a, layer_a) in enumerate(tables):
            a = layer_a.embeddings
            for path_b, layer_b in tables[i + 1:]:
                b = layer_b.embeddings
                if path_b in reported or a is b or tuple(a.shape) != tuple(b.shape) or prints[path_a] != prints[path_b]:
                    continue
                if not (layer_a.trainable or layer_b.trainable) or not bool(tf.reduce_all(tf.equal(a, b))):
                    continue
                reported.add(path_b)
                n, d = a.shape
                yield path_b, "weight", 0.0, (
                    f"{path_b} (Embedding {n}x{d}) holds exactly the same values as {path_a} "
                    "after this epoch: two tables that should learn different things do not differ."
                ), (f"give {path_b} its own initialiser (no shared seed or copied weights), and check that it is "
                    "fed its own ids; to share one table on purpose, call the same Embedding layer twice.")


class EmbeddingCollapse(Detector):
    """Every ``every`` steps (default 1000) and at each epoch's end, the effective rank of each trainable
    Embedding table (Roy & Vetterli 2007: exp of the entropy of its normalised singular values) from its
    d x d Gram matrix: O(rows * d^2) on the device, then O(d^3), never per step. Guo et al. (ICML 2024)
    measure this "embedding collapse" in recommenders: the model learns, but the table is no better
    than a narrower one. It fires when the effective rank is below ``min_rank_fraction`` (default 0.1)
    of ``min(rows, d)``, or has fallen at each of the last ``falling`` (default 3) checks, by more than
    ``max_drop`` (default 0.5) of its first value. A random initialisation has an effective rank near
    ``min(rows, d)``; measured on the healthy embedding models of the test suite (two-table recommenders,
    a token + position text model, hashed ids, a shared table): never below 0.6 of it. Tables narrower
    than ``min_dim`` (default 8) are left alone.

    Blame rule: the collapsed table itself.
    """

    name = "embedding_collapse"
    default_action = "warn"
    needs = ()
    reports_at = ("epoch_end", "periodic")

    def __init__(self, min_rank_fraction=0.1, falling=3, max_drop=0.5, every=1000, min_dim=8, action=None):
        super().__init__(action)
        self.min_rank_fraction = self.check_range("min_rank_fraction", min_rank_fraction, 0.0, 1.0, low_open=True)
        self.falling = self.check_int("falling", falling, 2)
        self.max_drop = self.check_range("max_drop", max_drop, 0.0, 1.0, low_open=True, high_open=True)
        self.every = None if every is None else self.check_int("every", every, 1)
        self.min_dim = self.check_int("min_dim", min_dim, 2)
        self.history = {}  # table path -> [(step, effective rank)]
        self._reported = set()

    def reset(self):
        super().reset()
        self.history, self._reported = {}, set()

    @staticmethod
    def effective_rank(table=None, gram=None):
        """exp(entropy of the normalised singular values), from the table or its d x d Gram matrix."""
        if gram is None:
            table = np.asarray(table, np.float64)
            gram = table.T @ table
        return embeddings.rank_of_gram(gram)

    def ranks(self, ctx):
        """``{path: (effective rank, min(rows, d))}`` of the trainable, finite tables, measured now (a
        table with NaN/Inf in it is the nan detector's finding, not a rank)."""
        out = {}
        for path, layer in _tables(ctx):
            n, d = layer.embeddings.shape
            if d < self.min_dim or not layer.trainable:
                continue
            erank = embeddings.effective_rank(layer.embeddings)
            if erank is not None:
                out[path] = (erank, min(n, d))
        return out

    def epoch_end(self, ctx):
        return self._check(ctx)

    def periodic(self, ctx):
        return self._check(ctx)

    def _check(self, ctx):
        step = ctx.current_step()
        for path, (erank, width) in self.ranks(ctx).items():
            hist = self.history.setdefault(path, [])
            if hist and hist[-1][0] == step:
                continue
            hist.append((step, erank))
            if path in self._reported:
                continue
            trend = [r for _, r in hist[-(self.falling + 1):]]
            falling = (len(trend) == self.falling + 1 and all(b < a for a, b in zip(trend, trend[1:]))
                       and erank < (1.0 - self.max_drop) * hist[0][1])
            low = erank < self.min_rank_fraction * width
            if not (low or falling):
                continue
            self._reported.add(path)
            n, d = _shape(ctx, path)
            how = (f"below {self.min_rank_fraction:.0%} of min(rows, d)={width}" if low else
                   f"falling at each of the last {self.falling} checks, from {hist[0][1]:.3g} at step {hist[0][0]}")
            yield path, "weight", erank, (
                f"{path} (Embedding {n}x{d}): its rows span about {erank:.3g} of its {d} dimensions "
                f"(effective rank, {how}): the table is collapsing."
            ), (f"lower the learning rate or add weight decay on {path}; check for an interaction (a dot "
                "product with a collapsed table) that pulls every row the same way.")


def _shape(ctx, path):
    for p, layer in _tables(ctx):
        if p == path:
            return tuple(layer.embeddings.shape)
    return ("?", "?")
