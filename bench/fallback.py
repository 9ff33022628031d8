"""Budgeted float fallback on the PP-OCRv4 recognizer: the fewest nodes kept float for the
character accuracy to stay within the budget of float, and the latency that leaves.

    python -m bench.fallback [--budget 0.003] [--calib 64] [--test 300] [--no-integer-depthwise]

The recognizer is quantized with every depthwise Conv as an integer kernel (--depthwise integer,
which alone loses about 2 points), then `compile(accuracy_budget=..., accuracy_metric=...)`
keeps nodes float one at a time, most harmful first, judging each step by character accuracy
on text lines rendered from real sentences (bench/ocr_data.py's test split: other sentences
and fonts than calibration). Every step prints the node it added, the accuracy and the
one-thread latency against the float model, measured by the compiler in the same run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench import ocr_data
from bench.quantize import make_task


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=0.003, help="largest accuracy drop (0.003 = 0.3 points)")
    ap.add_argument("--calib", type=int, default=64, help="calibration lines")
    ap.add_argument("--test", type=int, default=300, help="test lines the accuracy is measured on")
    ap.add_argument("--no-integer-depthwise", action="store_true", help="plan depthwise Convs float (--depthwise float)")
    args = ap.parse_args(argv)
    import compiler

    task = make_task("rec", args.calib)
    samples = ocr_data.rec_samples("test", args.test)
    scratch = tempfile.mkdtemp(prefix="onnxcc-bench-fallback-")

    def accuracy(model) -> float:
        path = model
        if not isinstance(model, (str, Path)):
            path = os.path.join(scratch, "step.onnx")
            with open(path, "wb") as f:
                f.write(model)
        return ocr_data.evaluate("rec", str(path), samples)

    start = time.perf_counter()
    result = compiler.compile(str(task.model), quantize="int8", calibration=task.calibration,
                              depthwise="float" if args.no_integer_depthwise else "integer", accuracy_budget=args.budget,
                              accuracy_metric=accuracy, min_cosine=0.0)
    seconds = time.perf_counter() - start
    base = accuracy(task.model)
    print(f"rec: {task.model.name}, char accuracy on {args.test} lines, float {base:.4f}, "
          f"budget {100 * args.budget:g} points, {len(task.calibration)} calibration lines")
    print(f"  {'step':>4s}  {'kept float':30s} {'accuracy':>8s} {'vs float':>9s} {'latency':>8s}")
    for i, step in enumerate(result.report.fallback.steps):
        added = step.float_nodes[-1] if step.float_nodes else "(all quantized)"
        print(f"  {i:4d}  {added:30s} {step.metric:8.4f} {100 * (step.metric - base):+8.2f}p "
              f"{step.latency_ratio:7.2f}x")
    last = result.report.fallback.steps[-1]
    print(f"  chosen: {len(last.float_nodes)} node(s) float, {100 * (last.metric - base):+.2f} points, "
          f"{last.latency_ratio:.2f}x float latency; {result.report.integer_kernels}")
    print(f"total {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
