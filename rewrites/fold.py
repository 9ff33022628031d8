"""Constant folding: evaluate what does not depend on the model's inputs.

A node whose inputs are all constant is evaluated (onnxruntime on a one-node model, else
onnx's reference evaluator) and its outputs become initializers. Shape arithmetic folds
when the shapes it reads are static, and an If with a constant condition is replaced by its
branch. Folding is size-safe: output sizes are known before anything is evaluated, no tensor
over `size_limit` is made, and the model never grows unless `allow_growth`.

Growth is judged per region, not per node: the nodes computable from constants form a region,
split into connected pieces (linked by the values they compute and by the weights they
share). A piece folds as a whole when the values leaving it (read by other nodes, or graph
outputs) weigh no more than the constants it frees: `Slice(W) x3 -> Concat` reorders W in
place, though each Slice alone would duplicate part of W.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

import ir
from ir import ArrayTensor, Graph, Model, Node, Value
from ir.printer import format_bytes
from ir.tensors import Tensor, storage_bytes

from .base import Change, ChangeLog, Match, Pass, PassResult, Reject, Rewriter
from .patterns import (NONDETERMINISTIC, attr, const, default_opset, output_ids, producer,
                       static_shape)
from .shapes import broadcast, shape_dims

GROWTH_SLACK = 1024  # bytes a fold may add, so shape arithmetic on tiny tensors folds
INFERENCE_DATA_LIMIT = 4096  # constant inputs up to this size are visible to shape inference

QUANTIZATION = frozenset("QuantizeLinear DequantizeLinear DynamicQuantizeLinear".split())
NON_TENSOR = frozenset("""SequenceConstruct SequenceEmpty SequenceInsert SequenceErase SequenceAt
    SequenceLength SequenceMap SplitToSequence ConcatFromSequence Optional OptionalGetElement
    OptionalHasElement""".split())


@dataclass
class Region:
    """A connected piece of constant computation, folded as a whole or not at all."""

    nodes: list[Node]  # topological order
    frontier: list[Value]  # values read outside the region or graph outputs: become initializers
    freed: list[Value]  # constants only the region reads: they go away
    verdict: Match | Reject


@dataclass
class FoldConstants(Pass):
    """Fold constant subexpressions in the main graph and every subgraph.

    The change log holds one `FoldConstants` rewrite per folded node (also when a region of
    several nodes is committed at once), one `FoldShape` per shape-arithmetic node, one
    `InlineConstantIf` per inlined If and one `InfeasibleBranch` per If whose output types
    were refined from the only branch a valid input can take."""

    size_limit: int = 1 << 20  # bytes: no folded tensor may be larger
    allow_growth: bool = False  # allow folds whose outputs outweigh the constants they free
    name = "fold-constants"

    def run(self, model: Model) -> PassResult:
        log = ChangeLog()
        rw = Rewriter(model, log, "FoldConstants")
        # Function bodies are not folded: a FunctionProto has no initializers to fold into.
        return PassResult(self._graph(model.graph, rw, model.opset_imports), log)

    def _graph(self, graph: Graph, rw: Rewriter, opsets: dict[str, int]) -> bool:
        """Sweep until nothing changes: a sweep's folds can make new regions (a Reshape whose
        size was unknown until its shape input folded). Every change removes a node, or
        gives an If output of unknown rank the rank of the only branch a valid input can
        take (`feasible.py`), after which rank tests on it fold."""
        from .feasible import refine_branch_types  # it evaluates nodes with this module

        changed = False
        while True:
            while self._sweep(graph, rw, opsets):
                changed = True
            if not refine_branch_types(graph, rw, opsets):
                return changed
            changed = True

    def _sweep(self, graph: Graph, rw: Rewriter, opsets: dict[str, int]) -> bool:
        """One sweep in topological order: a region that may fold is evaluated and committed
        at its first node; folded results feed the next node, so chains fold in one run. An
        inlined branch lands where the If was, and is swept next."""
        regions = self.regions(graph, opsets, rw.graph_output_ids())
        plan = {id(n): r for r in regions if r.verdict for n in r.nodes}
        changed, done, i = False, set(), 0
        while i < len(graph.nodes):
            node = graph.nodes[i]
            done.add(node)
            if self._node(node, rw, opsets, plan):
                changed = True
                # The node is gone, and maybe constants before it: resume at the first node
                # not yet seen (an inlined branch's first node, or the successor).
                i = min(i, len(graph.nodes))
                while i > 0 and graph.nodes[i - 1] not in done:
                    i -= 1
                continue
            bodies = list(node.subgraphs())
            for sub in bodies:
                changed |= self._graph(sub, rw, opsets)
            # Folding in a body may drop a constant of this graph that only it read.
            i = graph.nodes.index(node) + 1 if bodies else i + 1
        return changed

    def _node(self, node: Node, rw: Rewriter, opsets: dict[str, int], plan: dict[int, Region]) -> bool:
        if (m := constant_if(node)):
            _record(rw, "InlineConstantIf", node)
            _inline_branch(m, rw)
            return True
        if (m := self.match_shape(node)):
            _record(rw, "FoldShape", node)
            _replace(node, [m["value"]], rw)
            return True
        if (region := plan.get(id(node))) is not None:
            for n in region.nodes:  # tried once; if it fails its nodes fold one by one below
                del plan[id(n)]
            if (arrays := self._evaluate_region(region, opsets)) is not None:
                _commit(region, arrays, rw)
                return True
        if not (m := self.match(node, opsets, rw.graph_output_ids())):
            return False
        arrays = evaluate(node, opsets)
        if arrays is None or not _plausible(node, arrays, self.size_limit):
            return False
        _record(rw, "FoldConstants", node)
        _replace(node, arrays, rw)
        return True

    # -- what may fold (pure) ---------------------------------------------------------------

    def match(self, node: Node, opsets: dict[str, int] | None = None,
              outputs: set[int] | None = None) -> Match | Reject:
        """Whether `node` alone may be evaluated now; the Match holds its output sizes in
        bytes. `outputs`: ids of every graph output of the model (the Rewriter's cached set
        when run; without one, those of the graphs `node` can see)."""
        outputs = output_ids(node.graph) if outputs is None else outputs
        types = self._admit(node, opsets or {}, outputs, {})
        if isinstance(types, Reject):
            return types
        sizes = [_nbytes(*t) for t in types]
        freed = sum(v.const.nbytes for v in _dying_inputs(node, outputs))
        grown = self._growth(sum(sizes), freed)
        return Match([node], {"sizes": sizes}) if grown is None else grown

    def regions(self, graph: Graph, opsets: dict[str, int] | None = None,
                outputs: set[int] | None = None) -> list[Region]:
        """The pieces of constant computation in `graph`, each with its verdict. Pure:
        nothing is evaluated, sizes come from types. Pieces are linked by the values they
        compute and by weights they share that would be freed; constants within the growth
        slack link nothing (freeing them cannot pay for anything), so unrelated folds that
        read the same axes constant do not depend on each other."""
        opsets = opsets or {}
        outputs = output_ids(graph) if outputs is None else outputs
        types: dict[int, tuple] = {}  # id -> (dtype, shape) of the values the region computes
        members: list[Node] = []
        for node in graph.nodes:
            if self.match_shape(node):
                continue  # shape arithmetic: folded as such, never grows
            got = self._admit(node, opsets, outputs, types)
            if isinstance(got, Reject):
                continue
            members.append(node)
            types.update((id(o), t) for o, t in zip(node.outputs, got) if o is not None)
        parent = {id(n): id(n) for n in members}

        def find(k: int) -> int:
            while parent[k] != k:
                parent[k] = parent[parent[k]]
                k = parent[k]
            return k

        for node in members:
            for v in node.inputs:
                if v is None:
                    continue
                if id(v) in types:
                    parent[find(id(node))] = find(id(v.producer))
                elif v.const.nbytes > GROWTH_SLACK and id(v) not in outputs and \
                        all(id(user) in parent for user, _ in v.uses):
                    for user, _ in v.uses:
                        parent[find(id(user))] = find(id(node))
        pieces: dict[int, list[Node]] = {}
        for node in members:
            pieces.setdefault(find(id(node)), []).append(node)
        return [self._judge(nodes, types, outputs) for nodes in pieces.values()]

    def _judge(self, nodes: list[Node], types: dict[int, tuple], outputs: set[int]) -> Region:
        ids = {id(n) for n in nodes}
        frontier = [o for n in nodes for o in n.outputs if o is not None and
                    (id(o) in outputs or any(id(user) not in ids for user, _ in o.uses))]
        consts = {id(v): v for n in nodes for v in n.inputs if v is not None and id(v) not in types}
        freed = [v for v in consts.values()
                 if id(v) not in outputs and all(id(user) in ids for user, _ in v.uses)]
        grown = self._growth(sum(_nbytes(*types[id(o)]) for o in frontier),
                             sum(v.const.nbytes for v in freed))
        return Region(nodes, frontier, freed, Match(nodes) if grown is None else grown)

    def _growth(self, made: int, freed: int) -> Reject | None:
        if self.allow_growth or made <= freed + GROWTH_SLACK:
            return None
        return Reject(f"would grow the model: {format_bytes(made)} of outputs for "
                      f"{format_bytes(freed)} of constants freed")

    def _admit(self, node: Node, opsets: dict[str, int], outputs: set[int],
               pending: dict[int, tuple]) -> list[tuple] | Reject:
        """The static (dtype, shape) of each output if `node` can be evaluated from constants
        and from the values in `pending` (computed earlier in the region, by id), within
        the size limit; else why not."""
        if (why := _unfoldable(node)) is not None:
            return why
        present = [v for v in node.inputs if v is not None]
        if not present:
            return Reject("no inputs")
        for v in present:
            if v.const is None and id(v) not in pending:
                return Reject(f"input %{v.name} is not constant")
        if node.op_type == "Identity" and any(id(o) in outputs for o in node.outputs):
            return Reject("already a constant carried to a graph output")
        for v in present:
            if v.const is not None and v.const.nbytes > self.size_limit:
                return Reject(f"input %{v.name} is {format_bytes(v.const.nbytes)}, over the size "
                              f"limit")
        types = output_types(node, opsets, pending)
        if types is None:
            return Reject("output size unknown before evaluation")
        for out, t in zip(node.outputs, types):
            if out is not None and _nbytes(*t) > self.size_limit:
                return Reject(f"output %{out.name} would be {format_bytes(_nbytes(*t))}, over the "
                              f"size limit of {format_bytes(self.size_limit)}")
        return types

    def _evaluate_region(self, region: Region, opsets: dict[str, int]) -> dict[int, np.ndarray] | None:
        """The frontier values of the region, by id, evaluated node by node in memory. A
        value is dropped once its last reader in the region ran, unless it leaves the
        region, so memory holds the frontier and the live intermediates, each within the
        size limit. None if the region changed since it was planned or a node cannot be
        evaluated."""
        keep = {id(v) for v in region.frontier}
        readers = Counter(id(v) for n in region.nodes for v in n.inputs if v is not None)
        arrays: dict[int, np.ndarray] = {}
        for node in region.nodes:
            if node.graph is None:
                return None  # removed earlier in the sweep (e.g. as dead)
            inputs = [None if v is None else
                      ArrayTensor(arrays[id(v)]) if id(v) in arrays else v.const for v in node.inputs]
            if any(v is not None and t is None for v, t in zip(node.inputs, inputs)):
                return None
            results = evaluate(node, opsets, inputs)
            if results is None or not _plausible(node, results, self.size_limit):
                return None
            for out, array in zip(node.outputs, results):
                if out is not None and (readers[id(out)] or id(out) in keep):
                    arrays[id(out)] = array
            for v in node.inputs:
                if v is not None and id(v) in arrays:
                    readers[id(v)] -= 1
                    if not readers[id(v)] and id(v) not in keep:
                        del arrays[id(v)]
        return {k: arrays[k] for k in keep}

    def match_shape(self, node: Node) -> Match | Reject:
        """Shape, Size, and Gather of a Shape, when the dimensions they read are fixed."""
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Shape", "Size", "Gather"):
            return Reject("not shape arithmetic")
        x = node.inputs[0]
        if node.op_type == "Size":
            shape = static_shape(x)
            if shape is None and (src := producer(x, "Shape")) is not None and \
                    (dims := shape_dims(src)) is not None:
                shape = (len(dims),)  # Size(Shape(x)) is the rank: x's dims may be unknown
            return Match([node], {"value": np.array(math.prod(shape), np.int64)}) if shape is not None \
                else Reject(f"shape of %{x.name} is not static")
        source = node if node.op_type == "Shape" else producer(x, "Shape")
        if source is None:
            return Reject("not a Gather of a Shape")
        dims = shape_dims(source)
        if dims is None:
            return Reject(f"rank of %{source.inputs[0].name} is unknown")
        if node.op_type == "Shape":
            picked = np.array(dims, dtype=object)
        else:
            indices = const(node.inputs[1])
            if indices is None or attr(node, "axis", 0) != 0:
                return Reject("indices are not constant")
            if indices.size and (indices.min() < -len(dims) or indices.max() >= len(dims)):
                return Reject("indices out of range")
            picked = np.asarray(np.array(dims, dtype=object)[indices.astype(np.int64)], dtype=object)
        if not all(isinstance(d, int) for d in picked.ravel()):
            return Reject(f"dimensions of %{source.inputs[0].name} read here are not static")
        return Match([node], {"value": picked.astype(np.int64)})


def _unfoldable(node: Node) -> Reject | None:
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return Reject(f"custom domain '{node.domain}'")
    if op == "Constant":
        return Reject("already a constant")
    if op in NONDETERMINISTIC:
        return Reject(f"{op} is not deterministic")
    if op in QUANTIZATION:
        return Reject("quantized weights stay quantized")
    if op in NON_TENSOR or any(v is not None and v.type is not None for v in node.outputs):
        return Reject("produces a sequence or optional")
    if any(a.graphs() for a in node.attributes.values()):
        return Reject("has a subgraph")
    if any(a.ref_attr_name for a in node.attributes.values()):
        return Reject("an attribute refers to a function attribute")
    return None


def _dying_inputs(node: Node, outputs: set[int]) -> list[Value]:
    """Constant inputs read only by this node: folding frees them."""
    seen, out = set(), []
    for v in node.inputs:
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        if all(user is node for user, _ in v.uses) and id(v) not in outputs:
            out.append(v)
    return out


# -- output sizes before evaluation ----------------------------------------------------------


def output_types(node: Node, opsets: dict[str, int],
                 pending: dict[int, tuple] | None = None) -> list[tuple] | None:
    """Static (dtype, shape) of each output ((None, ()) for omitted ones), None if unknown:
    the inferred types when static, else onnx's inference on a one-node model that sees the
    small constant inputs; inputs not computed yet (`pending`: id -> type) are typed only."""
    types = [(o.dtype, static_shape(o)) if o is not None else (None, ()) for o in node.outputs]
    if any(o is not None and (d is None or s is None) for o, (d, s) in zip(node.outputs, types)):
        pending = pending or {}
        inputs = []
        for v in node.inputs:
            t = None if v is None else v.const
            if v is not None and t is None:
                t = pending.get(id(v))
                if t is None:
                    return None
            elif t is not None and t.nbytes > INFERENCE_DATA_LIMIT:
                t = (t.dtype, t.shape)
            inputs.append(t)
        try:
            proto = onnx.shape_inference.infer_shapes(_one_node(node, opsets, inputs), strict_mode=False)
        except Exception:  # noqa: BLE001 - no size, no fold
            return None
        found = {}
        for vi in list(proto.graph.output) + list(proto.graph.value_info):
            tt = vi.type.tensor_type
            if tt.elem_type and tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
                found[vi.name] = (tt.elem_type, tuple(d.dim_value for d in tt.shape.dim))
        types = [found.get(f"out{j}", (None, None)) if o is not None else (None, ())
                 for j, o in enumerate(node.outputs)]
        if types and types[0][1] is None:
            try:
                types[:1] = _from_constants(node, [t if isinstance(t, tuple) or t is None
                                                   else (t.dtype, t.shape) for t in inputs])
            except (TypeError, ValueError, ArithmeticError):
                return None
    for o, (dtype, shape) in zip(node.outputs, types):
        if o is not None and (dtype is None or shape is None or
                              not all(isinstance(d, int) and d >= 0 for d in shape)):
            return None
    return types


def _nbytes(dtype: int | None, shape: tuple) -> int:
    if dtype is None:  # an omitted output
        return 0
    numel = math.prod(shape)
    return storage_bytes(dtype, numel) or 16 * numel  # strings: a guess


def _from_constants(node: Node, in_types: list[tuple | None]) -> list[tuple]:
    """(dtype, shape) of output 0 of the ops that can explode, computed from their constant
    inputs, for when onnx's inference gives up (e.g. Range on one-element vectors)."""
    ins = [const(v) for v in node.inputs]
    op, x = node.op_type, ins[0]
    if op == "ConstantOfShape" and x is not None:
        value = attr(node, "value")
        return [(value.dtype if value is not None else TensorProto.FLOAT, tuple(int(d) for d in x.ravel()))]
    if op == "Range" and all(a is not None and a.size == 1 for a in ins):
        start, limit, delta = (a.ravel()[0].item() for a in ins)
        count = max(math.ceil((limit - start) / delta), 0) if delta else 0
        return [(in_types[0][0], (count,))]
    if op in ("Expand", "Tile") and len(ins) > 1 and ins[1] is not None and in_types[0] is not None:
        dtype, shape = in_types[0]
        reps = tuple(int(d) for d in ins[1].ravel())
        if op == "Expand":
            return [(dtype, broadcast([shape, reps]))]
        return [(dtype, tuple(a * b for a, b in zip(shape, reps)))]
    return [(None, None)]


