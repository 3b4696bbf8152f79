"""Which layer feeds which: read from the traced step's own TensorFlow graph.

Execution order is not the network's shape. An encoder–decoder runs its encoder
first, but the encoder reaches the loss through cross-attention, beside the
decoder, not below it; a Siamese tower runs twice; a skip connection jumps
layers. Detectors that speak of "the layers above it" or "the layer nearest the
loss" ask this graph.

Built once per trace (never per step) from the captured layer outputs: walking
back from each captured tensor through the ops that made it, until another
captured tensor is met, gives the layers that feed it directly. From there:

- ``depth(path)``: the fewest captured layers between the layer's output and
  the loss (0: a layer whose output the loss reads directly);
- ``feeds(path, other)``: ``other`` lies on a path from ``path`` to the loss.

When there is no graph (a step run eagerly), execution order stands in for
both, as it did before: a layer feeds every layer that ran after it.
"""

from __future__ import annotations

import collections

# Walking a graph this large is not worth it (a trace of a huge model): execution order stands in.
MAX_VISITS = 500_000


class LayerGraph:
    """``depth`` and ``downstream`` per layer path (a layer called twice: both calls together)."""

    def __init__(self, depth: dict, downstream: dict, order: dict, consumers=None, feeders=None):
        self._depth = depth
        self._downstream = downstream
        self._consumers = consumers or {}  # path -> the layers reading its output directly
        self._feeders = feeders or {}  # path -> the layers whose outputs it reads directly
        self._order = order  # path -> execution order of its first call (the fallback)

    def _known(self, path):
        """The call's path (``dense#2``, an output ``:i`` dropped), else its layer's (both calls), else the
        nearest enclosing path the graph knows (an RNN cell's weights belong to the cell, whose calls
        inside the loop are not captured: the RNN layer stands in)."""
        path = path.split(":", 1)[0]
        if path in self._depth:
            return path
        path = path.split("#", 1)[0]
        while path and path not in self._depth:
            if "/" not in path:
                return None
            path = path.rsplit("/", 1)[0]
        return path or None

    def depth(self, path):
        known = self._known(path)
        return None if known is None else self._depth[known]

    def consumers(self, path) -> frozenset:
        """The layers that read ``path``'s output directly (empty when unknown)."""
        known = self._known(path)
        return self._consumers.get(known, frozenset()) if known is not None else frozenset()

    def feeders(self, path):
        """The layers whose outputs ``path`` reads directly (empty: it reads the model's inputs);
        None when the graph does not know ``path``."""
        known = self._known(path)
        return None if known is None else self._feeders.get(known, frozenset())

    def feeds(self, path, other) -> bool:
        """True when ``other``'s output depends on ``path``'s (``other`` is above ``path``)."""
        a, b = self._known(path), self._known(other)
        if a is None or b is None:
            oa, ob = self._order.get(path), self._order.get(other)
            return oa is not None and ob is not None and ob > oa
        return base_path(b) in self._downstream[a]


def base_path(path: str) -> str:
    """``outer/dense#2:1`` -> ``outer/dense``: the layer of a call's output path."""
    return path.split(":", 1)[0].split("#", 1)[0]


