"""A bounded history of per-layer statistics over a whole run, for pictures of where a fault started.

Every traced step adds one value per (layer, quantity): the output-gradient norm, the weight-gradient
norm (all of a layer's weights together), the update ratio, the dead fraction (ReLU family), the
saturated fraction (sigmoid/tanh), the output mean and standard deviation. Steps are kept in
*buckets* of adjacent steps, each holding the exact minimum, maximum and mean of its steps; when the
buckets pass ``max_buckets``, adjacent pairs merge and every bucket covers twice as many steps. A run
of a million steps and one of a thousand both fit in ``keys x max_buckets`` numbers (a few MB).

The compiled step writes its statistics into a small buffer on the device; the host drains it every
``BUFFER`` traced steps and at each epoch's end, so keeping the history adds no transfer per step.
Only statistics the step computed anyway are kept: a quantity no detector asked for (the standard
deviation, the update ratio, unless configured) is NaN, not measured at extra cost.
"""

from __future__ import annotations

import json
import os

import numpy as np

from gradtrace.stats import SATURATION_LIMITS

# The quantities kept, by the kind of row they come from and the statistic column they read.
QUANTITIES = {
    "gradient_norm": ("gradient", "norm"),  # the layer's output gradient
    "weight_gradient_norm": ("weight_gradient", "norm"),  # all of the layer's weights together
    "update_ratio": ("weight_gradient", "update_ratio"),
    "dead_fraction": ("output", "dead_frac"),
    "saturated_fraction": ("output", "saturated"),
    "output_mean": ("output", "mean"),
    "output_std": ("output", "std"),
}
COLUMNS = ("norm", "update_ratio", "dead_frac", "saturated", "mean", "std")  # the columns the buffer holds
BUFFER = 32  # traced steps between two drains of the device buffer