# -- evaluation -------------------------------------------------------------------------------


def evaluate(node: Node, opsets: dict[str, int],
             inputs: list[Tensor | None] | None = None) -> list[np.ndarray | None] | None:
    """The node's outputs (None for omitted outputs) on its constant inputs, or on `inputs`
    (a tensor per input) when given, computed by onnxruntime, else by onnx's reference
    evaluator; None if neither can."""
    tensors = [None if v is None else v.const for v in node.inputs] if inputs is None else inputs
    if node.op_type == "Reshape" and node.domain in ("", "ai.onnx"):
        reshaped = _reshape(node, tensors)
        if reshaped is not None:
            return [reshaped]
    try:
        proto = _one_node(node, opsets, tensors)
    except Exception:  # noqa: BLE001 - e.g. an opset newer than the installed onnx: no fold
        return None
    for run in (_run_ort, _run_reference):
        try:
            results = list(run(proto))
        except Exception:  # noqa: BLE001 - an op the evaluator lacks: try the next, or skip
            continue
        if _dtypes_match(node, results):
            it = iter(results)
            return [next(it) if o is not None else None for o in node.outputs]
    return None


def _reshape(node: Node, tensors: list) -> np.ndarray | None:
    """Reshape in numpy: only moves values, so exact, and it spares the onnxruntime session
    each fold costs (exporters leave a Reshape of a constant per BatchNorm or SE scale).
    None when anything is unusual: then onnxruntime decides."""
    if len(tensors) != 2 or any(t is None for t in tensors) or len(node.outputs) != 1:
        return None
    data, shape = tensors[0].numpy(), tensors[1].numpy()
    if shape.ndim != 1 or shape.dtype != np.int64:
        return None
    dims = [int(d) for d in shape]
    allowzero = node.attributes.get("allowzero")
    if allowzero is not None and allowzero.ref_attr_name:  # set by a function's caller
        return None
    if allowzero is None or not allowzero.value:
        if any(d == 0 and i >= data.ndim for i, d in enumerate(dims)):
            return None
        dims = [data.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    try:
        return data.reshape(dims).copy()
    except ValueError:
        return None


def _run_ort(proto: onnx.ModelProto) -> list:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 4
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {})


