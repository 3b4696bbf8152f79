"""Per-tensor statistics, computed in-graph and packed into one small tensor.

Every captured tensor of a step becomes one *row* of a ``[rows, columns]``
float32 matrix; that matrix is the only thing that leaves the graph. Rows are
described on the host by :class:`Row` (built once, at trace time), so a
detector can select rows by kind or layer without any per-step Python work.

Statistics of a float tensor ``t`` with ``n`` elements:

- ``mean = sum(t) / n``, ``std = sqrt(sum((t - mean)**2) / n)`` (two passes,
  so a large mean does not swallow a small spread),
- ``min``, ``max``, ``norm = sqrt(sum(t*t))``,
- ``nan``, ``inf``: counts. They are only computed when some row's sum or
  sum of squares is not finite (one ``tf.cond`` per step), otherwise 0,
- ``zero_frac``: share of elements exactly 0,
- ``dead_frac`` (ReLU-family outputs): share of units (last axis) that are 0
  for every example and position in the batch,
- ``update_ratio`` (weight gradients): ``lr * |g| / |w|``,
- ``saturated`` (sigmoid/tanh outputs): share of elements within 1% of the
  activation's limits,
- for Embedding ids (rows of kind ``ids``, taken before the lookup): ``min``,
  ``max``, ``size``, ``bad`` (ids < 0 or >= input_dim), ``bad_value`` and
  ``bad_index`` (flat position) of the first bad id.

Embedding gradients arrive as ``tf.IndexedSlices``: their statistics are over
the looked-up slices (one per lookup, never the densified table), and the
weight norm used in the update ratio is that of the looked-up rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

COLUMNS = (
    "mean",
    "std",
    "min",
    "max",
    "norm",
    "nan",
    "inf",
    "zero_frac",
    "dead_frac",
    "update_ratio",
    "size",
    "bad",
    "bad_value",
    "bad_index",
    "saturated",
)
COL = {name: i for i, name in enumerate(COLUMNS)}

KINDS = ("input", "target", "output", "gradient", "weight", "weight_gradient", "loss", "ids")
FORWARD_KINDS = ("output",)
BACKWARD_KINDS = ("gradient", "weight_gradient")


@dataclass(frozen=True)
class Row:
    """Host-side description of one row of the statistics matrix."""

    index: int
    kind: str  # one of KINDS
    path: str  # layer path, or "inputs" / "targets" / "loss"
    layer_class: str = ""
    shape: tuple = ()
    relu: bool = False
    activation: str = ""
    order: int = 0  # execution order of the layer call (forward)
    name: str = ""  # variable name for weight rows, input name for data rows
    input_dim: int = 0  # Embedding ids rows


class Table:
    """The rows of one compiled step variant, with boolean masks for detectors."""

    def __init__(self, rows):
        self.rows = list(rows)
        self._masks: dict = {}

    def __len__(self):
        return len(self.rows)

    def mask(self, kinds=None, relu=None, predicate=None) -> np.ndarray:
        key = (tuple(kinds) if kinds else None, relu, predicate)
        if predicate is None and key in self._masks:
            return self._masks[key]
        m = np.array(
            [
                (kinds is None or r.kind in kinds)
                and (relu is None or r.relu == relu)
                and (predicate is None or predicate(r))
                for r in self.rows
            ],
            dtype=bool,
        )
        if predicate is None:
            self._masks[key] = m
        return m

    def index(self, kind, path):
        for r in self.rows:
            if r.kind == kind and r.path == path:
                return r.index
        return None


class StatsView:
    """What a detector's in-graph check sees: columns of the packed matrix, by name."""

    def __init__(self, table: Table, matrix, step, ids=None):
        self.table = table
        self.matrix = matrix
        self.step = step
        # row index of each ``ids`` row -> the int ids tensor (before the lookup)
        self.ids = ids or {}

    def __getitem__(self, name):
        return self.matrix[:, COL[name]]

    def mask(self, **kw):
        return tf.constant(self.table.mask(**kw))