class LayerHistory:
    """Per-(layer, quantity) minimum, maximum and mean over buckets of adjacent traced steps."""

    def __init__(self, max_buckets=512):
        if max_buckets < 2 or max_buckets % 2:
            raise ValueError(f"max_buckets={max_buckets!r} must be an even integer >= 2.")
        self.max_buckets = int(max_buckets)
        self.width = 1  # steps per bucket (doubles at every merge)
        self.keys: list = []  # (layer path, quantity), in the order first seen (execution order)
        self._index: dict = {}
        self.steps = np.zeros((0, 2), np.int64)  # per bucket: first and last step
        self.epochs = np.zeros((0, 2), np.int64)
        self.count = np.zeros(0, np.int64)  # steps in each bucket
        self.min = np.zeros((0, 0))
        self.max = np.zeros((0, 0))
        self.sum = np.zeros((0, 0))
        self.n = np.zeros((0, 0), np.int64)  # finite values per bucket and key

    # -- adding -------------------------------------------------------------------------------
    def _key(self, key):
        i = self._index.get(key)
        if i is None:
            i = self._index[key] = len(self.keys)
            self.keys.append(key)
            pad = lambda a, v: np.concatenate([a, np.full((a.shape[0], 1), v, a.dtype)], axis=1)  # noqa: E731
            self.min, self.max = pad(self.min, np.inf), pad(self.max, -np.inf)
            self.sum, self.n = pad(self.sum, 0.0), pad(self.n, 0)
        return i

    def add(self, step, epoch, values):
        """One traced step: ``values`` maps ``(layer path, quantity)`` to a float (NaN: not measured)."""
        self.add_steps([step], epoch, list(values), np.array([list(values.values())], np.float64))

    def add_steps(self, steps, epoch, keys, values):
        """Traced steps in order: ``values[i, j]`` is step ``steps[i]``'s value of ``keys[j]``."""
        cols = np.asarray([self._key(k) for k in keys], np.int64)
        for step, v in zip(steps, np.asarray(values, np.float64)):
            self._add(int(step), epoch, cols, v)

    def _add(self, step, epoch, cols, v):
        if not len(self.count) or self.count[-1] >= self.width:
            self._new_bucket(step, epoch)
        b = len(self.count) - 1
        self.steps[b, 1], self.epochs[b, 1] = step, epoch
        self.count[b] += 1
        ok = np.isfinite(v)
        c = cols[ok]
        self.min[b, c] = np.minimum(self.min[b, c], v[ok])
        self.max[b, c] = np.maximum(self.max[b, c], v[ok])
        self.sum[b, c] += v[ok]
        self.n[b, c] += 1
        if len(self.count) > self.max_buckets:
            self._merge()

    def _new_bucket(self, step, epoch):
        k = len(self.keys)
        self.steps = np.concatenate([self.steps, [[step, step]]])
        self.epochs = np.concatenate([self.epochs, [[epoch, epoch]]])
        self.count = np.concatenate([self.count, [0]])
        self.min = np.concatenate([self.min, np.full((1, k), np.inf)])
        self.max = np.concatenate([self.max, np.full((1, k), -np.inf)])
        self.sum = np.concatenate([self.sum, np.zeros((1, k))])
        self.n = np.concatenate([self.n, np.zeros((1, k), np.int64)])

    def _merge(self):
        """Merge adjacent pairs of buckets (a last odd bucket stays as it is)."""
        m = len(self.count) // 2 * 2
        tail = slice(m, None)

        def pairs(a, how):
            merged = how(a[:m:2], a[1:m:2])
            return np.concatenate([merged, a[tail]])

        self.steps = np.concatenate([np.stack([self.steps[:m:2, 0], self.steps[1:m:2, 1]], 1), self.steps[tail]])
        self.epochs = np.concatenate([np.stack([self.epochs[:m:2, 0], self.epochs[1:m:2, 1]], 1),
                                      self.epochs[tail]])
        self.count = pairs(self.count, np.add)
        self.min, self.max = pairs(self.min, np.minimum), pairs(self.max, np.maximum)
        self.sum, self.n = pairs(self.sum, np.add), pairs(self.n, np.add)
        self.width *= 2

    # -- reading ------------------------------------------------------------------------------
    def layers(self, quantity):
        """The layer paths that have ``quantity``, in the order first seen (execution order)."""
        return [p for p, q in self.keys if q == quantity]

    def series(self, quantity, stat="mean"):
        """``(paths, [buckets, paths] array)`` of ``stat`` (``mean``, ``min``, ``max``); NaN where unmeasured."""
        paths = self.layers(quantity)
        idx = [self._index[(p, quantity)] for p in paths]
        with np.errstate(invalid="ignore", divide="ignore"):
            if stat == "mean":
                out = self.sum[:, idx] / self.n[:, idx]
            else:
                out = (self.min if stat == "min" else self.max)[:, idx].astype(np.float64)
        out = np.where(self.n[:, idx] > 0, out, np.nan)
        return paths, out

    @property
    def nbytes(self):
        return sum(a.nbytes for a in (self.steps, self.epochs, self.count, self.min, self.max, self.sum, self.n))

    # -- saving ---------------------------------------------------------------------------------
    def save(self, path):
        """``path.npz`` (the arrays) and ``path.json`` (the keys, the bucket width): no pickle."""
        np.savez_compressed(f"{path}.npz", steps=self.steps, epochs=self.epochs, count=self.count, min=self.min,
                            max=self.max, sum=self.sum, n=self.n)
        with open(f"{path}.json", "w") as f:
            json.dump({"keys": [list(k) for k in self.keys], "width": self.width,
                       "max_buckets": self.max_buckets}, f)

    @classmethod
    def load(cls, path):
        path = path[:-5] if path.endswith(".json") else path[:-4] if path.endswith(".npz") else path
        if not (os.path.exists(f"{path}.json") and os.path.exists(f"{path}.npz")):
            raise FileNotFoundError(f"no saved history at {path!r}: expected {path}.json and {path}.npz "
                                    "(written by gradtrace.save_report or LayerHistory.save).")
        with open(f"{path}.json") as f:
            meta = json.load(f)
        h = cls(meta["max_buckets"])
        h.width = meta["width"]
        h.keys = [tuple(k) for k in meta["keys"]]
        h._index = {k: i for i, k in enumerate(h.keys)}
        with np.load(f"{path}.npz", allow_pickle=False) as z:
            for name in ("steps", "epochs", "count", "min", "max", "sum", "n"):
                setattr(h, name, z[name])
        return h