def _run_reference(proto: onnx.ModelProto) -> list:
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(proto).run(None, {})


def _dtypes_match(node: Node, results: list) -> bool:
    """The evaluator gave one array per output, of the element type the node promises."""
    outs = [o for o in node.outputs if o is not None]
    if len(results) != len(outs):
        return False
    for o, r in zip(outs, results):
        if not isinstance(r, np.ndarray):
            return False
        try:
            got = helper.np_dtype_to_tensor_dtype(r.dtype)
        except (KeyError, TypeError, ValueError):
            return False
        if o.dtype is not None and got != o.dtype:
            return False
    return True


def _plausible(node: Node, arrays: list, limit: int) -> bool:
    """Results have the inferred shapes and stay within the size limit."""
    for o, a in zip(node.outputs, arrays):
        if o is None:
            continue
        shape = static_shape(o)
        if (shape is not None and tuple(a.shape) != shape) or a.nbytes > limit:
            return False
    return True


def _one_node(node: Node, opsets: dict[str, int], given: list) -> onnx.ModelProto:
    """A model of this node alone; `given` per input: a tensor (an initializer), a
    (dtype, shape) pair (a typed input, no data) or None (omitted). Built from fresh values:
    the IR is not touched."""
    g = Graph("fold")
    inputs = []
    for i, t in enumerate(given):
        if t is None:
            inputs.append(None)
        elif isinstance(t, tuple):
            inputs.append(g.add_input(Value(f"in{i}", *t)))
        else:
            inputs.append(g.add_initializer(Value(f"in{i}", t.dtype, t.shape, tensor=t)))
    outputs = [Value(f"out{j}") if o is not None else None for j, o in enumerate(node.outputs)]
    g.append(Node(node.op_type, inputs, outputs, domain=node.domain, name=node.name,
                  attributes=node.attributes))
    g.outputs = [o for o in outputs if o is not None]
    opset = default_opset(opsets)
    ir_version = max(10, helper.find_min_ir_version_for([helper.make_opsetid("", opset)]))
    proto = ir.to_proto(Model(g, ir_version, {"": opset}))
    for value in g.initializers.values():
        # The node and its values form a reference cycle: let go of the data now, not at the
        # next garbage collection (a region's intermediates must not pile up).
        value.tensor = None
    return proto


