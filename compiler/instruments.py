"""Instruments around passes: the debug dump and per-pass verification."""

from __future__ import annotations

import difflib
import re
import shutil
import tempfile
import traceback
from pathlib import Path

import ir
from ir import Model

from .errors import CompileError
from .fallback import FallbackCurve, fallback_table
from .feeds import Feed
from .pass_manager import Instrument, PassRecord
from .plots import fallback_plot, plotting_available, sensitivity_plot
from .report import summary_table
from .sensitivity import NodeSensitivity, sensitivity_table
from .verify import EXACT, Tolerance, VerificationError, compare, run, runnable

MARKER = ".onnxcc-dump"
_OURS = re.compile(r"\d{3}_[\w.-]+\.(onnx|onnx\.data|txt|diff|unchanged)|summary\.txt|"
                   r"(sensitivity|fallback)\.(txt|png)|" + re.escape(MARKER))
MAX_LOGGED_CHANGES = 500


class DebugDump(Instrument):
    """Numbered files per pass: NNN_<pass>.onnx (+ .onnx.data for large weights), .txt (the
    printer), .diff (change-log header, then a unified diff), .unchanged when the pass did
    nothing, NNN_<pass>.FAILED.txt when it raised, and summary.txt."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.previous = ""
        self.shared: dict = {}  # where 000_input.onnx.data holds each tensor

    def start(self, model: Model) -> None:
        self._prepare()
        self.previous = ir.print_model(model)
        self._snapshot("000_input", model, self.previous)

    def _prepare(self) -> None:
        folder = self.folder
        if folder.exists() and not folder.is_dir():
            raise CompileError(f"debug dump path '{folder}' exists and is not a folder")
        entries = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
        if entries:
            foreign = [e for e in entries if not (_OURS.fullmatch(e) and (folder / e).is_file())]
            if MARKER not in entries or foreign:
                example = (foreign or entries)[0]
                raise CompileError(f"debug dump folder '{folder}' holds files onnxcc did not write "
                                   f"(e.g. '{example}'); give an empty or new folder")
            for e in entries:
                (folder / e).unlink()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / MARKER).write_text("written by onnxcc --debug-dump; safe to delete\n")
        except OSError as e:  # a file in the path, no permission: the user's environment
            raise CompileError(f"cannot create debug dump folder '{folder}': {e.strerror or e}") from None

    def _snapshot(self, stem: str, model: Model, text: str) -> None:
        # Weights a pass left untouched point into 000_input.onnx.data: written once.
        written = ir.save(model, self.folder / f"{stem}.onnx", external=True, threshold=1 << 20,
                          reuse=self.shared)
        if stem == "000_input":
            self.shared = written
        (self.folder / f"{stem}.txt").write_text(text)

    def after_pass(self, record: PassRecord, model: Model) -> None:
        stem = f"{record.index:03d}_{record.name}"
        if not record.changed:  # what it found still shows (calibrate logs every range)
            notes = change_header(record) if len(record.log) else ""
            (self.folder / f"{stem}.unchanged").write_text(f"pass '{record.name}' changed nothing\n{notes}")
            return
        text = ir.print_model(model)
        self._snapshot(stem, model, text)
        diff = difflib.unified_diff(self.previous.splitlines(keepends=True), text.splitlines(keepends=True),
                                    fromfile="before", tofile=f"after {record.name}")
        (self.folder / f"{stem}.diff").write_text(change_header(record) + "".join(diff))
        self.previous = text

    def on_failure(self, record: PassRecord, model: Model, error: BaseException) -> None:
        stem = f"{record.index:03d}_{record.name}"
        lines = [f"pass {record.index} '{record.name}' FAILED: {type(error).__name__}: {error}", "",
                 "".join(traceback.format_exception(error)), change_header(record)]
        try:
            lines += ["IR at the failure:", ir.print_model(model)]
        except Exception as e:  # noqa: BLE001 - the IR may be broken; say so and keep the rest
            lines.append(f"(the IR could not be printed: {type(e).__name__}: {e})")
        (self.folder / f"{stem}.FAILED.txt").write_text("\n".join(lines))

    def finish(self, model: Model, records: list[PassRecord]) -> None:
        (self.folder / "summary.txt").write_text(summary_table(records))

    def write_analyses(self, sensitivity: list[NodeSensitivity] | None, fallback: FallbackCurve | None) -> list[str]:
        """sensitivity.txt/.png and fallback.txt/.png for the analyses that ran; returns a
        note for the report when the figures cannot be drawn."""
        if sensitivity is None and fallback is None:
            return []
        if sensitivity is not None:
            (self.folder / "sensitivity.txt").write_text(sensitivity_table(sensitivity))
        if fallback is not None:
            (self.folder / "fallback.txt").write_text(fallback_table(fallback))
        if not plotting_available():
            return ["figures not drawn in the debug dump: matplotlib is not installed (pip install 'onnxcc[plots]')"]
        if sensitivity is not None:
            sensitivity_plot(sensitivity, self.folder / "sensitivity.png")
        if fallback is not None:
            fallback_plot(fallback, self.folder / "fallback.png")
        return []


def change_header(record: PassRecord) -> str:
    """Which rule did what to which node, from the change log."""
    by_rule = record.log.by_rule()
    changes = [c for c in record.log if c.kind != "match"]
    lines = [f"# pass {record.index:03d} {record.name}: {len(changes)} changes, "
             f"{sum(by_rule.values())} rewrites"]
    lines += [f"#   {rule}: {count} rewrites" for rule, count in sorted(by_rule.items())]
    for change in changes[:MAX_LOGGED_CHANGES]:
        lines.append(f"#   {change}")
    if len(changes) > MAX_LOGGED_CHANGES:
        lines.append(f"#   ... {len(changes) - MAX_LOGGED_CHANGES} more changes")
    return "\n".join(lines) + "\n"


class VerifyEachPass(Instrument):
    """Compare every intermediate model with the input on the same feeds; the first pass
    that breaks the numbers is named (bisection for free)."""

    def __init__(self, feeds: list[Feed], reference: list[dict], tolerance: Tolerance = EXACT,
                 lossy_tolerance: Tolerance | None = None):
        self.feeds = feeds
        self.reference = reference
        self.tolerance = tolerance
        self.lossy_tolerance = lossy_tolerance or tolerance
        self.lossy_seen = False  # after a lossy pass, exact ones are held to the lossy budget too

    def start(self, model: Model) -> None:
        self.lossy_seen = False

    def after_pass(self, record: PassRecord, model: Model) -> None:
        self.lossy_seen = self.lossy_seen or not record.exact
        if not record.changed:
            record.error = "(unchanged)"
            return
        scratch = Path(tempfile.mkdtemp(prefix="onnxcc-verify-"))
        try:
            outputs = run(runnable(model, scratch), self.feeds, f"model after pass '{record.name}'")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        result = compare(self.reference, outputs, self.lossy_tolerance if self.lossy_seen else self.tolerance)
        record.error = result.worst()
        if not result.ok:
            raise VerificationError(f"pass {record.index} '{record.name}' broke the numbers: {result.worst()}")
