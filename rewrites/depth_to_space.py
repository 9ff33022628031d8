"""ConvTranspose heads as 1x1 Convs and DepthToSpace, and the DepthToSpace moved past what
follows it.

A ConvTranspose whose kernel equals its stride (no padding) writes each input pixel into its
own s x s block of the output: that is a 1x1 Conv to C_out * s * s channels, then
DepthToSpace (CRD) laying each pixel's channels out as its block. onnxruntime's ConvTranspose
(a GEMM, then col2im) is slower than its Conv, and only the Conv has an integer kernel.

DepthToSpace only moves values, so it commutes with elementwise ops, and with a 1x1 Conv once
that Conv is applied to each block position separately (its weights repeated along the
block-diagonal). Moving it past a Conv that narrows the channels leaves it less to move, and
two in a row are one with a larger block (the channels permuted in the Conv before them).
On the PP-OCR detector's head (ConvTranspose, Relu, ConvTranspose to one channel, Sigmoid),
this leaves two 1x1 Convs, a Relu and a Sigmoid on the small map, and one DepthToSpace at the
end.
"""

from __future__ import annotations

import numpy as np
from onnx import AttributeProto as A

from ir import Attr, Node, Value

from .base import Match, Reject, RewriteRule, RulePass, Rewriter
from .fuse_affine import FLOATS
from .patterns import attr, const, is_const, is_output, unpadded

# Elementwise and free of broadcast operands (Clip's bounds are checked to be scalars).
ELEMENTWISE = frozenset({"Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip"})
ONE_BY_ONE = {"kernel_shape": Attr(A.INTS, [1, 1])}


def _zeros(node: Node, name: str) -> bool:
    return not any(attr(node, name, []))


def _ones(node: Node, name: str) -> bool:
    return all(v == 1 for v in attr(node, name, []))


def _float_const(v: Value | None, ndim: int) -> np.ndarray | None:
    c = const(v)
    return c if c is not None and c.dtype in FLOATS and c.ndim == ndim else None


def _bias(node: Node) -> tuple[bool, np.ndarray | None]:
    """(usable, the bias or None): a bias must be constant to be rearranged."""
    b = node.inputs[2] if len(node.inputs) > 2 else None
    return (b is None or is_const(b)), const(b)


def _sole_reader(v: Value) -> Node | None:
    if len(v.uses) != 1 or is_output(v):
        return None
    reader, index = v.uses[0]
    return reader if index == 0 and reader.domain in ("", "ai.onnx") else None


def _crd(node: Node) -> bool:
    return attr(node, "mode", "DCR") == "CRD"


def _shape(v: Value, channels: int) -> tuple | None:
    """`v`'s shape with `channels` channels: what a 1x1 Conv of `v` gives."""
    if v.shape is None or len(v.shape) != 4:
        return None
    return (v.shape[0], channels, *v.shape[2:])


def _conv(rewriter: Rewriter, before: Node, x: Value, weight: np.ndarray, bias: np.ndarray | None,
          name: str, base: str) -> Value:
    """A 1x1 Conv of `x` with these weights, inserted before `before`."""
    graph = before.graph
    inputs = [x, rewriter.add_initializer(graph, f"{base}_w", weight)]
    if bias is not None:
        inputs.append(rewriter.add_initializer(graph, f"{base}_b", bias))
    conv = rewriter.add_node(graph, before, "Conv", inputs, name=name, attributes=dict(ONE_BY_ONE))
    rewriter.set_type(conv.outputs[0], x.dtype, _shape(x, weight.shape[0]))
    return conv.outputs[0]


def _depth_to_space(rewriter: Rewriter, before: Node, x: Value, block: int, name: str, replaces: Value,
                    mode: str = "CRD") -> None:
    """DepthToSpace(x, block, mode) in place of `replaces`, which it computes."""
    attributes = {"blocksize": Attr(A.INT, block), "mode": Attr(A.STRING, mode.encode())}
    node = rewriter.add_node(before.graph, before, "DepthToSpace", [x], name=name, attributes=attributes)
    rewriter.set_type(node.outputs[0], replaces.dtype, replaces.shape)
    rewriter.replace_uses(replaces, node.outputs[0])


