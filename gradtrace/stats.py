"""Per-tensor statistics, computed in-graph and packed into one small tensor.

Every captured tensor of a step becomes one *row* of a ``[rows, columns]``
float32 matrix; that matrix is the only thing that leaves the graph. Rows are
described on the host by :class:`Row` (built once, at trace time), so a
detector can select rows by kind or layer without any per-step Python work.

Statistics of a float tensor ``t`` with ``n`` elements:

- ``mean = sum(t) / n``, ``std = sqrt(sum((t - mean)**2) / n)`` (two passes,
  so a large mean does not swallow a small spread),
- ``min``, ``max``, ``norm = sqrt(sum(t*t))``,
- ``nan``, ``inf``: exact counts when every statistic is computed (a
  reported step, a TensorBoard summary step, replay); otherwise 0/1 flags
  read off the row's sum, which is non-finite whenever the tensor holds a
  NaN or an Inf (see :class:`Collector`),
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

KINDS = ("input", "target", "output", "gradient", "weight", "weight_gradient", "loss", "ids", "labels")


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
    head: bool = False  # an output row that is (part of) the model's prediction y_pred
    loss_kind: str = ""  # the loss row: "binary_crossentropy", "categorical_crossentropy", ..., "regression"
    from_logits: bool = False  # the loss row: the crossentropy takes logits


class Table:
    """The rows of one compiled step variant, with boolean masks for detectors."""

    def __init__(self, rows, graph=None, optimizer=None):
        self.rows = list(rows)
        self._masks: dict = {}
        # which layer feeds which (gradtrace.graph.LayerGraph), read from the traced step's graph;
        # None (a step run eagerly, a table written by hand): execution order stands in
        self.graph = graph
        self.optimizer = optimizer  # the optimizer whose update the rows are about (host side: its learning rate)
        # row index -> the row whose tensor holds the same values, whose statistics it reuses (a Flatten's
        # output and its input, a nested model's output and its last layer's); see stats.value_sources
        self.derived: dict = {}

    def feeds(self, path, other) -> bool:
        """True when ``other`` lies on ``path``'s way to the loss (``other`` is above ``path``)."""
        if self.graph is not None:
            return self.graph.feeds(path, other)
        order = {}
        for r in self.rows:
            order.setdefault(r.path, r.order)
        return path in order and other in order and order[other] > order[path]

    def nearness(self, row):
        """Sort key of backward order: smaller is nearer the loss (graph distance, else reversed
        execution order)."""
        depth = self.graph.depth(row.path) if self.graph is not None else None
        return (0, depth, -row.order) if depth is not None else (1, 0, -row.order)

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


@dataclass
class Lookup:
    """One Embedding call of a traced step: the ``ids`` it looked up, the ``rows`` it gathered (its
    output, ``ids.shape + [d]``), their gradient (``None`` when no gradient reaches them) and the
    ``layer``. Detectors reduce these per lookup, O(looked-up rows): nothing densifies a table."""

    ids: object
    rows: object
    grad: object
    layer: object


class StatsView:
    """What a detector's in-graph check sees: columns of the packed matrix, by name."""

    def __init__(self, table: Table, matrix, step=None, ids=None, loss_scaled=False, alive=None,
                 unit_rows=(), examples=None, lookups=None, columns=None):
        self.table = table
        self.matrix = matrix
        # {column: [rows]}, each made only of what it needs (Collector.columns): a check that reads the
        # ``nan`` column waits for the rows' sums, not for every statistic; None: read off ``matrix``
        self.columns = columns
        self.step = step
        # per-unit activity of ReLU-family outputs (when "dead_frac" is computed): ``alive`` is a
        # [units] 0/1 vector, 1 where the unit was non-zero somewhere in the (global) batch, in the
        # segments ``unit_rows`` = [(row index, units)]; ``examples`` is the global batch size
        self.alive = alive
        self.unit_rows = list(unit_rows)
        self.examples = examples
        # the optimizer is a LossScaleOptimizer (mixed precision): it skips, on its own,
        # a step whose scaled gradients overflow, and lowers the scale
        self.loss_scaled = loss_scaled
        # row index of each ``ids`` row -> the int ids tensor (before the lookup)
        self.ids = ids or {}
        # row index of each ``ids`` row -> its :class:`Lookup` (traced steps, dense ids)
        self.lookups = lookups or {}
        self._batches = {}  # row indices -> their LookupBatch (lookup_batch)

    def __getitem__(self, name):
        if self.columns is not None:
            return self.columns[name]
        return self.matrix[:, COL[name]]

    def lookup_batch(self, index=None):
        """The :class:`~gradtrace.embeddings.LookupBatch` of the ``ids`` rows ``index`` (default: all), made
        once per step and shared by the detectors that ask for the same rows. A table's path is its
        base path: a table called twice is one table."""
        from gradtrace.embeddings import LookupBatch
        from gradtrace.graph import base_path

        index = tuple(sorted(self.ids if index is None else index))
        batch = self._batches.get(index)
        if batch is None:
            rows = self.table.rows
            batch = self._batches[index] = LookupBatch(
                [(base_path(rows[i].path), rows[i].input_dim, self.ids[i] if i in self.ids else self.lookups[i].ids)
                 for i in index])
        return batch

    def mask(self, **kw):
        return tf.constant(self.table.mask(**kw))


