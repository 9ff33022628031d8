"""Pruning in the compiler: structured channel pruning needs the statistics of each
consumer's input on the user's data (onnxruntime runs here, not in rewrites/), and the
report gives what pruning bought (sparsity, channels, file size plain and zipped)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Callable

import ir
from calibration.collect import collect_input_stats
from calibration.gram import InputStats
from ir import Model
from ir.emit import has_external
from rewrites.base import Pass, PassResult
from rewrites.channels import channel_spaces
from rewrites.prune import PruneWeights, sparsity_report
from rewrites.prune_channels import PruneChannels, plan_channels

from .errors import CompileError

MODES = ("unstructured", "2:4", "channel")
REFITS = ("lstsq", "bias", "none")
# Kept channel counts are multiples of this: onnxruntime's blocked (NCHWc) convolutions take
# 16 channels at a time on AVX-512 CPUs (8 on AVX2) and fall back to slower kernels plus
# reorders otherwise (digits CNN at 20%: 1.09x float with multiples of 8, 0.71x with 16).
DEFAULT_MULTIPLE = 16


@dataclass
class ChannelPruning(Pass):
    """Remove a share of the channels of every prunable channel space, as the model stands
    when this pass runs (after folding, so BatchNorm is already in the weights). When the
    importance or the refit needs them, each consumer's input statistics are gathered on
    `feeds` from the float model first: the float model is the teacher of the refit."""

    name = "prune-channels"
    exact = False
    ratio: float = 0.0
    scope: str = "layer"
    importance: str = "l1"
    refit: str = "none"
    exclude: tuple[str, ...] = ()
    multiple: int = DEFAULT_MULTIPLE
    feeds: Any = None
    progress: Callable[[int, int | None], None] | None = None

    def run(self, model: Model) -> PassResult:
        spaces = channel_spaces(model)
        stats = None
        if self.importance == "activation" or self.refit != "none":
            stats = consumer_stats(model, spaces, self.feeds, self.progress)
        plan = plan_channels(model, spaces, self.ratio, scope=self.scope, importance=self.importance,
                             stats=stats, exclude=self.exclude, refit=self.refit, round_to=self.multiple)
        return PruneChannels(plan=plan, stats=stats, refit=self.refit).run(model)


def consumer_stats(model: Model, spaces, feeds, progress=None) -> dict[str, InputStats]:
    """Mean and Gram matrix of the input features of every consumer of a prunable space
    (consumer node name -> stats), streamed over `feeds` in onnxruntime."""
    if feeds is None:
        raise CompileError("channel pruning with refit or activation importance needs calibration data "
                           "(--calib DIR); or use --refit none --prune-importance l1")
    layers = {consumer.node.name: (consumer.node.inputs[0].name, consumer.layout)
              for space in spaces if space.pinned is None for consumer in space.consumers}
    return collect_input_stats(model, layers, feeds, progress=progress)


def model_size(model: Model) -> tuple[int, int] | None:
    """(bytes, zipped bytes) of the model as one file, or None when its weights are external
    data (sizing would load them)."""
    if has_external(model):
        return None
    data = ir.to_proto(model).SerializeToString()
    return len(data), len(zlib.compress(data, 6))


def prune_passes(share: float, mode: str, scope: str, importance: str | None, refit: str | None,
                 exclude, first_last: bool, multiple: int, feeds, progress=None) -> list[Pass]:
    """The pruning pass the options ask for (validated here, with one-line errors)."""
    if mode not in MODES:
        raise CompileError(f"unknown pruning mode '{mode}' (choose from: {', '.join(MODES)})")
    if mode != "channel":
        if refit is not None or importance is not None or multiple != DEFAULT_MULTIPLE:
            raise CompileError("refit, importance and channel multiple apply to channel pruning "
                               "(--prune-mode channel)")
        return [PruneWeights(sparsity=share, mode=mode, scope=scope, exempt_first_last=not first_last,
                             exclude=tuple(exclude))]
    # With data, rank channels by the error the refit cannot recover and refit the next layer
    # (bench/prune.py at 20%: l1 ranking costs rec 6.3 and cls 7.9 more points; without the
    # refit rec falls to 0.14 accuracy).
    if first_last:
        raise CompileError("prune_first_last applies to weight pruning: channel pruning never touches a "
                           "graph output's channels, and prunes the first layer's unless excluded")
    if refit is None:
        refit = "lstsq" if feeds is not None else "none"
    if importance is None:
        importance = "activation" if feeds is not None else "l1"
    if refit not in REFITS:
        raise CompileError(f"unknown refit '{refit}' (choose from: {', '.join(REFITS)})")
    return [ChannelPruning(ratio=share, scope=scope, importance=importance, refit=refit,
                           exclude=tuple(exclude), multiple=multiple, feeds=feeds, progress=progress)]


def pruning_summary(model: Model, records) -> str:
    """One line for the report: the sparsity of the prunable weights, and the channels the
    channel pruning removed."""
    parts = []
    tensors = sparsity_report(model)
    zeros = sum(t.zeros for t in tensors)
    if zeros:
        parts.append(f"weights {zeros / sum(t.numel for t in tensors):.1%} zero ({len(tensors)} tensors)")
    for record in records:
        if record.name == ChannelPruning.name:
            parts.append(channels_summary(record.log))
    return "; ".join(parts) or "nothing pruned"


def channels_summary(log) -> str:
    """'channels 3744 -> 3132 in 19 spaces' from the prune-channels change log."""
    before = after = spaces = 0
    for change in log:
        if change.kind == "match" and change.detail.startswith("channels "):
            a, b = change.detail.removeprefix("channels ").split(" -> ")
            before, after, spaces = before + int(a), after + int(b), spaces + 1
    if not spaces:
        return "no channel removed"
    return f"channels {before} -> {after} in {spaces} space{'s' if spaces > 1 else ''}"
