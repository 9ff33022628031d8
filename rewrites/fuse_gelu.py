"""Gelu written out in primitives -> one Gelu op (opset 20).

    erf form:  x * 0.5 * (1 + Erf(x / sqrt(2)))          (or Erf(x * 0.7071...))
    tanh form: x * 0.5 * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))

The three factors may be multiplied in any order (torch writes (x * (1 + ...)) * 0.5).
"""

from __future__ import annotations

import math

from onnx import AttributeProto as A

from ir import Attr, Node, Value

from .base import Match, Reject, RewriteRule, Rewriter
from .fuse_affine import constant_nodes
from .patterns import is_scalar, other_operand, sole_producer

SQRT2 = math.sqrt(2.0)
TANH_SCALE = math.sqrt(2.0 / math.pi)
TANH_CUBE = 0.044715


def _factors(node: Node) -> tuple[list[Value], list[Node]]:
    """The operands of a product of Muls, one level deep, and the inner Muls."""
    factors, inner = [], []
    for v in node.inputs:
        mul = sole_producer(v, "Mul", node)
        if mul is not None:
            factors += mul.inputs
            inner.append(mul)
        else:
            factors.append(v)
    return factors, inner


def _erf_arg(arg: Value, erf: Node) -> tuple[Value, list[Node]] | None:
    """x and the nodes of x / sqrt(2) or x * (1 / sqrt(2))."""
    div = sole_producer(arg, "Div", erf)
    if div is not None and is_scalar(div.inputs[1], SQRT2):
        return div.inputs[0], [div]
    mul = sole_producer(arg, "Mul", erf)
    x = other_operand(mul, 1 / SQRT2) if mul is not None else None
    return (x, [mul]) if x is not None else None


def _tanh_arg(arg: Value, tanh: Node) -> tuple[Value, list[Node]] | None:
    """x and the nodes of sqrt(2/pi) * (x + 0.044715 * x^3), x^3 as Pow(x, 3) or x * x * x."""
    scale = sole_producer(arg, "Mul", tanh)
    inner = other_operand(scale, TANH_SCALE) if scale is not None else None
    add = sole_producer(inner, "Add", scale) if inner is not None else None
    if add is None:
        return None
    for x, term in (add.inputs, add.inputs[::-1]):
        mul = sole_producer(term, "Mul", add)
        cube = other_operand(mul, TANH_CUBE) if mul is not None else None
        nodes = _cube(cube, x, mul) if cube is not None else None
        if nodes is not None:
            return x, [scale, add, mul, *nodes]
    return None


def _cube(v: Value, x: Value, reader: Node) -> list[Node] | None:
    """The nodes computing v = x^3 (Pow(x, 3), x * (x * x) or (x * x) * x)."""
    pow_ = sole_producer(v, "Pow", reader)
    if pow_ is not None:
        return [pow_] if pow_.inputs[0] is x and is_scalar(pow_.inputs[1], 3.0) else None
    mul = sole_producer(v, "Mul", reader)
    if mul is None:
        return None
    for a, b in (mul.inputs, mul.inputs[::-1]):
        square = sole_producer(b, "Mul", mul)
        if a is x and square is not None and square.inputs[0] is x and square.inputs[1] is x:
            return [mul, square]
    return None


class FuseGelu(RewriteRule):
    """x * 0.5 * (1 + Erf(x / sqrt(2))) (or the tanh form) -> Gelu(x)."""

    op_type = "Mul"

    def match(self, node: Node) -> Match | Reject:
        factors, muls = _factors(node)
        if len(factors) != 3:
            return Reject("not a product of three factors")
        for i, one_plus in enumerate(factors):
            add = sole_producer(one_plus, "Add", _reader_of(one_plus, node, muls))
            t = other_operand(add, 1.0) if add is not None else None
            act = sole_producer(t, "Erf", add) or sole_producer(t, "Tanh", add)
            found = None if act is None else (_erf_arg if act.op_type == "Erf" else _tanh_arg)(act.inputs[0], act)
            if found is None:
                continue
            x, arg_nodes = found
            a, b = factors[:i] + factors[i + 1:]
            if not (a is x and is_scalar(b, 0.5) or b is x and is_scalar(a, 0.5)):
                continue
            if self.opset < 20:
                return Reject("Gelu needs opset 20")
            nodes = [node, *muls, add, act, *arg_nodes]
            consts = constant_nodes(*factors, *(v for n in nodes[1:] for v in n.inputs))
            return Match(nodes + consts, {"x": x, "approximate": "none" if act.op_type == "Erf" else "tanh"})
        return Reject("not x * 0.5 * (1 + Erf(x / sqrt(2))) or its tanh form")

    def rewrite(self, match: Match, rewriter: Rewriter) -> None:
        root = match.nodes[0]
        gelu = rewriter.add_node(root.graph, root, "Gelu", [match["x"]], name=f"{root.name}_gelu",
                                 attributes={"approximate": Attr(A.STRING, match["approximate"].encode())})
        out = root.outputs[0]
        rewriter.set_type(gelu.outputs[0], out.dtype, out.shape)
        rewriter.replace_uses(out, gelu.outputs[0])


def _reader_of(v: Value, root: Node, muls: list[Node]) -> Node:
    """Which of the product's Mul nodes reads factor `v`."""
    return next((m for m in muls if any(i is v for i in m.inputs)), root)


__all__ = ["FuseGelu"]