SATURATION_LIMITS = {"sigmoid": (0.0, 1.0), "hard_sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0)}


def _f32(t):
    return tf.cast(t, tf.float32)


def float_stats(t, relu=False, activation=""):
    """Statistics of one dense float tensor, as a dict of float32 scalars."""
    t = _f32(t)
    n = tf.cast(tf.size(t), tf.float32)
    safe_n = tf.maximum(n, 1.0)
    s = tf.reduce_sum(t)
    ss = tf.reduce_sum(tf.square(t))
    nonempty = n > 0
    mn = tf.where(nonempty, tf.reduce_min(t), 0.0)
    mx = tf.where(nonempty, tf.reduce_max(t), 0.0)
    mean = s / safe_n
    # two passes: the one-pass E[t^2] - mean^2 loses all precision when |mean| >> std
    var = tf.reduce_sum(tf.square(t - mean)) / safe_n
    zeros = tf.reduce_sum(tf.cast(tf.equal(t, 0.0), tf.float32))
    out = {
        "mean": mean,
        "std": tf.sqrt(var),
        "min": mn,
        "max": mx,
        "norm": tf.sqrt(ss),
        "zero_frac": zeros / safe_n,
        "size": n,
        "_s": s,
        "_ss": ss,
    }
    if relu and t.shape.rank is not None and t.shape.rank >= 2:
        axes = list(range(t.shape.rank - 1))
        unit_max = tf.reduce_max(tf.abs(t), axis=axes)
        dead = tf.reduce_sum(tf.cast(tf.equal(unit_max, 0.0), tf.float32))
        out["dead_frac"] = dead / tf.maximum(tf.cast(tf.size(unit_max), tf.float32), 1.0)
    if activation in SATURATION_LIMITS:
        low, high = SATURATION_LIMITS[activation]
        margin = 0.01 * (high - low)
        pinned = tf.logical_or(t <= low + margin, t >= high - margin)
        out["saturated"] = tf.reduce_sum(tf.cast(pinned, tf.float32)) / safe_n
    return out


def ids_stats(ids, input_dim):
    """Range statistics of Embedding ids, taken before the lookup."""
    flat = tf.reshape(tf.cast(ids, tf.int64), [-1])
    n = tf.size(flat)
    nonempty = n > 0
    bad = tf.logical_or(flat < 0, flat >= input_dim)
    any_bad = tf.reduce_any(bad)
    # a sentinel keeps argmax and gather defined for zero ids (length-0 sequences)
    first = tf.cast(tf.argmax(tf.cast(tf.concat([bad, [True]], 0), tf.int32)), tf.int32)
    bad_value = tf.where(any_bad, tf.gather(tf.concat([flat, [0]], 0), first), 0)
    return {
        "min": tf.where(nonempty, _f32(tf.reduce_min(flat)), 0.0),
        "max": tf.where(nonempty, _f32(tf.reduce_max(flat)), 0.0),
        "size": _f32(n),
        "bad": tf.reduce_sum(_f32(bad)),
        "bad_value": _f32(bad_value),
        "bad_index": tf.where(any_bad, _f32(first), -1.0),
    }


def nonfinite_counts(t):
    t = _f32(t)
    return (
        tf.reduce_sum(tf.cast(tf.math.is_nan(t), tf.float32)),
        tf.reduce_sum(tf.cast(tf.math.is_inf(t), tf.float32)),
    )


def pack(entries):
    """Pack ``[(stats_dict, tensor_for_counts_or_None)]`` into a ``[rows, columns]`` matrix.

    NaN/Inf counts are computed in one ``tf.cond``: only when some row's sum or
    sum of squares is not finite, which is the rare faulty step.
    """
    zero = tf.constant(0.0)
    cols = {c: [] for c in COLUMNS}
    sums = []
    for st, _ in entries:
        for c in COLUMNS:
            cols[c].append(st.get(c, zero))
        sums.append(st.get("_s", zero))
        sums.append(st.get("_ss", zero))
    if not entries:
        return tf.zeros([0, len(COLUMNS)], tf.float32)
    all_finite = tf.reduce_all(tf.math.is_finite(tf.stack(sums)))
    counted = [t for _, t in entries]

    def no_counts():
        z = tf.zeros([len(entries)], tf.float32)
        return z, z

    def counts():
        nans, infs = [], []
        for t in counted:
            if t is None:
                nans.append(zero)
                infs.append(zero)
            else:
                a, b = nonfinite_counts(t)
                nans.append(a)
                infs.append(b)
        return tf.stack(nans), tf.stack(infs)

    nan, inf = tf.cond(all_finite, no_counts, counts)
    columns = []
    for c in COLUMNS:
        if c == "nan":
            columns.append(nan)
        elif c == "inf":
            columns.append(inf)
        else:
            columns.append(tf.stack(cols[c]))
    return tf.stack(columns, axis=1)


def row_dict(matrix_row) -> dict:
    """One packed row (NumPy) as ``{column: float}``."""
    return {c: float(matrix_row[i]) for i, c in enumerate(COLUMNS)}
