"""Fold a constant per-channel Mul or Add on a Conv's input into the Conv.

PP-OCRv4's learnable affine blocks put `x * s + b` (scalars) after each activation, right
before the next Conv; `fuse_affine` folds such maps into the layer *before* them, but after a
HardSwish there is none. Conv(x * s) is Conv with its weights scaled along the input-channel
axis, whatever the padding (a padded zero stays zero). Conv(x + c) is Conv(x) with
sum(W * c) added to the bias, but only without padding: a padded border would see c where
there is none.
"""

from __future__ import annotations

import numpy as np

from ir import Node

from .base import Match, Reject, RewriteRule, Rewriter
from .fuse_affine import FLOATS, constant_nodes, per_channel
from .patterns import attr, const, is_const, unpadded

KINDS = ("Mul", "Add")


class FuseConvInputAffine(RewriteRule):
    """Mul/Add(x, per-input-channel constant) -> Conv: the Conv reads x, with its weights
    scaled (Mul) or its bias shifted (Add, unpadded Convs only)."""

    op_type = "Conv"

    def match(self, node: Node) -> Match | Reject:
        op = node.inputs[0].producer if node.inputs[0] is not None else None
        if op is None or op.op_type not in KINDS or op.domain not in ("", "ai.onnx"):
            return Reject("input is not produced by Mul or Add")
        a, b = op.inputs
        x, c = (a, b) if not is_const(a) else (b, a)
        if not is_const(c) or is_const(x):
            return Reject(f"{op.op_type} has no single constant operand")
        w = const(node.inputs[1]) if len(node.inputs) > 1 else None
        bias_value = node.inputs[2] if len(node.inputs) > 2 else None
        if w is None or w.dtype not in FLOATS or w.ndim < 3:
            return Reject("Conv weight is not a float constant")
        if bias_value is not None and not is_const(bias_value):
            return Reject("Conv bias is not constant")
        channels = w.shape[1] * attr(node, "group", 1)
        vector = per_channel(const(c), w.ndim, channels)
        if vector is None:
            return Reject("constant does not broadcast per input channel")
        # A scalar leaves x's shape as it is; a vector could be what gives x its channels.
        scalar = const(c).size == 1 and const(c).ndim <= 1
        if not scalar and (x.shape is None or len(x.shape) != w.ndim or x.shape[1] != channels):
            return Reject(f"{op.op_type} input is not known to have the Conv's {channels} channels")
        if op.op_type == "Add" and not unpadded(node):
            return Reject("Conv pads its input: the border would lose the Add")
        return Match([node, op, *constant_nodes(c)], {"x": x, "vector": vector, "weight": w})

    def rewrite(self, match: Match, rewriter: Rewriter) -> None:
        conv, op = match.nodes[0], match.nodes[1]
        w, vector, graph = match["weight"], match["vector"], conv.graph
        group = attr(conv, "group", 1)
        # [group, out per group, in per group, k...] against [group, 1, in per group, 1...]
        grouped = w.astype(np.float64).reshape((group, w.shape[0] // group) + w.shape[1:])
        per_group = vector.reshape((group, 1, w.shape[1]) + (1,) * (w.ndim - 2))
        if op.op_type == "Mul":
            weight = (grouped * per_group).reshape(w.shape).astype(w.dtype)
            rewriter.set_input(conv, 1, rewriter.add_initializer(graph, f"{conv.inputs[1].name}_scaled", weight))
        else:
            shift = (grouped * per_group).sum(axis=tuple(range(2, w.ndim + 1))).reshape(-1)
            old = const(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2] is not None else None
            bias = shift + (0.0 if old is None else old.astype(np.float64))
            name = conv.inputs[2].name if old is not None else f"{conv.name}_bias"
            new_bias = rewriter.add_initializer(graph, f"{name}_shifted", bias.astype(w.dtype))
            if len(conv.inputs) > 2:
                rewriter.set_input(conv, 2, new_bias)
            else:  # no bias slot: a new Conv with one
                new = rewriter.add_node(graph, conv, "Conv", [conv.inputs[0], conv.inputs[1], new_bias],
                                        name=conv.name, attributes=dict(conv.attributes))
                rewriter.set_type(new.outputs[0], conv.outputs[0].dtype, conv.outputs[0].shape)
                rewriter.replace_uses(conv.outputs[0], new.outputs[0])
                conv = new
        rewriter.set_input(conv, 0, match["x"])


__all__ = ["FuseConvInputAffine"]
