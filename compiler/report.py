"""The compile report: one row per pass, and the final verification."""

from __future__ import annotations

from dataclasses import dataclass, field

from ir.printer import format_bytes

from .pass_manager import PassRecord
from .fallback import FallbackCurve, fallback_table
from .quantize import IntegerKernels
from .sensitivity import NodeSensitivity, sensitivity_table
from .verify import Verification


@dataclass
class CompileReport:
    pipeline: str
    records: list[PassRecord] = field(default_factory=list)
    verification: Verification | None = None
    nodes_before: int = 0
    nodes_after: int = 0
    param_bytes_before: int = 0
    param_bytes_after: int = 0
    notes: list[str] = field(default_factory=list)  # what the compiler did besides passes
    integer_kernels: IntegerKernels | None = None  # when quantizing
    pruning: str | None = None  # when pruning: what went (sparsity or channels)
    weight_only: str | None = None  # with weight_only: how many MatMuls went low-bit
    file_size_before: tuple[int, int] | None = None  # when pruning: (bytes, zipped bytes) as one file
    file_size_after: tuple[int, int] | None = None
    sensitivity: list[NodeSensitivity] | None = None  # when asked: each quantized node's cost, ranked
    fallback: FallbackCurve | None = None  # with an accuracy budget: each step of the fallback

    def rewrites_by_rule(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for r in self.records:
            for rule, count in r.log.by_rule().items():
                total[rule] = total.get(rule, 0) + count
        return total

    def headline(self) -> str:
        line = (f"pipeline '{self.pipeline}': {self.nodes_before} -> {self.nodes_after} nodes, "
                f"{format_bytes(self.param_bytes_before)} -> {format_bytes(self.param_bytes_after)} parameters")
        for note in self.notes:
            line += f"; {note}"
        if self.pruning is not None:
            line += f"; {self.pruning}"
        if self.weight_only is not None:
            line += f"; {self.weight_only}"
        if self.file_size_before is not None and self.file_size_after is not None:
            (a, az), (b, bz) = self.file_size_before, self.file_size_after
            line += (f"; file {format_bytes(a)} -> {format_bytes(b)}, "
                     f"zipped {format_bytes(az)} -> {format_bytes(bz)}")
        if self.integer_kernels is not None:
            line += f"; {self.integer_kernels}"
        if self.verification is not None:
            v = self.verification
            line += f"; verified on {v.feeds} feed{'' if v.feeds == 1 else 's'}: {v.worst()}"
        return line

    def __str__(self) -> str:
        text = self.headline() + "\n" + summary_table(self.records)
        if self.fallback is not None:
            text += ("\nfloat fallback (nodes kept float, the metric, one-thread latency vs float):\n"
                     + fallback_table(self.fallback))
        if self.sensitivity is not None:
            text += ("\nquantization sensitivity (worst output vs the float model; most harmful alone "
                     "first):\n" + sensitivity_table(self.sensitivity))
        return text


def summary_table(records: list[PassRecord]) -> str:
    header = ("#", "pass", "changed", "rewrites", "nodes", "params", "ms", "error vs input")
    rows = [header]
    for r in records:
        rules = ", ".join(f"{k} {v}" for k, v in sorted(r.log.by_rule().items())) or "-"
        rows.append((f"{r.index:03d}", r.name, "yes" if r.changed else "no", rules,
                     f"{r.nodes_before} -> {r.nodes_after}",
                     f"{format_bytes(r.param_bytes_before)} -> {format_bytes(r.param_bytes_after)}",
                     f"{r.seconds * 1000:.1f}", r.error or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"
