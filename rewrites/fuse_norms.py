"""LayerNormalization written out in primitives -> one LayerNormalization op (opset 17).

The shape exporters write (torch below opset 17, Paddle):

    mean = ReduceMean(x, axes)        d = Sub(x, mean)
    var  = ReduceMean(Pow(d, 2) or Mul(d, d), axes)
    y    = Div(d, Sqrt(Add(var, eps)))  [-> Mul(gamma) -> Add(beta)]

with `axes` the trailing dimensions (an attribute, or an input from opset 18).
"""

from __future__ import annotations

import numpy as np
from onnx import AttributeProto as A

from ir import Attr, Node, Value

from .base import Match, Reject, RewriteRule, Rewriter
from .fuse_affine import constant_nodes
from .patterns import attr, const, is_output, only_reader, producer


def _scalar(v: Value | None) -> float | None:
    c = const(v)
    return float(c.ravel()[0]) if c is not None and c.size == 1 and c.dtype.kind == "f" else None


def _axes(rm: Node) -> list[int] | None:
    """The ReduceMean's axes when it keeps dims and reduces given axes, else None."""
    if attr(rm, "keepdims", 1) != 1:
        return None
    axes = attr(rm, "axes")
    if axes is None and len(rm.inputs) > 1:
        c = const(rm.inputs[1])
        axes = None if c is None else c.ravel().tolist()
    return [int(a) for a in axes] if axes else None


def _trailing(axes: list[int], rank: int | None) -> int | None:
    """-k when `axes` are exactly the last k dimensions, else None."""
    if any(a >= 0 for a in axes):
        if rank is None:
            return None
        axes = [a - rank if a >= 0 else a for a in axes]
    k = len(axes)
    return -k if sorted(axes) == list(range(-k, 0)) else None


def _single_reader(v: Value, op_type: str) -> Node | None:
    """The one node reading `v` when it is an `op_type` (and `v` no graph output)."""
    if len(v.uses) != 1:
        return None
    node = v.uses[0][0]
    ok = only_reader(v, node) and node.op_type == op_type and node.domain in ("", "ai.onnx")
    return node if ok else None


def _affine_operand(node: Node, v: Value) -> Value | None:
    """The constant operand of a binary `node` whose other operand is `v`."""
    a, b = node.inputs
    other = b if a is v else a
    return other if other is not v and const(other) is not None else None


