"""Channel spaces: the tensor axes that must lose the same channels when a layer's output
channels are pruned.

A Conv (group 1), ConvTranspose (group 1), Gemm or MatMul with a constant weight opens
channels on its output. Every tensor carrying them is tracked with a `Layout`: its channel
axis and the runs of channels (`Segment`s) laid along it. Pass-through ops (BatchNorm,
activations, pooling, Resize, per-channel constants...) copy the layout; a depthwise Conv
copies it too, each channel now `expand` positions wide; Flatten or Reshape into a Gemm
widens each channel to its H*W features; Concat on the channel axis lays its inputs' runs one
after the other, Split and Slice take a range of them. Element-wise ops with two dynamic
inputs (residual Add, gating Mul) join the runs they line up, with union-find: the joined
runs form one `ChannelSpace`, pruned as a whole.

A Split or Slice cutting through a run, or a join of runs with different boundaries, cuts the
runs apart at the source: the analysis runs again with the producers' channels split there,
so that every range a Split takes is a space of its own (pruned on its own, never emptied).

Anything else reading channels pins them: graph outputs, unknown ops, ops that mix or reduce
channels (Softmax or ReduceMean over them, LayerNorm, grouped conv), reads from inside a
subgraph, Shape. Pinned spaces are reported with the first reason found.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ir import Model, Node, Value

from .channel_layout import ChannelAnalysis, ChannelSpace, Consumer, Layout, Producer, Read, Segment
from .channel_rules import ELEMENTWISE, POOLS, UNARY, OpRules, static_dim, segment_starts
from .patterns import attr, const, default_opset

MAX_ROUNDS = 16  # cut-and-rerun rounds; real graphs settle in two


def channel_spaces(model: Model) -> list[ChannelSpace]:
    """Every channel space of the main graph, prunable or pinned, in graph order."""
    return analyze(model).spaces


def analyze(model: Model) -> ChannelAnalysis:
    """Channel spaces plus what pruning needs to shrink them (layouts, roles, reads)."""
    cuts: dict[str, set[int]] = {}
    for _ in range(MAX_ROUNDS):
        walk = _Walk(model, cuts)
        walk.run()
        new = walk.needed_cuts()
        if all(offsets <= cuts.get(name, set()) for name, offsets in new.items()):
            break
        for name, offsets in new.items():
            cuts.setdefault(name, set()).update(offsets)
    return walk.result()


def weight2d(node: Node) -> tuple[np.ndarray, np.ndarray | None]:
    """A linear node's weight as [O, F] (F in the order of its input features: (c, k...) for a
    Conv, the last axis for Gemm/MatMul) and its bias as [O] (None when it has none or it is
    not a vector), float64. Gemm's alpha and beta are folded in."""
    w = const(node.inputs[1]).astype(np.float64)
    op = node.op_type
    if op == "Conv":
        b = const(node.inputs[2]) if len(node.inputs) > 2 else None
        return w.reshape(w.shape[0], -1), None if b is None else b.astype(np.float64)
    if op == "ConvTranspose":  # [C_in, C_out, k...] -> rows are output channels
        b = const(node.inputs[2]) if len(node.inputs) > 2 else None
        rows = np.moveaxis(w, 1, 0).reshape(w.shape[1], -1)
        return rows, None if b is None else b.astype(np.float64)
    if op == "Gemm":
        w2 = attr(node, "alpha", 1.0) * (w if attr(node, "transB", 0) else w.T)
        return w2, gemm_bias(node, w2.shape[0])
    return w.T, None  # MatMul [K, N]


def gemm_bias(node: Node, outputs: int) -> np.ndarray | None:
    """beta * C as an [O] vector when C is one (a scalar, [O], [1, O]), else None."""
    c = const(node.inputs[2]) if len(node.inputs) > 2 else None
    if c is None:
        return None
    if c.size == 1 or (c.shape[-1] == outputs and c.size == outputs):
        return attr(node, "beta", 1.0) * np.broadcast_to(c.reshape(-1).astype(np.float64), (outputs,)).copy()
    return None



# -- the walk -------------------------------------------------------------------------------


@dataclass
class _Atom:
    origin: str  # the value whose channels it is a run of
    offset: int  # first channel of the run in that value
    size: int | None
    whole: bool  # the run is all of the value's channels
    producer: Node | None = None


