"""Branches no valid input takes: the rank of an If's output from what follows it.

An If whose branches return tensors of different ranks leaves its output's rank unknown, and
with it every rank test downstream. Torch exports that pattern around recurrent layers
(`if x.dim() == 2: x = x.unsqueeze(0)`), and silero-vad's decoder squeezes a time axis of
length 1 in one branch only. Sometimes one branch cannot be part of any run that succeeds:
with that branch's output types, a node that runs whenever the If runs is certain to fail
(silero's LSTM would get a rank-5 input). Then every input the model accepts takes the other
branch, and the If's outputs have that branch's types. That is a fact about every valid input,
like the facts onnx's inference already assumes (an Add's operands broadcast, a Reshape's
target fits): a model's meaning is defined where it runs.

The check is a small abstract run of the nodes after the If in its graph, under the hypothesis
that the If took one branch: Shape, Size and Gather of a Shape follow the hypothesized ranks,
small constant nodes are evaluated, an If whose condition becomes constant runs its branch,
other nodes get onnx's inference of the node alone; whatever the run does not refine keeps the
type the IR has (true of every run, so of this one). A node certainly fails only by the rules
of `violation`, each a check onnxruntime makes (tests/test_feasible.py runs every one in
onnxruntime); an inference error is never taken for a failure. Only live nodes count.

The rewrite only refines types: the If stays, and its condition goes away only if other rules
fold it from the refined types.

Not done, on purpose: onnxscript's optimizer reaches the same types on silero-vad from a type
the exporter declared for an Identity inside the other branch, which it copies onto the outer
value the Identity reads. A branch's declarations hold when that branch runs, not before the
If: that step turns valid models into wrong ones (tests/test_feasible.py shows one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto

from ir import ArrayTensor, Graph, Node, Value
from ir.tensors import storage_bytes

from .base import Change, Match, Reject, Rewriter
from .patterns import NONDETERMINISTIC, attr

SMALL = 4096  # bytes: the constants the abstract run computes with (shape arithmetic)
MAX_STEPS = 1000  # nodes one abstract run may visit; past that it finds no failure
RNNS = ("LSTM", "GRU", "RNN")
RULE = "InfeasibleBranch"
BRANCHES = ("then_branch", "else_branch")


# -- the rewrite ----------------------------------------------------------------------------


def match(node: Node, opsets: dict[str, int] | None = None) -> Match | Reject:
    """An If with an output whose rank differs between its branches, where one branch
    certainly makes a later node of the If's graph fail. The Match holds the branch every
    valid input takes and why the other one fails."""
    if (why := _candidate(node)) is not None:
        return why
    opsets = opsets or {}
    fails = {name: _fails(node, attr(node, name), opsets) for name in BRANCHES}
    if all(fails.values()):
        return Reject("neither branch can succeed: " + "; ".join(fails.values()))
    if not any(fails.values()):
        return Reject("both branches can succeed")
    bad = next(name for name in BRANCHES if fails[name])
    good = next(name for name in BRANCHES if not fails[name])
    return Match([node], {"branch": good, "why": f"the {bad} fails: {fails[bad]}"})


def refine_branch_types(graph: Graph, rw: Rewriter, opsets: dict[str, int]) -> bool:
    """Give the first If of `graph` (not its bodies) that only one branch can leave validly
    the output types of that branch; one `InfeasibleBranch` rewrite. One at a time: folding
    what the new types settle (later rank tests, the Ifs they feed) comes before the next
    If is judged, so each If is judged on the most the IR can know."""
    for node in graph.nodes:
        m = match(node, opsets)
        if not m:
            continue
        rw.rule = RULE
        rw.log.record(Change(RULE, "match", node.name, m["why"]))
        body = attr(node, m["branch"])
        for out, b in zip(node.outputs, body.outputs):
            if out is not None and out.type is None and b.type is None and out.shape is None and \
                    b.shape is not None:
                rw.set_type(out, out.dtype if out.dtype is not None else b.dtype, b.shape)
        return True
    return False


def _candidate(node: Node) -> Reject | None:
    if node.op_type != "If" or node.domain not in ("", "ai.onnx"):
        return Reject("not an If")
    bodies = [attr(node, name) for name in BRANCHES]
    if not all(isinstance(b, Graph) and not b.inputs and len(b.outputs) == len(node.outputs) for b in bodies):
        return Reject("branches do not match the If's outputs")
    for out, a, b in zip(node.outputs, *(body.outputs for body in bodies)):
        if out is None or any(v.type is not None for v in (out, a, b)) or out.shape is not None:
            continue
        if a.shape is not None and b.shape is not None and len(a.shape) != len(b.shape):
            return None
    return Reject("no output of unknown rank whose branches have known, different ranks")


# -- the abstract run ------------------------------------------------------------------------


@dataclass
class Hypothesis:
    """What is known of values in one run: types, small constants, the dims a Shape holds.
    Values not in here have the IR's types."""

    types: dict[int, tuple] = field(default_factory=dict)
    consts: dict[int, np.ndarray] = field(default_factory=dict)
    dims: dict[int, list] = field(default_factory=dict)
    steps: int = 0  # nodes visited, against MAX_STEPS

    def touched(self, v: Value | None) -> bool:
        return v is not None and (id(v) in self.types or id(v) in self.consts or id(v) in self.dims)

    def type(self, v: Value | None) -> tuple:
        if v is None or v.type is not None:
            return (None, None)
        return self.types.get(id(v), (v.dtype, v.shape))

    def const(self, v: Value | None) -> np.ndarray | None:
        if v is None:
            return None
        if id(v) in self.consts:
            return self.consts[id(v)]
        t = v.const
        return t.numpy() if t is not None and t.nbytes <= SMALL else None

    def learn(self, v: Value, dtype, shape, data: np.ndarray | None = None, dims: list | None = None) -> None:
        """What the run computed for `v`, merged with what the IR knows (when the ranks
        disagree, neither is kept: the run does not guess)."""
        ir_dtype, ir_shape = (v.dtype, v.shape) if v.type is None else (None, None)
        if shape is not None and ir_shape is not None:
            shape = tuple(a if isinstance(a, int) else b if isinstance(b, int) else a or b
                          for a, b in zip(shape, ir_shape)) if len(shape) == len(ir_shape) else None
        elif shape is None:
            shape = ir_shape if data is None else tuple(data.shape)
        self.types[id(v)] = (dtype if dtype is not None else ir_dtype, shape)
        if data is not None:
            self.consts[id(v)] = data
        if dims is not None:
            self.dims[id(v)] = dims


