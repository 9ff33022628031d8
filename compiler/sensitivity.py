"""Quantization sensitivity: which quantized nodes cost the accuracy. An instrument, not a
pass: just before the quantize pass runs, it quantizes copies of the model with one node
alone, and with every node but that one, runs each in onnxruntime on the verification feeds
and compares the outputs with the float model's."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import ir
from ir import Model
from rewrites.cleanup import DeadCodeElimination
from rewrites.qdq import InsertQDQ, plan

from .pass_manager import Instrument, PassRecord
from .verify import Tolerance, compare, run, runnable

_ANY = Tolerance(rtol=float("inf"), atol=float("inf"))


@dataclass(frozen=True)
class Error:
    """The worst output of a model against the float one."""

    cosine: float
    sqnr_db: float


@dataclass(frozen=True)
class NodeSensitivity:
    node: str
    op: str
    alone: Error  # only this node quantized
    without: Error | None  # every planned node but this one quantized (None: not measured)


class Sensitivity(Instrument):
    """Measures, before `insert` runs, the output error of quantizing each node it would
    quantize; `results` is ranked, most harmful alone first."""

    def __init__(self, insert: InsertQDQ, feeds: list[dict], reference: list[dict],
                 progress: Callable[[int, int | None, str], None] | None = None):
        self.insert, self.feeds, self.reference, self.progress = insert, feeds, reference, progress
        self.results: list[NodeSensitivity] = []

    def before_pass(self, record: PassRecord, model: Model) -> None:
        if record.name != self.insert.name:
            return
        scratch = Path(tempfile.mkdtemp(prefix="onnxcc-sensitivity-"))
        try:
            self.results = measure_nodes(model, self.insert, self.feeds, self.reference, scratch,
                                         progress=self.progress)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def measure_nodes(model: Model, insert: InsertQDQ, feeds: list[dict], reference: list[dict], scratch: Path, *,
                  without: bool = True, progress=None) -> list[NodeSensitivity]:
    """Each node `insert` would quantize, measured alone (and, with `without`, with all but
    it), ranked most harmful alone first."""
    ops = {n.name: n.op_type for n in model.graph.nodes}
    nodes = plan(model, insert.target, insert.exclude, insert.input_shapes).nodes

    def error(exclude: tuple[str, ...]) -> Error:
        variant = quantized_variant(model, insert, exclude, scratch)
        return worst_error(reference, run(variant, feeds, "a sensitivity model"))

    results = []
    for i, name in enumerate(nodes):
        alone = error(tuple(n for n in nodes if n != name))
        results.append(NodeSensitivity(name, ops.get(name, "?"), alone, error((name,)) if without else None))
        if progress is not None:
            progress(i + 1, len(nodes), "sensitivity")
    return sorted(results, key=lambda r: (r.alone.cosine, r.alone.sqnr_db))


def quantized_variant(model: Model, insert: InsertQDQ, exclude: tuple[str, ...], scratch: Path):
    """A copy of `model` quantized by `insert` with `exclude` kept float too, as onnxruntime
    loads it (bytes, or a file under `scratch`); `model` itself is untouched."""
    copy = ir.load(ir.to_proto(model))
    replace(insert, exclude=tuple(insert.exclude) + tuple(exclude)).run(copy)
    DeadCodeElimination().run(copy)
    return runnable(copy, scratch)


def worst_error(reference: list[dict], outputs: list[dict]) -> Error:
    diffs = compare(reference, outputs, _ANY).outputs
    return Error(min(d.cosine for d in diffs), min(d.sqnr_db for d in diffs))


def sensitivity_table(results: list[NodeSensitivity], most: int | None = None) -> str:
    """The ranked table of the report: worst output cosine and SQNR per node, alone and
    all-but-it."""
    rows = [("node", "op", "cosine alone", "SQNR alone", "cosine without", "SQNR without")]
    for r in results[:most]:
        rows.append((r.node, r.op, f"{r.alone.cosine:.6f}", f"{r.alone.sqnr_db:.1f} dB",
                     f"{r.without.cosine:.6f}", f"{r.without.sqnr_db:.1f} dB"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"
