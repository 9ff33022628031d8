"""W8A8 QDQ placement: `plan` decides which nodes run quantized and which activations need a
calibrated range; `InsertQDQ` writes QuantizeLinear/DequantizeLinear pairs from a calibration
table, int8 weights and int32 biases behind DequantizeLinear.

Placement follows a `Target` (rewrites/qdq_targets.py): Q/DQ goes only where the runtime fuses
the group into an integer kernel or runs a data-movement op on the quantized type, so no op
runs DQ -> float -> Q for nothing. Relu/Clip after a quantized op are kept and the group's
output is taken after them: their output is what gets calibrated, its range starts at 0 (or the
clip bound), and onnxruntime drops the Relu/Clip because the Q's range implies it.
Only the main graph is planned; graph outputs are never quantized.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import AttributeProto, TensorProto

from calibration.scales import QuantParams, params_from_range, quantize, weight_params
from calibration.table import CalibrationTable
from ir import Attr, CompileError, Graph, Model, Node, Value

from .base import ChangeLog, Pass, PassResult, Rewriter
from .patterns import attr, check_exclude, const, default_opset, is_const
from .qdq_targets import ORT_CPU, Target
from .shapes import bound_shapes

_ONNX_DTYPES = {"uint8": TensorProto.UINT8, "int8": TensorProto.INT8,
                "uint16": TensorProto.UINT16, "int16": TensorProto.INT16}


@dataclass
class QuantPlan:
    """Names, in graph order. `activations` need calibrated ranges; `shared` maps each output
    of a data-movement op to the calibrated tensor whose scale and zero point it reuses."""

    nodes: list[str] = field(default_factory=list)  # every node that runs quantized
    weighted: list[str] = field(default_factory=list)  # Conv/MatMul/Gemm with int8 weights
    activations: list[str] = field(default_factory=list)
    shared: dict[str, str] = field(default_factory=dict)
    # outputs of Mul/Div by a positive scalar of a quantized tensor -> (that tensor, factor):
    # read through a DequantizeLinear whose scale carries the factor, the Mul/Div goes away
    scaled: dict[str, tuple[str, float]] = field(default_factory=dict)
    # small constant operands of integer ops, stored as uint8 behind DequantizeLinear:
    # (node name, input index)
    constants: list[tuple[str, int]] = field(default_factory=list)

    @property
    def quantized(self) -> list[str]:
        """Every tensor that gets a Q -> DQ pair."""
        return self.activations + list(self.shared)


def plan(model: Model, target: Target = ORT_CPU, exclude=(), input_shapes: dict | None = None) -> QuantPlan:
    """Pure analysis of the main graph (nothing is changed). `exclude`: node names or op types
    that stay float. `input_shapes` (input name -> dims, usually the calibration feeds') size
    the tensors where the target's choice depends on size."""
    check_exclude(model, exclude, "quantize", _known_op_types(target))
    shapes = bound_shapes(model, input_shapes) if input_shapes else None
    graph, excluded = model.graph, set(exclude)
    outputs = _output_like_ids(graph)
    calibrated: dict[int, Value] = {}  # id -> tensor that gets its own range
    shared: dict[int, Value] = {}  # id -> data-movement output sharing its input's params
    scaled: dict[int, tuple[Value, Value, float]] = {}  # id -> (output, quantized input, factor)
    constants: dict[tuple[int, int], tuple[Node, int]] = {}  # (node id, index) -> (node, index)
    quantized_nodes: dict[int, Node] = {}
    weighted: dict[int, Node] = {}

    def in_q(v):
        return v is not None and (id(v) in calibrated or id(v) in shared or id(v) in scaled)

    def group_output(node):
        """The group's output: after a Relu/Clip that is the only reader (absorbed)."""
        out = node.outputs[0]
        if id(out) in outputs or len(out.uses) != 1:
            return out, None
        reader = out.uses[0][0]
        if (reader.graph is graph and reader.op_type in target.absorbed and _default(reader)
                and not _excluded(reader, excluded) and _simple_clip(reader)):
            return reader.outputs[0], reader
        return out, None

    def mark_output(node) -> bool:
        """Quantize the group's output; False when it is a graph output (left float)."""
        out, absorbed = group_output(node)
        if id(out) in outputs:
            return False
        if id(out) not in shared:
            calibrated[id(out)] = out
        if absorbed is not None:
            quantized_nodes[id(absorbed)] = absorbed
        return True

    changed = True
    while changed:  # a tensor may become quantized through a reader later in graph order
        before = (len(calibrated), len(shared), len(scaled), len(quantized_nodes))
        for node in graph.nodes:
            if id(node) in quantized_nodes or not _default(node) or _excluded(node, excluded):
                continue
            op = node.op_type
            if op in target.weighted and _weighted_ok(node, target) and not _float_stem(node, target, shapes):
                out_is_graph_output = id(group_output(node)[0]) in outputs
                if out_is_graph_output and op in target.needs_output_q:
                    continue  # without its output Q the runtime leaves it float
                x = node.inputs[0]
                if not in_q(x):
                    calibrated[id(x)] = x
                if not out_is_graph_output:
                    mark_output(node)
                quantized_nodes[id(node)] = weighted[id(node)] = node
            elif op in ("Mul", "Div") and (rescale := _rescaling(node, in_q, outputs)) is not None:
                x, factor = rescale
                scaled[id(node.outputs[0])] = (node.outputs[0], x, factor)
                quantized_nodes[id(node)] = node  # it reads x's Q, so that Q must stay
            elif op in target.integer:
                operands = _integer_operands(node, in_q, target.is_small(node.outputs[0], shapes))
                if operands is not None and mark_output(node):
                    quantized_nodes[id(node)] = node
                    for v in operands["calibrate"]:
                        calibrated[id(v)] = v
                    for i in operands["constants"]:
                        constants[id(node), i] = (node, i)
            elif op in target.data_movement and (in_q(node.inputs[0]) or _wanted_quantized(node, calibrated)):
                outs = [v for v in node.outputs if v is not None]
                if any(id(v) in outputs for v in outs):
                    continue
                if not in_q(node.inputs[0]):  # its readers want it quantized: quantize its input
                    calibrated[id(node.inputs[0])] = node.inputs[0]  # instead, so it moves uint8
                for v in outs:  # one scale through the op, so it runs on the quantized type
                    calibrated.pop(id(v), None)
                    shared[id(v)] = node.inputs[0]
                quantized_nodes[id(node)] = node
        changed = before != (len(calibrated), len(shared), len(scaled), len(quantized_nodes))

    # A data-movement op that no quantized op reads from would run DQ -> op -> Q -> DQ -> float.
    pruned = True
    while pruned:
        pruned = False
        for node in graph.nodes:
            if id(node) in quantized_nodes and node.op_type in target.data_movement and not any(
                    id(r) in quantized_nodes for v in node.outputs if v is not None for r, _ in v.uses):
                del quantized_nodes[id(node)]
                for v in node.outputs:
                    shared.pop(id(v), None)
                pruned = True

    def root(v):
        while id(v) in shared:
            v = shared[id(v)]
        return v

    def scaled_root(v):
        """The tensor whose Q a rescaled output reads, and the product of the factors."""
        factor = 1.0
        while id(v) in scaled:
            _, v, f = scaled[id(v)]
            factor *= f
        return v, factor

    order = _value_order(graph)
    by_order = lambda vs: sorted(vs, key=lambda v: order[id(v)])  # noqa: E731
    return QuantPlan(
        nodes=[n.name for n in graph.nodes if id(n) in quantized_nodes],
        weighted=[n.name for n in graph.nodes if id(n) in weighted],
        activations=[v.name for v in by_order(calibrated.values())],
        shared={v.name: root(v).name for v in by_order(v for v in _all_values(graph) if id(v) in shared)},
        scaled={v.name: (scaled_root(v)[0].name, scaled_root(v)[1])
                for v in by_order(out for out, _, _ in scaled.values())},
        constants=[(n.name, i) for n in graph.nodes for i in range(len(n.inputs)) if (id(n), i) in constants],
    )


@dataclass
class InsertQDQ(Pass):
    """Insert Q -> DQ pairs on the planned activations with the table's parameters, store the
    weights of the planned Conv/MatMul/Gemm as int8 (symmetric, per output channel unless
    per_channel=False) and their biases as int32 (scale = input scale * weight scale), each
    behind a DequantizeLinear. Lossy: held to an accuracy budget by the caller."""

    table: CalibrationTable | None = None
    target: Target = ORT_CPU
    exclude: tuple = ()
    per_channel: bool = True
    activation_dtype: str = "uint8"
    input_shapes: dict | None = None  # what plan() sizes tensors with
    name = "quantize"
    exact = False

    def run(self, model: Model) -> PassResult:
        log = ChangeLog()
        rw = Rewriter(model, log, self.name)
        opset = default_opset(model.opset_imports)
        if opset < 10:
            raise CompileError(f"quantize: QuantizeLinear needs opset >= 10, the model has opset {opset}")
        if self.per_channel and opset < 13:
            raise CompileError(f"quantize: per-channel weights need opset >= 13, the model has opset {opset} "
                               f"(upgrade the model or quantize weights per tensor: --per-tensor-weights)")
        if self.activation_dtype in ("uint16", "int16") and opset < 21:
            raise CompileError(f"quantize: {self.activation_dtype} activations need opset >= 21, "
                               f"the model has opset {opset}")
        p = plan(model, self.target, self.exclude, self.input_shapes)
        graph = model.graph
        values = {v.name: v for v in _all_values(graph)}
        params = {name: self._activation_params(name) for name in p.activations}
        params.update({name: params[src] for name, src in p.shared.items()})
        for name, (src, factor) in p.scaled.items():  # a weighted op may read a rescaled tensor (GELU's * 0.5)
            params[name] = QuantParams(np.float64(params[src].scale) * factor, params[src].zero_point,
                                       params[src].dtype)

        nodes = {n.name: n for n in graph.nodes}
        for name in p.weighted:
            self._quantize_weights(rw, graph, nodes[name], params[nodes[name].inputs[0].name])
        for node_name, index in p.constants:
            node = nodes[node_name]
            c = const(node.inputs[index])
            cp = params_from_range(min(0.0, float(c.min())), max(0.0, float(c.max())), self.activation_dtype)
            _replace_input(rw, graph, node, index,
                           _dequantize(rw, graph, node, node.inputs[index].name, quantize(c, cp), cp))
        inits: dict[str, tuple[Value, Value]] = {}  # shared tensors reuse their root's scale/zp
        q_outs: dict[str, Value] = {}
        for name in p.quantized:
            q_outs[name], inits[name] = _insert_pair(rw, graph, values[name], params[name],
                                                     inits.get(p.shared.get(name)))
        for name, (src, factor) in p.scaled.items():
            _read_rescaled(rw, graph, values[name], q_outs[src], params[src], factor)
        return PassResult(bool(p.quantized or p.weighted), log)

    def _activation_params(self, name: str) -> QuantParams:
        table = self.table if self.table is not None else CalibrationTable()
        if name not in table:
            raise CompileError(f"quantize: the calibration table has no entry for tensor '{name}'")
        entry = table[name]
        if entry.params.axis is not None:
            raise CompileError(f"quantize: tensor '{name}' has per-channel calibration; activations are per tensor")
        if entry.params.dtype == self.activation_dtype:
            return entry.params
        lo, hi = entry.range  # the range is what was calibrated; the params follow the dtype
        return params_from_range(lo, hi, self.activation_dtype)

    def _quantize_weights(self, rw: Rewriter, graph: Graph, node: Node, x: QuantParams) -> None:
        w_index, b_index = self.target.weighted[node.op_type]
        w = const(node.inputs[w_index])
        axis = weight_axis(node) if self.per_channel else None
        wp = weight_params(w, axis, self.target.weight_dtype)
        base = node.inputs[w_index].name
        dq = _dequantize(rw, graph, node, base, quantize(w, wp), wp)
        _replace_input(rw, graph, node, w_index, dq)
        if b_index is None or b_index >= len(node.inputs) or node.inputs[b_index] is None:
            return
        b = const(node.inputs[b_index]).astype(np.float64)
        # The integer kernel adds the bias to the int32 accumulator: its scale is fixed.
        scale = (np.float64(x.scale) * wp.scale.astype(np.float64)).astype(np.float32)
        q = np.clip(np.rint(b / scale), -2**31, 2**31 - 1).astype(np.int32)
        bp = _Int32Params(scale, np.zeros(scale.shape, np.int32), 0 if axis is not None else None)
        dq = _dequantize(rw, graph, node, node.inputs[b_index].name, q, bp)
        _replace_input(rw, graph, node, b_index, dq)


@dataclass(frozen=True)
class _Int32Params:
    """Bias parameters: QuantParams does not take int32."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None


def _insert_pair(rw: Rewriter, graph: Graph, v: Value, p: QuantParams, inits=None):
    """v -> Q -> DQ; every reader in this graph reads the DQ. Graph outputs keep `v` itself.
    Returns the Q's output and the (scale, zero point) initializers (`inits` when given: a
    shared scale)."""
    readers = [(n, i) for n, i in v.uses if n.graph is graph]
    if not readers:
        return None, inits
    first = min((n for n, _ in readers), key=graph.nodes.index)
    if inits is None:
        inits = (rw.add_initializer(graph, f"{v.name}_scale", np.asarray(p.scale, np.float32)),
                 rw.add_initializer(graph, f"{v.name}_zero_point", np.asarray(p.zero_point)))
    scale, zp = inits
    q = rw.add_node(graph, first, "QuantizeLinear", [v, scale, zp], name=f"{v.name}_QuantizeLinear")
    rw.set_type(q.outputs[0], _ONNX_DTYPES[p.dtype], v.shape)
    dq = rw.add_node(graph, first, "DequantizeLinear", [q.outputs[0], scale, zp],
                     name=f"{v.name}_DequantizeLinear")
    rw.set_type(dq.outputs[0], TensorProto.FLOAT, v.shape)
    for n, i in readers:
        rw.set_input(n, i, dq.outputs[0])
    return q.outputs[0], inits


def _read_rescaled(rw: Rewriter, graph: Graph, v: Value, q: Value, p: QuantParams, factor: float) -> None:
    """The readers of v = x * factor read x's quantized data through a DequantizeLinear whose
    scale is x's times the factor; the Mul/Div producing v is left unread for dead-code."""
    readers = [(n, i) for n, i in v.uses if n.graph is graph]
    if not readers or q is None:
        return
    first = min((n for n, _ in readers), key=graph.nodes.index)
    scale = rw.add_initializer(graph, f"{v.name}_scale", np.asarray(np.float64(p.scale) * factor, np.float32))
    zp = rw.add_initializer(graph, f"{v.name}_zero_point", np.asarray(p.zero_point))
    dq = rw.add_node(graph, first, "DequantizeLinear", [q, scale, zp], name=f"{v.name}_DequantizeLinear")
    rw.set_type(dq.outputs[0], TensorProto.FLOAT, v.shape)
    for n, i in readers:
        rw.set_input(n, i, dq.outputs[0])