class ConvTransposeToDepthToSpace(RewriteRule):
    """ConvTranspose with kernel == stride == s (2-D, s >= 2, no padding, group 1) -> 1x1 Conv
    to C_out * s * s channels + DepthToSpace(s, CRD). The Conv keeps the node's name."""

    op_type = "ConvTranspose"

    def match(self, node: Node) -> Match | Reject:
        if self.opset < 11:
            return Reject("DepthToSpace has no CRD mode before opset 11")
        w = _float_const(node.inputs[1], 4)
        if w is None:
            return Reject("weight is not a 4-D float constant")
        s = w.shape[2]
        if s < 2 or w.shape[3] != s:
            return Reject("kernel is not square, or is 1x1")
        if attr(node, "strides", [1, 1]) != [s, s] or attr(node, "kernel_shape", [s, s]) != [s, s]:
            return Reject("stride differs from the kernel: blocks overlap or leave gaps")
        if attr(node, "group", 1) != 1 or not _ones(node, "dilations"):
            return Reject("grouped or dilated")
        if not unpadded(node) or not _zeros(node, "output_padding") or "output_shape" in node.attributes:
            return Reject("padded, or its output shape is set")
        usable, bias = _bias(node)
        if not usable:
            return Reject("bias is not constant")
        return Match([node], {"w": w, "s": s, "bias": bias})

    def rewrite(self, match: Match, rewriter: Rewriter) -> None:
        node, w, s, bias = match.nodes[0], match["w"], match["s"], match["bias"]
        c_in, c_out = w.shape[:2]
        # Output channel c * s * s + a * s + b is kernel position (a, b) of output channel c.
        weight = np.ascontiguousarray(w.transpose(1, 2, 3, 0).reshape(c_out * s * s, c_in, 1, 1))
        blocks = None if bias is None else np.repeat(bias, s * s)
        conv = _conv(rewriter, node, node.inputs[0], weight, blocks, node.name, f"{node.inputs[1].name}_as_conv")
        _depth_to_space(rewriter, node, conv, s, f"{node.name}_depth_to_space", node.outputs[0])


class SinkDepthToSpaceElementwise(RewriteRule):
    """DepthToSpace -> elementwise op (its only reader) => the op, then DepthToSpace."""

    op_type = "DepthToSpace"

    def match(self, node: Node) -> Match | Reject:
        op = _sole_reader(node.outputs[0])
        if op is None or op.op_type not in ELEMENTWISE:
            return Reject("not read by one elementwise op alone")
        if any(v is not None and not (is_const(v) and const(v).size == 1) for v in op.inputs[1:]):
            return Reject("Clip bounds are not constant scalars")
        return Match([op, node])  # readers first: each is dead once the one after it goes

    def rewrite(self, match: Match, rewriter: Rewriter) -> None:
        op, node = match.nodes
        x = node.inputs[0]
        moved = rewriter.add_node(op.graph, op, op.op_type, [x, *op.inputs[1:]], name=op.name,
                                  attributes=dict(op.attributes))
        rewriter.set_type(moved.outputs[0], op.outputs[0].dtype, x.shape)
        _depth_to_space(rewriter, op, moved.outputs[0], attr(node, "blocksize"), node.name, op.outputs[0],
                        attr(node, "mode", "DCR"))


# What moving one value through onnxruntime's DepthToSpace costs, in a Conv's multiply-adds
# (one thread: about 1.7 ns a value against 0.03 ns a multiply-add on the detector's head).
MOVE_COST = 32


class SinkDepthToSpaceConv(RewriteRule):
    """DepthToSpace(s, CRD) -> 1x1 Conv from C to C' < C channels (its only reader) => the Conv
    on each block position (block-diagonal weights), then DepthToSpace. Per input pixel the
    Conv does C * C' * s**2 * (s**2 - 1) more multiply-adds (zeros), and DepthToSpace moves
    (C - C') * s**2 fewer values: it moves when that saves more than it adds, at MOVE_COST."""

    op_type = "DepthToSpace"

    def match(self, node: Node) -> Match | Reject:
        if not _crd(node):
            return Reject("not CRD mode")  # DCR would need grouped weights: none made here yet
        conv = _sole_reader(node.outputs[0])
        if conv is None or conv.op_type != "Conv":
            return Reject("not read by one Conv alone")
        w = _float_const(conv.inputs[1], 4)
        if w is None or w.shape[2:] != (1, 1) or attr(conv, "group", 1) != 1:
            return Reject("the Conv is not a dense 1x1 Conv with constant weights")
        if not _ones(conv, "strides") or not unpadded(conv):
            return Reject("the Conv is strided or padded")
        usable, bias = _bias(conv)
        if not usable:
            return Reject("the Conv's bias is not constant")
        s, (c_out, c_in) = attr(node, "blocksize"), w.shape[:2]
        if (c_in - c_out) * MOVE_COST < c_in * c_out * (s * s - 1):
            return Reject(f"the Conv's {c_in} -> {c_out} channels narrow too little to pay for its zeros")
        return Match([conv, node], {"w": w[:, :, 0, 0], "bias": bias, "s": s})

    def rewrite(self, match: Match, rewriter: Rewriter) -> None:
        conv, node = match.nodes
        w, bias, s = match["w"], match["bias"], match["s"]
        k = s * s
        weight = np.zeros((w.shape[0] * k, w.shape[1] * k, 1, 1), w.dtype)
        for p in range(k):  # channel c * k + p holds block position p of channel c
            weight[p::k, p::k, 0, 0] = w
        blocks = None if bias is None else np.repeat(bias, k)
        out = _conv(rewriter, conv, node.inputs[0], weight, blocks, conv.name, f"{conv.inputs[1].name}_per_block")
        _depth_to_space(rewriter, conv, out, s, node.name, conv.outputs[0])


