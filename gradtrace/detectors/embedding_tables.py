"""``embedding_twins`` and ``embedding_collapse``: whole-table checks of Embedding layers at epoch end."""

from __future__ import annotations

import numpy as np

from gradtrace.detectors.base import Detector


def _tables(ctx):
    """``[(path, layer, table as float64 numpy)]`` for every Embedding layer of the run's model."""
    import keras

    tap = ctx.engine.tap
    out = []
    for lid, layer in tap.layers.items():
        if isinstance(layer, keras.layers.Embedding):
            out.append((tap.paths.get(lid, layer.name), layer, np.asarray(layer.embeddings.numpy(), np.float64)))
    return sorted(out, key=lambda t: t[0])


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

    def check(self, view):
        import tensorflow as tf

        n = len(view.table)
        return tf.zeros([n], tf.bool), tf.zeros([n])

    def epoch_end(self, ctx):
        tables = _tables(ctx)
        reported = set()
        for i, (path_a, layer_a, a) in enumerate(tables):
            for path_b, layer_b, b in tables[i + 1:]:
                if path_b in reported or a.shape != b.shape or layer_a.embeddings is layer_b.embeddings:
                    continue
                if not (layer_a.trainable or layer_b.trainable) or not np.array_equal(a, b):
                    continue
                reported.add(path_b)
                yield path_b, "weight", 0.0, (
                    f"{path_b} (Embedding {a.shape[0]}x{a.shape[1]}) holds exactly the same values as {path_a} "
                    "after this epoch: two tables that should learn different things do not differ."
                ), (f"give {path_b} its own initialiser (no shared seed or copied weights), and check that it is "
                    "fed its own ids; to share one table on purpose, call the same Embedding layer twice.")


class EmbeddingCollapse(Detector):
    """At each epoch's end, fires for an Embedding table whose rows span only a few of its dimensions: its
    effective rank (Roy & Vetterli 2007: exp of the entropy of the normalised singular values) is below
    ``min_rank_fraction`` (default 0.1) of its width, with at least ``min_dim`` (default 8) dimensions.
    Guo et al. (ICML 2024) measure this "embedding collapse" in recommenders: the model learns, but
    the table is no better than a narrower one. A random initialisation has an effective rank near its
    width. Off by default (``detectors=[..., "embedding_collapse"]``): how low is too low depends on
    the model, and the default has not been measured on a corpus of healthy models.

    Computed from the d x d Gram matrix of the table (one pass over it, on the host, at epoch end).
    Blame rule: the collapsed table itself.
    """

    name = "embedding_collapse"
    default_action = "warn"
    needs = ()
    reports_at = ("epoch_end",)

    def __init__(self, min_rank_fraction=0.1, min_dim=8, action=None):
        super().__init__(action)
        self.min_rank_fraction = self._check_range("min_rank_fraction", min_rank_fraction, 0.0, 1.0, low_open=True)
        self.min_dim = self._check_int("min_dim", min_dim, 2)

    def check(self, view):
        import tensorflow as tf

        n = len(view.table)
        return tf.zeros([n], tf.bool), tf.zeros([n])

    @staticmethod
    def effective_rank(table):
        gram = table.T @ table
        s = np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0.0, None))
        if s.sum() <= 0:
            return 0.0
        p = s / s.sum()
        p = p[p > 0]
        return float(np.exp(-(p * np.log(p)).sum()))

    def epoch_end(self, ctx):
        for path, layer, table in _tables(ctx):
            d = table.shape[1]
            if d < self.min_dim or not layer.trainable:
                continue
            erank = self.effective_rank(table)
            if erank < self.min_rank_fraction * d:
                yield path, "weight", erank, (
                    f"{path} (Embedding {table.shape[0]}x{d}): its rows span about {erank:.2g} of its {d} "
                    f"dimensions (effective rank; below {self.min_rank_fraction:.0%} of its width): the table has "
                    "collapsed."
                ), (f"lower the learning rate or add weight decay on {path}; check for an interaction (a dot "
                    "product with a collapsed table) that pulls every row the same way.")
