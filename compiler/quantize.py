"""Quantization in the compiler: calibrate on the user's data (onnxruntime runs here, not
in rewrites/), then let the QDQ pass insert what the calibration table says."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import onnx
import onnx.version_converter
from onnx import helper

import ir
from calibration import (METHODS, CalibrationTable, HistogramObserver, MinMaxObserver, entry_from_observer,
                         params_from_range, select_range)
from calibration.collect import collect
from ir import Model
from ir.emit import has_external
from ir.errors import first_line
from rewrites.base import Change, ChangeLog, Pass, PassResult
from rewrites.patterns import default_opset
from rewrites.qdq import InsertQDQ, plan
from rewrites.qdq_targets import ORT_CPU

from .depthwise import depthwise_candidates
from .errors import CompileError
from .verify import Tolerance

DEFAULT_MIN_COSINE = 0.99
PER_CHANNEL_OPSET = 13  # DequantizeLinear's axis attribute


def upgrade_for_per_channel(model: Model) -> tuple[Model, str | None]:
    """Per-channel weights need DequantizeLinear with an axis (opset 13)."""
    return upgrade_opset(model, PER_CHANNEL_OPSET, "per-channel weights",
                         "or quantize weights per tensor: --per-tensor-weights")


def upgrade_opset(model: Model, need: int, what: str, remedy: str) -> tuple[Model, str | None]:
    """`what` needs opset `need`: an older model is converted with onnx's version converter
    (in memory, so only models without external data) and given the IR version that opset
    needs; returns the model and a note for the report. `remedy` ends the errors."""
    have = default_opset(model.opset_imports)
    if have >= need:
        return model, None
    if has_external(model):
        raise CompileError(f"{what} need opset {need}, the model has opset {have} "
                           f"and external data, which the upgrade does not handle yet; {remedy}")
    try:
        proto = onnx.version_converter.convert_version(ir.to_proto(model), need)
        proto.ir_version = max(proto.ir_version, helper.find_min_ir_version_for([helper.make_opsetid("", need)]))
        upgraded = ir.load(proto)
    except Exception as e:  # noqa: BLE001 - the converter raises assorted errors
        raise CompileError(f"{what} need opset {need}; onnx's version converter "
                           f"cannot upgrade this model from opset {have} ({first_line(e)}); {remedy}") from None
    return upgraded, f"opset upgraded from {have} to {need} for {what}"


# What onnxruntime makes of Conv/MatMul/Gemm: integer kernels, and the float forms they may
# keep (its own float fusions rename them).
INTEGER_KERNELS = frozenset({"QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger",
                             "ConvInteger", "DynamicQuantizeMatMul", "MatMulNBits"})
FLOAT_LINEAR = frozenset({"Conv", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm", "ConvTranspose"})


@dataclass(frozen=True)
class IntegerKernels:
    """How many of the compiled model's Conv/MatMul/Gemm (and ConvTranspose) onnxruntime runs
    as integer kernels, read back from the graph it optimized."""

    kernels: dict[str, int]  # integer kernel op -> count
    float_ops: dict[str, int]  # linear ops left float -> count

    @property
    def integer(self) -> int:
        return sum(self.kernels.values())

    @property
    def total(self) -> int:
        return self.integer + sum(self.float_ops.values())

    def __str__(self) -> str:
        detail = ", ".join(f"{op} {n}" for op, n in sorted(self.kernels.items()))
        return (f"{self.integer} of {self.total} Conv/MatMul/Gemm run as integer kernels in onnxruntime"
                + (f" ({detail})" if detail else ""))


def integer_kernels(optimized: Path) -> IntegerKernels:
    """Count the kernels in the graph onnxruntime wrote to `optimized` (verify.session)."""
    graph = onnx.load(str(optimized), load_external_data=False).graph
    ops = Counter(n.op_type for n in graph.node)
    return IntegerKernels({op: n for op, n in ops.items() if op in INTEGER_KERNELS},
                          {op: n for op, n in ops.items() if op in FLOAT_LINEAR})


def quantize_tolerance(min_cosine: float = DEFAULT_MIN_COSINE) -> Tolerance:
    """Quantized outputs are held to a cosine budget, not to elementwise closeness."""
    return Tolerance(rtol=math.inf, atol=math.inf, min_cosine=min_cosine)


@dataclass
class Calibrate(Pass):
    """Find the range of every tensor the QDQ plan needs — from `feeds` through onnxruntime,
    or from a given `table` — and hand the table to the insertion pass that follows. The
    graph does not change; the log lists each tensor's range, scale and zero point, which
    the debug dump shows."""

    name = "calibrate"
    insert: InsertQDQ | None = None
    feeds: Any = None
    method: str = "mse"
    exclude: tuple[str, ...] = ()
    table: CalibrationTable | None = None
    input_shapes: dict | None = None  # tensors are sized at these (recorded in the table)
    progress: Callable[[int, int | None], None] | None = None
    # Also range what quantizing one planned node alone, or all but one, needs (the
    # sensitivity analysis quantizes those variants: excluding a Relu unabsorbs its input).
    node_variants: bool = False
    # Also range what keeping each big depthwise Conv float needs (compiler/depthwise.py).
    depthwise_variants: bool = False
    feeds_used: int = field(default=0, init=False)

    def run(self, model: Model) -> PassResult:
        if self.method not in METHODS:
            raise CompileError(f"unknown calibration method '{self.method}' (choose from: {', '.join(METHODS)})")
        if self.table is None and self.feeds is None:
            raise CompileError("quantization needs calibration data (--calib DIR) or a calibration "
                               "table (--calibration-table FILE)")
        target = self.insert.target if self.insert is not None else ORT_CPU
        wanted = plan(model, target, exclude=self.exclude, input_shapes=self.input_shapes).activations
        if self.node_variants:
            wanted = self._variant_tensors(model, target, wanted)
        if self.depthwise_variants:
            big, small = depthwise_candidates(model, self.insert)
            excludes = [tuple(small) + tuple(big)] + [tuple(small) + (name,) for name in big]
            wanted = self._union(model, target, wanted, excludes)
        if self.table is None:
            observers = {name: MinMaxObserver() if self.method == "minmax" else HistogramObserver()
                         for name in wanted}
            self.feeds_used = collect(model, observers, self.feeds, progress=self.progress)
            if not self.feeds_used:
                raise CompileError("calibration data holds no feeds")
            self.table = CalibrationTable(inputs=self.input_shapes)
            for name, obs in observers.items():
                lo, hi = select_range(obs, self.method)
                self.table[name] = entry_from_observer(obs, self.method, (lo, hi),
                                                       params_from_range(lo, hi, "uint8"))
        missing = [name for name in wanted if name not in self.table]
        if missing:
            raise CompileError(f"calibration table has no entry for tensor '{missing[0]}' "
                               f"({len(missing)} missing); recalibrate with --calib DIR, or compile with the "
                               f"options the table was saved with (--depthwise, --exclude)")
        if self.insert is not None:
            self.insert.table = self.table
        log = ChangeLog()
        for name in wanted:
            entry = self.table[name]
            p = entry.params
            log.record(Change(self.name, "calibrate", f"%{name}",
                              f"{entry.method} range [{entry.range[0]:.6g}, {entry.range[1]:.6g}], "
                              f"scale {float(p.scale):.6g}, zero point {int(p.zero_point)} {p.dtype}"))
        return PassResult(False, log)

    def _variant_tensors(self, model: Model, target, wanted: list[str]) -> list[str]:
        nodes = plan(model, target, exclude=self.exclude, input_shapes=self.input_shapes).nodes
        excludes = [excluded for name in nodes for excluded in ((name,), tuple(n for n in nodes if n != name))]
        return self._union(model, target, wanted, excludes)

    def _union(self, model: Model, target, wanted: list[str], excludes) -> list[str]:
        """`wanted`, then what the plans with each of `excludes` kept float also quantize."""
        out = list(wanted)
        seen = set(out)
        for excluded in excludes:
            variant = plan(model, target, exclude=self.exclude + tuple(excluded), input_shapes=self.input_shapes)
            out += [t for t in variant.activations if t not in seen]
            seen.update(variant.activations)
        return out