def _dequantize(rw: Rewriter, graph: Graph, node: Node, base: str, q: np.ndarray, p) -> Value:
    """A constant stored quantized behind a DequantizeLinear placed before `node`."""
    data = rw.add_initializer(graph, f"{base}_quantized", q)
    scale = rw.add_initializer(graph, f"{base}_scale", np.asarray(p.scale, np.float32))
    zp = rw.add_initializer(graph, f"{base}_zero_point", np.asarray(p.zero_point))
    attrs = {} if p.axis is None else {"axis": Attr(AttributeProto.INT, p.axis)}
    dq = rw.add_node(graph, node, "DequantizeLinear", [data, scale, zp], name=f"{base}_DequantizeLinear",
                     attributes=attrs)
    rw.set_type(dq.outputs[0], TensorProto.FLOAT, q.shape)
    return dq.outputs[0]


def _replace_input(rw: Rewriter, graph: Graph, node: Node, index: int, new: Value) -> None:
    """Point the input at `new`; drop the float initializer when nothing else reads it."""
    old = node.inputs[index]
    rw.set_input(node, index, new)
    if not old.uses and graph.initializers.get(old.name) is old:
        rw.remove_initializer(graph, old)


def weight_axis(node: Node) -> int:
    """The weight's output-channel axis: Conv [M, C, kh, kw] and Gemm transB=1 [N, K] -> 0;
    MatMul and Gemm transB=0 [K, N] -> 1."""
    if node.op_type == "Conv" or (node.op_type == "Gemm" and attr(node, "transB", 0)):
        return 0
    return 1


