"""What the channel analysis finds (rewrites/channels.py): the runs of channels a tensor
carries (`Segment`, `Layout`), the spaces that must lose the same channels
(`ChannelSpace`, with their producers and consumers) and what pruning needs to shrink them
(`ChannelAnalysis`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from calibration.gram import FeatureLayout
from ir import Node, Value

@dataclass(frozen=True)
class Segment:
    """`size` channels of one atom (a run of a producer's channels), each `expand`
    consecutive positions wide along the channel axis."""

    atom: int
    size: int | None
    expand: int = 1

    @property
    def length(self) -> int | None:
        return None if self.size is None else self.size * self.expand


@dataclass(frozen=True)
class Layout:
    """The channel axis of a tensor (negative: counted from the last axis), its rank when
    known, and the runs of channels along that axis."""

    axis: int
    rank: int | None
    segments: tuple[Segment, ...]

    @property
    def length(self) -> int | None:
        lengths = [s.length for s in self.segments]
        return None if None in lengths else sum(lengths)

    @property
    def position(self) -> int | None:
        """The channel axis counted from the first axis."""
        return None if self.rank is None else self.axis + self.rank

    def widened(self, factor: int, axis: int, rank: int | None) -> Layout:
        return Layout(axis, rank, tuple(Segment(s.atom, s.size, s.expand * factor) for s in self.segments))

    def moved(self, axis: int, rank: int | None) -> Layout:
        return Layout(axis, rank, self.segments)


@dataclass
class Producer:
    """A layer whose output channels `offset .. offset + space.size - 1` are the space."""

    node: Node
    offset: int


@dataclass
class Consumer:
    """A layer reading the space: `channel_of_feature[f]` is the space channel feature f of
    its canonical 2-D weight [O, F] reads (`weight2d`), or -1 for another space's feature.
    `layout` says how to collect its input statistics (calibration.gram)."""

    node: Node
    layout: FeatureLayout
    channel_of_feature: np.ndarray


@dataclass
class ChannelSpace:
    key: str  # stable name: the first tensor carrying it, with a range when it is a part
    size: int | None
    producers: list[Producer] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    # Layers whose weights lose the pruned inputs but cannot be refit (ConvTranspose, a
    # Conv with auto_pad over unknown sizes).
    sliced: list[Node] = field(default_factory=list)
    tensors: list[str] = field(default_factory=list)
    pinned: str | None = None  # why it cannot be pruned; None = prunable

    @property
    def prunable(self) -> bool:
        return self.pinned is None


@dataclass
class Read:
    """How a linear node reads its input's channels: `per_channel` features per position."""

    node: Node
    value: Value
    layout: Layout
    per_channel: int
    feature_layout: FeatureLayout | None


@dataclass
class ChannelAnalysis:
    spaces: list[ChannelSpace]
    layouts: dict[int, tuple[Value, Layout]]  # id(value) -> layout of its channels
    roles: dict[int, tuple[Node, str, dict]]  # id(node) -> what pruning must update there
    reads: dict[int, Read]  # id(linear node) -> its input's channels
    space_of_atom: list[int]

    def layout(self, v: Value | None) -> Layout | None:
        entry = self.layouts.get(id(v))
        return None if entry is None else entry[1]

    def kept_positions(self, layout: Layout, keep: list[np.ndarray]) -> np.ndarray:
        """Positions along the channel axis that remain when space i keeps `keep[i]` (bool)."""
        parts = [np.repeat(keep[self.space_of_atom[s.atom]], s.expand) for s in layout.segments]
        return np.flatnonzero(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    def channels(self, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
        """(space index, channel) of every position along the layout's axis."""
        spaces, chans = [], []
        for s in layout.segments:
            spaces.append(np.full(s.length, self.space_of_atom[s.atom]))
            chans.append(np.repeat(np.arange(s.size), s.expand))
        if not spaces:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(spaces), np.concatenate(chans)