class _Walk(OpRules):
    """One pass over the main graph with the producers' channels cut at `cuts`."""

    def __init__(self, model: Model, cuts: dict[str, set[int]]):
        self.model = model
        self.graph = model.graph
        self.opset = default_opset(model.opset_imports)
        self.cuts = cuts
        self.atoms: list[_Atom] = []
        self.parent: list[int] = []
        self.pins: list[tuple[int, str]] = []
        self.wanted: list[tuple[int, int]] = []  # (atom, channel) to cut before
        self.layouts: dict[int, tuple[Value, Layout]] = {}
        self.roles: dict[int, tuple[Node, str, dict]] = {}
        self.reads: dict[int, Read] = {}

    # -- union-find and pins ---------------------------------------------------------------

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the older atom stays the root: it names the space
            self.parent[max(ra, rb)] = min(ra, rb)

    def pin(self, layout: Layout | None, reason: str) -> None:
        if layout is not None:
            for s in layout.segments:
                self.pins.append((s.atom, reason))

    def cut(self, atom: int, channel: int) -> None:
        self.wanted.append((atom, channel))

    # -- layouts -------------------------------------------------------------------------------

    def layout(self, v: Value | None) -> Layout | None:
        entry = self.layouts.get(id(v))
        return None if entry is None else entry[1]

    def set_layout(self, v: Value | None, layout: Layout | None) -> None:
        if v is not None and layout is not None:
            rank = len(v.shape) if v.shape is not None else layout.rank
            self.layouts[id(v)] = (v, layout.moved(layout.axis, rank))

    def open(self, v: Value, axis: int, rank: int | None, size: int | None,
             producer: Node | None = None, reason: str | None = None) -> Layout:
        """New channels on `v` (cut where earlier rounds asked); pinned with `reason`."""
        bounds = [0] + sorted(c for c in self.cuts.get(v.name, ()) if size is None or 0 < c < size)
        bounds.append(size)
        segments = []
        for lo, hi in zip(bounds, bounds[1:]):
            n = None if hi is None else hi - lo
            self.atoms.append(_Atom(v.name, lo, n, len(bounds) == 2, producer))
            self.parent.append(len(self.parent))
            segments.append(Segment(len(self.atoms) - 1, n))
        layout = Layout(axis, rank, tuple(segments))
        if reason is not None:
            self.pin(layout, reason)
        self.set_layout(v, layout)
        return self.layout(v)

    def need(self, v: Value, axis: int, rank: int | None, size: int | None = None) -> Layout:
        """The layout of `v` along `axis`; a tensor whose channels nothing here produced
        (graph input, constant, unknown op) gets channels of its own, pinned."""
        have = self.layout(v)
        if have is not None and have.axis == axis and (size is None or have.length == size):
            return have
        if have is not None:
            self.pin(have, f"channels of %{v.name} read along another axis or count")
        if size is None:
            size = static_dim(v, axis)
        if v.const is not None:
            reason = f"constant channels %{v.name}"
        elif v.producer is None:
            reason = f"channels come from graph input %{v.name}"
        else:
            reason = f"channels come from {v.producer.op_type} '{v.producer.name}'"
        if have is not None:  # keep the first layout; this one only serves the reader
            bounds = Layout(axis, rank, (Segment(self._opaque(v, size), size),))
            self.pin(bounds, reason)
            return bounds
        return self.open(v, axis, rank, size, reason=reason)

    def _opaque(self, v: Value, size: int | None) -> int:
        self.atoms.append(_Atom(v.name, 0, size, True))
        self.parent.append(len(self.parent))
        return len(self.atoms) - 1

    def join(self, a: Layout, b: Layout, where: str) -> bool:
        """Make the channels of two equally long layouts one: runs with the same boundaries
        are united; a boundary one side lacks becomes a cut for the next round."""
        if a.length is None or b.length is None or a.length != b.length:
            self.pin(a, f"{where} joins channels of unknown or different counts")
            self.pin(b, f"{where} joins channels of unknown or different counts")
            return False
        starts_a, starts_b = segment_starts(a), segment_starts(b)
        aligned = True
        for layout, starts, other in ((a, starts_a, starts_b), (b, starts_b, starts_a)):
            for pos in other:
                if pos not in starts and pos < layout.length:
                    aligned = False
                    if not self._cut_at(layout, pos):
                        self.pin(a, f"{where} joins channels laid out differently")
                        self.pin(b, f"{where} joins channels laid out differently")
                        return False
        if not aligned:  # resolved by the cuts in the next round
            self.pin(a, f"{where} joins channels laid out differently")
            self.pin(b, f"{where} joins channels laid out differently")
            return False
        for sa, sb in zip(a.segments, b.segments):
            if sa.expand != sb.expand:
                self.pin(a, f"{where} joins channels of different widths")
                self.pin(b, f"{where} joins channels of different widths")
                return False
        for sa, sb in zip(a.segments, b.segments):
            self.union(sa.atom, sb.atom)
        return True

    def _cut_at(self, layout: Layout, pos: int) -> bool:
        """Ask for a cut so that a run boundary falls at position `pos`."""
        start = 0
        for s in layout.segments:
            if start < pos < start + s.length:
                if (pos - start) % s.expand:
                    return False
                self.cut(s.atom, (pos - start) // s.expand)
                return True
            start += s.length
        return True

    def sub(self, layout: Layout, lo: int, hi: int, where: str) -> Layout | None:
        """Positions lo..hi-1 as a layout of whole runs (else cuts are asked for: None)."""
        ok = True
        for pos in (lo, hi):
            if pos not in segment_starts(layout) and pos != layout.length:
                if not self._cut_at(layout, pos):
                    self.pin(layout, f"{where} cuts through a channel's positions")
                    return None
                ok = False
        if not ok:
            self.pin(layout, f"{where} cuts channels apart")
            return None
        segments, start = [], 0
        for s in layout.segments:
            if lo <= start and start + s.length <= hi:
                segments.append(s)
            start += s.length
        return Layout(layout.axis, layout.rank, tuple(segments))

    # -- the graph -----------------------------------------------------------------------------

    def run(self) -> None:
        for node in self.graph.nodes:
            handled = self.visit(node)
            for i, v in enumerate(node.inputs):
                if v is not None and i not in handled and self.layout(v) is not None:
                    self.pin(self.layout(v), f"read by {node.op_type} '{node.name}'")
        for v in self.graph.outputs:
            self.pin(self.layout(v), f"graph output %{v.name}")
        for v, layout in list(self.layouts.values()):
            for user, _ in v.uses:
                if user.graph is not self.graph:
                    owner = user.graph.owner if user.graph is not None else None
                    self.pin(layout, f"read inside the body of '{owner.name if owner else '?'}'")
                    break

    def visit(self, node: Node) -> set[int]:
        """Give the node's outputs their layouts; returns the inputs whose channels it
        handles (every other input carrying channels gets pinned)."""
        if node.domain not in ("", "ai.onnx"):
            return set()
        op = node.op_type
        if op in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            return self.linear(node)
        if op in UNARY or op == "CastLike":
            return self.unary(node)
        if op in ELEMENTWISE:
            return self.elementwise(node)
        if op in POOLS:
            return self.pool(node)
        method = getattr(self, "op_" + op, None)
        return method(node) if method is not None else set()

    def role(self, node: Node, kind: str, **info) -> None:
        self.roles[id(node)] = (node, kind, info)

    def rank(self, v: Value) -> int | None:
        if v.shape is not None:
            return len(v.shape)
        layout = self.layout(v)
        return None if layout is None else layout.rank

    # -- results -----------------------------------------------------------------------------

    def needed_cuts(self) -> dict[str, set[int]]:
        """Cuts asked for this round, at every source of the channels they fall in."""
        members: dict[int, list[int]] = {}
        for a in range(len(self.atoms)):
            members.setdefault(self.find(a), []).append(a)
        out: dict[str, set[int]] = {}
        for atom, channel in self.wanted:
            for a in members[self.find(atom)]:
                out.setdefault(self.atoms[a].origin, set()).add(self.atoms[a].offset + channel)
        return out

    def result(self) -> ChannelAnalysis:
        roots: dict[int, int] = {}
        keys: set[str] = set()
        spaces: list[ChannelSpace] = []
        space_of_atom = []
        for a, atom in enumerate(self.atoms):
            r = self.find(a)
            if r not in roots:
                first = self.atoms[r]
                key = first.origin if first.whole else \
                    f"{first.origin}[{first.offset}:{first.offset + (first.size or 0)}]"
                while key in keys:  # a stand-in for a tensor read along a second axis
                    key += "'"
                keys.add(key)
                roots[r] = len(spaces)
                spaces.append(ChannelSpace(key, first.size))
            space_of_atom.append(roots[r])
            if atom.producer is not None:
                spaces[roots[r]].producers.append(Producer(atom.producer, atom.offset))
        for atom, reason in self.pins:
            space = spaces[space_of_atom[atom]]
            if space.pinned is None:
                space.pinned = reason
        for space in spaces:
            if space.pinned is None and not space.producers:
                space.pinned = "no layer produces these channels"
        analysis = ChannelAnalysis(spaces, self.layouts, self.roles, self.reads, space_of_atom)
        for v, layout in self.layouts.values():
            for i in sorted({space_of_atom[s.atom] for s in layout.segments}):
                spaces[i].tensors.append(v.name)
        for read in self.reads.values():
            node = read.node
            which, chans = analysis.channels(read.layout)
            for i in np.unique(which):
                if read.feature_layout is None:
                    spaces[i].sliced.append(node)
                    continue
                of = np.where(which == i, chans, -1)
                spaces[i].consumers.append(Consumer(node, read.feature_layout, np.repeat(of, read.per_channel)))
        return analysis


__all__ = ["ChannelAnalysis", "ChannelSpace", "Consumer", "Layout", "Producer", "Read", "Segment",
           "analyze", "channel_spaces", "gemm_bias", "weight2d"]