def _float_stem(node: Node, target: Target, shapes: dict | None) -> bool:
    """A plain Conv on at most `target.float_stem_channels` channels whose output is known
    to be large (at the calibration shapes)."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    return (node.op_type == "Conv" and attr(node, "group", 1) == 1 and is_const(w) and len(w.const.shape) >= 3
            and w.const.shape[1] <= target.float_stem_channels and target.is_known_large(node.outputs[0], shapes))


def _weighted_ok(node: Node, target: Target) -> bool:
    """A constant float weight of the expected rank, a constant bias of one value per output
    channel, and the plain form of the op (what the integer kernels compute)."""
    w_index, b_index = target.weighted[node.op_type]
    if is_depthwise(node) and not target.integer_depthwise:
        return False
    x, w = node.inputs[0], node.inputs[w_index] if w_index < len(node.inputs) else None
    if x is None or not _float(x) or not is_const(w) or w.const.dtype != TensorProto.FLOAT:
        return False
    shape = w.const.shape
    if node.op_type == "Conv":
        ok_rank = len(shape) >= 3
    else:
        ok_rank = len(shape) == 2
    if node.op_type == "Gemm" and (attr(node, "transA", 0) or attr(node, "alpha", 1.0) != 1.0
                                   or attr(node, "beta", 1.0) != 1.0):
        return False
    if not ok_rank:
        return False
    b = node.inputs[b_index] if b_index is not None and b_index < len(node.inputs) else None
    if b is None:
        return True
    channels = shape[weight_axis(node)]
    return is_const(b) and b.const.dtype == TensorProto.FLOAT and tuple(b.const.shape) == (channels,)


SMALL_CONSTANT = 4096  # elements: per-channel scales and biases, not masks or tables


def _rescaling(node: Node, in_q, outputs: set[int]) -> tuple[Value, float] | None:
    """(x, factor) when `node` is Mul(x, c) or Div(x, c) with x quantized and c a positive
    finite float scalar, so its output is x's quantized data read with scale * factor."""
    if len(node.inputs) != 2 or id(node.outputs[0]) in outputs or not _float(node.outputs[0]):
        return None
    pairs = [node.inputs] if node.op_type == "Div" else [node.inputs, node.inputs[::-1]]
    for x, c in pairs:
        value = const(c)
        if in_q(x) and _float(x) and value is not None and value.size == 1 and value.dtype.kind == "f":
            factor = float(value.ravel()[0])
            if node.op_type == "Div":
                factor = 1.0 / factor if factor else 0.0
            if np.isfinite(factor) and factor > 0:
                return x, factor
    return None