class StepValues:
    """How one table's buffered columns become ``(layer path, quantity)`` values: worked out once per
    table, then applied to many traced steps at once with NumPy (a drain of the device buffer)."""

    def __init__(self, table, columns):
        from gradtrace.graph import base_path

        col = {c: i for i, c in enumerate(COLUMNS)}
        self.keys: list = []
        index = {}
        single, norms, ratios = [], {}, {}

        def key(k):
            if k not in index:
                index[k] = len(self.keys)
                self.keys.append(k)
            return index[k]

        def measured(name):
            return columns is None or name in columns

        for r in table.rows:
            if r.kind == "gradient":
                single.append((key((base_path(r.path), "gradient_norm")), r.index, col["norm"], measured("norm")))
            elif r.kind == "weight_gradient":
                # every weight of the layer together: the norm of their norms; the update ratio: the largest
                norms.setdefault(r.path, []).append(r.index)
                ratios.setdefault(key((r.path, "update_ratio")), []).append(r.index)
            elif r.kind == "output":
                path = base_path(r.path)
                if r.relu:
                    single.append((key((path, "dead_fraction")), r.index, col["dead_frac"], measured("dead_frac")))
                if r.activation in SATURATION_LIMITS:
                    single.append((key((path, "saturated_fraction")), r.index, col["saturated"],
                                   measured("saturated")))
                single.append((key((path, "output_mean")), r.index, col["mean"], measured("mean")))
                single.append((key((path, "output_std")), r.index, col["std"], measured("std")))
        self._single = single
        self._ratios = [(j, rows) for j, rows in ratios.items()] if measured("update_ratio") else []
        self._norms = [(key((path, "weight_gradient_norm")), rows) for path, rows in norms.items()] \
            if measured("norm") else []
        self._col = col

    def __call__(self, block):
        """``[steps, rows, len(COLUMNS)]`` buffered statistics -> ``[steps, len(keys)]`` values (NaN: not
        measured)."""
        block = np.asarray(block, np.float64)
        out = np.full((block.shape[0], len(self.keys)), np.nan)
        for j, row, c, measured in self._single:
            if measured:
                out[:, j] = block[:, row, c]
        for j, rows in self._norms:
            out[:, j] = np.sqrt(np.sum(np.square(block[:, rows, self._col["norm"]]), axis=1))
        for j, rows in self._ratios:
            out[:, j] = np.fmax.reduce(block[:, rows, self._col["update_ratio"]], axis=1)
        return out


class DeviceBuffer:
    """The device side of the history: a ring of the last ``BUFFER`` traced steps' columns (``[BUFFER, rows,
    len(COLUMNS)]``), their steps, and how many were ever written; a compiled step writes it in-graph."""

    def __init__(self, rows):
        import tensorflow as tf

        from gradtrace import _keras_compat as compat

        self.values = compat.plain_variable(lambda: tf.zeros([BUFFER, rows, len(COLUMNS)], tf.float32),
                                            name="gradtrace_hist")
        self.steps = compat.plain_variable(lambda: tf.zeros([BUFFER], tf.int64), name="gradtrace_hsteps")
        self.count = compat.plain_variable(lambda: tf.zeros([], tf.int64), name="gradtrace_hcount")

    def write(self, columns, step):
        """In-graph: one traced step's ``[rows, len(COLUMNS)]`` into the next slot of the ring."""
        import tensorflow as tf

        slot = tf.math.floormod(self.count, BUFFER)
        self.values.scatter_nd_update([[slot]], [columns])
        self.steps.scatter_nd_update([[slot]], [tf.cast(step, tf.int64)])
        self.count.assign_add(1)

    def written(self) -> int:
        return int(self.count.numpy())

    def read(self, since):
        """Host side: ``(count, steps, values)`` of the steps written after the first ``since`` (at most
        ``BUFFER``: older ones were overwritten), in the order they were written."""
        count = self.written()
        new = min(count - since, BUFFER)
        if new <= 0:
            return count, None, None
        slots = [k % BUFFER for k in range(count - new, count)]
        return count, self.steps.numpy()[slots], self.values.numpy()[slots]


