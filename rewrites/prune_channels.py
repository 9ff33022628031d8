"""Structured channel pruning: `plan_channels` chooses the channels each prunable channel
space keeps; `PruneChannels` removes the others from every tensor and weight that depends
on them (rewrites/channels.py finds what that is), refitting the layers that read them.

Importance: "l1"/"l2" of each producer's output-channel weights, divided by that layer's
mean (so layers of different scales compare), summed over the producers of a space;
"activation": from calibration statistics, the error removing the channel adds to its
consumers' outputs after the refit that follows (`removal_error`), summed. Kept counts are rounded to the nearest multiple of `round_to` (8: what fast
kernels want) and never reach zero; a space smaller than `round_to` is left whole.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

import numpy as np
from onnx import AttributeProto

from calibration.gram import InputStats
from ir import Attr, Model, Node, Value
from ir.errors import CompileError

from .base import Change, ChangeLog, Pass, PassResult, Rewriter
from .channels import ChannelAnalysis, ChannelSpace, analyze, channel_spaces, weight2d
from .patterns import attr, const, default_opset
from .refit import MODES as REFITS
from .refit import refit

SCOPES = ("layer", "global")
IMPORTANCES = ("l1", "l2", "activation")


@dataclass
class ChannelPlan:
    """The channels each shrinking space keeps, by space key (`ChannelSpace.key`)."""

    kept: dict[str, np.ndarray] = field(default_factory=dict)  # sorted channel indices
    sizes: dict[str, int] = field(default_factory=dict)  # channels before, every planned space

    @property
    def removed(self) -> int:
        return sum(self.sizes[k] - len(v) for k, v in self.kept.items())

    @property
    def total(self) -> int:
        return sum(self.sizes.values())


def plan_channels(model: Model, spaces: list[ChannelSpace] | None = None, ratio: float = 0.0, *,
                  scope: str = "layer", importance: str = "l1",
                  stats: dict[str, InputStats] | None = None, round_to: int = 8,
                  exclude=(), refit: str = "none") -> ChannelPlan:
    """Choose the channels to keep in every prunable space: `ratio` of each space ("layer"),
    or of all their channels by normalised importance ("global"). A space is left whole when
    a layer that produces or reads it is named (by node name or op type) in `exclude`.
    `refit` is the refit that will follow: "activation" importance scores what it cannot
    recover."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise CompileError(f"channel pruning ratio must be in [0, 1), got {ratio!r}")
    if scope not in SCOPES:
        raise CompileError(f"unknown channel pruning scope '{scope}' (choose from: {', '.join(SCOPES)})")
    if importance not in IMPORTANCES:
        raise CompileError(f"unknown channel importance '{importance}' (choose from: {', '.join(IMPORTANCES)})")
    if importance == "activation" and stats is None:
        raise CompileError("activation importance needs calibration statistics of the consumers (stats)")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise CompileError(f"channel count multiple must be a positive integer, got {round_to!r}")
    if spaces is None:
        spaces = channel_spaces(model)
    exclude = set(exclude)
    # With a refit, a space read by a layer that cannot be refit (a ConvTranspose) stays whole:
    # plain slicing there is what broke the OCR detector's head at 30%.
    eligible = [s for s in spaces if s.prunable and s.size and s.size >= round_to and not _excluded(s, exclude)
                and not (refit != "none" and s.sliced)]
    scores = {s.key: _normalised(channel_importance(s, importance, stats, refit)) for s in eligible}
    if scope == "layer":
        removed = {s.key: math.floor(ratio * s.size + 1e-9) for s in eligible}
    else:
        removed = dict.fromkeys(scores, 0)
        if eligible:
            keys = np.concatenate([[i] * s.size for i, s in enumerate(eligible)])
            flat = np.concatenate([scores[s.key] for s in eligible])
            lowest = np.argsort(flat, kind="stable")[:math.floor(ratio * flat.size + 1e-9)]
            for i, n in zip(*np.unique(keys[lowest], return_counts=True)):
                removed[eligible[i].key] = int(n)
    plan = ChannelPlan()
    for s in eligible:
        plan.sizes[s.key] = s.size
        n = kept_count(s.size, s.size - removed[s.key], round_to)
        if n < s.size:  # the most important n, ties to the lower channel
            order = np.lexsort((np.arange(s.size), -scores[s.key]))
            plan.kept[s.key] = np.sort(order[:n])
    return plan


