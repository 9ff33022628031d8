"""Cleanup passes: dead code, Identity removal, and rules that remove nodes which compute
their input unchanged (no-op Cast, Reshape, Transpose, Slice, ...) or cancel each other
(consecutive Transposes or Reshapes, Squeeze/Unsqueeze pairs).

Every rule is exact: the output it removes is bit-identical to the value that replaces it.
Operands that older opsets give as attributes and newer ones as inputs (Squeeze axes,
Slice starts/ends, Pad pads, Reshape shape) are read from whichever the node has, so a
rule is right for every opset and for function bodies with their own opset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import AttributeProto

from ir import Attr, Graph, Model, Node, Value
from ir.tensors import dtype_name

from .base import ChangeLog, Match, Pass, PassResult, Reject, RewriteRule, Rewriter, RulePass
from .patterns import attr, const, is_output, only_reader, producer

INT64_MAX = int(np.iinfo(np.int64).max)
INT64_MIN = int(np.iinfo(np.int64).min)


@dataclass
class DeadCodeElimination(Pass):
    """Remove nodes no output depends on and initializers nothing reads, in every graph.
    Graph inputs are the model's signature and stay."""

    name = "dead-code"

    def run(self, model: Model) -> PassResult:
        log = ChangeLog()
        rw = Rewriter(model, log, self.name)
        changed = False
        for graph in _innermost_first(model):
            doomed = _dead_nodes(graph, rw.graph_output_ids())
            if doomed:
                rw.remove_nodes(graph, doomed)
                changed = True
            for value in list(graph.initializers.values()):
                if not value.uses and not value.is_graph_input and id(value) not in rw.graph_output_ids():
                    rw.remove_initializer(graph, value)
                    changed = True
        return PassResult(changed, log)


def _dead_nodes(graph: Graph, outputs: set[int]) -> list[Node]:
    """Nodes whose outputs are read only by dead nodes (bodies of dead nodes included) and
    are no graph output, readers first: one backward sweep, then one batched removal."""
    dead: set[int] = set()
    doomed = []
    for node in reversed(graph.nodes):
        if all(v is None or (id(v) not in outputs and all(id(user) in dead for user, _ in v.uses))
               for v in node.outputs):
            doomed.append(node)
            dead.add(id(node))
            dead.update(id(inner) for sub in node.subgraphs() for inner in sub.walk())
    return doomed


def _innermost_first(model: Model) -> list[Graph]:
    """Subgraphs before the graphs that own them, so a body's dead reads of outer values
    are gone before the outer graph is swept."""
    return list(reversed(list(model.graphs())))


# -- helpers -------------------------------------------------------------------------------

OUTPUT_BLOCKED = "carries a graph output from an input, initializer, outer value or another output"


def _forward(node: Node, source: Value | None, *consumed: Node) -> Match | Reject:
    """Match that makes every reader of the node's first output read `source` instead.
    A graph output keeps its name, so `source` must be able to take it: produced in the
    same graph and not itself an output (else `replace_uses` would need an Identity, which
    RemoveIdentity would try to remove again)."""
    out = node.outputs[0] if node.outputs else None
    if source is None or out is None:
        return Reject("no input or output")
    graph = node.graph
    if any(o is out for o in graph.outputs):
        owned = source.producer is not None and source.producer.graph is graph
        if not owned or is_output(source):
            return Reject(OUTPUT_BLOCKED)
    return Match([node, *consumed], {"out": out, "source": source})


def _has_refs(node: Node) -> bool:
    """An attribute refers to a function attribute: its value is unknown here."""
    return any(a.ref_attr_name for a in node.attributes.values())


def _ints(node: Node, name: str, index: int) -> list[int] | Reject | None:
    """An int-list operand that older opsets give as attribute `name` and newer ones as
    input `index`: the list, None when absent, or a Reject when it is not a constant."""
    a = node.attributes.get(name)
    if a is not None:
        return [int(i) for i in a.value]
    v = node.inputs[index] if index < len(node.inputs) else None
    if v is None:
        return None
    data = const(v)
    if data is None:
        return Reject(f"{name} is not a constant")
    return [int(i) for i in data.ravel()]


def _same_axes(a: list[int], b: list[int], rank: int | None) -> bool:
    """The same set of axes, both relative to a tensor of `rank` (None when unknown: then
    only literally equal lists can be proven equal)."""
    if sorted(a) == sorted(b):
        return True
    return rank is not None and sorted(i % rank for i in a) == sorted(i % rank for i in b)