def _fails(node: Node, branch: Graph, opsets: dict[str, int]) -> str | None:
    """Why a run of `node`'s graph in which `node` takes `branch` certainly fails, or None."""
    hyp = Hypothesis()
    for out, b in zip(node.outputs, branch.outputs):
        dtype, shape = hyp.type(b)
        if out is not None and (shape is not None or hyp.const(b) is not None):
            hyp.learn(out, dtype, shape, hyp.const(b))
    graph = node.graph
    return _run(graph.nodes[graph.nodes.index(node) + 1:], graph, hyp, opsets)


def _run(nodes: list[Node], graph: Graph, hyp: Hypothesis, opsets: dict[str, int],
         alive: bool = True) -> str | None:
    """Run `nodes` (of `graph`, in order) under the hypothesis; the first certain failure of
    a live node. `alive`: the graph's own outputs are needed (a branch of a live If)."""
    live = None
    for node in nodes:
        if not _reads(node, hyp):
            continue
        hyp.steps += 1
        if hyp.steps > MAX_STEPS:
            return None
        if live is None:
            live = _live(graph) if alive else set()
        if id(node) in live and (why := violation(node, hyp.type, hyp.const)) is not None:
            return f"{node.op_type} '{node.name}': {why}"
        if (why := _step(node, hyp, opsets, id(node) in live)) is not None:
            return why
    return None


def _reads(node: Node, hyp: Hypothesis) -> bool:
    """The node reads a value the hypothesis knows more of (in its bodies too)."""
    if any(hyp.touched(v) for v in node.inputs):
        return True
    return any(hyp.touched(v) for sub in node.subgraphs() for inner in sub.walk() for v in inner.inputs)


