"""AdaRound against round-to-nearest: W8A8 (`compile(quantize="int8", weight_rounding=...)`)
and 4-bit weights alone, on the same models, data and metrics as bench/quantize.py.

    python -m bench.adaround [--tasks digits,cls,rec] [--calib 64] [--w4] [--depthwise] [--per-tensor]

Rows per model: float; W8A8 rtn and adaround (depthwise Convs float, the default); with
--depthwise also W8A8 with integer depthwise Convs (rec loses most there); with --per-tensor
also W8A8 with one weight scale per tensor (larger rounding steps); with --w4 every
Conv/Gemm/MatMul weight snapped to a symmetric per-channel 4-bit grid, activations float
(onnxruntime has no int4 Conv kernel: an accuracy question only). AdaRound's time is the
adaround pass's own (statistics on the quantized prefix plus rounding), from the same run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.quantize import DEFAULT_CALIB, make_task

TASKS = ("digits", "cls", "rec")


def _pass_seconds(result, name: str = "adaround") -> float:
    return sum(r.seconds for r in result.report.records if r.name == name)


def w8a8(task, rounding: str, depthwise: bool, out: Path, per_channel: bool = True):
    import compiler

    result = compiler.compile(str(task.model), quantize="int8", calibration=task.calibration, min_cosine=0.0,
                              weight_rounding=rounding, depthwise="integer" if depthwise else "float",
                              per_channel=per_channel)
    result.save(out)
    return task.evaluate(out), _pass_seconds(result)


def w4(task, rounding: str, out: Path):
    import compiler
    from compiler.adaround import AdaRound
    from compiler.pipeline import get_pipeline
    from rewrites.adaround_weights import AdaRoundWeights

    snap = AdaRound(feeds=task.calibration, weight_bits=4) if rounding == "adaround" \
        else AdaRoundWeights(rounding="rtn", weight_bits=4)
    result = compiler.compile(str(task.model), pipeline=get_pipeline("default") + [snap], verify=False)
    result.save(out)
    return task.evaluate(out), _pass_seconds(result)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--calib", type=int, default=None, help="calibration feeds (default: bench/quantize.py's)")
    ap.add_argument("--w4", action="store_true", help="also 4-bit weights, float activations")
    ap.add_argument("--depthwise", action="store_true", help="also W8A8 with integer depthwise Convs")
    ap.add_argument("--per-tensor", action="store_true", help="also W8A8 with per-tensor weight scales")
    args = ap.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="onnxcc-bench-adaround-"))
    print(f"{'model':7s} {'setting':28s} {'rtn':>8s} {'adaround':>9s} {'gain':>7s} {'adaround s':>10s}")
    for name in args.tasks.split(","):
        task = make_task(name, args.calib or DEFAULT_CALIB[name])
        print(f"{name:7s} {'float (' + task.metric_name + ')':28s} {task.evaluate(task.model):8.4f}", flush=True)
        settings = [("W8A8", lambda r, o: w8a8(task, r, False, o))]
        if args.depthwise:
            settings.append(("W8A8 integer depthwise", lambda r, o: w8a8(task, r, True, o)))
        if args.per_tensor:
            settings.append(("W8A8 per-tensor weights", lambda r, o: w8a8(task, r, False, o, per_channel=False)))
        if args.w4:
            settings.append(("W4 weights, float act.", lambda r, o: w4(task, r, o)))
        for label, run in settings:
            t0 = time.perf_counter()
            rtn, _ = run("rtn", scratch / f"{name}-rtn.onnx")
            ada, seconds = run("adaround", scratch / f"{name}-ada.onnx")
            print(f"{name:7s} {label:28s} {rtn:8.4f} {ada:9.4f} {100 * (ada - rtn):+6.2f}p {seconds:9.1f}s"
                  f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
