"""Verification: run two models in onnxruntime on the same feeds and compare every output.

Reference runs use ORT_DISABLE_ALL, so a mismatch points at our rewrite, not at ORT's own
fusions."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ir.errors import first_line

from .errors import CompileError
from .feeds import Feed, describe_feed


class VerificationError(CompileError):
    """The compiled model's outputs differ from the input's beyond the budget."""

    exit_code = 1


@dataclass(frozen=True)
class Tolerance:
    """Budget for one output: |a - b| <= atol + rtol * |b| elementwise, and cosine >= min_cosine."""

    rtol: float = 1e-4
    atol: float = 1e-5
    min_cosine: float = 0.0

    def for_dtype(self, dtype: np.dtype) -> "Tolerance":
        """Half-precision outputs round at about 1e-3 (float16) or 8e-3 (bfloat16) relative:
        a rewrite that computes a constant once in higher precision moves them by an ulp or
        two, so their floor is a few ulps."""
        floor = _HALF_FLOORS.get(np.dtype(dtype).name)
        if floor is None:
            return self
        rtol, atol = floor
        return Tolerance(max(self.rtol, rtol), max(self.atol, atol), self.min_cosine)


_HALF_FLOORS = {"float16": (4e-3, 1e-3), "bfloat16": (3e-2, 1e-2)}

EXACT = Tolerance()


@dataclass
class OutputDiff:
    name: str
    max_abs: float
    max_rel: float
    cosine: float
    sqnr_db: float
    ok: bool
    note: str = ""

    def __str__(self) -> str:
        if self.note:
            return f"'{self.name}' {self.note}"
        return (f"'{self.name}' max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g}, "
                f"cosine {self.cosine:.6f}, SQNR {_db(self.sqnr_db)}")


@dataclass
class Verification:
    feeds: int
    outputs: list[OutputDiff] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    def worst(self) -> str:
        """One line: the failing outputs, or the largest error when all pass."""
        bad = [o for o in self.outputs if not o.ok]
        shown = bad or sorted(self.outputs, key=lambda o: -o.max_abs)[:1]
        return "; ".join(str(o) for o in shown)


def session(model: bytes | str | Path, optimized: Path | None = None):
    """An onnxruntime CPU session with graph optimizations off (the reference setting), or,
    with `optimized`, with onnxruntime's fusions on (QDQ groups become integer kernels, as
    they will when deployed) and the fused graph written to that path, weights beside it."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized is not None:
        # EXTENDED, not ALL: the layout changes of ALL are machine-specific (REFERENCE.md)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(optimized)
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                      optimized.name + ".data")
    opts.log_severity_level = 4  # errors come back as exceptions; ORT need not print them too
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def run(model: bytes | str | Path, feeds: list[Feed], what: str,
        error: type[CompileError] = VerificationError, optimized: Path | None = None) -> list[dict[str, np.ndarray]]:
    """Outputs by name for each feed. onnxruntime failures become one-line errors of type
    `error`: a CompileError (exit 2) when the user's own model or feeds do not run, a
    VerificationError (exit 1) when a model we produced does not. `optimized`: see session."""
    try:
        sess = session(model, optimized)
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        raise error(f"onnxruntime cannot load the {what}: {first_line(e)}") from None
    names = [o.name for o in sess.get_outputs()]
    results = []
    for i, feed in enumerate(feeds):
        try:
            results.append(dict(zip(names, sess.run(None, feed))))
        except Exception as e:  # noqa: BLE001
            raise error(f"onnxruntime cannot run the {what} on feed {i} ({describe_feed(feed)}): "
                                    f"{first_line(e)}; bind symbolic dimensions with --input-shape "
                                    "or give data with --verify-data") from None
    return results


def compare(reference: list[dict[str, np.ndarray]], actual: list[dict[str, np.ndarray]],
            tolerance: Tolerance = EXACT) -> Verification:
    """Compare outputs feed by feed; each output's figures are its worst over all feeds."""
    result = Verification(len(reference))
    for name in reference[0] if reference else []:
        diffs = [_diff(name, ref[name], act.get(name), tolerance) for ref, act in zip(reference, actual)]
        worst = min(diffs, key=lambda d: (d.ok, -d.max_abs, d.cosine))
        result.outputs.append(worst)
    return result