def _integer_operands(node: Node, in_q, small: bool) -> dict | None:
    """How the inputs of an integer-kernel op get quantized, or None when it stays float.
    Binary elementwise ops (Add, Mul) need one quantized input; a small constant operand is
    stored quantized, a float activation gets its own range (onnxruntime's kernels take two
    quantized inputs of any scales) — unless the output is `small`. Other ops need every
    input quantized."""
    inputs = [v for v in node.inputs if v is not None]
    if not inputs or not all(_float(v) for v in inputs):
        return None
    if node.op_type == "Concat":  # QLinearConcat requantizes inputs of any scales
        if not any(in_q(v) for v in inputs) or any(is_const(v) for v in inputs):
            return None
        return {"calibrate": [v for v in inputs if not in_q(v)], "constants": []}
    if node.op_type not in ("Add", "Mul") or len(inputs) != 2:
        return {"calibrate": [], "constants": []} if all(in_q(v) for v in inputs) else None
    if not any(in_q(v) for v in inputs) or (small and not all(in_q(v) for v in inputs)):
        return None
    calibrate, constants = [], []
    for i, v in enumerate(node.inputs):
        if in_q(v):
            continue
        value = const(v)
        if value is None:
            calibrate.append(v)
        elif value.size <= SMALL_CONSTANT and value.dtype == np.float32 and np.isfinite(value).all():
            constants.append(i)
        else:
            return None
    return {"calibrate": calibrate, "constants": constants}


