"""Weight-only low-bit MatMul in the compiler: the options, the opset upgrade the
DequantizeLinear form needs, the input statistics GPTQ and AdaRound round against (gathered
in onnxruntime on the calibration data, from the float model as it stands), and the
report's line."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from calibration.collect import collect_input_stats
from calibration.gram import FeatureLayout, InputStats
from ir import Model
from rewrites.base import Pass, PassResult
from rewrites.weight_only import DQ_OPSET, EMBEDDING_BITS, FORMATS, ROUNDINGS, WeightOnly, targets

from .errors import CompileError
from .quantize import upgrade_opset

MODES = {"int8": 8, "int4": 4, "int2": 2}


@dataclass
class WeightOnlyQuantize(Pass):
    """`rewrite` (a rewrites.weight_only.WeightOnly), after gathering the input statistics
    of every target on `feeds` when its rounding needs them."""

    name = "weight-only"
    exact = False
    rewrite: WeightOnly | None = None
    feeds: Any = None
    progress: Callable[[int, int | None], None] | None = None

    def run(self, model: Model) -> PassResult:
        if self.rewrite.rounding != "rtn":
            found, _ = targets(model, self.rewrite.exclude)
            self.rewrite.stats = self._stats(model, [t.node for t in found])
        return self.rewrite.run(model)

    def _stats(self, model: Model, nodes) -> dict[str, InputStats]:
        """Mean and Gram of each node's input rows (node name -> stats); nodes reading one
        tensor (Q, K and V projections) share its statistics."""
        tensors = {node.inputs[0].name: (node.inputs[0].name, FeatureLayout("rows")) for node in nodes}
        stats = collect_input_stats(model, tensors, self.feeds, progress=self.progress)
        return {node.name: stats[node.inputs[0].name] for node in nodes}


def weight_only_passes(mode: str, block_size: int, rounding: str, fmt: str, embeddings: bool,
                       exclude, feeds, progress=None) -> list[Pass]:
    """The weight-only pass the options ask for (validated here, with one-line errors)."""
    bits = check_mode(mode)
    if fmt not in FORMATS:
        raise CompileError(f"unknown weight format '{fmt}' (choose from: {', '.join(FORMATS)})")
    if rounding not in ROUNDINGS:
        raise CompileError(f"unknown weight rounding '{rounding}' for weight_only "
                           f"(choose from: {', '.join(ROUNDINGS)})")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 \
            or block_size & (block_size - 1):
        raise CompileError(f"block size must be a power of two >= 16 (onnxruntime's MatMulNBits), got {block_size!r}")
    if rounding != "rtn" and feeds is None:
        raise CompileError(f"weight rounding '{rounding}' needs calibration data (--calib DIR): it rounds "
                           "against each MatMul's inputs")
    rewrite = WeightOnly(bits=bits, block_size=block_size, format=fmt, rounding=rounding,
                         embeddings=embeddings, exclude=tuple(exclude))
    return [WeightOnlyQuantize(rewrite=rewrite, feeds=feeds, progress=progress)]


def check_mode(mode: str) -> int:
    if mode not in MODES:
        raise CompileError(f"unknown weight-only mode '{mode}' (choose from: {', '.join(MODES)})")
    return MODES[mode]


def upgrade_for_dq(model: Model, mode: str, embeddings: bool) -> tuple[Model, str | None]:
    """The blocked DequantizeLinear form needs opset 21 (int8, int4) or 25 (int2)."""
    need = max(DQ_OPSET[check_mode(mode)], DQ_OPSET[EMBEDDING_BITS] if embeddings else 0)
    return upgrade_opset(model, need, f"{mode} weights as DequantizeLinear",
                         "or use weight_format 'nbits' (--weight-format nbits)")


def weight_only_summary(stage: WeightOnlyQuantize, records) -> str:
    """'int4 weights (nbits, block 32, gptq): 13 MatMul/Gemm low-bit, 1 embedding Gather
    int4' from the pass's settings and its change log."""
    p = stage.rewrite
    head = f"int{p.bits} weights ({p.format}, block {p.block_size}, {p.rounding})"
    for record in records:
        if record.name != stage.name:
            continue
        counts = record.log.by_rule()
        parts = [f"{counts.get('WeightOnlyMatMul', 0)} MatMul/Gemm low-bit"]
        if counts.get("WeightOnlyGather"):
            parts.append(f"{counts['WeightOnlyGather']} embedding Gather int{EMBEDDING_BITS}")
        skipped = sum(1 for c in record.log if c.kind == "skip")
        if skipped:
            parts.append(f"{skipped} skipped")
        return f"{head}: " + ", ".join(parts)
    return f"{head}: not run"