def _live(graph: Graph) -> set[int]:
    """Ids of the nodes some output of `graph` depends on (a body's reads count for the
    node that owns it)."""
    needed = {id(v) for v in graph.outputs}
    live: set[int] = set()
    for node in reversed(graph.nodes):
        if any(o is not None and id(o) in needed for o in node.outputs):
            live.add(id(node))
            needed.update(id(v) for v in node.inputs if v is not None)
            needed.update(id(v) for sub in node.subgraphs() for inner in sub.walk()
                          for v in inner.inputs if v is not None)
    return live


def _step(node: Node, hyp: Hypothesis, opsets: dict[str, int], alive: bool) -> str | None:
    """Learn what `node` computes under the hypothesis; a failure found inside a branch the
    node certainly takes (when the node is live) is returned."""
    if node.domain not in ("", "ai.onnx"):
        return None
    op, ins, outs = node.op_type, node.inputs, node.outputs
    if op == "If":
        cond = hyp.const(ins[0])
        if cond is None or cond.size != 1:
            return None
        body = attr(node, BRANCHES[0] if bool(cond.ravel()[0]) else BRANCHES[1])
        if not isinstance(body, Graph) or body.inputs or len(body.outputs) != len(outs):
            return None
        if (why := _run(body.nodes, body, hyp, opsets, alive)) is not None:
            return why
        for out, b in zip(outs, body.outputs):
            if out is not None:
                hyp.learn(out, *hyp.type(b), hyp.const(b), hyp.dims.get(id(b)))
        return None
    if any(node.subgraphs()) or op in NONDETERMINISTIC or any(o is not None and o.type is not None for o in outs):
        return None
    if op == "Shape":
        shape = hyp.type(ins[0])[1]
        if shape is not None:
            dims = _slice_dims(node, shape)
            data = np.array(dims, np.int64) if all(isinstance(d, int) for d in dims) else None
            hyp.learn(outs[0], TensorProto.INT64, (len(dims),), data, dims)
        return None
    if op == "Size":
        shape = hyp.type(ins[0])[1]
        if shape is not None and all(isinstance(d, int) for d in shape):
            hyp.learn(outs[0], TensorProto.INT64, (), np.array(math.prod(shape), np.int64))
        return None
    if op == "Gather" and id(ins[0]) in hyp.dims and attr(node, "axis", 0) == 0:
        dims, indices = hyp.dims[id(ins[0])], hyp.const(ins[1])
        if indices is not None and indices.dtype.kind == "i" and \
                all(-len(dims) <= i < len(dims) for i in indices.ravel()):
            picked = np.array(dims, dtype=object)[indices.astype(np.int64)]
            if all(isinstance(d, int) for d in np.ravel(picked)):
                hyp.learn(outs[0], TensorProto.INT64, indices.shape, np.asarray(picked, np.int64))
        return None
    types = _infer(node, hyp, opsets)
    present = [v for v in ins if v is not None]
    if present and all(hyp.const(v) is not None for v in present) and _small(outs, types):
        from .fold import evaluate  # fold calls this module: imported when first needed

        results = evaluate(node, opsets, [None if v is None else ArrayTensor(hyp.const(v)) for v in ins])
        if results is not None:
            for out, r in zip(outs, results):
                if out is not None and r is not None:
                    hyp.learn(out, _tensor_type(r), tuple(r.shape), r)
            return None
    for out, t in zip(outs, types):
        if out is not None and t is not None:
            hyp.learn(out, *t)
    return None


def _small(outs, types: list) -> bool:
    """Every output's size is known before evaluating, and small (the inputs of a
    ConstantOfShape or an Expand may be small while its output is not)."""
    if len(types) != len(outs):
        return False
    for out, t in zip(outs, types):
        if out is None:
            continue
        if t is None or t[0] is None or t[1] is None or not all(isinstance(d, int) for d in t[1]):
            return False
        size = storage_bytes(t[0], math.prod(t[1]))
        if size is None or size > SMALL:
            return False
    return True


def _slice_dims(shape_node: Node, shape: tuple) -> list:
    rank = len(shape)
    start, end = attr(shape_node, "start", 0), attr(shape_node, "end", rank)
    start, end = (min(max(k + rank if k < 0 else k, 0), rank) for k in (start, end))
    return list(shape[start:end])