class _Rule(RewriteRule):
    """Rejects nodes whose attributes refer to function attributes, then calls `check`."""

    def match(self, node: Node) -> Match | Reject:
        if _has_refs(node):
            return Reject("an attribute refers to a function attribute")
        return self.check(node)

    def check(self, node: Node) -> Match | Reject:
        raise NotImplementedError


class _Forward(_Rule):
    """A node whose output equals one of its inputs: readers of the output read the input."""

    def rewrite(self, match: Match, rewriter: Rewriter) -> None:
        rewriter.replace_uses(match["out"], match["source"])


# -- single no-op nodes -------------------------------------------------------------------


class RemoveIdentity(_Forward):
    """Identity(x) -> x for every reader of its output."""

    op_type = "Identity"

    def check(self, node: Node) -> Match | Reject:
        if node.inputs[0] is None or node.outputs[0] is None:
            return Reject("Identity without input or output")
        return _forward(node, node.inputs[0])


class RemoveDropout(_Forward):
    """Dropout at inference is a copy of its input."""

    op_type = "Dropout"

    def check(self, node: Node) -> Match | Reject:
        mask = node.outputs[1] if len(node.outputs) > 1 else None
        if mask is not None and (mask.uses or is_output(mask)):
            return Reject("mask output is used")
        if self.opset < 7 and not attr(node, "is_test", 0):
            return Reject("is_test is 0: training mode (before opset 7)")
        training = node.inputs[2] if len(node.inputs) > 2 else None
        if training is not None:
            flag = const(training)
            if flag is None:
                return Reject("training_mode is not a constant")
            if flag.any():
                return Reject("training_mode is true")
        return _forward(node, node.inputs[0])


class RemoveCast(_Forward):
    """Cast to the type the input already has."""

    op_type = "Cast"

    def check(self, node: Node) -> Match | Reject:
        x, to = node.inputs[0], attr(node, "to")
        if not isinstance(to, int):
            return Reject("'to' is not a type code (a string before opset 6)")
        if x is None or x.dtype is None:
            return Reject("input dtype unknown")
        if x.dtype != to:
            return Reject(f"casts {dtype_name(x.dtype)} to {dtype_name(to)}")
        return _forward(node, x)


class RemoveCastLike(_Forward):
    """CastLike to a tensor of the type the input already has."""

    op_type = "CastLike"

    def check(self, node: Node) -> Match | Reject:
        x, like = node.inputs[0], node.inputs[1]
        if x is None or like is None or x.dtype is None or like.dtype is None:
            return Reject("input dtype unknown")
        if x.dtype != like.dtype:
            return Reject(f"casts {dtype_name(x.dtype)} to {dtype_name(like.dtype)}")
        return _forward(node, x)


class RemoveReshape(_Forward):
    """Reshape to the shape the input already has."""

    op_type = "Reshape"

    def check(self, node: Node) -> Match | Reject:
        x = node.inputs[0]
        target = _ints(node, "shape", 1)  # an attribute before opset 5
        if isinstance(target, Reject):
            return target
        if target is None:
            return Reject("no target shape")
        if x is None or x.shape is None:
            return Reject("input shape unknown")
        if why := _reshape_changes(x.shape, target, attr(node, "allowzero", 0)):
            return Reject(why)
        return _forward(node, x)


def _reshape_changes(shape: tuple, target: list[int], allowzero: int) -> str | None:
    """Why reshaping `shape` to `target` may change it, or None when it provably does not."""
    if len(target) != len(shape):
        return f"changes rank {len(shape)} to {len(target)}"
    if target.count(-1) > 1:
        return "more than one -1"
    for i, (t, d) in enumerate(zip(target, shape)):
        if isinstance(d, int) and t == d:
            continue
        if t == 0 and not allowzero:
            continue  # copies the input dim
        if t == -1:
            # The inferred dim is numel / product(others); when every other dim is kept (the
            # loop checks them) it is this one, unless another dim is 0 (no inference).
            if any(e == 0 for j, e in enumerate(shape) if j != i):
                return "-1 next to a zero-size dim"
            continue
        return f"dim {i}: {t} may differ from input dim {d!r}"
    return None


