"""Runs a pipeline: each pass, then the IR invariants, with instruments called around it.
Dumping, verifying and timing are instruments, never code inside a pass."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import ir
from ir import Model
from ir.errors import first_line
from rewrites.base import ChangeLog, Pass, PassResult

from .errors import CompileError


class PassError(CompileError):
    """A pass raised or broke an IR invariant: a bug of onnxcc, reported with context."""

    exit_code = 3


@dataclass
class PassRecord:
    """What one pass did: filled by the manager and by instruments (error vs input)."""

    index: int
    name: str
    exact: bool
    changed: bool = False
    log: ChangeLog = field(default_factory=ChangeLog)
    nodes_before: int = 0
    nodes_after: int = 0
    param_bytes_before: int = 0
    param_bytes_after: int = 0
    seconds: float = 0.0
    error: str = ""  # numeric error vs the input, when a verify instrument measured it


class Instrument:
    """Hooks around passes. Subclasses override what they need."""

    def start(self, model: Model) -> None: ...

    def before_pass(self, record: PassRecord, model: Model) -> None: ...

    def after_pass(self, record: PassRecord, model: Model) -> None: ...

    def on_failure(self, record: PassRecord, model: Model, error: BaseException) -> None: ...

    def finish(self, model: Model, records: list[PassRecord]) -> None: ...


class PassManager:
    def __init__(self, passes: list[Pass], instruments: list[Instrument] = ()):
        self.passes = list(passes)
        self.instruments = list(instruments)

    def run(self, model: Model) -> list[PassRecord]:
        for inst in self.instruments:
            inst.start(model)
        records: list[PassRecord] = []
        try:
            for index, p in enumerate(self.passes, start=1):
                self._run_one(index, p, model, records)
        finally:  # the summary is written even when a pass fails: that is when it matters
            for inst in self.instruments:
                inst.finish(model, records)
        return records

    def _run_one(self, index: int, p: Pass, model: Model, records: list[PassRecord]) -> None:
        """Run one pass and append its record (before the after-pass instruments, so a
        verifier that raises still leaves the row in the summary)."""
        record = PassRecord(index, p.name, p.exact)
        last = records[-1] if records else None
        if last is not None and last.error is None:  # nothing runs between two passes
            record.nodes_before, record.param_bytes_before = last.nodes_after, last.param_bytes_after
        else:
            record.nodes_before, record.param_bytes_before = count_nodes(model), param_bytes(model)
        for inst in self.instruments:
            inst.before_pass(record, model)
        start = time.perf_counter()
        try:
            result = p.run(model)
            if not isinstance(result, PassResult):
                raise TypeError(f"run() returned {type(result).__name__}, not PassResult")
            record.changed, record.log = result.changed, result.log
            ir.verify(model)
        except Exception as e:
            record.seconds = time.perf_counter() - start
            record.error = f"FAILED: {type(e).__name__}"
            records.append(record)
            for inst in self.instruments:
                inst.on_failure(record, model, e)
            if isinstance(e, CompileError):
                raise
            before = ", ".join(r.name for r in records[:-1]) or "none"
            raise PassError(f"pass {index} '{p.name}' failed (passes before it: {before}): "
                            f"{type(e).__name__}: {first_line(e)}") from e
        record.seconds = time.perf_counter() - start
        record.nodes_after, record.param_bytes_after = count_nodes(model), param_bytes(model)
        records.append(record)
        for inst in self.instruments:
            inst.after_pass(record, model)


def count_nodes(model: Model) -> int:
    return sum(1 for g in model.graphs() for _ in g.nodes)


def param_bytes(model: Model) -> int:
    """Bytes of constant data: initializers and Constant node values, subgraphs included."""
    total = 0
    for g in model.graphs():
        total += sum(v.tensor.nbytes for v in g.initializers.values())
        for node in g.nodes:
            if node.op_type == "Constant":
                const = node.outputs[0].const if node.outputs and node.outputs[0] is not None else None
                total += const.nbytes if const is not None else 0
    return total