# -- rewriting ----------------------------------------------------------------------------------


def _replace(node: Node, arrays: list, rw: Rewriter) -> None:
    """Outputs become initializers of the node's graph; the node and the constants only it
    read go away."""
    graph = node.graph
    for out, array in zip(node.outputs, arrays):
        if out is not None and array is not None:
            rw.replace_uses(out, rw.add_initializer(graph, out.name, np.asarray(array)))
    inputs = list({id(v): v for v in node.inputs if v is not None}.values())
    rw.remove_node(node)
    for v in inputs:
        _drop_if_dead(v, graph, rw)


def _commit(region: Region, arrays: dict[int, np.ndarray], rw: Rewriter) -> None:
    """The frontier values become initializers; the region's nodes and the constants only
    it read go away."""
    graph = region.nodes[0].graph
    for node in region.nodes:
        _record(rw, "FoldConstants", node)
    for out in region.frontier:
        rw.replace_uses(out, rw.add_initializer(graph, out.name, np.asarray(arrays[id(out)])))
    inputs = {id(v): v for n in region.nodes for v in n.inputs if v is not None}
    for node in reversed(region.nodes):  # readers first: a removed node's outputs are unread
        rw.remove_node(node)
    for v in inputs.values():
        if v.producer is None or v.producer.graph is not None:  # not one of the removed nodes'
            _drop_if_dead(v, graph, rw)