class RemoveTranspose(_Forward):
    """Transpose with the identity permutation."""

    op_type = "Transpose"

    def check(self, node: Node) -> Match | Reject:
        x, perm = node.inputs[0], attr(node, "perm")
        if perm is None:  # the default reverses the dims: a no-op only up to rank 1
            if x is None or x.shape is None:
                return Reject("no perm and input rank unknown")
            perm = list(reversed(range(len(x.shape))))
        if list(perm) != list(range(len(perm))):
            return Reject(f"perm {list(perm)} is not the identity")
        return _forward(node, x)


class RemoveExpand(_Forward):
    """Expand to a shape that broadcasts to the input's own shape."""

    op_type = "Expand"

    def check(self, node: Node) -> Match | Reject:
        x, target = node.inputs[0], const(node.inputs[1])
        if target is None:
            return Reject("shape is not a constant")
        if x is None or x.shape is None:
            return Reject("input shape unknown")
        target = [int(t) for t in target.ravel()]
        if len(target) > len(x.shape):
            return Reject(f"broadcasts rank {len(x.shape)} to {len(target)}")
        for t, d in zip(reversed(target), reversed(x.shape)):
            if t != 1 and t != d:  # a symbolic or unknown dim d may be 1 and broadcast to t
                return Reject(f"may broadcast dim {d!r} to {t}")
        return _forward(node, x)


class RemoveSlice(_Forward):
    """Slice over the full range of every sliced axis with step 1."""

    op_type = "Slice"

    def check(self, node: Node) -> Match | Reject:
        x = node.inputs[0]
        # Attributes before opset 10, inputs since.
        operands = [_ints(node, name, i) for i, name in enumerate(("starts", "ends", "axes", "steps"), 1)]
        for r in operands:
            if isinstance(r, Reject):
                return r
        starts, ends, axes, steps = operands
        if starts is None or ends is None:
            return Reject("no starts or ends")
        axes = list(range(len(starts))) if axes is None else axes
        steps = [1] * len(starts) if steps is None else steps
        shape = x.shape if x is not None else None
        for axis, start, end, step in zip(axes, starts, ends, steps):
            if step != 1:
                return Reject(f"step {step} on axis {axis}")
            if axis < 0:
                if shape is None:
                    return Reject("negative axis and input rank unknown")
                axis += len(shape)
            d = shape[axis] if shape is not None and 0 <= axis < len(shape) else None
            known = isinstance(d, int)
            if not (start == 0 or start == INT64_MIN or (known and start <= -d)):
                return Reject(f"starts at {start} on axis {axis} (dim {d!r})")
            if not (end == INT64_MAX or (known and end >= d)):
                return Reject(f"ends at {end} on axis {axis} (dim {d!r})")
        return _forward(node, x)


class RemovePad(_Forward):
    """Pad with all pads zero (any mode)."""

    op_type = "Pad"

    def check(self, node: Node) -> Match | Reject:
        pads = _ints(node, "pads", 1)  # attribute before opset 11 ('paddings' in opset 1)
        if pads is None and "paddings" in node.attributes:
            pads = [int(p) for p in node.attributes["paddings"].value]
        if isinstance(pads, Reject):
            return pads
        if pads is None:
            return Reject("no pads")
        if any(pads):
            return Reject(f"pads {pads} are not all zero")
        return _forward(node, node.inputs[0])


class RemoveConcat(_Forward):
    """Concat of a single input."""

    op_type = "Concat"

    def check(self, node: Node) -> Match | Reject:
        if len(node.inputs) != 1:
            return Reject(f"{len(node.inputs)} inputs")
        return _forward(node, node.inputs[0])


class RemoveSqueeze(_Forward):
    """Squeeze without axes (every dim of size 1) of a tensor with no dim of size 1."""

    op_type = "Squeeze"

    def check(self, node: Node) -> Match | Reject:
        x, axes = node.inputs[0], _ints(node, "axes", 1)
        if isinstance(axes, Reject):
            return axes
        if axes:
            return Reject(f"squeezes axes {axes}")
        if x is None or x.shape is None:
            return Reject("input shape unknown")
        for i, d in enumerate(x.shape):
            if not isinstance(d, int) or d == 1:
                return Reject(f"dim {i} ({d!r}) may be 1")
        return _forward(node, x)