def build(calls, loss, layer_path) -> LayerGraph | None:
    """The graph of one traced step. ``calls``: the recorded layer calls (their ``outputs``);
    ``loss``: the scalar the gradients are taken of; ``layer_path(call)``: the call's layer path.
    Returns None when the step runs eagerly (no graph to read)."""
    order = {}
    for i, call in enumerate(calls):
        order.setdefault(layer_path(call), i)
    if loss is None or not hasattr(loss, "op") or not hasattr(loss, "graph"):
        return None
    try:
        loss.op  # eager tensors raise here
    except AttributeError:
        return None
    owners = collections.defaultdict(set)  # captured tensor -> layer paths producing it
    for call in calls:
        for t in call.outputs:
            if hasattr(t, "op"):
                owners[t.ref()].add(layer_path(call))
    if not owners:
        return None
    budget = [MAX_VISITS]

    # A crossentropy on a sigmoid/softmax output reads the logits under it instead (Keras does, for
    # numerical stability): from the loss, those logits stand for the captured output.
    logits = {}
    for ref in owners:
        t = ref.deref()
        under = getattr(t, "_keras_logits", None)
        if under is None and t.op.type in ("Softmax", "Sigmoid") and len(t.op.inputs) == 1:
            under = t.op.inputs[0]
        if under is not None and hasattr(under, "ref") and under.ref() not in owners:
            logits[under.ref()] = ref

    def feeders(start_ops, aliases=None):
        """Captured tensors met walking back from ``start_ops`` (not through another captured one)."""
        aliases = aliases or {}
        found, seen, stack = set(), set(), list(start_ops)
        while stack:
            op = stack.pop()
            if op in seen:
                continue
            seen.add(op)
            budget[0] -= 1
            if budget[0] < 0:
                raise _TooLarge
            for t in op.inputs:
                ref = t.ref()
                if ref in owners:
                    found.add(ref)
                elif ref in aliases:
                    found.add(aliases[ref])
                else:
                    stack.append(t.op)
        return found

    try:
        parents = {ref: feeders([ref.deref().op]) - {ref} for ref in owners}
        heads = {loss.ref()} & set(owners) or feeders([loss.op], logits)
    except _TooLarge:
        return None
    children = collections.defaultdict(set)
    for ref, ps in parents.items():
        for p in ps:
            children[p].add(ref)
    # depth: breadth first from the tensors the loss reads
    depth_of = {ref: 0 for ref in heads}
    queue = collections.deque(heads)
    while queue:
        ref = queue.popleft()
        for p in parents.get(ref, ()):
            if p not in depth_of:
                depth_of[p] = depth_of[ref] + 1
                queue.append(p)
    memo: dict = {}  # captured tensor -> every captured tensor it feeds, transitively
    depth, downstream, consumers, fed = {}, {}, {}, {}
    for ref, paths in owners.items():
        direct = {base_path(p) for c in children.get(ref, ()) for p in owners[c]}
        fed_by = {base_path(p) for c in parents.get(ref, ()) for p in owners[c]}
        for path in paths:
            consumers.setdefault(path, set()).update(direct - {base_path(p) for p in paths})
            for q in (path, base_path(path)):
                fed.setdefault(q, set()).update(fed_by - {base_path(p) for p in paths})
        d = depth_of.get(ref)
        reach = {base_path(p) for c in _iterative_above(ref, children, memo) for p in owners[c]}
        # a call and its layer (all of that layer's calls together: a shared layer)
        for path in {q for p in paths for q in (p, base_path(p))}:
            if d is not None:
                depth[path] = min(depth.get(path, d), d)
            downstream.setdefault(path, set()).update(reach - {base_path(p) for p in paths})
    far = max(depth.values(), default=0) + 1
    for path in downstream:
        depth.setdefault(path, far)  # captured but not on the way to this loss (another head's)
    return LayerGraph(depth, {p: frozenset(s) for p, s in downstream.items()}, order,
                      {p: frozenset(s) for p, s in consumers.items()}, {p: frozenset(s) for p, s in fed.items()})


def _iterative_above(ref, children, memo):
    """Every captured tensor ``ref`` feeds, transitively (no recursion: deep models are deep)."""
    if ref in memo:
        return memo[ref]
    # post-order over the children graph
    stack = [(ref, False)]
    while stack:
        node, done = stack.pop()
        if node in memo and not done:
            continue
        if done:
            out = set()
            for c in children.get(node, ()):
                out.add(c)
                out |= memo.get(c, set())
            memo[node] = out
            continue
        stack.append((node, True))
        for c in children.get(node, ()):
            if c not in memo:
                stack.append((c, False))
    return memo[ref]


class _TooLarge(Exception):
    pass