class FuseLayerNorm(RewriteRule):
    """The written-out layer norm above -> LayerNormalization(x, gamma, beta)."""

    op_type = "Div"

    def match(self, node: Node) -> Match | Reject:
        d, s = node.inputs
        sub, sqrt = producer(d, "Sub"), producer(s, "Sqrt")
        if sub is None or sqrt is None:
            return Reject("not Sub(...) / Sqrt(...)")
        x, mean = sub.inputs
        rm1 = producer(mean, "ReduceMean")
        if rm1 is None or rm1.inputs[0] is not x:
            return Reject("Sub does not subtract the ReduceMean of its own input")
        add = producer(sqrt.inputs[0], "Add")
        if add is None:
            return Reject("Sqrt input is not Add(variance, epsilon)")
        var, eps_value = add.inputs if _scalar(add.inputs[1]) is not None else add.inputs[::-1]
        rm2, eps = producer(var, "ReduceMean"), _scalar(eps_value)
        if rm2 is None or eps is None:
            return Reject("Sqrt input is not Add(variance, epsilon)")
        sq = rm2.inputs[0].producer
        squares = sq is not None and sq.domain in ("", "ai.onnx") and (
            (sq.op_type == "Pow" and sq.inputs[0] is d and _scalar(sq.inputs[1]) == 2.0)
            or (sq.op_type == "Mul" and sq.inputs[0] is d and sq.inputs[1] is d))
        if not squares:
            return Reject("variance is not the ReduceMean of Pow(d, 2) or Mul(d, d)")
        rank = len(x.shape) if x.shape is not None else None
        axes1, axes2 = _axes(rm1), _axes(rm2)
        axis = _trailing(axes1, rank) if axes1 else None
        if axis is None or axes2 is None or _trailing(axes2, rank) != axis:
            return Reject("ReduceMean axes are not the same trailing dimensions")
        inner = {id(n) for n in (sq, node)}
        private = (only_reader(mean, sub) and only_reader(rm2.outputs[0], add)
                   and only_reader(add.outputs[0], sqrt) and only_reader(s, node)
                   and only_reader(sq.outputs[0], rm2) and producer(d) is sub
                   and all(id(n) in inner for n, _ in d.uses) and not is_output(d))
        if not private:
            return Reject("an intermediate value is used outside the pattern")
        if self.opset < 17:
            return Reject("LayerNormalization needs opset 17")
        norm_shape = x.shape[axis:] if x.shape is not None else None
        if norm_shape is None or not all(isinstance(n, int) for n in norm_shape):
            return Reject("normalized dimensions are not static")

        # Absorb a following Mul(gamma) and Add(beta) whose constants fit the normalized shape.
        last, gamma, beta, tail = node, None, None, []
        mul = _single_reader(node.outputs[0], "Mul")
        if mul is not None and _fits(g := _affine_operand(mul, node.outputs[0]), norm_shape):
            last, gamma, tail = mul, g, [mul]
        plus = _single_reader(last.outputs[0], "Add")
        if plus is not None and _fits(b := _affine_operand(plus, last.outputs[0]), norm_shape):
            last, beta, tail = plus, b, [plus, *tail]
        nodes = [*tail, node, sqrt, add, rm2, sq, sub, rm1]
        consts = constant_nodes(eps_value, sq.inputs[1], *rm1.inputs[1:], *rm2.inputs[1:], gamma, beta)
        return Match(nodes + consts, {"x": x, "gamma": gamma, "beta": beta, "last": last,
                                     "axis": axis, "epsilon": eps, "norm_shape": tuple(norm_shape),
                                     "dtype": const(eps_value).dtype})

    def rewrite(self, match: Match, rewriter: Rewriter) -> None:
        last = match["last"]
        full = {"shape": match["norm_shape"], "dtype": match["dtype"], "base": last.name}
        inputs = [match["x"], _full(rewriter, last.graph, match["gamma"], 1.0, "scale", **full)]
        if match["beta"] is not None:  # B is optional
            inputs.append(_full(rewriter, last.graph, match["beta"], 0.0, "bias", **full))
        ln = rewriter.add_node(last.graph, last, "LayerNormalization", inputs, name=f"{last.name}_layernorm",
                               attributes={"axis": Attr(A.INT, match["axis"]),
                                           "epsilon": Attr(A.FLOAT, match["epsilon"])})
        out = last.outputs[0]
        rewriter.set_type(ln.outputs[0], out.dtype, out.shape)
        rewriter.replace_uses(out, ln.outputs[0])


def _full(rewriter: Rewriter, graph, value: Value | None, fill: float, name: str, *,
          shape: tuple[int, ...], dtype, base: str) -> Value:
    """`value` when it already has the normalized shape, else a new initializer of that shape
    (filled with `fill` when there is no value)."""
    if value is not None and value.const.shape == shape:
        return value
    data = np.full(shape, fill) if value is None else np.broadcast_to(const(value), shape)
    return rewriter.add_initializer(graph, f"{base}_{name}", data.astype(dtype))


def _fits(v: Value | None, norm_shape) -> bool:
    """A constant that broadcasts to the normalized shape without growing the output."""
    if v is None:
        return False
    c = v.const
    if len(c.shape) > len(norm_shape):
        return False
    return all(d in (1, n) for d, n in zip(c.shape[::-1], norm_shape[::-1]))


__all__ = ["FuseLayerNorm"]
