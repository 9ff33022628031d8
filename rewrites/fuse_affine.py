"""Fold constant per-channel affine maps into the linear layer before them.

BatchNormalization (inference form), a per-channel Mul and a bias Add after a Conv,
ConvTranspose, Gemm or MatMul become new weights and a new bias of that layer, and MatMul
followed by a bias Add becomes one Gemm. Plain ONNX only; the arithmetic runs in float64 and
the results are cast back to the weights' dtype.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

from ir import Node, Value

from .base import Match, Reject, RewriteRule, Rewriter
from .patterns import attr, const, is_const, is_output, only_reader, producer

LINEAR = ("Conv", "ConvTranspose", "Gemm", "MatMul")
FLOATS = (np.float16, np.float32, np.float64)


@dataclass
class Layer:
    """A linear layer with constant weights, as the folds see it."""

    node: Node
    weight: np.ndarray
    bias: np.ndarray | None  # Conv/ConvTranspose B, Gemm C (as stored, before beta)
    channels: int  # output channels: axis 1 of the output
    rank: int  # output rank


def linear_layer(node: Node) -> Layer | Reject:
    """The layer's constant weight and bias, or why it has none usable."""
    op = node.op_type
    w = const(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or w.dtype not in FLOATS:
        return Reject(f"{op} weight is not a float constant")
    b_value = node.inputs[2] if len(node.inputs) > 2 else None
    b = const(b_value)
    if b_value is not None and b is None:
        return Reject(f"{op} bias is not constant")
    if op == "Conv":
        return Layer(node, w, b, w.shape[0], w.ndim)
    if op == "ConvTranspose":
        return Layer(node, w, b, w.shape[1] * attr(node, "group", 1), w.ndim)
    if w.ndim != 2:
        return Reject(f"{op} weight is not 2-D")
    if op == "Gemm":
        return Layer(node, w, b, w.shape[0] if attr(node, "transB", 0) else w.shape[1], 2)
    if rank2_shape(node) is None:  # MatMul: only [M, K] x [K, N] has its channels on axis 1
        return Reject("MatMul activations are not known to be rank 2")
    return Layer(node, w, None, w.shape[1], 2)


def rank2_shape(node: Node) -> tuple | None:
    """The shape of a MatMul's A (or output) when it is known to be rank 2, else None.
    With a 2-D B, either being rank 2 means [M, K] x [K, N]."""
    for v in (node.inputs[0], node.outputs[0]):
        if v is not None and v.shape is not None:
            return v.shape if len(v.shape) == 2 else None
    return None


def per_channel(c: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """`c` as a [channels] vector if it broadcasts along axis 1 of a rank-`rank` output
    without growing it ([C,1,1], [1,C,1,1], a scalar, [1]...), else None."""
    if c.ndim > rank:
        return None
    full = (1,) * (rank - c.ndim) + c.shape
    if any(d != 1 for i, d in enumerate(full) if i != 1) or full[1] not in (1, channels):
        return None
    return np.broadcast_to(c.reshape(-1).astype(np.float64), (channels,))


def scale_weight(node: Node, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The weight of `node` with output channel i multiplied by s[i], in float64."""
    w = w.astype(np.float64)
    op = node.op_type
    if op == "Conv":  # [C_out, C_in/group, k...]
        return w * s.reshape((-1,) + (1,) * (w.ndim - 1))
    if op == "ConvTranspose":  # [C_in, C_out/group, k...]: channel g*(C_out/group)+j
        group = attr(node, "group", 1)
        grouped = w.reshape((group, w.shape[0] // group) + w.shape[1:])
        return (grouped * s.reshape((group, 1, -1) + (1,) * (w.ndim - 2))).reshape(w.shape)
    if op == "Gemm" and attr(node, "transB", 0):  # [N, K]
        return w * s[:, None]
    return w * s[None, :]  # [K, N]


def fold(rw: Rewriter, layer: Layer, root: Node, scale: np.ndarray | None,
         shift: np.ndarray | None, opset: int) -> None:
    """Make `layer` compute scale * layer(x) + shift per output channel and hand its output
    to the readers of `root`'s output. A missing bias slot needs a new node; a MatMul
    becomes a Gemm (or MatMul + Add before opset 7)."""
    node, w, graph = layer.node, layer.weight, layer.node.graph
    inputs = list(node.inputs)
    if scale is not None:
        inputs[1] = rw.add_initializer(graph, _fused_name(inputs[1].name),
                                       scale_weight(node, w, scale).astype(w.dtype))
    attributes = {k: replace(a) for k, a in node.attributes.items()}
    if shift is not None or (scale is not None and layer.bias is not None):
        bias = np.zeros(layer.channels) if layer.bias is None else layer.bias.astype(np.float64)
        if node.op_type == "Gemm":  # C is beta * C; the new C carries beta, so beta becomes 1
            bias = bias * attr(node, "beta", 1.0)
            attributes.pop("beta", None)
        if scale is not None:
            bias = bias * scale
        if shift is not None:
            bias = bias + shift
        name = _fused_name(node.inputs[2].name if layer.bias is not None else f"{node.name}_bias")
        inputs[2:3] = [rw.add_initializer(graph, name, bias.astype(w.dtype))]

    out = node.outputs[0]
    if node.op_type == "MatMul" and opset < 7:  # no Gemm with broadcast C yet
        rw.set_input(node, 1, inputs[1])
        out = rw.add_node(graph, root, "Add", [out, inputs[2]], name=f"{node.name}_bias").outputs[0]
    elif node.op_type == "MatMul" or len(inputs) > len(node.inputs):  # no slot for the bias
        new = rw.add_node(graph, node, "Gemm" if node.op_type == "MatMul" else node.op_type, inputs,
                          domain=node.domain, name=node.name, attributes=attributes)
        out = new.outputs[0]
    else:
        for i, v in enumerate(inputs):  # replaced weights stay for the dead-code pass
            if v is not node.inputs[i]:
                rw.set_input(node, i, v)
        if "beta" in node.attributes and "beta" not in attributes:
            rw.set_attribute(node, "beta", None)
    if out is not node.outputs[0]:
        old = root.outputs[0]
        rw.set_type(out, old.dtype, old.shape)
    rw.replace_uses(root.outputs[0], out)


def _fused_name(name: str) -> str:
    """`w` -> `w_fused`, and again `w_fused` (or `w_fused_2`) -> `w_fused`."""
    return re.sub(r"_fused(_\d+)?$", "", name) + "_fused"


def constant_nodes(*values: Value | None) -> list[Node]:
    """Constant nodes producing these values: listed in a Match so the driver erases them
    once nothing reads them."""
    nodes = []
    for v in values:
        p = producer(v, "Constant")
        if p is not None and p not in nodes:
            nodes.append(p)
    return nodes


def _layer_before(node: Node, x: Value, ops: tuple[str, ...]) -> Layer | Reject:
    """The linear layer producing `x`, if `node` is its only reader."""
    lin = x.producer
    if lin is None or lin.op_type not in ops or lin.domain not in ("", "ai.onnx"):
        return Reject(f"input is not produced by {', '.join(ops[:-1])} or {ops[-1]}")
    if not only_reader(x, node):
        return Reject(f"{lin.op_type} output is read by other nodes too")
    return linear_layer(lin)


def _layer_inputs(layer: Layer) -> list[Value | None]:
    return list(layer.node.inputs[1:3])


class FuseBatchNorm(RewriteRule):
    """Conv/ConvTranspose/Gemm/MatMul -> BatchNormalization (inference): scale the weights
    by gamma / sqrt(var + eps) and fold the shift into the bias."""

    op_type = "BatchNormalization"

    def match(self, node: Node) -> Match | Reject:
        if attr(node, "training_mode", 0) or (self.opset < 7 and not attr(node, "is_test", 0)):
            return Reject("BatchNormalization in training mode")
        if any(v is not None and (v.uses or is_output(v)) for v in node.outputs[1:]):
            return Reject("BatchNormalization statistics outputs are used")
        if attr(node, "spatial", 1) != 1:
            return Reject("BatchNormalization with spatial=0")
        params = [const(v) for v in node.inputs[1:5]]
        if len(params) != 4 or any(p is None for p in params):
            return Reject("BatchNormalization scale, bias, mean or variance is not constant")
        layer = _layer_before(node, node.inputs[0], LINEAR)
        if not layer:
            return layer
        if any(p.shape != (layer.channels,) for p in params):
            return Reject("BatchNormalization parameters do not match the layer's output channels")
        return Match([node, layer.node, *constant_nodes(*node.inputs[1:5], *_layer_inputs(layer))],
                     {"layer": layer, "params": params})

    def rewrite(self, match: Match, rewriter: Rewriter) -> None:
        bn = match.nodes[0]
        scale, bias, mean, var = (p.astype(np.float64) for p in match["params"])
        s = scale / np.sqrt(var + attr(bn, "epsilon", 1e-5))
        fold(rewriter, match["layer"], bn, s, bias - mean * s, self.opset)


class _ConvChannelOp(RewriteRule):
    """Shared match of Conv/ConvTranspose -> Add/Mul(constant per output channel)."""

    def match(self, node: Node) -> Match | Reject:
        a, b = node.inputs
        x, c = (a, b) if not is_const(a) else (b, a)
        if not is_const(c):
            return Reject(f"{node.op_type} has no constant operand")
        layer = _layer_before(node, x, ("Conv", "ConvTranspose"))
        if not layer:
            return layer
        vector = per_channel(const(c), layer.rank, layer.channels)
        if vector is None:
            return Reject("constant does not broadcast per output channel")
        return Match([node, layer.node, *constant_nodes(c, *_layer_inputs(layer))],
                     {"layer": layer, "vector": vector})


class FuseConvAdd(_ConvChannelOp):
    """Conv -> Add(per-channel constant): the constant joins the Conv's bias."""

    op_type = "Add"

    def rewrite(self, match: Match, rewriter: Rewriter) -> None:
        fold(rewriter, match["layer"], match.nodes[0], None, match["vector"], self.opset)


class FuseConvMul(_ConvChannelOp):
    """Conv -> Mul(per-channel constant): scales the Conv's weights and bias."""

    op_type = "Mul"

    def rewrite(self, match: Match, rewriter: Rewriter) -> None:
        fold(rewriter, match["layer"], match.nodes[0], match["vector"], None, self.opset)


class FuseMatMulAdd(RewriteRule):
    """MatMul([M, K], constant [K, N]) -> Add(C) becomes Gemm(A, B, C) when C broadcasts
    to [M, N] the way Gemm allows: [N], [1, N], [M, N], [M, 1] or a scalar."""

    op_type = "Add"

    def match(self, node: Node) -> Match | Reject:
        a, b = node.inputs
        mm, c = (a, b) if producer(a, "MatMul") is not None else (b, a)
        matmul = producer(mm, "MatMul")
        if matmul is None:
            return Reject("input is not produced by MatMul")
        if not only_reader(mm, node):
            return Reject("MatMul output is read by other nodes too")
        w, bias = const(matmul.inputs[1]), const(c)
        if w is None or w.ndim != 2 or w.dtype not in FLOATS:
            return Reject("MatMul weight is not a 2-D float constant")
        if bias is None:
            return Reject("Add operand is not constant")
        shape = rank2_shape(matmul)
        if shape is None:
            return Reject("MatMul activations are not known to be rank 2")
        if self.opset < 7:
            return Reject("Gemm broadcasts C from opset 7")
        full = (1,) * (2 - bias.ndim) + bias.shape if bias.ndim <= 2 else None
        if full is None or full[1] not in (1, w.shape[1]) or full[0] not in (1, shape[0]):
            return Reject("Add operand does not broadcast to [M, N]")
        return Match([node, matmul], {"a": matmul.inputs[0], "b": matmul.inputs[1], "c": c})

    def rewrite(self, match: Match, rewriter: Rewriter) -> None:
        add, matmul = match.nodes
        gemm = rewriter.add_node(add.graph, add, "Gemm", [match["a"], match["b"], match["c"]],
                                 name=matmul.name)
        out = add.outputs[0]
        rewriter.set_type(gemm.outputs[0], out.dtype, out.shape)
        rewriter.replace_uses(out, gemm.outputs[0])


__all__ = ["FuseBatchNorm", "FuseConvAdd", "FuseConvMul", "FuseMatMulAdd", "Layer", "linear_layer",
           "rank2_shape", "per_channel", "scale_weight", "fold", "constant_nodes"]
