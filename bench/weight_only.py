"""Weight-only low-bit MatMul: W8/W4/W2 weights with round-to-nearest, GPTQ and AdaRound,
against the float model, in the same run.

    python -m bench.weight_only [--tasks rec,transformer] [--calib N] [--test N] [--runs R]
                                [--settings NAME,...] [--timing-only] [--kernels]

Tasks:
  rec          PP-OCRv4 recognizer (bench/ocr_data.py): its MatMuls with a constant weight (the
               attention projections, MLPs and the 120 -> 6625 character head); character
               accuracy on rendered text lines; calibration from the "calib" split
  transformer  bench/transformer.py's seeded 4-layer pre-norm encoder exported from torch
               (d_model 256, FFN 1024, vocabulary 1000, 64 tokens); random weights, so the
               measure is agreement with float: output cosine and top-1 agreement of the logits;
               calibration and test token ids from different seeds
Settings are `compiler.compile(weight_only=..., weight_rounding=..., weight_format=...)` with
verify=False (the benchmark judges), timed from the call to the saved file; "onnxcc float" is
the default pipeline alone (what the weight-only rows start from). Columns: the task metric;
cosine, the first output's cosine with float's, averaged over the test inputs; size: the
file, as a ratio to float's; latency: onnxruntime CPU EP, one thread, every model run in
turn on the same input (bench/quantize.py's `latencies`), as a ratio to float. The
latency is noisy while other processes run: --timing-only re-measures it alone.
--kernels times one float MatMul against MatMulNBits at 8, 4 and 2 bits (block 32,
accuracy_level 4) alone, at a few shapes: where the kernel is faster than float and where not.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from bench.quantize import _size, latencies, session

TASKS = ("rec", "transformer")
DEFAULT_CALIB = {"rec": 64, "transformer": 32}
DEFAULT_TEST = {"rec": 300, "transformer": 16}


@dataclass
class Setting:
    name: str
    options: dict = field(default_factory=dict)  # compile's keyword arguments, less the model


def settings(task: str) -> list[Setting]:
    out = [Setting("onnxcc float", {})]
    for bits in ("int4", "int2"):
        for rounding in ("rtn", "gptq", "adaround"):
            out.append(Setting(f"W{bits[3:]} {rounding}", dict(weight_only=bits, weight_rounding=rounding)))
        out.append(Setting(f"W{bits[3:]} gptq dq", dict(weight_only=bits, weight_rounding="gptq",
                                                         weight_format="dq")))
    out.append(Setting("W8 rtn", dict(weight_only="int8")))
    if task == "transformer":
        out.append(Setting("W4 gptq + int4 embeddings", dict(weight_only="int4", weight_rounding="gptq",
                                                             quantize_embeddings=True)))
    return out


@dataclass
class Task:
    name: str
    model: Path
    calibration: list[dict]
    test: list[dict]  # inputs for the cosine
    metric_name: str
    metric: Callable[[Path, list[np.ndarray]], float]  # (model, its outputs on `test`) -> metric


def make_task(name: str, n_calib: int, n_test: int) -> Task:
    if name == "rec":
        from bench import ocr_data

        samples = ocr_data.rec_samples("test", n_test)
        test = [ocr_data.rec_feed(img) for img, _ in samples[:16]]
        return Task(name, ocr_data.model_path("rec"), ocr_data.calibration_feeds("rec", n_calib), test,
                    "char accuracy", lambda path, _: ocr_data.evaluate("rec", path, samples))
    if name == "transformer":
        from bench.transformer import cached_transformer, transformer_feeds

        test = transformer_feeds(n_test, seed=2)
        return Task(name, cached_transformer(), transformer_feeds(n_calib, seed=1), test, "top-1 agree", None)
    raise ValueError(f"unknown task {name!r} (choose from {', '.join(TASKS)})")


@dataclass
class Row:
    setting: str
    path: Path | None = None
    metric: float | None = None
    cosine: float | None = None
    size_bytes: int | None = None
    latency_ms: float | None = None
    seconds: float | None = None
    summary: str | None = None  # the compile report's weight-only line
    error: str | None = None


def compile_setting(task: Task, setting: Setting, out: Path) -> Row:
    row = Row(setting.name)
    start = time.perf_counter()
    try:
        import compiler

        result = compiler.compile(str(task.model), verify=False, min_cosine=0.0,
                                  calibration=task.calibration, **setting.options)
        result.save(out)
        row.summary = result.report.weight_only
    except Exception as e:  # noqa: BLE001 - a setting that fails is a result to report
        row.error = f"error: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:150]}"
        traceback.print_exc()
    row.seconds = time.perf_counter() - start
    if row.error is None:
        row.path, row.size_bytes = out, _size(out)
    return row


def outputs(path: Path, feeds: list[dict]) -> list[np.ndarray]:
    sess = session(path)
    return [sess.run(None, f)[0].astype(np.float64) for f in feeds]


def score(task: Task, rows: list[Row]) -> None:
    """Cosine with float over the test inputs, and the task metric."""
    reference = outputs(rows[0].path, task.test)
    for r in rows:
        if r.error is not None:
            continue
        got = outputs(r.path, task.test)
        r.cosine = float(np.mean([_cosine(a, b) for a, b in zip(got, reference)]))
        if task.metric is not None:
            r.metric = task.metric(r.path, got)
        else:  # top-1 agreement of the logits with float's
            r.metric = float(np.mean([np.mean(a.argmax(-1) == b.argmax(-1)) for a, b in zip(got, reference)]))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def time_rows(task: Task, rows: list[Row], runs: int) -> None:
    done = [r for r in rows if r.error is None]
    for r, ms in zip(done, latencies([r.path for r in done], task.test[0], runs)):
        r.latency_ms = ms


def report(task: Task, rows: list[Row]) -> str:
    base = rows[0]
    lines = [f"{task.name}: {task.model.name}, {len(task.calibration)} calibration feeds, "
             f"{len(task.test)} cosine inputs",
             f"  {'setting':28s} {task.metric_name:>13s} {'cosine':>8s} {'size':>9s} {'ratio':>5s} "
             f"{'latency':>10s} {'ratio':>5s} {'compile':>8s}"]
    for r in rows:
        took = "" if r.seconds is None else f"{r.seconds:.1f} s"
        if r.error is not None:
            lines.append(f"  {r.setting:28s} {r.error}  ({took})")
            continue
        latency = ratio = ""
        if r.latency_ms is not None and base.latency_ms:
            latency, ratio = f"{r.latency_ms:7.2f} ms", f"{r.latency_ms / base.latency_ms:.2f}"
        lines.append(f"  {r.setting:28s} {r.metric:13.4f} {r.cosine:8.5f} {r.size_bytes / 1e6:6.2f} MB "
                     f"{r.size_bytes / base.size_bytes:5.2f} {latency:>10s} {ratio:>5s} {took:>8s}")
    for r in rows:
        if r.summary:
            lines.append(f"    {r.setting}: {r.summary}")
    return "\n".join(lines)


def run_task(task: Task, plan: list[Setting], runs: int, folder: Path) -> list[Row]:
    rows = [Row("float", path=task.model, size_bytes=_size(task.model))]
    for i, setting in enumerate(plan):
        rows.append(compile_setting(task, setting, folder / f"w{i}.onnx"))
        print(f"  {task.name}: {setting.name}: {rows[-1].error or f'{rows[-1].seconds:.1f} s'}",
              file=sys.stderr, flush=True)
    score(task, rows)
    time_rows(task, rows, runs)
    return rows


KERNEL_SHAPES = ((1, 1024, 1024), (1, 4096, 4096), (16, 1024, 1024), (64, 256, 1024), (64, 1024, 256))


def kernel_table(runs: int) -> str:
    """Milliseconds of A [M, K] x B [K, N] as a float MatMul and as MatMulNBits, one thread,
    the models run in turn (`latencies`), and each ratio to float."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from rewrites.block_quant import nbits_weight

    rng = np.random.default_rng(0)
    lines = ["MatMulNBits alone (block 32, accuracy_level 4) vs a float MatMul, one thread:",
             f"  {'M x K x N':>18s} {'float':>9s} " + " ".join(f"{f'{b}-bit':>14s}" for b in (8, 4, 2))]
    with tempfile.TemporaryDirectory(prefix="onnxcc-bench-kernels-") as tmp:
        for m, k, n in KERNEL_SHAPES:
            paths = []
            for bits in (32, 8, 4, 2):
                if bits == 32:
                    inits = [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")]
                    node = helper.make_node("MatMul", ["a", "w"], ["y"])
                else:
                    codes = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), size=(n, k))
                    inits = [numpy_helper.from_array(nbits_weight(codes, bits, 32), "b"),
                             numpy_helper.from_array(np.full((n, k // 32), 0.01, np.float32), "s")]
                    node = helper.make_node("MatMulNBits", ["a", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n,
                                            bits=bits, block_size=32, accuracy_level=4)
                graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
                                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], inits)
                model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                                helper.make_opsetid("com.microsoft", 1)], ir_version=10)
                paths.append(Path(tmp) / f"k{m}_{k}_{n}_{bits}.onnx")
                onnx.save(model, str(paths[-1]))
            ms = latencies(paths, {"a": rng.standard_normal((m, k)).astype(np.float32)}, runs)
            lines.append(f"  {f'{m} x {k} x {n}':>18s} {ms[0]:6.3f} ms " +
                         " ".join(f"{t:6.3f} ms {t / ms[0]:4.2f}" for t in ms[1:]))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--calib", type=int, help="calibration feeds (default: rec 64, transformer 32)")
    ap.add_argument("--test", type=int, help="test samples (default: rec 300, transformer 16)")
    ap.add_argument("--runs", type=int, default=20, help="latency rounds")
    ap.add_argument("--settings", help="only these settings (comma-separated names)")
    ap.add_argument("--timing-only", action="store_true", help="compile, then only measure latency")
    ap.add_argument("--kernels", action="store_true", help="only time MatMulNBits against a float MatMul")
    args = ap.parse_args(argv)
    import onnxruntime

    print(f"onnxruntime {onnxruntime.__version__}, {os.cpu_count()} cores, one inference thread")
    start = time.perf_counter()
    if args.kernels:
        print(kernel_table(args.runs))
        return 0
    for name in args.tasks.split(","):
        task = make_task(name, args.calib or DEFAULT_CALIB[name], args.test or DEFAULT_TEST[name])
        plan = settings(name)
        if args.settings:
            wanted = set(args.settings.split(","))
            plan = [s for s in plan if s.name in wanted]
        with tempfile.TemporaryDirectory(prefix=f"onnxcc-bench-wo-{name}-") as tmp:
            if args.timing_only:
                rows = [Row("float", path=task.model, size_bytes=_size(task.model))]
                rows += [compile_setting(task, s, Path(tmp) / f"w{i}.onnx") for i, s in enumerate(plan)]
                time_rows(task, rows, args.runs)
                for r in rows:
                    if r.latency_ms is not None:
                        print(f"  {name}: {r.setting:28s} {r.latency_ms:7.2f} ms "
                              f"{r.latency_ms / rows[0].latency_ms:5.2f}")
                continue
            rows = run_task(task, plan, args.runs, Path(tmp))
            print(report(task, rows), flush=True)
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