class Drain:
    """Moves the traced steps the device buffers hold into a :class:`LayerHistory` (every ``BUFFER``
    traced steps and at each epoch's end: one read of a few small variables, not one per step)."""

    def __init__(self, history, variants):
        self.history = history
        self._drained = {}  # (plan, segment index) -> traced steps already taken from its buffer
        self._step_values = {}  # (table, columns) -> StepValues: how its buffer becomes history values
        self.since = 0  # traced steps run since the last drain
        for key, segment in self._segments(variants):  # a compiled step kept from an earlier fit: its
            self._drained[key] = segment.record().hist.written()  # buffer holds that fit's steps

    @staticmethod
    def _segments(variants):
        for plan, variant in list(variants.items()):
            if plan.mode != "train" or not plan.traced:
                continue
            for segment in variant.segments:
                if segment.record() is not None and segment.table is not None:
                    yield (plan, segment.index), segment

    def counted(self, steps):
        """``steps`` more traced steps ran; True when the buffers should be drained now."""
        self.since += steps
        return self.since >= BUFFER

    def __call__(self, variants, epoch):
        self.since = 0
        blocks = []  # (steps, keys, values[steps, keys]) of each update's buffer
        for key, segment in self._segments(variants):
            count, steps, hist = segment.record().hist.read(self._drained.get(key, 0))
            self._drained[key] = count
            if steps is None:
                continue
            cache = (id(segment.table), None if segment.columns is None else frozenset(segment.columns))
            if cache not in self._step_values:
                self._step_values[cache] = StepValues(segment.table, segment.columns)
            values = self._step_values[cache]
            blocks.append((steps, values.keys, values(hist)))
        if len(blocks) == 1:
            steps, keys, values = blocks[0]
            order = np.argsort(steps, kind="stable")
            self.history.add_steps(steps[order], epoch, keys, values[order])
        elif blocks:  # several updates or variants: one row per step, their values side by side
            keys = list(dict.fromkeys(k for _, ks, _ in blocks for k in ks))
            col = {k: j for j, k in enumerate(keys)}
            steps = np.unique(np.concatenate([b[0] for b in blocks]))
            merged = np.full((len(steps), len(keys)), np.nan)
            for b_steps, b_keys, b_values in blocks:
                rows = np.searchsorted(steps, b_steps)
                cols = [col[k] for k in b_keys]
                merged[np.ix_(rows, cols)] = b_values
            self.history.add_steps(steps, epoch, keys, merged)


def data_prefix(path):
    """``report.html``, ``report.data.json``, ``report.data`` ... -> ``report.data`` (where
    :func:`gradtrace.save_report` keeps the run as data)."""
    path = os.fspath(path)
    if path.endswith(".data"):
        return path
    for ext in (".html", ".htm", ".data.meta.json", ".data.json", ".data.npz", ".json"):
        if path.endswith(ext):
            path = path[: -len(ext)]
            break
    return path + ".data"


class SavedAnomaly:
    """An anomaly as a saved report holds it (its fields, read back from JSON)."""

    def __init__(self, detector, layer, step, epoch, message="", hint="", verified=None, verification="", **_):
        self.detector, self.layer, self.step, self.epoch = detector, layer, step, epoch
        self.message, self.hint = message, hint
        self.verified, self.verification = verified, verification


class SavedRun:
    """A run saved by :func:`gradtrace.save_report`, as :func:`gradtrace.plot` and the report read it."""

    def __init__(self, path):
        prefix = data_prefix(path)
        if not os.path.exists(prefix + ".meta.json"):
            raise FileNotFoundError(f"no saved report data at {prefix!r}: expected {prefix}.meta.json, .json and "
                                    ".npz (written by gradtrace.save_report).")
        with open(prefix + ".meta.json") as f:
            self.meta = json.load(f)
        self.history = LayerHistory.load(prefix)
        self.anomalies = [SavedAnomaly(**a) for a in self.meta["anomalies"]]
        self.model = type("SavedModel", (), {"name": self.meta["model"]})

    def drain_history(self):
        """Nothing to drain: the history was saved whole."""
