"""How each op carries, joins, cuts or pins channels: the rules of the channel walk
(rewrites/channels.py), as a mixin of the walk so each rule reads like the op it handles."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from calibration.gram import FeatureLayout
from ir import Node, Value

from .channel_layout import Layout, Read
from .patterns import attr, const

FLOATS = (np.float16, np.float32, np.float64)

UNARY = frozenset("""Abs Acos Acosh Asin Asinh Atan Atanh Cast Ceil Celu Cos Cosh Elu Erf Exp Floor
    Gelu HardSigmoid HardSwish Identity IsInf IsNaN LeakyRelu Log Mish Neg Not Reciprocal Relu
    Round Selu Shrink Sigmoid Sign Sin Sinh Softplus Softsign Sqrt Tan Tanh ThresholdedRelu""".split())
ELEMENTWISE = frozenset("""Add Sub Mul Div Pow Max Min Sum Mean Mod PRelu Where Clip Dropout BitShift
    Equal Less Greater LessOrEqual GreaterOrEqual And Or Xor""".split())
POOLS = frozenset("MaxPool AveragePool LpPool GlobalAveragePool GlobalMaxPool GlobalLpPool".split())
REDUCE = frozenset("""ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2
    ReduceLogSum ReduceLogSumExp ReduceSumSquare""".split())
# From these opsets the op takes its axes (split sizes) as an input, no longer an attribute;
# the other reductions switched at 18.
AXES_INPUT_FROM = {"ReduceSum": 13, "Squeeze": 13, "Unsqueeze": 13, "Split": 13}


class OpRules:
    """The per-op rules; the walk (`channels._Walk`) provides layouts, joins, pins and cuts."""

    # -- linear layers -----------------------------------------------------------------------

    def linear(self, node: Node) -> set[int]:
        op, x = node.op_type, node.inputs[0]
        w = const(node.inputs[1]) if len(node.inputs) > 1 else None
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if x is None or w is None or w.dtype not in FLOATS or (bias is not None and bias.const is None):
            return set()  # non-constant weights: every channel tensor it reads is pinned
        out = node.outputs[0]
        if op == "MatMul":
            if w.ndim != 2 or x.const is not None:
                return set()
            rank = self.rank(x)
            self.read(node, x, self.need(x, -1, rank, w.shape[0]), 1, FeatureLayout("rows"))
            self.open(out, -1, rank, w.shape[1], producer=node)
            self.role(node, "linear")
            return {0}
        if op == "Gemm":
            if w.ndim != 2 or attr(node, "transA", 0) or x.const is not None:
                return set()
            k, n = (w.shape[1], w.shape[0]) if attr(node, "transB", 0) else w.shape
            self.read(node, x, self.need(x, -1, 2, k), 1, FeatureLayout("rows"))
            self.open(out, -1, 2, n, producer=node)
            self.role(node, "linear")
            return {0}
        group, rank = attr(node, "group", 1), w.ndim
        axis = 1 - rank
        if op == "ConvTranspose":
            lx = self.need(x, axis, rank, w.shape[0])
            if group != 1:
                self.pin(lx, f"grouped ConvTranspose '{node.name}'")
                self.open(out, axis, rank, w.shape[1] * group, reason=f"grouped ConvTranspose '{node.name}'")
                return {0}
            self.read(node, x, lx, 1, None)
            self.open(out, axis, rank, w.shape[1], producer=node)
            self.role(node, "linear")
            return {0}
        c_in = w.shape[1] * group
        lx = self.need(x, axis, rank, c_in)
        if group == 1:
            kernel = w.shape[2:]
            self.read(node, x, lx, math.prod(kernel), conv_layout(node, x, kernel))
            self.open(out, axis, rank, w.shape[0], producer=node)
            self.role(node, "linear")
        elif w.shape[1] == 1 and lx.length == c_in and w.shape[0] % group == 0:
            # Depthwise: output channel c*k+m reads input channel c only.
            self.set_layout(out, lx.widened(w.shape[0] // group, axis, rank))
            self.role(node, "depthwise")
        else:
            why = f"grouped Conv '{node.name}' (group {group})"
            self.pin(lx, why)
            self.open(out, axis, rank, w.shape[0], reason=why)
        return {0}

    def read(self, node: Node, x: Value, layout: Layout, per_channel: int,
             feature_layout: FeatureLayout | None) -> None:
        self.reads[id(node)] = Read(node, x, layout, per_channel, feature_layout)

    # -- channels passing through ----------------------------------------------------------------

    def unary(self, node: Node) -> set[int]:
        layout = self.layout(node.inputs[0]) if node.inputs else None
        if layout is None:
            return {1} if node.op_type == "CastLike" else set()
        self.set_layout(node.outputs[0], layout)
        self.role(node, "pass")
        return {0, 1} if node.op_type == "CastLike" else {0}

    def elementwise(self, node: Node) -> set[int]:
        """Broadcasting ops: dynamic inputs as long as the output along the channel axis
        are joined; constants must be per channel (their slice is taken); length-1 inputs
        broadcast."""
        where = f"{node.op_type} '{node.name}'"
        present = [(i, v) for i, v in enumerate(node.inputs) if v is not None]
        carrying = [self.layout(v) for _, v in present if self.layout(v) is not None]
        if not carrying:
            return set()
        if len({lay.axis for lay in carrying}) > 1:
            for lay in carrying:
                self.pin(lay, f"{where} mixes channel axes")
            return {i for i, _ in present}
        axis = carrying[0].axis
        full = max((lay.length for lay in carrying if lay.length is not None), default=None)
        if full is None or any(lay.length is None for lay in carrying):
            for lay in carrying:
                self.pin(lay, f"{where} on channels of unknown count")
            self.set_outputs(node, carrying[0])
            return {i for i, _ in present}
        joined: list[Layout] = []
        for _, v in present:
            layout = self.layout(v)
            if layout is None:
                c = const(v)
                dims = c.shape if c is not None else v.shape
                pos = None if dims is None else len(dims) + axis
                if dims is not None and (pos < 0 or dims[pos] == 1):
                    continue  # broadcast along the channels
                if c is not None:
                    if dims[pos] == full:
                        continue  # per channel: sliced with the channels
                    for lay in carrying:
                        self.pin(lay, f"{where} has a constant that is not per channel")
                    self.set_outputs(node, carrying[0])
                    return {i for i, _ in present}
                layout = self.need(v, axis, self.rank(v))
            if layout.length == 1 and full != 1:
                continue
            joined.append(layout)
        for other in joined[1:]:
            self.join(joined[0], other, where)
        self.set_outputs(node, joined[0])
        self.role(node, "elementwise", axis=axis)
        return {i for i, _ in present}

    def set_outputs(self, node: Node, layout: Layout) -> None:
        for out in node.outputs:
            self.set_layout(out, layout)

    def pool(self, node: Node) -> set[int]:
        layout = self.layout(node.inputs[0])
        if layout is None:
            return set()
        if layout.position != 1:
            return set()
        if len(node.outputs) > 1 and node.outputs[1] is not None and node.outputs[1].uses:
            return set()  # MaxPool indices count positions across channels
        self.set_layout(node.outputs[0], layout)
        self.role(node, "pass")
        return {0}

    def op_BatchNormalization(self, node: Node) -> set[int]:
        return self._norm(node, node.inputs[1:5])

    def op_InstanceNormalization(self, node: Node) -> set[int]:
        return self._norm(node, node.inputs[1:3])

    def _norm(self, node: Node, params) -> set[int]:
        layout = self.layout(node.inputs[0])
        if layout is None or layout.position != 1 or attr(node, "training_mode", 0):
            return set()
        if any(v is not None and v.uses for v in node.outputs[1:]):
            return set()
        values = [const(p) for p in params]
        if any(p is None or p.shape != (layout.length,) for p in values):
            return set()
        self.set_layout(node.outputs[0], layout)
        self.role(node, "norm")
        return {0}

    def op_Resize(self, node: Node) -> set[int]:
        layout = self.layout(node.inputs[0])
        if layout is None or layout.position is None:
            return set()
        p = layout.position
        axes = attr(node, "axes")
        index = p if axes is None else next((k for k, a in enumerate(axes) if a % layout.rank == p), None)
        if index is None:  # the channel axis is not resized
            self.set_layout(node.outputs[0], layout)
            self.role(node, "pass")
            return {0}
        ins = node.inputs
        if node.op_type == "Upsample" or self.opset < 11:
            scales, sizes = (const(ins[1]) if len(ins) > 1 else attr(node, "scales")), None
        else:
            scales = const(ins[2]) if len(ins) > 2 else None
            sizes = const(ins[3]) if len(ins) > 3 else None
            if len(ins) > 2 and ins[2] is not None and scales is None:
                return set()
        if scales is not None and len(scales):
            if float(np.asarray(scales)[index]) != 1.0:
                return set()
            info = {}
        elif sizes is not None and len(sizes) and int(sizes[index]) == layout.length:
            info = {"index": index}  # the sizes name the channel count: rewritten
        else:
            return set()
        self.set_layout(node.outputs[0], layout)
        self.role(node, "resize", **info)
        return {0}

    op_Upsample = op_Resize

    def op_Concat(self, node: Node) -> set[int]:
        carrying = [self.layout(v) for v in node.inputs if self.layout(v) is not None]
        if not carrying:
            return set()
        rank = next((self.rank(v) for v in node.inputs if self.rank(v) is not None), None)
        axis = _negative(attr(node, "axis", 0), rank)
        if len({lay.axis for lay in carrying}) > 1 or axis is None:
            for lay in carrying:
                self.pin(lay, f"Concat '{node.name}' over channels it cannot place")
            return set(range(len(node.inputs)))
        if axis != carrying[0].axis:  # along another axis: the inputs share their channels
            return self.elementwise(node)
        parts = [self.need(v, axis, rank) for v in node.inputs]
        if any(p.length is None for p in parts):
            for p in parts:
                self.pin(p, f"Concat '{node.name}' of channels of unknown count")
            return set(range(len(node.inputs)))
        self.set_layout(node.outputs[0], Layout(axis, rank, tuple(s for p in parts for s in p.segments)))
        self.role(node, "pass")
        return set(range(len(node.inputs)))

    def op_Split(self, node: Node) -> set[int]:
        layout = self.layout(node.inputs[0])
        if layout is None:
            return set()
        axis = _negative(attr(node, "axis", 0), layout.rank)
        if axis is None:
            return set()
        if axis != layout.axis:
            self.set_outputs(node, layout)
            self.role(node, "pass")
            return {0}
        n = layout.length
        if n is None:
            return set()
        if self.opset >= AXES_INPUT_FROM["Split"]:
            split_in = node.inputs[1] if len(node.inputs) > 1 else None
            sizes = const(split_in)
            if split_in is not None and sizes is None:
                return set()
        else:
            sizes = attr(node, "split")
        if sizes is None or len(sizes) == 0:
            parts = len(node.outputs)
            step = -(-n // parts)
            sizes = [min(step, n - k * step) for k in range(parts)]
        bounds = np.concatenate([[0], np.cumsum(np.asarray(sizes, np.int64))]).tolist()
        if bounds[-1] != n:
            return set()
        subs = [self.sub(layout, lo, hi, f"Split '{node.name}'") for lo, hi in zip(bounds, bounds[1:])]
        if any(s is None for s in subs):
            return {0}
        for out, s in zip(node.outputs, subs):
            self.set_layout(out, s)
        self.role(node, "split", bounds=bounds)
        return {0}

    def op_Slice(self, node: Node) -> set[int]:
        layout = self.layout(node.inputs[0])
        if layout is None:
            return set()
        if self.opset >= 10:
            ins = list(node.inputs) + [None] * (5 - len(node.inputs))
            starts, ends, axes, steps = (const(v) for v in ins[1:5])
            if starts is None or ends is None or any(v is not None and const(v) is None for v in ins[3:5]):
                return set()
        else:
            starts, ends, axes, steps = attr(node, "starts"), attr(node, "ends"), attr(node, "axes"), None
            if starts is None or ends is None:
                return set()
        starts, ends = [int(s) for s in starts], [int(e) for e in ends]
        axes = list(range(len(starts))) if axes is None else [int(a) for a in axes]
        negatives = [_negative(a, layout.rank) for a in axes]
        if None in negatives:
            return set()
        if layout.axis not in negatives:
            self.set_layout(node.outputs[0], layout)
            self.role(node, "pass")
            return {0}
        k = negatives.index(layout.axis)
        n = layout.length
        if n is None or (steps is not None and int(steps[k]) != 1):
            return set()
        lo, hi = (min(max(v + n if v < 0 else v, 0), n) for v in (starts[k], ends[k]))
        if hi <= lo:
            return set()
        s = self.sub(layout, lo, hi, f"Slice '{node.name}'")
        if s is None:
            return {0}
        self.set_layout(node.outputs[0], s)
        self.role(node, "slice", index=k, lo=lo, hi=hi)
        return {0}

    # -- ops that move the channel axis --------------------------------------------------------

    def op_Flatten(self, node: Node) -> set[int]:
        x = node.inputs[0]
        layout = self.layout(x)
        if layout is None or layout.rank is None:
            return set()
        k = attr(node, "axis", 1)
        k = k + layout.rank if k < 0 else k
        widened = self._merge_tail(x, layout, k)
        if widened is None:
            return set()
        self.set_layout(node.outputs[0], widened.moved(-1, 2))
        self.role(node, "pass")
        return {0}

    def _merge_tail(self, x: Value, layout: Layout, k: int) -> Layout | None:
        """The layout once the axes k.. are merged into one: each channel widens to the size
        of the axes after it (static), if the axes between k and the channel axis are 1."""
        p, shape = layout.position, x.shape
        if p < k or shape is None:
            return None
        if any(d != 1 for d in shape[k:p]):
            return None
        tail = shape[p + 1:]
        if not all(isinstance(d, int) for d in tail):
            return None
        return layout.widened(math.prod(tail), -1, None)

    def op_Reshape(self, node: Node) -> set[int]:
        x = node.inputs[0]
        layout, target = self.layout(x), const(node.inputs[1])
        if layout is None or layout.position is None or target is None or x.shape is None:
            return set()
        p, t, dims = layout.position, [int(d) for d in target], x.shape
        copy = 0 if not attr(node, "allowzero", 0) else None
        if len(t) <= p:
            return set()
        # The axes before the channels stay as they are (copied, equal, or one -1 that can
        # only take their size because everything from the channels on is spelt out).
        moved = [i for i in range(p) if not (t[i] == copy or t[i] == dims[i])]
        if moved and (len(moved) > 1 or t[moved[0]] != -1 or -1 in t[p:] or copy in t[p:]):
            return set()
        n = layout.length
        if t[p] in (copy, n) and (len(t) > p + 1 or all(d == 1 for d in dims[p + 1:])):
            out = layout.moved(p - len(t), len(t))  # the channel axis stays, the rest reshapes
        elif len(t) == p + 1:  # the channel axis and everything after it merge
            out = self._merge_tail(x, layout, p)
            if out is None or (t[p] != -1 and t[p] != out.length):
                return set()
            out = out.moved(-1, len(t))
        else:
            return set()
        self.set_layout(node.outputs[0], out)
        self.role(node, "reshape", index=p, literal=t[p] not in (-1, copy))
        return {0}

    def op_Transpose(self, node: Node) -> set[int]:
        layout = self.layout(node.inputs[0])
        perm = attr(node, "perm")
        if layout is None or layout.rank is None:
            return set()
        perm = list(perm) if perm is not None else list(range(layout.rank))[::-1]
        q = perm.index(layout.position)
        self.set_layout(node.outputs[0], layout.moved(q - layout.rank, layout.rank))
        self.role(node, "pass")
        return {0}

    def _axes(self, node: Node, name: str) -> list[int] | None:
        """An op's axes, from the attribute or (newer opsets) the constant second input;
        [] when absent, None when not constant."""
        if self.opset >= AXES_INPUT_FROM.get(node.op_type, 18):
            v = node.inputs[1] if len(node.inputs) > 1 else None
            c = const(v)
            if v is not None and c is None:
                return None
            return [] if c is None else [int(a) for a in c.reshape(-1)]
        return list(attr(node, name, []) or [])

    def op_Squeeze(self, node: Node) -> set[int]:
        layout = self.layout(node.inputs[0])
        axes = self._axes(node, "axes")
        if layout is None or layout.rank is None or not axes:
            return set()
        axes = [a % layout.rank for a in axes]
        p = layout.position
        if p in axes:
            return set()
        after = sum(1 for a in axes if a > p)
        self.set_layout(node.outputs[0], layout.moved(layout.axis + after, layout.rank - len(axes)))
        self.role(node, "pass")
        return {0}

    def op_Unsqueeze(self, node: Node) -> set[int]:
        layout = self.layout(node.inputs[0])
        axes = self._axes(node, "axes")
        if layout is None or layout.rank is None or not axes:
            return set()
        rank = layout.rank + len(axes)
        inserted = {a % rank for a in axes}
        kept = [i for i in range(rank) if i not in inserted]
        self.set_layout(node.outputs[0], layout.moved(kept[layout.position] - rank, rank))
        self.role(node, "pass")
        return {0}

    # -- ops that may read across channels ------------------------------------------------------

    def _keep_axis(self, node: Node, reduced: list[int] | None, keepdims: bool = True) -> set[int]:
        """Pass the layout when the op works over `reduced` axes away from the channels."""
        layout = self.layout(node.inputs[0])
        if layout is None or layout.rank is None or reduced is None:
            return set()
        reduced = [a % layout.rank for a in reduced]
        if layout.position in reduced:
            return set()
        axis = layout.axis if keepdims else layout.axis + sum(1 for a in reduced if a > layout.position)
        self.set_layout(node.outputs[0], layout.moved(axis, layout.rank - (0 if keepdims else len(reduced))))
        self.role(node, "pass")
        return {0}

    def op_Softmax(self, node: Node) -> set[int]:
        layout = self.layout(node.inputs[0])
        if layout is None or layout.rank is None:
            return set()
        if self.opset >= 13:
            return self._keep_axis(node, [attr(node, "axis", -1)])
        a = attr(node, "axis", 1) % layout.rank  # older: all axes from `axis` on are one
        return self._keep_axis(node, list(range(a, layout.rank)))

    op_LogSoftmax = op_Hardmax = op_Softmax

    def op_LayerNormalization(self, node: Node) -> set[int]:
        layout = self.layout(node.inputs[0])
        if layout is None or layout.rank is None or any(v is not None and v.uses for v in node.outputs[1:]):
            return set()
        a = attr(node, "axis", -1) % layout.rank
        return self._keep_axis(node, list(range(a, layout.rank)))

    def _reduce(self, node: Node) -> set[int]:
        axes = self._axes(node, "axes")
        if axes == [] and not attr(node, "noop_with_empty_axes", 0):
            return set()  # reduces over every axis
        return self._keep_axis(node, axes, bool(attr(node, "keepdims", 1)))

    def op_Pad(self, node: Node) -> set[int]:
        layout = self.layout(node.inputs[0])
        if layout is None or layout.rank is None:
            return set()
        if self.opset >= 11:
            pads = const(node.inputs[1]) if len(node.inputs) > 1 else None
            axes_v = node.inputs[3] if len(node.inputs) > 3 else None
            axes = const(axes_v)
            if pads is None or (axes_v is not None and axes is None):
                return set()
        else:
            pads, axes = attr(node, "pads"), None
        axes = list(range(layout.rank)) if axes is None else [int(a) % layout.rank for a in axes]
        pads = [int(p) for p in pads]
        if layout.position in axes:
            k = axes.index(layout.position)
            if pads[k] or pads[k + len(axes)]:
                return set()
        self.set_layout(node.outputs[0], layout)
        self.role(node, "pass")
        return {0}


# -- small helpers ---------------------------------------------------------------------------


def segment_starts(layout: Layout) -> set[int]:
    starts, pos = set(), 0
    for s in layout.segments:
        starts.add(pos)
        pos += s.length or 0
    return starts


def _negative(axis: int, rank: int | None) -> int | None:
    """An op's axis counted from the last axis (None if it counts from the first and the
    rank is unknown)."""
    if axis < 0:
        return axis
    return None if rank is None else axis - rank


def static_dim(v: Value, axis: int) -> int | None:
    shape = v.shape if v.const is None else v.const.shape
    if shape is None or len(shape) < -axis:
        return None
    d = shape[axis]
    return d if isinstance(d, int) else None


def conv_layout(node: Node, x: Value, kernel: tuple[int, ...]) -> FeatureLayout | None:
    """The im2col layout of a group-1 Conv's input, or None when the padding depends on sizes
    that are not known (auto_pad SAME over a dynamic input)."""
    n = len(kernel)
    strides = tuple(attr(node, "strides", None) or (1,) * n)
    dilations = tuple(attr(node, "dilations", None) or (1,) * n)
    auto = attr(node, "auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        pads = tuple(attr(node, "pads", None) or (0,) * (2 * n))
    elif auto == "VALID":
        pads = (0,) * (2 * n)
    else:
        spatial = x.shape[2:] if x.shape is not None else None
        if spatial is None or not all(isinstance(d, int) for d in spatial):
            return None
        begins, ends = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, big = total // 2, total - total // 2
            begins.append(big if auto == "SAME_LOWER" else small)
            ends.append(small if auto == "SAME_LOWER" else big)
        pads = tuple(begins + ends)
    return FeatureLayout("conv", tuple(int(k) for k in kernel), tuple(int(s) for s in strides),
                         tuple(int(p) for p in pads), tuple(int(d) for d in dilations))


def input_layout(node: Node) -> FeatureLayout | None:
    """How a Conv/Gemm/MatMul's input becomes rows of features: im2col patches of all input
    channels for a Conv (any group), the last axis otherwise; None when a Conv's padding
    depends on unknown sizes."""
    if node.op_type != "Conv":
        return FeatureLayout("rows")
    layout = conv_layout(node, node.inputs[0], tuple(const(node.inputs[1]).shape[2:]))
    return None if layout is None else replace(layout, group=attr(node, "group", 1))


for _op in REDUCE:
    setattr(OpRules, "op_" + _op, OpRules._reduce)