def _diff(name: str, ref, act, tol: Tolerance) -> OutputDiff:
    if act is None:
        return OutputDiff(name, math.inf, math.inf, 0.0, -math.inf, False, "is missing from the output")
    if isinstance(ref, list) or isinstance(act, list):  # sequence outputs
        same = len(ref) == len(act) and all(_diff(name, r, a, tol).ok for r, a in zip(ref, act))
        return OutputDiff(name, 0.0 if same else math.inf, 0.0, 1.0, math.inf, same,
                          "" if same else "sequence differs")
    ref, act = np.asarray(ref), np.asarray(act)
    if ref.dtype != act.dtype:
        return OutputDiff(name, math.inf, math.inf, 0.0, -math.inf, False,
                          f"has type {act.dtype}, expected {ref.dtype}")
    if ref.dtype.kind == "c":  # compare real and imaginary parts as pairs of floats
        ref, act = _as_pairs(ref), _as_pairs(act)
    if ref.shape != act.shape:
        return OutputDiff(name, math.inf, math.inf, 0.0, -math.inf, False,
                          f"has shape {list(act.shape)}, expected {list(ref.shape)}")
    if ref.dtype.kind not in "fc":  # integers, booleans, strings: exact
        same = np.array_equal(ref, act)
        return OutputDiff(name, 0.0 if same else math.inf, 0.0, 1.0, math.inf, same,
                          "" if same else "differs (exact values expected)")
    tol = tol.for_dtype(ref.dtype)
    r, a = ref.astype(np.float64), act.astype(np.float64)
    fin_r, fin_a = np.isfinite(r), np.isfinite(a)
    special_ok = np.array_equal(fin_r, fin_a) and np.array_equal(r[~fin_r], a[~fin_a], equal_nan=True)
    finite = fin_r & fin_a
    err = np.abs(r[finite] - a[finite])
    max_abs = float(err.max()) if err.size else 0.0
    max_rel = float((err / np.maximum(np.abs(r[finite]), 1e-12)).max()) if err.size else 0.0
    cosine = _cosine(r[finite], a[finite])
    sqnr = _sqnr(r[finite], a[finite])
    unbounded = math.isinf(tol.atol) or math.isinf(tol.rtol)  # a cosine-only budget (lossy passes)
    within = unbounded or bool(np.all(err <= tol.atol + tol.rtol * np.abs(r[finite])))
    ok = special_ok and within and cosine >= tol.min_cosine
    note = "" if special_ok else "NaN/Inf positions differ"
    return OutputDiff(name, max_abs, max_rel, cosine, sqnr, ok, note)


def _as_pairs(x: np.ndarray) -> np.ndarray:
    return np.stack([x.real, x.imag], axis=-1)


def _cosine(r: np.ndarray, a: np.ndarray) -> float:
    nr, na = np.linalg.norm(r), np.linalg.norm(a)
    if nr == 0 and na == 0:
        return 1.0
    if nr == 0 or na == 0:
        return 0.0
    return float(np.dot(r.ravel(), a.ravel()) / (nr * na))


def _sqnr(r: np.ndarray, a: np.ndarray) -> float:
    noise = float(np.sum((r - a) ** 2))
    signal = float(np.sum(r ** 2))
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def _db(x: float) -> str:
    return "inf dB" if x == math.inf else f"{x:.1f} dB"



def runnable(model, scratch: Path) -> bytes | Path:
    """What onnxruntime should load for an IR model: bytes when it fits in one protobuf
    without external data, else a file saved (with its external data) under `scratch`."""
    import ir
    from ir.emit import PROTOBUF_LIMIT, has_external, tensor_bytes

    if not has_external(model) and tensor_bytes(model) < PROTOBUF_LIMIT // 2:
        return ir.to_proto(model).SerializeToString()
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / "model.onnx"
    ir.save(model, path, external=True, threshold=1 << 20)
    return path
