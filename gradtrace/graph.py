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
- ``feeds(path, other)``: ``other`` lies on a path from ``path`` to the loss;
- ``cut(path)``: when every route from the layer's output to the loss passes an
  op that passes no gradient (``StopGradient``, ``Sign``, ``Round``, ``Floor``,
  a cast to an integer type, ``ArgMax``, a comparison), the first such op met
  going up, and the layer just above it.

When there is no graph (a step run eagerly), execution order stands in for
both, as it did before: a layer feeds every layer that ran after it.
"""

from __future__ import annotations

import collections

from gradtrace import _keras_compat as compat

# Walking a graph this large is not worth it (a trace of a huge model): execution order stands in.
MAX_VISITS = 500_000

# Ops whose gradient is None or zero by definition (TensorFlow registers them NotDifferentiable or
# with a zero gradient). Any op with an integer or boolean output passes no gradient either (a cast
# to int, ArgMax, a comparison): that is read from the dtype.
NO_GRADIENT_OPS = frozenset({
    "StopGradient", "PreventGradient", "Sign", "Round", "Rint", "Floor", "Ceil", "FloorDiv", "ZerosLike",
    "OnesLike", "Shape", "ShapeN", "Size", "Rank", "RandomUniform", "RandomStandardNormal",
})


def _passes_gradient(op, tensor) -> bool:
    """Whether ``op`` passes a gradient back to its input ``tensor``."""
    if op.type in NO_GRADIENT_OPS:
        return False
    if not (tensor.dtype.is_floating or tensor.dtype.is_complex):
        return False
    return any(o.dtype.is_floating or o.dtype.is_complex or o.dtype == "resource" or o.dtype == "variant"
               for o in op.outputs) or not op.outputs


def _describe(op) -> str:
    if op.type == "Cast":
        return f"a Cast to {op.outputs[0].dtype.name} ({op.name})"
    return f"{op.type} ({op.name})"


class LayerGraph:
    """``depth`` and ``downstream`` per layer path (a layer called twice: both calls together)."""

    def __init__(self, depth: dict, downstream: dict, order: dict, consumers=None, feeders=None, cuts=None,
                 unreached=None):
        self._cuts = cuts or {}  # (path, consumer path or "loss") -> the op that passes no gradient between them
        self._unreached = unreached or frozenset()  # paths with no route to the loss that passes a gradient
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

    def cut(self, path):
        """``(op, above)`` when no route from ``path``'s output to the loss passes a gradient: ``op`` describes
        the first op met going up that passes none (``"Sign (model/lambda/Sign)"``), ``above`` the layer that
        reads what it made (``"loss"``: the loss does). None when a gradient reaches ``path`` (or unknown)."""
        known = self._known(path)
        if known is None or known not in self._unreached:
            return None
        queue, seen = collections.deque([known]), {known}
        while queue:
            node = queue.popleft()
            for above in sorted(self._consumers.get(node, ())) + ["loss"]:
                op = self._cuts.get((node, above))
                if op is not None and (above == "loss" or above not in self._unreached):
                    return op, above
                if above != "loss" and above in self._unreached and above not in seen:
                    seen.add(above)
                    queue.append(above)
        return None

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

    logits = _logits(owners)

    def feeders(start_ops, aliases=None, routes=None):
        """Captured tensors met walking back from ``start_ops`` (not through another captured one). With
        ``routes`` (a dict), each one's ``routes[ref]`` gets the op that passes no gradient on the way
        (the one nearest ``ref``) for each route, or None for a route that passes one."""
        aliases = aliases or {}
        found, seen, stack = set(), set(), [(op, None) for op in start_ops]
        while stack:
            op, cut = stack.pop()
            if (op, cut is None) in seen:
                continue
            seen.add((op, cut is None))
            budget[0] -= 1
            if budget[0] < 0:
                raise _TooLarge
            for t in op.inputs:
                # the op nearest the feeder wins (walking back: the last met): the one applied to its output
                on = cut if _passes_gradient(op, t) else _describe(op)
                ref = aliases.get(t.ref(), t.ref())
                if ref in owners:
                    found.add(ref)
                    if routes is not None:
                        routes.setdefault(ref, set()).add(on)
                else:
                    stack.append((t.op, on))
        return found

    try:
        parents, routes = {}, {}
        for ref in owners:
            routes[ref] = {}
            parents[ref] = feeders([ref.deref().op], routes=routes[ref]) - {ref}
        loss_routes = {}
        heads = {loss.ref()} & set(owners) or feeders([loss.op], logits, routes=loss_routes)
    except _TooLarge:
        return None
    children = collections.defaultdict(set)
    for ref, ps in parents.items():
        for p in ps:
            children[p].add(ref)
    depth_of = _depths(heads, parents)
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
    cuts, unreached = _cuts(routes, loss_routes, owners, loss)
    return LayerGraph(depth, {p: frozenset(s) for p, s in downstream.items()}, order,
                      {p: frozenset(s) for p, s in consumers.items()}, {p: frozenset(s) for p, s in fed.items()},
                      cuts, unreached)


def _logits(owners):
    """A crossentropy on a sigmoid/softmax output reads the logits under it instead (Keras does, for
    numerical stability): from the loss, those logits stand for the captured output. ``logits ref ->
    the captured output's ref``."""
    logits = {}
    for ref in owners:
        t = ref.deref()
        under = compat.keras_logits(t)
        if under is None and t.op.type in ("Softmax", "Sigmoid") and len(t.op.inputs) == 1:
            under = t.op.inputs[0]
        if under is not None and hasattr(under, "ref") and under.ref() not in owners:
            logits[under.ref()] = ref
    return logits


def _depths(heads, parents):
    """Depth of each captured tensor: breadth first from the tensors the loss reads (``heads``)."""
    depth_of = {ref: 0 for ref in heads}
    queue = collections.deque(heads)
    while queue:
        ref = queue.popleft()
        for p in parents.get(ref, ()):
            if p not in depth_of:
                depth_of[p] = depth_of[ref] + 1
                queue.append(p)
    return depth_of


def _cuts(routes, loss_routes, owners, loss):
    """Edges every route of which passes an op with no gradient (``(feeder path, path above) -> the op``),
    and the layer paths no gradient reaches."""
    cuts, clean_parents = {}, collections.defaultdict(set)
    for child, by_parent in list(routes.items()) + [(None, loss_routes)]:
        for parent, ons in by_parent.items():
            if parent == child:
                continue
            if None in ons:
                clean_parents[child].add(parent)
            else:
                above = ["loss"] if child is None else [base_path(q) for q in owners[child]]
                for p in owners[parent]:
                    for a in above:
                        cuts.setdefault((base_path(p), a), sorted(ons)[0])
                        cuts.setdefault((p, a), sorted(ons)[0])
    reached = set(clean_parents[None]) if loss.ref() not in owners else {loss.ref()}
    queue = collections.deque(reached)
    while queue:
        ref = queue.popleft()
        for p in clean_parents.get(ref, ()):
            if p not in reached:
                reached.add(p)
                queue.append(p)
    reached_paths = {q for ref in reached for p in owners[ref] for q in (p, base_path(p))}
    unreached = frozenset(q for ref in owners if ref not in reached for p in owners[ref]
                          for q in (p, base_path(p)) if q not in reached_paths)
    return cuts, unreached


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