def _drop_if_dead(v: Value, graph: Graph, rw: Rewriter) -> None:
    """Remove a constant (initializer or Constant node) or a Shape node nobody reads anymore."""
    if v.uses or id(v) in rw.graph_output_ids():
        return
    node = v.producer
    if node is not None:
        # Constant and Shape have one output: v, now unread.
        if node.op_type in ("Constant", "Shape") and node.domain in ("", "ai.onnx") and node.graph is not None:
            rw.remove_node(node)
        return
    while graph is not None:  # the initializer lives in this graph or an enclosing one
        if graph.initializers.get(v.name) is v and not v.is_graph_input:
            rw.remove_initializer(graph, v)
            return
        graph = graph.owner.graph if graph.owner is not None else None


def _record(rw: Rewriter, rule: str, node: Node) -> None:
    rw.rule = rule
    rw.log.record(Change(rule, "match", node.name, node.op_type))


# -- If with a constant condition ------------------------------------------------------------------


def constant_if(node: Node) -> Match | Reject:
    """An If whose condition is a constant: the branch it takes is known."""
    if node.op_type != "If" or node.domain not in ("", "ai.onnx"):
        return Reject("not an If")
    cond = const(node.inputs[0])
    if cond is None or cond.size != 1:
        return Reject("condition is not a constant")
    branch = attr(node, "then_branch" if bool(cond.ravel()[0]) else "else_branch")
    if not isinstance(branch, Graph) or len(branch.outputs) != len(node.outputs) or branch.inputs:
        return Reject("branch does not match the If's outputs")
    return Match([node], {"branch": branch})


def _inline_branch(match: Match, rw: Rewriter) -> None:
    """The branch's nodes and initializers move into the If's graph, before the If; its
    outputs replace the If's."""
    node, branch = match.nodes[0], match["branch"]
    graph = node.graph
    for value in list(branch.initializers.values()):
        rw.move_initializer(value, graph, branch)
    for inner in list(branch.nodes):
        rw.move_node(inner, graph, node)
    for out, new in zip(node.outputs, branch.outputs):
        if out is not None:
            rw.replace_uses(out, new)
    cond = node.inputs[0]
    rw.remove_node(node)  # its branches' outputs are plain values now: the Rewriter knows
    _drop_if_dead(cond, graph, rw)


__all__ = ["FoldConstants", "Region", "constant_if", "evaluate", "output_types"]