def _channel_source(v: Value) -> Node | None:
    """The Conv whose output channels are `v`'s, through elementwise ops that treat every
    channel alike, each value read by the next op alone."""
    node = v.producer
    while node is not None and node.op_type in ELEMENTWISE and _sole_reader(node.outputs[0]) is not None:
        v, node = node.inputs[0], node.inputs[0].producer
    if node is None or node.op_type != "Conv" or _sole_reader(v) is None:
        return None
    return node


class MergeDepthToSpace(RewriteRule):
    """Conv -> (elementwise ops) -> DepthToSpace(s1, CRD) -> DepthToSpace(s2, CRD) => the Conv
    with its output channels permuted -> (the same ops) -> DepthToSpace(s1 * s2, CRD)."""

    op_type = "DepthToSpace"

    def match(self, node: Node) -> Match | Reject:
        second = _sole_reader(node.outputs[0])
        if second is None or second.op_type != "DepthToSpace" or not (_crd(node) and _crd(second)):
            return Reject("not followed by another CRD DepthToSpace alone")
        conv = _channel_source(node.inputs[0])
        if conv is None:
            return Reject("its input is not a Conv's output (through elementwise ops) read by it alone")
        w = _float_const(conv.inputs[1], 4)
        usable, bias = _bias(conv)
        if w is None or not usable:
            return Reject("the Conv's weights or bias are not constant")
        if attr(conv, "group", 1) != 1:
            return Reject("the Conv is grouped: its output channels cannot be permuted")
        return Match([second, node, conv], {"w": w, "bias": bias})

    def rewrite(self, match: Match, rewriter: Rewriter) -> None:
        second, first, conv = match.nodes
        w, bias = match["w"], match["bias"]
        s1, s2 = attr(first, "blocksize"), attr(second, "blocksize")
        channels = w.shape[0] // (s1 * s2) ** 2
        # Channel (c, a2, b2, a1, b1) of the Conv lands where channel (c, a1, a2, b1, b2) of a
        # one-step DepthToSpace would put it: row a1 * s2 + a2, column b1 * s2 + b2 of the block.
        order = np.arange(w.shape[0]).reshape(channels, s2, s2, s1, s1).transpose(0, 3, 1, 4, 2).reshape(-1)
        weight = np.ascontiguousarray(w[order])
        graph = conv.graph
        inputs = [conv.inputs[0], rewriter.add_initializer(graph, f"{conv.inputs[1].name}_permuted", weight)]
        if bias is not None:
            inputs.append(rewriter.add_initializer(graph, f"{conv.inputs[2].name}_permuted", bias[order]))
        new = rewriter.add_node(graph, conv, "Conv", inputs, name=conv.name, attributes=dict(conv.attributes))
        rewriter.set_type(new.outputs[0], conv.outputs[0].dtype, conv.outputs[0].shape)
        rewriter.replace_uses(conv.outputs[0], new.outputs[0])  # the elementwise ops between follow
        _depth_to_space(rewriter, second, first.inputs[0], s1 * s2, second.name, second.outputs[0])


def depth_to_space() -> RulePass:
    """After `fuse`, so a BatchNorm has folded into the ConvTranspose before it turns into a Conv."""
    return RulePass([ConvTransposeToDepthToSpace(), SinkDepthToSpaceElementwise(), SinkDepthToSpaceConv(),
                     MergeDepthToSpace()], name="depth-to-space")


__all__ = ["depth_to_space", "ConvTransposeToDepthToSpace", "MergeDepthToSpace", "SinkDepthToSpaceConv",
           "SinkDepthToSpaceElementwise"]