SATURATION_LIMITS = {"sigmoid": (0.0, 1.0), "hard_sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0)}


def _f32(t):
    return tf.cast(t, tf.float32)


# The per-tensor quantities everything else is derived from, one small vector per row.
BASE = ("s", "ss", "min", "max", "zeros", "sqdev", "size", "dead_frac", "saturated",
        "bad", "bad_value", "bad_index")
_B = {name: i for i, name in enumerate(BASE)}


def _base_dict(t, activation, which, s=None, n=None):
    """The base quantities in ``which`` of float32 ``t`` (``s`` and ``n``: its sum and size, when known),
    as a dict: only the ops for what is asked (and what applies: saturation to sigmoid/tanh)."""
    static = t.shape.num_elements()
    if n is None:
        n = tf.constant(float(static)) if static is not None else tf.cast(tf.size(t), tf.float32)
    if s is None:
        s = tf.reduce_sum(t)
    nonempty = None if static else n > 0  # a statically non-empty tensor needs no guard

    def guarded(v):
        return v if nonempty is None else tf.where(nonempty, v, 0.0)

    out = {"s": s, "size": n}
    if "ss" in which:
        out["ss"] = 2.0 * tf.nn.l2_loss(t)
    if "min" in which:
        out["min"] = guarded(tf.reduce_min(t))
    if "max" in which:
        out["max"] = guarded(tf.reduce_max(t))
    if "zeros" in which:
        out["zeros"] = tf.reduce_sum(tf.cast(tf.equal(t, 0.0), tf.float32))
    if "sqdev" in which:
        # two passes: the one-pass E[t^2] - mean^2 loses all precision when |mean| >> std
        out["sqdev"] = 2.0 * tf.nn.l2_loss(t - s / tf.maximum(n, 1.0))
    if "saturated" in which and activation in SATURATION_LIMITS:
        low, high = SATURATION_LIMITS[activation]
        margin = 0.01 * (high - low)
        pinned = tf.logical_or(t <= low + margin, t >= high - margin)
        out["saturated"] = tf.reduce_sum(tf.cast(pinned, tf.float32)) / tf.maximum(n, 1.0)
    return out


def _vector(d):
    zero = tf.constant(0.0)
    return tf.stack([tf.cast(d.get(k, zero), tf.float32) for k in BASE])


def float_stats(t, relu=False, activation=""):
    """Statistics of one dense float tensor, as a dict of float32 scalars (see module docstring), measured
    exactly as a watched step measures a layer's output: one :class:`Collector` row, every statistic.
    ``_s`` and ``_ss`` are its sum and sum of squares."""
    c = Collector()
    c.add("output", "tensor", t, relu=relu, activation=activation)
    _, matrix, _ = c.build()
    m = matrix[0]
    out = {c: m[COL[c]] for c in COLUMNS if c not in ("nan", "inf", "update_ratio", "bad", "bad_value", "bad_index")}
    if not relu or t.shape.rank is None or t.shape.rank < 2:
        out.pop("dead_frac")
    if activation not in SATURATION_LIMITS:
        out.pop("saturated")
    out["_s"], out["_ss"] = m[COL["mean"]] * m[COL["size"]], tf.square(m[COL["norm"]])
    return out


def ids_stats(ids, input_dim):
    """Range statistics of Embedding ids, taken before the lookup (a dict of float32 scalars)."""
    block = ids_block([(ids, input_dim)])[0]
    return {k: block[_B[k]] for k in ("min", "max", "size", "bad", "bad_value", "bad_index")}


_IDS_LIMIT = np.iinfo(np.int64).max
IDS_BASE = ("min", "max", "size", "bad", "bad_value", "bad_index")  # what ids_block measures


def ids_block(items):
    """The range statistics of several ids tensors (``[(ids, input_dim)]``: each Embedding lookup's ids,
    the labels) as a ``[len(items), len(BASE)]`` block of base quantities: ``min``, ``max``, ``size``,
    ``bad`` (ids < 0 or >= input_dim), ``bad_value`` (the first bad id) and ``bad_index`` (its flat
    position, -1 when none); the rest 0. All lookups are laid end to end and reduced together (a
    segment reduction per quantity), not one set of reductions per lookup."""
    k = len(items)
    flats = [tf.reshape(tf.cast(ids, tf.int64), [-1]) for ids, _ in items]
    dims = np.array([int(d) for _, d in items], np.int64)
    sizes = [f.shape[0] for f in flats]
    if all(n is not None for n in sizes):  # static shapes: what depends on them is a constant
        counts = np.array(sizes, np.int64)
        segment = tf.constant(np.repeat(np.arange(k, dtype=np.int32), counts))
        limit = tf.constant(np.repeat(dims, counts))
        starts = tf.constant(np.cumsum(counts) - counts)
        n = tf.constant(counts.astype(np.float32))
    else:
        segment = tf.concat([tf.fill(tf.shape(f), j) for j, f in enumerate(flats)], 0)
        limit = tf.gather(tf.constant(dims), segment)
        counts_t = tf.stack([tf.size(f, out_type=tf.int64) for f in flats])
        starts = tf.cumsum(counts_t, exclusive=True)
        n = tf.cast(counts_t, tf.float32)
    flat = flats[0] if k == 1 else tf.concat(flats, 0)
    total = tf.size(flat, out_type=tf.int64)
    bad = tf.logical_or(flat < 0, flat >= limit)
    nonempty = n > 0
    nbad = tf.math.unsorted_segment_sum(tf.cast(bad, tf.float32), segment, k)
    any_bad = nbad > 0
    # the first bad id of each lookup: its position among all ids (``total`` where there is none)
    first = tf.minimum(tf.math.unsorted_segment_min(
        tf.where(bad, tf.range(total, dtype=tf.int64), tf.constant(_IDS_LIMIT, tf.int64)), segment, k), total)
    # a sentinel keeps gather defined for zero ids (length-0 sequences)
    bad_value = tf.where(any_bad, _f32(tf.gather(tf.concat([flat, [0]], 0), first)), 0.0)
    cols = {
        "min": tf.where(nonempty, _f32(tf.math.unsorted_segment_min(flat, segment, k)), 0.0),
        "max": tf.where(nonempty, _f32(tf.math.unsorted_segment_max(flat, segment, k)), 0.0),
        "size": n,
        "bad": nbad,
        "bad_value": bad_value,
        "bad_index": tf.where(any_bad, _f32(first - starts), -1.0),
    }
    zeros = tf.zeros([k], tf.float32)
    return tf.stack([cols.get(name, zeros) for name in BASE], axis=1)


def nonfinite_counts(t):
    t = _f32(t)
    return (
        tf.reduce_sum(tf.cast(tf.math.is_nan(t), tf.float32)),
        tf.reduce_sum(tf.cast(tf.math.is_inf(t), tf.float32)),
    )


def derive(base, nan=None, inf=None, update_ratio=None):
    """The statistics columns (``{column: [rows]}``) from the base quantities (``{name: [rows]}``). Each
    column depends only on the base quantities it is made of, so a detector that reads ``nan`` waits for
    the rows' sums, not for every statistic."""
    b = base
    n = tf.maximum(b["size"], 1.0)
    zero = tf.zeros_like(b["s"])
    return {
        "mean": b["s"] / n,
        "std": tf.sqrt(tf.maximum(b["sqdev"], 0.0) / n),
        "min": b["min"],
        "max": b["max"],
        "norm": tf.sqrt(b["ss"]),
        "nan": zero if nan is None else nan,
        "inf": zero if inf is None else inf,
        "zero_frac": b["zeros"] / n,
        "dead_frac": b["dead_frac"],
        "update_ratio": zero if update_ratio is None else update_ratio,
        "size": b["size"],
        "bad": b["bad"],
        "bad_value": b["bad_value"],
        "bad_index": b["bad_index"],
        "saturated": b["saturated"],
    }


def packed(columns):
    """``{column: [rows]}`` as the ``[rows, len(COLUMNS)]`` matrix."""
    return tf.stack([columns[c] for c in COLUMNS], axis=1)


def _stitch(blocks, indices, rows):
    """``{name: [rows]}`` from blocks (``{name: [len(ix)]}``) of the rows ``indices``: a quantity no block has
    is 0 in every row; one that some blocks have is 0 in the others' rows."""
    positions = [tf.constant(ix, tf.int32) for ix in indices]
    out = {}
    for name in BASE:
        parts = [b.get(name) for b in blocks]
        out[name] = tf.zeros([rows], tf.float32) if all(p is None for p in parts) else tf.dynamic_stitch(
            positions, [tf.zeros([len(ix)]) if p is None else p for p, ix in zip(parts, indices)])
    return out


def _split(block, names=BASE):
    """A ``[rows, len(BASE)]`` block as ``{name: [rows]}`` (only ``names``: the others are 0)."""
    return {name: block[:, _B[name]] for name in names}


_SAME = object()


@dataclass(frozen=True)
class _Ids:
    """An ids row of a :class:`Collector` (its statistics come from :func:`ids_block`)."""

    ids: object
    input_dim: int

# The base quantities behind each column. s, ss and size are always computed (the
# NaN/Inf gate and the norm need them); the rest only when a detector needs them,
# and all of them on a step where a detector fired (for the report).
ALWAYS = ("s", "size")
COLUMN_BASE = {
    "mean": ("s",), "std": ("s", "sqdev"), "min": ("min",), "max": ("max",), "norm": ("ss",),
    "zero_frac": ("zeros",), "dead_frac": ("dead_frac",), "saturated": ("saturated",),
    "update_ratio": ("ss",),
}


def base_needs(columns) -> frozenset:
    """The base quantities that statistics ``columns`` are derived from."""
    out = set(ALWAYS)
    for c in columns:
        out.update(COLUMN_BASE.get(c, ()))
    return frozenset(out)


ALL_BASE = frozenset(BASE)


class Collector:
    """Collects the rows of one step and computes all their statistics at once.

    ``add`` registers a row with a float tensor (its statistics are computed) or ready-made values
    (Embedding ids); ``build`` returns the :class:`Table` and the packed ``[rows, columns]`` matrix, and
    keeps :attr:`columns` (``{column: [rows]}``, each made only of its own base quantities).

    Cost per step is what matters (a deep model has hundreds of rows): each tensor costs one ``reduce_sum``,
    plus one reduction per further quantity a detector needs (``l2_loss`` for norms, the per-unit maximum
    for dead ReLUs, ...), assembled one column at a time, with no ``tf.cond``. So unless every statistic is
    asked for (a reported step, TensorBoard summaries, replay: exact counts), ``nan`` and ``inf`` are flags
    read off the tensor's sum (a tensor holding a NaN or an Inf always has a non-finite sum). Counting them
    in a layer's tensors where a detector fired would keep every captured tensor alive until the detectors
    decide (measured: 0.09x of a deep MLP's step, 0.13x of a CNN's), so the record counts them exactly in
    the batch and the loss only; a held step is counted in full when it is measured again.
    """

    def __init__(self):
        self.rows: list[Row] = []
        self.lookups: dict = {}  # ids row index -> Lookup
        self._vectors = []
        self._counted = []
        self._ratios = []  # (weight_gradient row, weight row)
        self._always = {}  # row index -> base quantities computed for that row whatever the step needs
        self.derived = {}  # row index -> the row whose tensor holds the same values (its statistics are that row's)
        self.alive = None  # after build: [units] of the ReLU-family rows, 1 where the unit fired (see _finish)

    def add(self, kind, path, tensor=None, values=None, counted=_SAME, relu=False, activation="", deferred=False,
            always=(), ids=None, **meta) -> int:
        """Register a row; ``counted`` is the tensor whose NaN/Inf are counted (default: ``tensor``).
        ``ids=(ids, input_dim)``: a row of ids (:func:`ids_block`: every ids row of the step is reduced
        together); ``values``: a dict of ready-made base quantities.

        A ``deferred`` row takes ``tensor`` as a function returning the tensor; it is
        called, and the row measured, only when every statistic is asked for. Weights
        are deferred: reading a variable before the optimizer updates it keeps its old
        buffer alive, and the update then copies the whole variable (measured: the
        largest single cost of an earlier version).
        """
        index = len(self.rows)
        if always:  # small tensors (targets, the model's outputs) whose range detectors always read
            self._always[index] = frozenset(always)
        self.rows.append(Row(index=index, kind=kind, path=path, relu=relu, activation=activation, **meta))
        if ids is not None:
            self._vectors.append(_Ids(*ids))
            counted = None
        elif values is not None:
            self._vectors.append(_vector(values))
        else:
            self._vectors.append((tensor, relu, activation, deferred))
        self._counted.append(None if deferred else tensor if counted is _SAME else counted)
        return index

    def ratio(self, grad_row, weight_row):
        self._ratios.append((grad_row, weight_row))

    def build(self, lr=None, needs=ALL_BASE, replicas=None, graph=None, optimizer=None):
        """Return ``(table, matrix, full)``.

        ``matrix`` holds the columns whose base quantities are in ``needs`` (the
        others are 0); ``full()`` builds the matrix with every column. With
        ``replicas`` (a :class:`gradtrace.distribute.Replicas`), every replica's
        quantities are gathered and combined into global statistics, and
        :attr:`faults` (``[replicas, rows]``: that replica's shard of the row
        held NaN/Inf or bad ids) is set. ``graph`` and ``optimizer`` go to the table (see :class:`Table`).
        """
        table = Table(self.rows, graph, optimizer)
        self._lr, self._replicas = lr, replicas
        self.faults = None
        if not self.rows:
            empty = tf.zeros([0, len(COLUMNS)], tf.float32)
            self.columns = {c: tf.zeros([0], tf.float32) for c in COLUMNS}
            return table, empty, lambda: empty
        self.columns, self.faults = self._finish(self._local(needs))
        matrix = packed(self.columns)
        table.derived = dict(self.derived)
        return table, matrix, (lambda: matrix) if needs >= ALL_BASE else (
            lambda: packed(self._finish(self._local(ALL_BASE))[0]))

    def counted_exactly(self, matrix):
        """:func:`counted_exactly` on this step (under a strategy the flags stay: counts would cross replicas)."""
        return matrix if self._replicas is not None else counted_exactly(matrix, [r.kind for r in self.rows],
                                                                           self._counted)

    def _local(self, which):
        """This replica's ``(base {name: [rows]}, nan [rows], inf [rows], alive [units])``: each base quantity
        stitched from its own sources (a column waits only for what it is made of)."""
        full = which >= ALL_BASE
        counted = list(self._counted)
        tensor_rows, value_rows, zero_rows, ids_rows = [], [], [], []
        for i, v in enumerate(self._vectors):
            if isinstance(v, _Ids):
                ids_rows.append((i, v))
                continue
            if not isinstance(v, tuple):
                value_rows.append((i, v))
                continue
            tensor, relu, activation, deferred = v
            if deferred:
                if not full:
                    zero_rows.append(i)
                    continue
                tensor = counted[i] = tensor()
            tensor_rows.append((i, tensor, relu, activation))

        indices, blocks, alive = [], [], None  # blocks: {name: [rows of the block]}
        if tensor_rows:
            block, alive = self._tensor_block(tensor_rows, which)
            indices.append([i for i, *_ in tensor_rows])
            blocks.append(block)
        if value_rows:
            indices.append([i for i, _ in value_rows])
            blocks.append(_split(tf.stack([v for _, v in value_rows])))
        if ids_rows:
            indices.append([i for i, _ in ids_rows])
            blocks.append(_split(ids_block([(v.ids, v.input_dim) for _, v in ids_rows]), IDS_BASE))
        if zero_rows:
            indices.append(zero_rows)
            blocks.append({})
        base = _stitch(blocks, indices, len(self.rows))

        has_counted = np.array([t is not None for t in counted])
        if full:
            pairs = [nonfinite_counts(t) if t is not None else (0.0, 0.0) for t in counted]
            nan = tf.stack([tf.cast(a, tf.float32) for a, _ in pairs])
            inf = tf.stack([tf.cast(b, tf.float32) for _, b in pairs])
        else:
            s = base["s"]
            keep = tf.constant(has_counted)
            nan = tf.where(keep & tf.math.is_nan(s), 1.0, 0.0)
            inf = tf.where(keep & tf.math.is_inf(s), 1.0, 0.0)
        return base, nan, inf, alive if alive is not None else tf.zeros([0], tf.float32)

    def _tensor_block(self, items, which):
        """``[len(items), len(BASE)]`` for tensor rows: a row whose tensor holds the same values as another
        row's (see :func:`value_sources`) takes that row's quantities; the others are computed."""
        sources = value_sources(items)
        self.derived = {items[k][0]: items[src][0] for k, src in sources.items()}
        if not sources:
            return self._computed_block(items, which)
        computed = [k for k in range(len(items)) if k not in sources]
        # a source computes what its derived rows always need too (the model's output range)
        for k, src in sources.items():
            extra = self._always.get(items[k][0])
            if extra:
                i = items[src][0]
                self._always[i] = self._always.get(i, frozenset()) | extra
        block, alive = self._computed_block([items[k] for k in computed], which)
        position = {k: p for p, k in enumerate(computed)}
        gather = tf.constant([position[sources.get(k, k)] for k in range(len(items))], tf.int32)
        out = {name: tf.gather(v, gather) for name, v in block.items()}
        # what depends on the row's own activation and units (derived rows have neither) stays 0
        own = np.zeros([len(items)], bool)
        own[list(sources)] = True
        for name in ("dead_frac", "saturated"):
            if name in out:
                out[name] = tf.where(tf.constant(own), 0.0, out[name])
        return out, alive

    def _computed_block(self, items, which):
        """``{name: [len(items)]}`` for tensor rows, one column (one stack) at a time."""
        zero = tf.constant(0.0)
        cols = {name: [] for name in BASE}
        units, unit_rows = [], []
        for k, (i, t, relu, act) in enumerate(items):
            row_which = which | self._always.get(i, frozenset())
            t = _f32(t)
            size = t.shape.num_elements()
            n = tf.constant(float(size)) if size is not None else tf.cast(tf.size(t), tf.float32)
            s = tf.reduce_sum(t)
            cols["size"].append(n)
            cols["s"].append(s)
            if "ss" in which:
                cols["ss"].append(tf.nn.l2_loss(t))
            more = row_which & {"min", "max", "zeros", "sqdev", "saturated"}
            v = _base_dict(t, act, more, s=s, n=n) if more else {}
            for name in ("min", "max", "zeros", "sqdev", "saturated"):
                cols[name].append(v.get(name, zero))
            if relu and t.shape.rank is not None and t.shape.rank >= 2 and (
                    "dead_frac" in which or self._replicas is not None):
                # ReLU outputs are >= 0: the largest value of a unit is 0 only if it is dead
                axes = list(range(t.shape.rank - 1))
                unit_max = tf.reduce_max(t if act == "relu" else tf.abs(t), axis=axes)
                units.append(unit_max)
                unit_rows.append((k, t.shape[-1] if t.shape[-1] is not None else tf.shape(t)[-1]))
        count = len(items)
        columns = {}
        for name in ("s", "size", "min", "max", "zeros", "sqdev", "saturated"):
            if cols[name] and any(c is not zero for c in cols[name]):
                columns[name] = tf.stack(cols[name])
        if cols["ss"]:
            columns["ss"] = 2.0 * tf.stack(cols["ss"])
        alive = None
        if units:
            alive = tf.cast(tf.concat(units, 0) > 0, tf.float32)
            if "dead_frac" in which:
                columns["dead_frac"] = dead_fractions(1.0 - alive, unit_rows, count)
        return columns, alive

    def _finish(self, local):
        """Combine across replicas (if any) and derive the statistics: ``({column: [rows]}, faults)``."""
        base, nan, inf, alive = local
        faults = None
        # [units] of the ReLU-family rows (``unit_rows``): 1 where the unit fired in the batch; None when
        # the step did not compute them (no detector reads dead units)
        self.alive = alive if alive.shape.rank == 1 and alive.shape[0] != 0 else None
        if self._replicas is not None:
            local_matrix = tf.stack([base[k] for k in BASE] + [nan, inf], axis=1)
            gathered, alive_total = self._replicas.gather(local_matrix, alive)
            base, nan, inf, faults = combine(gathered, alive_total, self.unit_rows(),
                                               # weights are the same on every replica: taken from replica 0
                                               np.array([r.kind == "weight" for r in self.rows], dtype=bool))
            base = _split(base)
            self.alive = None if self.alive is None else tf.cast(alive_total > 0, tf.float32)
        ratio = None
        if self._ratios and self._lr is not None:
            g_idx = [g for g, _ in self._ratios]
            w_idx = [w for _, w in self._ratios]
            norms = tf.sqrt(base["ss"])
            w_norms = tf.gather(norms, w_idx)  # 0 where a light weight row was not measured
            values = tf.where(w_norms > 0, self._lr * tf.gather(norms, g_idx) / (w_norms + 1e-12), 0.0)
            ratio = tf.scatter_nd(tf.constant(g_idx, tf.int32)[:, None], values, [len(self.rows)])
        return derive(base, nan, inf, ratio), faults

    def histograms(self, matrix, kinds, bins):
        """``(rows, counts)``: ``bins``-bin histograms (``[len(rows), bins]``) of the tensors of
        the rows of ``kinds``, each over its own ``[min, max]`` from ``matrix`` (global under a
        strategy, the counts summed over replicas). Non-finite values are not counted."""
        rows, counts = [], []
        for i, v in enumerate(self._vectors):
            if not isinstance(v, tuple) or v[3] or self.rows[i].kind not in kinds:
                continue
            rows.append(i)
            counts.append(histogram(v[0], matrix[i, COL["min"]], matrix[i, COL["max"]], bins))
        out = tf.stack(counts) if counts else tf.zeros([0, bins], tf.float32)
        if self._replicas is not None:
            out = self._replicas.sum(out)
        return rows, out

    def unit_rows(self):
        """``[(row index, units)]``: the segments of :attr:`alive`, in the order of ``_tensor_block``."""
        out = []
        for i, v in enumerate(self._vectors):
            if isinstance(v, tuple) and v[1] and v[0] is not None and not v[3]:
                t = v[0]
                if t.shape.rank is not None and t.shape.rank >= 2:
                    out.append((i, t.shape[-1] if t.shape[-1] is not None else tf.shape(t)[-1]))
        return out



# the rows a firing step counts NaN/Inf in exactly: the batch and the loss (alive anyway, or a scalar); a
# layer's output or gradient is only flagged (see Collector)
COUNTED_KINDS = ("input", "target", "loss")


def counted_exactly(matrix, kinds, counted):
    """In-graph, on the step where a detector fired (the record's branch): ``matrix`` with exact NaN/Inf
    counts for the rows of :data:`COUNTED_KINDS` (``kinds``: each row's kind; ``counted``: each row's tensor
    whose NaN/Inf are counted, or None)."""
    rows = [i for i, (k, t) in enumerate(zip(kinds, counted)) if k in COUNTED_KINDS and t is not None]
    if not rows:
        return matrix
    pairs = [nonfinite_counts(counted[i]) for i in rows]
    counts = tf.stack([tf.stack([tf.cast(a, tf.float32), tf.cast(b, tf.float32)]) for a, b in pairs])
    index = [[i, COL[c]] for i in rows for c in ("nan", "inf")]
    return tf.tensor_scatter_nd_update(matrix, tf.constant(index, tf.int32), tf.reshape(counts, [-1]))


def uncounted(matrix, kinds, replicas=False):
    """A step's own matrix (NumPy), read on the host after it was applied: the ``nan`` and ``inf`` columns of
    a layer's rows are flags (1: the row's sum was NaN, or infinite), not counts, so they are marked ``-1``
    ("present, not counted"); :func:`count` reads them. The rows of :data:`COUNTED_KINDS` were counted
    (:func:`counted_exactly`), except under a strategy (``replicas``); a held step is measured again in full,
    with exact counts."""
    out = np.array(matrix, dtype=np.float32, copy=True)
    flagged = np.array([replicas or k not in COUNTED_KINDS for k in kinds], dtype=bool)
    for c in ("nan", "inf"):
        out[flagged, COL[c]] = -np.abs(out[flagged, COL[c]])
    return out


def count(value):
    """A ``nan``/``inf`` value of a packed row: the exact count, or None when it was only flagged (< 0, see
    :func:`uncounted`)."""
    return None if value < 0 else int(value)


def dead_fractions(dead, unit_rows, rows):
    """``[rows]``: for each ``(row, units)`` of ``unit_rows``, the share of its units (its segment of
    ``dead``, laid end to end in that order) that never fired: ``dead`` is 1 for a ReLU unit whose largest
    output over the batch, and every position, is 0 (under a strategy: on every replica), else 0. The one
    way ``dead_frac`` is computed; 0 for the other rows."""
    sizes = [u for _, u in unit_rows]
    if all(isinstance(u, int) for u in sizes):
        ids = tf.constant(np.repeat(np.arange(len(sizes), dtype=np.int32), sizes))
        per_unit = tf.constant(np.repeat(np.asarray(sizes, np.float32), sizes))
    else:
        sizes_t = tf.stack([tf.cast(u, tf.int32) for u in sizes])
        ids = tf.repeat(tf.range(len(sizes), dtype=tf.int32), sizes_t)
        per_unit = tf.cast(tf.gather(sizes_t, ids), tf.float32)
    shares = tf.math.unsorted_segment_sum(dead / per_unit, ids, len(sizes))
    shape = [rows] if isinstance(rows, int) else tf.reshape(rows, [1])
    return tf.scatter_nd(tf.constant([[k] for k, _ in unit_rows], tf.int32), shares, shape)


def histogram(t, lo, hi, bins):
    """``bins`` counts of the finite values of ``t`` over ``[lo, hi]`` (a range that is not finite, or
    empty, becomes ``[lo, lo + 1]``)."""
    t = tf.reshape(_f32(t), [-1])
    ok = tf.math.is_finite(lo) & tf.math.is_finite(hi)
    lo = tf.where(ok, lo, 0.0)
    hi = tf.where(ok & (hi > lo), hi, lo + 1.0)
    finite = tf.math.is_finite(t)
    h = tf.histogram_fixed_width(tf.where(finite, t, lo), tf.stack([lo, hi]), nbins=bins)
    # the non-finite values were put in the first bin: take them out again
    h = h - tf.one_hot(0, bins, dtype=h.dtype) * tf.reduce_sum(tf.cast(~finite, h.dtype))
    return tf.cast(h, tf.float32)

# ops whose output holds exactly the values of their first input, in another shape or order:
# Flatten, Reshape, Permute and RepeatVector-free reshapes, a nested model's output, Identity
VALUE_PRESERVING = frozenset({"Identity", "Reshape", "Squeeze", "ExpandDims", "Transpose", "StopGradient",
                              "Snapshot", "PreventGradient", "EnsureShape"})
_WALK = 8  # value-preserving ops followed back from one tensor


def value_sources(items):
    """``{k: source}``: the positions in ``items`` (``(row, tensor, relu, activation)``) whose tensor holds
    exactly the values of the tensor at ``source``, read off the traced graph: the same tensor (a nested
    model's output is its last layer's), or one reached back through :data:`VALUE_PRESERVING` ops (a
    ``Flatten`` output and its input; the gradient of that input, a reshape of the output's gradient).
    Its sum, norm, extremes, zeros, spread and size are then the source's. Rows with a per-unit or
    per-activation statistic (ReLU family, sigmoid/tanh) are always computed. Sources are roots: computed.
    Eager tensors have no graph: only the same tensor object is recognised."""
    first = {}
    for k, (_, t, _, _) in enumerate(items):
        try:
            first.setdefault(t.ref(), k)
        except (AttributeError, TypeError):
            continue
    out = {}
    for k, (_, t, relu, act) in enumerate(items):
        if relu or act in SATURATION_LIMITS:
            continue
        src, cur = None, t
        for _ in range(_WALK):
            try:
                j = first.get(cur.ref())
            except (AttributeError, TypeError):
                break
            if j is not None and j != k:
                src = j
                break
            op = getattr(cur, "op", None)
            try:
                if op is None or op.type not in VALUE_PRESERVING or not op.inputs:
                    break
            except AttributeError:  # an eager tensor has no graph op
                break
            nxt = op.inputs[0]
            if nxt.dtype != t.dtype:
                break
            cur = nxt
        if src is not None:
            out[k] = src
    # follow chains to their root: every link goes back in the graph (or to the first row of the same
    # tensor, which itself goes back), so a chain ends
    for k in list(out):
        root = out[k]
        while root in out:
            root = out[root]
        out[k] = root
    return out


def combine(gathered, alive_total, unit_rows, mirrored):
    """Global base quantities from every replica's: ``gathered`` is ``[replicas, rows, len(BASE) + 2]``
    (base quantities, then NaN and Inf counts).

    Sums and counts add up; minima and maxima are taken over replicas whose
    shard was not empty; the spread is pooled (each replica's sum of squared
    deviations plus its size times its mean's squared distance to the global
    mean); the saturated share is weighted by size; a unit is dead only if it
    is dead on every replica (``alive_total`` sums each replica's per-unit
    alive flags, in the segments ``unit_rows``); ``bad_value``/``bad_index``
    come from the first replica with a bad id. Rows in ``mirrored`` hold the
    same tensor everywhere and are taken from replica 0.

    Returns ``(base, nan, inf, faults)``, ``faults`` ``[replicas, rows]``:
    that replica's row held NaN/Inf or bad ids.
    """
    g = {k: gathered[:, :, i] for i, k in enumerate(BASE)}
    nan_r, inf_r = gathered[:, :, len(BASE)], gathered[:, :, len(BASE) + 1]
    n_r = g["size"]
    n = tf.reduce_sum(n_r, 0)
    safe_n = tf.maximum(n, 1.0)
    has = n_r > 0
    inf = tf.constant(np.inf, tf.float32)
    s = tf.reduce_sum(g["s"], 0)
    mean = s / safe_n
    mean_r = g["s"] / tf.maximum(n_r, 1.0)
    out = {
        "s": s, "ss": tf.reduce_sum(g["ss"], 0), "size": n, "zeros": tf.reduce_sum(g["zeros"], 0),
        "bad": tf.reduce_sum(g["bad"], 0),
        "min": tf.where(n > 0, tf.reduce_min(tf.where(has, g["min"], inf), 0), 0.0),
        "max": tf.where(n > 0, tf.reduce_max(tf.where(has, g["max"], -inf), 0), 0.0),
        "sqdev": tf.reduce_sum(g["sqdev"] + tf.where(has, n_r * tf.square(mean_r - mean), 0.0), 0),
        "saturated": tf.reduce_sum(g["saturated"] * n_r, 0) / safe_n,
    }
    first_bad = tf.argmax(tf.cast(g["bad"] > 0, tf.int32), axis=0, output_type=tf.int32)  # 0 if none
    pick = tf.stack([first_bad, tf.range(tf.shape(first_bad)[0])], 1)
    out["bad_value"] = tf.gather_nd(g["bad_value"], pick)
    out["bad_index"] = tf.gather_nd(g["bad_index"], pick)
    out["dead_frac"] = (dead_fractions(tf.cast(tf.equal(alive_total, 0.0), tf.float32), unit_rows, tf.shape(s)[0])
                        if unit_rows else tf.zeros_like(s))
    base = tf.stack([out[k] for k in BASE], 1)
    nan, inf_count = tf.reduce_sum(nan_r, 0), tf.reduce_sum(inf_r, 0)
    if mirrored.any():
        keep = tf.constant(mirrored)[:, None]
        base = tf.where(keep, gathered[0, :, : len(BASE)], base)
        nan = tf.where(keep[:, 0], nan_r[0], nan)
        inf_count = tf.where(keep[:, 0], inf_r[0], inf_count)
    faults = (nan_r + inf_r + g["bad"]) > 0
    return base, nan, inf_count, faults


def row_dict(matrix_row, columns=None) -> dict:
    """One packed row (NumPy) as ``{column: float}`` (only ``columns``, when given)."""
    return {c: float(matrix_row[i]) for i, c in enumerate(COLUMNS) if columns is None or c in columns}


def computed_columns(needs, requested=()) -> frozenset:
    """The columns that hold real values when the base quantities ``needs`` are computed
    (``update_ratio`` also needs the weights, measured only when it is ``requested``)."""
    if needs >= ALL_BASE:
        return frozenset(COLUMNS)
    out = {"nan", "inf", "size", "bad", "bad_value", "bad_index"}
    for c, bases in COLUMN_BASE.items():
        if set(bases) <= needs and (c != "update_ratio" or c in requested):
            out.add(c)
    return frozenset(out)