def _tensor_type(array: np.ndarray) -> int | None:
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    except (KeyError, TypeError, ValueError):
        return None


def _infer(node: Node, hyp: Hypothesis, opsets: dict[str, int]) -> list:
    """(dtype, shape) per output from onnx's inference of the node alone, on the
    hypothesis' types and small constants; [] when an input's dtype is unknown or onnx
    gives up."""
    from .fold import _one_node
    from .shapes import _dim

    given = []
    for v in node.inputs:
        if v is None:
            given.append(None)
        elif (c := hyp.const(v)) is not None:
            given.append(ArrayTensor(c))
        else:
            dtype, shape = hyp.type(v)
            if dtype is None:
                return []
            given.append((dtype, shape))
    try:
        proto = onnx.shape_inference.infer_shapes(_one_node(node, opsets, given), strict_mode=False)
    except Exception:  # noqa: BLE001 - an inference error is no evidence of anything
        return []
    found = {}
    for vi in proto.graph.output:
        tt = vi.type.tensor_type
        if vi.type.WhichOneof("value") == "tensor_type":
            found[vi.name] = (tt.elem_type or None,
                              tuple(_dim(d) for d in tt.shape.dim) if tt.HasField("shape") else None)
    return [found.get(f"out{j}") if o is not None else None for j, o in enumerate(node.outputs)]


# -- certain failures -------------------------------------------------------------------------


def violation(node: Node, type_of=lambda v: (v.dtype, v.shape), const_of=lambda v: None) -> str | None:
    """Why `node` certainly fails with inputs of these types, or None. Only ranks and axes
    are checked, each the way onnxruntime does (tests/test_feasible.py)."""
    if node.domain not in ("", "ai.onnx"):
        return None
    op, ins = node.op_type, node.inputs

    def rank(i: int) -> int | None:
        v = ins[i] if i < len(ins) else None
        shape = type_of(v)[1] if v is not None else None
        return None if shape is None else len(shape)

    if op in RNNS:
        named = [(0, "X"), (1, "W"), (2, "R"), (5, "initial_h")] + ([(6, "initial_c")] if op == "LSTM" else [])
        for i, name in named:
            if (r := rank(i)) is not None and r != 3:
                return f"input {name} has rank {r}, {op} needs 3"
    elif op in ("Conv", "ConvTranspose"):
        rx, rw = rank(0), rank(1)
        if rx is not None and rw is not None and rx != rw:
            return f"input X has rank {rx}, its weight rank {rw}"
    elif op == "Gemm":
        for i, name in ((0, "A"), (1, "B")):
            if (r := rank(i)) is not None and r != 2:
                return f"input {name} has rank {r}, Gemm needs 2"
    elif op == "Concat":
        ranks = {r for i in range(len(ins)) if (r := rank(i)) is not None}
        if len(ranks) > 1:
            return f"inputs of ranks {sorted(ranks)}"
    elif op in ("Squeeze", "Unsqueeze"):
        return _axes_violation(node, rank(0), type_of, const_of)
    return None


def _axes_violation(node: Node, rank: int | None, type_of, const_of) -> str | None:
    if rank is None:
        return None
    a = node.attributes.get("axes")
    if a is not None:
        if a.ref_attr_name:
            return None
        axes = [int(i) for i in a.value]
    else:
        data = const_of(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        if data is None:
            return None
        axes = [int(i) for i in np.ravel(data)]
    if node.op_type == "Unsqueeze":
        out = rank + len(axes)
        if any(not -out <= i < out for i in axes):
            return f"axes {axes} out of range for an output of rank {out}"
        return None
    if any(not -rank <= i < rank for i in axes):
        return f"axes {axes} out of range for an input of rank {rank}"
    shape = type_of(node.inputs[0])[1]
    for i in axes:
        d = shape[i % rank]
        if isinstance(d, int) and d != 1:
            return f"squeezes axis {i} of size {d}"
    return None


__all__ = ["Hypothesis", "RULE", "match", "refine_branch_types", "violation"]
