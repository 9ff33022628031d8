"""HardSwish written out in primitives -> HardSwish (opset 14), or HardSigmoid * x below.

    x * Clip(x + 3, 0, 6) / 6      (Paddle; the / 6 may be * (1/6), inside or outside the product)
    x * HardSigmoid(x, alpha=1/6, beta=0.5)

onnxruntime runs the written-out form as four float passes over the tensor; the fused op is
one (HardSwish, or HardSigmoid + Mul below opset 14, which onnxruntime fuses into a Conv
before it). In a quantized graph those passes sit between DequantizeLinear and
QuantizeLinear, where they cost more than the convolutions around them.
"""

from __future__ import annotations

from onnx import AttributeProto as A

from ir import Attr, Node, Value

from .base import Match, Reject, RewriteRule, Rewriter
from .fuse_affine import constant_nodes
from .patterns import attr, const, is_scalar, other_operand, sole_producer

SIXTH = 1.0 / 6.0
NOT_HARDSWISH = "not x * Clip(x + 3, 0, 6) / 6 or x * HardSigmoid(x)"


def _clip_0_6(v: Value, reader: Node) -> tuple[Value, list[Node]] | None:
    """x and the nodes of Clip(x + 3, 0, 6) producing `v`."""
    clip = sole_producer(v, "Clip", reader)
    if clip is None or not _bounds(clip, 0.0, 6.0):
        return None
    add = sole_producer(clip.inputs[0], "Add", clip)
    x = other_operand(add, 3.0) if add is not None else None
    return (x, [clip, add]) if x is not None else None


def _bounds(clip: Node, lo: float, hi: float) -> bool:
    """Clip's bounds: inputs from opset 11, attributes before."""
    if len(clip.inputs) > 1 or "min" not in clip.attributes:
        bounds = list(clip.inputs[1:3]) + [None] * (3 - len(clip.inputs))
        return all(b is not None and is_scalar(b, t) if t else _zero(b) for b, t in zip(bounds, (lo, hi)))
    return attr(clip, "min") == lo and attr(clip, "max") == hi


def _zero(v: Value | None) -> bool:
    c = const(v)
    return c is not None and c.size == 1 and float(c.ravel()[0]) == 0.0


def _divided_by_6(v: Value, reader: Node) -> tuple[Value, Node] | None:
    """(y, node) for v = y / 6 or y * (1/6) computed by a node only `reader` reads."""
    div = sole_producer(v, "Div", reader)
    if div is not None and is_scalar(div.inputs[1], 6.0):
        return div.inputs[0], div
    mul = sole_producer(v, "Mul", reader)
    y = other_operand(mul, SIXTH) if mul is not None else None
    return (y, mul) if y is not None else None


def _product(node: Node, divided_inside: bool) -> tuple[Value, list[Node]] | None:
    """x and the inner nodes when `node` (a Mul) computes x * (Clip(x + 3, 0, 6) / 6), or
    x * Clip(x + 3, 0, 6) when not `divided_inside` (the caller found the / 6 outside)."""
    for x, other in (node.inputs, node.inputs[::-1]):
        if divided_inside:
            scaled = _divided_by_6(other, node)
            inner = _clip_0_6(scaled[0], scaled[1]) if scaled is not None else None
            nodes = [scaled[1]] if scaled is not None else []
        else:
            inner, nodes = _clip_0_6(other, node), []
        if inner is not None and inner[0] is x:
            return x, nodes + inner[1]
    return None


def hardsigmoid_times_x(node: Node) -> tuple[Value, list[Node]] | None:
    """x and [node, the HardSigmoid] when the Mul `node` computes x * HardSigmoid(x, 1/6, 0.5),
    which is HardSwish(x)."""
    for x, other in (node.inputs, node.inputs[::-1]):
        hs = sole_producer(other, "HardSigmoid", node)
        if (hs is not None and hs.inputs[0] is x and abs(attr(hs, "alpha", 0.2) - SIXTH) < 1e-6
                and attr(hs, "beta", 0.5) == 0.5):
            return x, [node, hs]
    return None


class FuseHardSwish(RewriteRule):
    """x * Clip(x + 3, 0, 6) / 6 -> HardSwish(x) (opset 14; HardSigmoid(x) * x below), and
    x * HardSigmoid(x, 1/6, 0.5) -> HardSwish(x) from opset 14."""

    op_type = ("Mul", "Div")

    def match(self, node: Node) -> Match | Reject:
        found = self._written_out(node)
        if found is None and node.op_type == "Mul":
            found = hardsigmoid_times_x(node)
        if found is None:
            return Reject(NOT_HARDSWISH)
        x, nodes = found
        if nodes[1].op_type == "HardSigmoid" and self.opset < 14:
            return Reject("already HardSigmoid * x; HardSwish needs opset 14")
        consts = constant_nodes(*(v for n in nodes for v in n.inputs))
        return Match([node, *nodes[1:], *consts], {"x": x})

    def _written_out(self, node: Node) -> tuple[Value, list[Node]] | None:
        if node.op_type == "Mul":  # x * (Clip(...) / 6), or the / 6 applied to the product
            inner = _product(node, divided_inside=True)
            if inner is not None:
                return inner[0], [node, *inner[1]]
        if node.op_type == "Div" and is_scalar(node.inputs[1], 6.0):
            product = node.inputs[0]
        elif node.op_type == "Mul" and other_operand(node, SIXTH) is not None:
            product = other_operand(node, SIXTH)
        else:
            return None
        mul = sole_producer(product, "Mul", node)
        inner = _product(mul, divided_inside=False) if mul is not None else None
        return (inner[0], [node, mul, *inner[1]]) if inner is not None else None

    def rewrite(self, match: Match, rewriter: Rewriter) -> None:
        root, x = match.nodes[0], match["x"]
        out = root.outputs[0]
        if self.opset >= 14:
            fused = rewriter.add_node(root.graph, root, "HardSwish", [x], name=f"{root.name}_hardswish")
        else:
            hs = rewriter.add_node(root.graph, root, "HardSigmoid", [x], name=f"{root.name}_hardsigmoid",
                                   attributes={"alpha": Attr(A.FLOAT, SIXTH), "beta": Attr(A.FLOAT, 0.5)})
            rewriter.set_type(hs.outputs[0], out.dtype, out.shape)
            fused = rewriter.add_node(root.graph, root, "Mul", [x, hs.outputs[0]], name=f"{root.name}_hardswish")
        rewriter.set_type(fused.outputs[0], out.dtype, out.shape)
        rewriter.replace_uses(out, fused.outputs[0])


__all__ = ["FuseHardSwish", "hardsigmoid_times_x"]