def _wanted_quantized(node: Node, calibrated: dict) -> bool:
    """A data-movement op on a float activation whose every output a quantized reader asked
    for (a Concat input behind a Resize): quantizing its input instead lets it run on the
    quantized type, and the Q lands on the smaller side of an upsampling."""
    x = node.inputs[0]
    outs = [v for v in node.outputs if v is not None]
    return (x is not None and _float(x) and not is_const(x) and bool(outs)
            and all(id(v) in calibrated for v in outs))


def is_depthwise(node: Node) -> bool:
    """A grouped Conv with one input channel per group (MobileNet-style)."""
    group = attr(node, "group", 1)
    w = node.inputs[1] if len(node.inputs) > 1 else None
    return node.op_type == "Conv" and group > 1 and is_const(w) and w.const.shape[1] == 1


def _simple_clip(node: Node) -> bool:
    """Relu, or a Clip whose bounds are constants (the runtime compares them with the Q range)."""
    return node.op_type != "Clip" or all(v is None or is_const(v) for v in node.inputs[1:])


def _float(v: Value) -> bool:
    return v.dtype in (None, TensorProto.FLOAT)  # unknown: activations are float


def _default(node: Node) -> bool:
    return node.domain in ("", "ai.onnx")


# Ops that only move values: what they output is what they read, rearranged.
MOVES_VALUES = frozenset({"DepthToSpace", "SpaceToDepth", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
                          "Flatten", "Identity"})


def _output_like_ids(graph: Graph) -> set[int]:
    """The graph outputs, and the tensors they are rearrangements of: a range that clips those
    (entropy does, on a detector's probability map) would round what the user reads."""
    ids, todo = set(), list(graph.outputs)
    while todo:
        v = todo.pop()
        if v is None or id(v) in ids:
            continue
        ids.add(id(v))
        node = v.producer
        if node is not None and node.op_type in MOVES_VALUES and _default(node) and node.inputs:
            todo.append(node.inputs[0])
    return ids


def _known_op_types(target: Target) -> frozenset[str]:
    """Op types the target quantizes in some graph: excluding one the model lacks is harmless."""
    return frozenset(target.weighted) | target.integer | target.data_movement | target.absorbed


def _excluded(node: Node, exclude: set) -> bool:
    return node.name in exclude or node.op_type in exclude


def _all_values(graph: Graph):
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph.nodes:
        yield from (v for v in node.outputs if v is not None)


def _value_order(graph: Graph) -> dict[int, int]:
    return {id(v): i for i, v in enumerate(_all_values(graph))}