class RemoveUnsqueeze(_Forward):
    """Unsqueeze with an empty list of axes."""

    op_type = "Unsqueeze"

    def check(self, node: Node) -> Match | Reject:
        axes = _ints(node, "axes", 1)
        if isinstance(axes, Reject):
            return axes
        if axes is None:
            return Reject("no axes")
        if axes:
            return Reject(f"inserts axes {axes}")
        return _forward(node, node.inputs[0])


class RemoveFlatten(_Forward):
    """Flatten of a 2-D tensor that it leaves as it is."""

    op_type = "Flatten"

    def check(self, node: Node) -> Match | Reject:
        x, axis = node.inputs[0], attr(node, "axis", 1)
        if x is None or x.shape is None:
            return Reject("input shape unknown")
        if len(x.shape) != 2:
            return Reject(f"input has rank {len(x.shape)}, the output rank 2")
        axis = axis + 2 if axis < 0 else axis
        # The output is (prod(dims[:axis]), prod(dims[axis:])): axis 0 gives (1, d0*d1).
        if (axis == 0 and x.shape[0] != 1) or (axis == 2 and x.shape[1] != 1):
            return Reject(f"axis {axis} changes shape {list(x.shape)}")
        return _forward(node, x)


# -- pairs -------------------------------------------------------------------------------


class ComposeTransposes(_Rule):
    """Transpose(Transpose(x, p1), p2) -> Transpose(x, p1[p2]); an identity result is then
    removed by RemoveTranspose."""

    op_type = "Transpose"

    def check(self, node: Node) -> Match | Reject:
        inner = producer(node.inputs[0], "Transpose")
        if inner is None:
            return Reject("input is not produced by a Transpose")
        if _has_refs(inner):
            return Reject("the inner Transpose refers to a function attribute")
        x, p1, p2 = inner.inputs[0], attr(inner, "perm"), attr(node, "perm")
        rank = next((len(p) for p in (p1, p2) if p is not None), None)
        if rank is None and x is not None and x.shape is not None:
            rank = len(x.shape)
        if rank is None:
            return Reject("no perms and input rank unknown")
        reverse = list(reversed(range(rank)))
        p1 = reverse if p1 is None else list(p1)
        p2 = reverse if p2 is None else list(p2)
        return Match([node, inner], {"x": x, "perm": [p1[i] for i in p2]})

    def rewrite(self, match: Match, rewriter: Rewriter) -> None:
        node = match.nodes[0]
        rewriter.set_input(node, 0, match["x"])
        rewriter.set_attribute(node, "perm", Attr(AttributeProto.INTS, match["perm"]))


class ComposeSlices(_Rule):
    """Slice(Slice(x)) over different axes -> one Slice over both (opset 10+, where the
    operands are inputs); PyTorch exports a 2-D slice as two chained Slices."""

    op_type = "Slice"

    def check(self, node: Node) -> Match | Reject:
        inner = producer(node.inputs[0], "Slice")
        if inner is None:
            return Reject("input is not produced by a Slice")
        if self.opset < 10:
            return Reject("Slice operands are attributes before opset 10")
        if not only_reader(node.inputs[0], node):
            return Reject("the inner Slice is read elsewhere too")
        x = inner.inputs[0]
        rank = len(x.shape) if x is not None and x.shape is not None else None
        parts = []
        for s in (inner, node):
            starts, ends, axes, steps = (_ints(s, "", i) for i in range(1, 5))  # inputs only
            for r in (starts, ends, axes, steps):
                if isinstance(r, Reject):
                    return r
            axes = list(range(len(starts))) if axes is None else axes
            if any(a < 0 for a in axes):
                if rank is None:
                    return Reject("negative axis and input rank unknown")
                axes = [a % rank for a in axes]
            parts.append((starts, ends, axes, steps or [1] * len(starts)))
        if set(parts[0][2]) & set(parts[1][2]):
            return Reject("both Slices cut the same axis")
        merged = [a + b for a, b in zip(*parts)]
        return Match([node, inner], {"x": x, "operands": merged})

    def rewrite(self, match: Match, rewriter: Rewriter) -> None:
        node = match.nodes[0]
        operands = [rewriter.add_initializer(node.graph, f"{node.name}_{n}", np.array(v, np.int64))
                    for n, v in zip(("starts", "ends", "axes", "steps"), match["operands"])]
        fused = rewriter.add_node(node.graph, node, "Slice", [match["x"], *operands], name=node.name)
        rewriter.replace_uses(node.outputs[0], fused.outputs[0])


RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")  # keep element count and order


class ComposeReshapes(_Rule):
    """Reshape(R(x), s) -> Reshape(x, s) where R is a Reshape, Flatten, Squeeze or Unsqueeze:
    the result depends only on the element count, unless `s` has 0 entries that copy dims
    of R's output (allowzero=0)."""

    op_type = "Reshape"

    def check(self, node: Node) -> Match | Reject:
        inner = node.inputs[0].producer if node.inputs[0] is not None else None
        if inner is None or inner.op_type not in RESHAPES or inner.domain not in ("", "ai.onnx"):
            return Reject("input is not produced by Reshape, Flatten, Squeeze or Unsqueeze")
        if not attr(node, "allowzero", 0):
            target = _ints(node, "shape", 1)
            if isinstance(target, Reject):
                return target
            if target is None or 0 in target:
                return Reject("target shape has 0 entries that copy the intermediate's dims")
        return Match([node, inner], {"x": inner.inputs[0]})

    def rewrite(self, match: Match, rewriter: Rewriter) -> None:
        rewriter.set_input(match.nodes[0], 0, match["x"])


def _axes_pair(node: Node, inner_op: str) -> tuple[Node, list | None, list | None] | Reject:
    """For Squeeze/Unsqueeze over Unsqueeze/Squeeze: the inner node, its axes and the outer
    node's axes (attribute or input, by opset)."""
    inner = producer(node.inputs[0], inner_op)
    if inner is None:
        return Reject(f"input is not produced by {inner_op}")
    if _has_refs(inner):
        return Reject(f"the {inner_op} refers to a function attribute")
    inner_axes, outer_axes = _ints(inner, "axes", 1), _ints(node, "axes", 1)
    for r in (inner_axes, outer_axes):
        if isinstance(r, Reject):
            return r
    return inner, inner_axes, outer_axes


class SqueezeOfUnsqueeze(_Forward):
    """Squeeze(Unsqueeze(x, a), a) -> x."""

    op_type = "Squeeze"

    def check(self, node: Node) -> Match | Reject:
        pair = _axes_pair(node, "Unsqueeze")
        if isinstance(pair, Reject):
            return pair
        inner, inserted, squeezed = pair
        if not squeezed:
            return Reject("no axes: squeezes every dim of size 1, not just the inserted ones")
        x = inner.inputs[0]
        rank = len(x.shape) + len(inserted or []) if x is not None and x.shape is not None else None
        if inserted is None or not _same_axes(inserted, squeezed, rank):
            return Reject(f"squeezes axes {squeezed}, not the inserted {inserted}")
        return _forward(node, x, inner)


class UnsqueezeOfSqueeze(_Forward):
    """Unsqueeze(Squeeze(x, a), a) -> x: Squeeze with explicit axes guarantees those dims
    were 1, and Unsqueeze puts them back where they were."""

    op_type = "Unsqueeze"

    def check(self, node: Node) -> Match | Reject:
        pair = _axes_pair(node, "Squeeze")
        if isinstance(pair, Reject):
            return pair
        inner, squeezed, inserted = pair
        if not squeezed:
            return Reject("Squeeze without axes: which dims it removed is not known")
        x = inner.inputs[0]
        rank = len(x.shape) if x is not None and x.shape is not None else None
        if inserted is None or not _same_axes(squeezed, inserted, rank):
            return Reject(f"inserts axes {inserted}, not the squeezed {squeezed}")
        return _forward(node, x, inner)


# -- passes --------------------------------------------------------------------------------


def remove_identity() -> RulePass:
    return RulePass([RemoveIdentity()], name="identity")


def remove_noops() -> RulePass:
    """Every cleanup rule: no-op nodes, cancelling pairs and Identity."""
    return RulePass([
        RemoveIdentity(), RemoveDropout(), RemoveCast(), RemoveCastLike(),
        RemoveReshape(), ComposeReshapes(), RemoveTranspose(), ComposeTransposes(),
        RemoveExpand(), RemoveSlice(), ComposeSlices(), RemovePad(), RemoveConcat(),
        RemoveSqueeze(), SqueezeOfUnsqueeze(), RemoveUnsqueeze(), UnsqueezeOfSqueeze(),
        RemoveFlatten(),
    ], name="cleanup")