def kept_count(size: int, wanted: int, round_to: int = 8) -> int:
    """`wanted` rounded to the nearest multiple of `round_to` (halves up), at least `round_to`,
    at most `size`, so the share removed stays close to the one asked for; but rounded up
    when the nearest would remove over OVERSHOOT times what was asked (a 24-channel space at
    20% would lose a third: that broke the OCR detector)."""
    nearest = min(size, max(round_to, math.floor(wanted / round_to + 0.5) * round_to))
    if size - nearest > OVERSHOOT * (size - wanted):
        return min(size, max(round_to, -(-wanted // round_to) * round_to))
    return nearest


OVERSHOOT = 1.5


def channel_importance(space: ChannelSpace, importance: str = "l1",
                       stats: dict[str, InputStats] | None = None, refit: str = "none") -> np.ndarray:
    """One score per channel of the space (higher = keep). "activation": the error removing
    the channel alone adds to its consumers' outputs on the calibration rows, after the
    `refit` that will follow (rewrites/refit.py); falls back to "l2" when no consumer of the
    space has statistics."""
    total = np.zeros(space.size)
    if importance == "activation":
        used = False
        for c in space.consumers:
            st = (stats or {}).get(c.node.name)
            if st is None:
                continue
            w, _ = weight2d(c.node)
            if st.mean.shape != (w.shape[1],):
                raise CompileError(f"statistics of '{c.node.name}' hold {st.mean.size} features, "
                                   f"its weight reads {w.shape[1]}")
            total += removal_error(w, st, c.channel_of_feature, space.size, refit)
            used = True
        if used:
            return total
        importance = "l2"
    for p in space.producers:
        rows, _ = weight2d(p.node)
        norms = np.abs(rows).sum(axis=1) if importance == "l1" else np.sqrt((rows ** 2).sum(axis=1))
        mean = norms.mean()
        if mean > 0:
            total += norms[p.offset:p.offset + space.size] / mean
    return total


def removal_error(w: np.ndarray, st: InputStats, channel_of_feature: np.ndarray, size: int,
                  refit: str) -> np.ndarray:
    """Per channel of a space, E||W x - W' x'||^2 over the calibration rows when that channel
    alone is removed from a consumer with weight `w` [O, F] and the consumer is then refit:
    with "none" E||W_G x_G||^2, with "bias" the same on centred rows, with "lstsq" the
    Optimal Brain Surgeon cost tr(W_G (P_GG)^-1 W_G^T), P the inverse covariance (the kept
    features take over what they can of the channel). G: the channel's features."""
    scores = np.zeros(size)
    mine = channel_of_feature >= 0
    if st.gram is None:  # too many features for a Gram: the channels' energy
        np.add.at(scores, channel_of_feature[mine], ((w ** 2).sum(axis=0) * st.meansq)[mine])
        return scores
    channels, counts = np.unique(channel_of_feature[mine], return_counts=True)
    if counts.min() != counts.max():  # not one block per channel: the energy of each feature
        np.add.at(scores, channel_of_feature[mine], ((w ** 2).sum(axis=0) * st.meansq)[mine])
        return scores
    groups = np.stack([np.flatnonzero(channel_of_feature == ch) for ch in channels])  # [n, g]
    moment = st.gram if refit == "none" else st.covariance()
    if refit == "lstsq":
        diag = np.diag(moment)
        ridged = moment + np.diag(REMOVAL_DAMP * diag + 1e-12 * max(diag.mean(), 1e-30))
        try:
            moment = np.linalg.inv(ridged)
        except np.linalg.LinAlgError:
            moment = np.linalg.pinv(ridged)
    blocks = moment[groups[:, :, None], groups[:, None, :]]  # [n, g, g]
    if refit == "lstsq":
        blocks = np.linalg.pinv(blocks, hermitian=True)  # (P_GG)^-1
    wg = w[:, groups]  # [O, n, g]
    scores[channels] = np.einsum("ong,ngh,onh->n", wg, blocks, wg)
    return scores


REMOVAL_DAMP = 1e-3  # ridge of the covariance, relative to each feature's variance


def _normalised(scores: np.ndarray) -> np.ndarray:
    mean = scores.mean() if scores.size else 0.0
    return scores / mean if mean > 0 else scores


def _excluded(space: ChannelSpace, exclude: set) -> bool:
    nodes = [p.node for p in space.producers] + [c.node for c in space.consumers] + space.sliced
    return any(n.name in exclude or n.op_type in exclude for n in nodes)


# -- the pass ------------------------------------------------------------------------------


@dataclass
class PruneChannels(Pass):
    """Remove the channels `plan` does not keep. A consumer with statistics in `stats`
    (node name -> InputStats) is refit with `refit` ("lstsq", "bias"; "none" slices);
    without statistics it is sliced."""

    name = "prune-channels"
    exact = False
    plan: ChannelPlan = field(default_factory=ChannelPlan)
    stats: dict[str, InputStats] | None = None
    refit: str = "lstsq"

    def run(self, model: Model) -> PassResult:
        if self.refit not in REFITS:
            raise CompileError(f"unknown refit '{self.refit}' (choose from: {', '.join(REFITS)})")
        log = ChangeLog()
        analysis = analyze(model)
        keep = [np.ones(s.size or 0, bool) for s in analysis.spaces]
        by_key = {s.key: i for i, s in enumerate(analysis.spaces)}
        shrinking = []
        for key, kept in self.plan.kept.items():
            i = by_key.get(key)
            if i is None:
                raise CompileError(f"channel plan does not match the model: no channel space '{key}'")
            space = analysis.spaces[i]
            if space.pinned is not None:
                raise CompileError(f"channel plan prunes space '{key}', which is pinned: {space.pinned}")
            kept = np.asarray(kept, np.int64)
            if kept.ndim != 1 or not kept.size or kept[0] < 0 or kept[-1] >= space.size \
                    or np.any(np.diff(kept) <= 0):
                raise CompileError(f"channel plan for '{key}': kept channels must be sorted, unique, "
                                   f"non-empty and below {space.size}")
            if kept.size < space.size:
                keep[i] = np.zeros(space.size, bool)
                keep[i][kept] = True
                shrinking.append((space, kept.size))
        for space, n in shrinking:
            log.record(Change(self.name, "match", space.key, f"channels {space.size} -> {n}"))
        if shrinking:
            _Shrink(model, analysis, keep, Rewriter(model, log, self.name), self.stats or {}, self.refit).apply()
        return PassResult(bool(shrinking), log)


class _Shrink:
    """Applies one pruning: every tensor of a space loses the same channels."""

    def __init__(self, model: Model, analysis: ChannelAnalysis, keep: list[np.ndarray], rw: Rewriter,
                 stats: dict[str, InputStats], mode: str):
        self.model, self.analysis, self.rw = model, analysis, rw
        self.graph = model.graph
        self.opset = default_opset(model.opset_imports)
        self.stats, self.mode, self.keep = stats, mode, keep
        self.kept: dict[int, np.ndarray] = {}
        for vid, (v, layout) in analysis.layouts.items():
            if layout.length is None:  # pinned: channels of unknown count never shrink
                continue
            positions = analysis.kept_positions(layout, keep)
            if positions.size < layout.length:
                self.kept[vid] = positions

    def positions(self, v: Value | None) -> np.ndarray | None:
        """The positions `v` keeps along its channel axis, None if it loses none."""
        return self.kept.get(id(v))

    def apply(self) -> None:
        for vid, positions in self.kept.items():
            v, layout = self.analysis.layouts[vid]
            if v.shape is not None and -len(v.shape) <= layout.axis:
                shape = list(v.shape)
                if isinstance(shape[layout.axis], int):
                    shape[layout.axis] = int(positions.size)
                    self.rw.set_type(v, v.dtype, shape)
        for node, kind, info in list(self.analysis.roles.values()):
            getattr(self, "_" + kind)(node, **info)

    # -- constants ---------------------------------------------------------------------------

    def set_const(self, node: Node, index: int, array: np.ndarray) -> Value:
        """Input `index` of `node` becomes a new constant; the old one goes once unused."""
        old = node.inputs[index]
        new = self.rw.add_initializer(self.graph, re.sub(r"_pruned(_\d+)?$", "", old.name) + "_pruned", array)
        self.rw.set_input(node, index, new)
        if not old.uses and self.graph.initializers.get(old.name) is old and not old.is_graph_input \
                and all(o is not old for o in self.graph.outputs):
            self.rw.remove_initializer(self.graph, old)
        return new

    def rebuild(self, node: Node, inputs: list[Value | None], attributes=None) -> Node:
        """A copy of `node` with other inputs (a slot it lacked), taking over its readers."""
        attributes = {k: replace(a) for k, a in node.attributes.items()} if attributes is None else attributes
        new = self.rw.add_node(node.graph, node, node.op_type, inputs, len(node.outputs),
                               domain=node.domain, name=node.name, attributes=attributes)
        for old, out in zip(node.outputs, new.outputs):
            if old is not None:
                self.rw.set_type(out, old.dtype, old.shape)
                self.rw.replace_uses(old, out)
        self.rw.remove_node(node)
        return new

    # -- roles -------------------------------------------------------------------------------

    def _pass(self, node: Node) -> None:
        pass

    def _linear(self, node: Node) -> None:
        rows = self.positions(node.outputs[0])
        read = self.analysis.reads.get(id(node))
        inputs = None
        if read is not None and read.layout.length is not None:
            inputs = self.analysis.kept_positions(read.layout, self.keep)
            inputs = None if inputs.size == read.layout.length else inputs
        if rows is None and inputs is None:
            return
        op, w = node.op_type, const(node.inputs[1])
        if op == "ConvTranspose":  # [C_in, C_out, k...]: sliced, never refit
            if inputs is not None:
                w = w[inputs]
            if rows is not None:
                w = w[:, rows]
            self.set_const(node, 1, w)
            if rows is not None and len(node.inputs) > 2 and node.inputs[2] is not None:
                self.set_const(node, 2, const(node.inputs[2])[rows])
            return
        w2, bias = weight2d(node)
        c = const(node.inputs[2]) if op == "Gemm" and len(node.inputs) > 2 else None
        matrix = None  # a Gemm C that is not a vector
        if c is not None and bias is None:
            matrix = attr(node, "beta", 1.0) * c.astype(np.float64)
            if rows is not None and matrix.ndim and matrix.shape[-1] == w2.shape[0] > 1:
                matrix = np.take(matrix, rows, axis=-1)
        if rows is not None:
            w2 = w2[rows]
            bias = None if bias is None else bias[rows]
        if inputs is not None:
            kept = (inputs[:, None] * read.per_channel + np.arange(read.per_channel)).reshape(-1)
            stats = self.stats.get(node.name)
            mode = self.mode if stats is not None and read.feature_layout is not None else "none"
            had_bias = bias is not None
            w2, bias = refit(w2, bias, kept, stats, mode, where=node.name)
            if not had_bias and not np.any(bias):
                bias = None
        dtype = w.dtype
        if op == "Conv":
            self.set_const(node, 1, w2.reshape((w2.shape[0], -1) + w.shape[2:]).astype(dtype))
            self._bias(node, 2, bias, dtype)
        elif op == "Gemm":
            self._gemm(node, w2, bias if matrix is None else matrix + (0 if bias is None else bias), dtype)
        else:
            self.set_const(node, 1, w2.T.astype(dtype))
            if bias is not None:
                self._add_after(node, bias.astype(dtype))

    def _bias(self, node: Node, index: int, bias: np.ndarray | None, dtype) -> None:
        if bias is None:
            return
        if len(node.inputs) > index and node.inputs[index] is not None:
            self.set_const(node, index, bias.astype(dtype))
        else:
            value = self.rw.add_initializer(self.graph, f"{node.name}_bias", bias.astype(dtype))
            self.rebuild(node, list(node.inputs) + [None] * (index - len(node.inputs)) + [value])

    def _gemm(self, node: Node, w2: np.ndarray, bias: np.ndarray | None, dtype) -> None:
        """Gemm's alpha goes into B and beta into C (a C that is not a vector stays a
        matrix, its columns sliced, plus the refit's bias)."""
        self.set_const(node, 1, (w2 if attr(node, "transB", 0) else w2.T).astype(dtype))
        if attr(node, "alpha", 1.0) != 1.0:
            self.rw.set_attribute(node, "alpha", None)
        if bias is None:
            return
        if attr(node, "beta", 1.0) != 1.0:
            self.rw.set_attribute(node, "beta", None)
        self._bias(node, 2, np.asarray(bias), dtype)

    def _add_after(self, node: Node, bias: np.ndarray) -> None:
        """MatMul has no bias: an Add after it carries the refit's."""
        out = node.outputs[0]
        graph = node.graph
        index = graph.nodes.index(node)
        after = graph.nodes[index + 1] if index + 1 < len(graph.nodes) else None
        b = self.rw.add_initializer(graph, f"{node.name}_bias", bias)
        add = self.rw.add_node(graph, after, "Add", [out, b], name=f"{node.name}_bias")
        self.rw.set_type(add.outputs[0], out.dtype, out.shape)
        self.rw.replace_uses(out, add.outputs[0])
        self.rw.set_input(add, 0, out)

    def _depthwise(self, node: Node) -> None:
        rows = self.positions(node.outputs[0])
        if rows is None:
            return
        self.set_const(node, 1, const(node.inputs[1])[rows])
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            self.set_const(node, 2, const(node.inputs[2])[rows])
        channels = self.positions(node.inputs[0]).size
        self.rw.set_attribute(node, "group", _int(channels))

    def _norm(self, node: Node) -> None:
        rows = self.positions(node.outputs[0])
        if rows is not None:
            for i in range(1, len(node.inputs)):
                if node.inputs[i] is not None:
                    self.set_const(node, i, const(node.inputs[i])[rows])

    def _elementwise(self, node: Node, axis: int) -> None:
        """Per-channel constants lose the pruned channels."""
        out = node.outputs[0]
        rows = self.positions(out)
        if rows is None:
            return
        full = self.analysis.layout(out).length
        for i, v in enumerate(node.inputs):
            c = const(v)
            if c is None or self.analysis.layout(v) is not None:
                continue
            k = c.ndim + axis
            if k >= 0 and c.shape[k] == full and full > 1:
                self.set_const(node, i, np.take(c, rows, axis=k))

    def _split(self, node: Node, bounds: list[int]) -> None:
        positions = self.positions(node.inputs[0])
        if positions is None:
            return
        sizes = np.diff(np.searchsorted(positions, bounds)).astype(np.int64)
        if self.opset < 13:
            self.rw.set_attribute(node, "split", _ints(sizes))
        elif len(node.inputs) > 1 and node.inputs[1] is not None:
            self.set_const(node, 1, sizes)
        else:  # equal parts before: the sizes must now be spelt out
            value = self.rw.add_initializer(self.graph, f"{node.name}_split", sizes)
            attributes = {k: replace(a) for k, a in node.attributes.items() if k != "num_outputs"}
            self.rebuild(node, [node.inputs[0], value], attributes)

    def _slice(self, node: Node, index: int, lo: int, hi: int) -> None:
        positions = self.positions(node.inputs[0])
        if positions is None:
            return
        new_lo, new_hi = (int(n) for n in np.searchsorted(positions, [lo, hi]))
        if self.opset < 10:
            for name, n in (("starts", new_lo), ("ends", new_hi)):
                values = list(attr(node, name))
                values[index] = n
                self.rw.set_attribute(node, name, _ints(values))
            return
        for i, n in ((1, new_lo), (2, new_hi)):
            values = const(node.inputs[i]).copy()
            values[index] = n
            self.set_const(node, i, values)

    def _resize(self, node: Node, index: int | None = None) -> None:
        rows = self.positions(node.outputs[0])
        if rows is None or index is None:
            return
        sizes = const(node.inputs[3]).copy()
        sizes[index] = rows.size
        self.set_const(node, 3, sizes)

    def _reshape(self, node: Node, index: int, literal: bool) -> None:
        rows = self.positions(node.outputs[0])
        if rows is None or not literal:
            return
        target = const(node.inputs[1]).copy()
        target[index] = rows.size
        self.set_const(node, 1, target)


def _int(n: int) -> Attr:
    return Attr(AttributeProto.INT, int(n))


def _ints(values) -> Attr:
    return Attr(AttributeProto.INTS, [int(v) for v in values])
