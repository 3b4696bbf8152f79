"""``embedding_out_of_range``: an id < 0 or >= input_dim reaching an Embedding layer."""

from __future__ import annotations

import numpy as np

from gradtrace.detectors.base import Detector
from gradtrace.stats import COL


class EmbeddingOutOfRange(Detector):
    """Fires at the exact step where an Embedding receives an id outside ``[0, input_dim)``.

    The ids are checked in-graph before the lookup and replaced by 0 for the
    lookup itself, so the step completes on every device: on CPU TensorFlow
    would abort it with an opaque ``GatherV2`` error, on GPU it would silently
    read a zero row, under XLA it would clamp, and ``-1`` would silently read
    the last row. Default action: halt (the step's update is not applied).

    Blame rule: the table that got the id (the ids are the data's, the size is the layer's: the
    message names both, with the batch position and the ``input_dim`` that would do).
    """

    name = "embedding_out_of_range"
    default_action = "halt"
    needs = ("bad", "bad_value", "bad_index")
    every_step = True
    wants_ids = True

    def check(self, view):
        mask = view.mask(kinds=("ids",))
        return mask & (view["bad"] > 0), view["bad_value"]

    def explain(self, rows, fired, values, matrix, table):
        for i in np.flatnonzero(fired):
            row = table.rows[i]
            st = matrix[i]
            bad_id = int(st[COL["bad_value"]])
            flat = int(st[COL["bad_index"]])
            yield row, float(bad_id), (
                f"{row.path} ({row.layer_class}) got id {bad_id}, outside [0, input_dim={row.input_dim}), "
                f"at {where_in_batch(flat, row.shape)}; {int(st[COL['bad']])} bad id(s) in this batch "
                f"(ids seen: min {int(st[COL['min']])}, max {int(st[COL['max']])}). "
                f"Raise input_dim to at least {max(bad_id + 1, row.input_dim)} or fix the id mapping."
            ), (f"Embedding(input_dim={max(bad_id + 1, row.input_dim)}, ...) in {row.path}, or map ids into "
                f"[0, {row.input_dim}) (ids that start at 1 need input_dim = largest id + 1)."
                if bad_id >= 0 else f"negative ids read the table from its end: map ids into [0, {row.input_dim}).")


def where_in_batch(flat, shape):
    """Where the ``flat``-th value of a batch of ``shape`` is, in words."""
    if len(shape) == 1:
        return f"batch example {flat}"
    inner = shape[1:] if len(shape) > 1 else ()
    if inner and all(isinstance(d, int) for d in inner):
        per = int(np.prod(inner))
        example, rest = divmod(flat, per)
        pos = np.unravel_index(rest, inner)
        return f"batch example {example}, position {tuple(int(p) for p in pos)}"
    return f"flat position {flat} of the batch's ids"
