"""Before quantizing: write ops that have no integer kernel as ops that have one.

HardSwish has no quantized kernel in onnxruntime: between two QLinearConvs it runs as
DequantizeLinear -> HardSwish -> QuantizeLinear, and on MobileNet-style models those float
passes cost more than the convolutions. Written as

    x * (Clip(x + 3, 0, 6) * (1/6))

it is a QLinearAdd (the Clip is absorbed by its output's range [0, 6]), a free rescale (the
1/6 goes into a DequantizeLinear scale) and a QLinearMul: two passes over uint8 data. The
optimize pipeline fuses the other way, which is what float inference wants.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import AttributeProto as A

from ir import Attr, Model, Node, Value

from .base import ChangeLog, Match, Pass, PassResult, Reject, RewriteRule, Rewriter, apply_rules
from .fuse_hardswish import SIXTH, hardsigmoid_times_x
from .qdq_targets import ORT_CPU, Target
from .shapes import bound_shapes


class HardSwishAsIntegerOps(RewriteRule):
    """HardSwish(x), or x * HardSigmoid(x, 1/6, 0.5) -> x * (Clip(x + 3, 0, 6) * (1/6))."""

    op_type = ("HardSwish", "Mul")

    def __init__(self, target: Target = ORT_CPU, exclude=(), shapes: dict | None = None):
        self.target = target
        self.exclude = set(exclude)  # node names or op types the user keeps float
        self.shapes = shapes  # tensor name -> shape at the calibration inputs' sizes

    def match(self, node: Node) -> Match | Reject:
        if node.name in self.exclude or "HardSwish" in self.exclude:
            return Reject("excluded from quantization")
        if self.target.is_small(node.outputs[0], self.shapes):
            return Reject("small tensor: the integer ops would not pay (Target.small_tensor)")
        if node.op_type == "HardSwish":
            return Match([node], {"x": node.inputs[0]})
        found = hardsigmoid_times_x(node)
        if found is None:
            return Reject("not HardSwish(x) or x * HardSigmoid(x, 1/6, 0.5)")
        x, nodes = found
        return Match(nodes, {"x": x})

    def rewrite(self, match: Match, rewriter: Rewriter) -> None:
        root, x = match.nodes[0], match["x"]
        graph, out = root.graph, root.outputs[0]

        def scalar(base: str, value: float) -> Value:
            return rewriter.add_initializer(graph, f"{root.name}_{base}", np.array(value, np.float32))

        def add(op: str, inputs: list, suffix: str, **attributes: Attr) -> Value:
            node = rewriter.add_node(graph, root, op, inputs, name=f"{root.name}_{suffix}", attributes=attributes)
            rewriter.set_type(node.outputs[0], out.dtype, out.shape)
            return node.outputs[0]

        shifted = add("Add", [x, scalar("three", 3.0)], "add3")
        if self.opset >= 11:
            clipped = add("Clip", [shifted, scalar("zero", 0.0), scalar("six", 6.0)], "relu6")
        else:
            clipped = add("Clip", [shifted], "relu6", min=Attr(A.FLOAT, 0.0), max=Attr(A.FLOAT, 6.0))
        gate = add("Mul", [clipped, scalar("sixth", SIXTH)], "sixth")
        rewriter.replace_uses(out, add("Mul", [x, gate], "hardswish"))


@dataclass
class IntegerForms(Pass):
    """The rules above, with tensors sized at `input_shapes` (usually the calibration feeds')."""

    target: Target = ORT_CPU
    exclude: tuple = ()
    input_shapes: dict | None = None
    name = "integer-forms"

    def run(self, model: Model) -> PassResult:
        shapes = bound_shapes(model, self.input_shapes) if self.input_shapes else None
        log = ChangeLog()
        return PassResult(apply_rules(model, [HardSwishAsIntegerOps(self.target, self.exclude, shapes)], log), log)


__all__ = ["HardSwishAsIntegerOps", "IntegerForms"]
