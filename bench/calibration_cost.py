"""Calibration cost of onnxcc and onnxruntime's quantize_static: wall time and peak memory.

Measured for 16, 64 and 256 calibration samples.

What runs. Both tools quantize the same PP-OCRv4 model (rapidocr-onnxruntime) to W8A8 QDQ
with per-channel int8 weights and uint8 activations, calibrated on the same realistic feeds
(bench/ocr_data.py):

* onnxcc: `compiler.compile(model, quantize="int8", calibration=FOLDER,
  calibration_method=m, calibration_samples=n, verify=False)` then `result.save()`, with
  m in minmax / entropy / percentile. This is the whole compile: the default optimize
  pipeline, calibration, QDQ insertion and the one onnxruntime load that counts integer
  kernels.
* onnxruntime: `quantize_static(..., quant_format=QDQ, per_channel=True,
  activation_type=QUInt8, weight_type=QInt8, calibrate_method=MinMax|Entropy|Percentile)`
  with its other options at their defaults, as a user would call it. Its input is first
  pre-processed as onnxruntime recommends (`quant_pre_process`, without the symbolic shape
  inference that fails on both models), once per model, outside the timed part.

Feeds. The parent renders the feeds once per model and writes them to a scratch folder of
.npz files, so feed generation is never timed and neither tool holds them all: onnxcc reads
the folder lazily (its folder source opens one file per feed), quantize_static gets a
CalibrationDataReader that opens one file per `get_next`. onnxcc holds its first HOLDOUT
feeds out for verification (not run with verify=False) and calibrates on the next n; the
reader gives quantize_static exactly those n. Each worker checks that n feeds were run.
Models: `cls` (the direction classifier, feeds 1x3x48x192) and `rec` (the recognizer, line
crops cut to a fixed width of 320 pixels: its native feeds vary in width, on which
quantize_static's Entropy and Percentile calibrators crash).

Measurement. Every (model, tool, method, n) runs in a fresh child process (`--worker`) that
imports both tools, then times the quantize call alone (onnxcc: compile + save;
quantize_static writes its output itself) and prints one JSON line: the wall seconds of that
call and its peak RSS (VmHWM; not ru_maxrss, which survives exec on Linux, so a child would
report at least its parent's size at spawn). The parent polls the child's VmRSS and kills it above a memory cap or after a timeout,
reporting "killed > CAP" or "timeout"; a crash is reported with its one-line error. A
speed ratio against a killed run is a lower bound: the run had lasted that long already.
Timings are only as quiet as the machine: the load average is printed before and after.

    python -m bench.calibration_cost                       # cls and rec, 16/64/256 samples
    python -m bench.calibration_cost --models cls --samples 16,64
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.isolated import GB, REPO, measure, peak_rss, prepare_for_quantize_static, quantize_static_npz
from compiler.api import HOLDOUT

MODELS = ("cls", "rec")
METHODS = ("minmax", "entropy", "percentile")
ORT_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
TOOLS = ("onnxcc", "quantize_static")
REC_WIDTH = 320  # rapidocr's minimum rec width; every crop is cut (or zero-padded) to it


# ---- feeds ------------------------------------------------------------------------------


def model_feeds(task: str, n: int) -> list[dict[str, np.ndarray]]:
    """n calibration feeds of `task`, all of one shape."""
    from bench.ocr_data import calibration_feeds

    feeds = calibration_feeds(task, n)
    if task == "rec":
        for feed in feeds:
            x = feed["x"][..., :REC_WIDTH]
            feed["x"] = np.pad(x, [(0, 0)] * 3 + [(0, REC_WIDTH - x.shape[-1])])
    return feeds


def write_feeds(task: str, n: int, folder: Path) -> None:
    """The HOLDOUT feeds onnxcc keeps apart, then n to calibrate on, one .npz each. Never
    fewer than 5 * HOLDOUT files: below that onnxcc holds out fewer (a fifth of the data)."""
    folder.mkdir(parents=True)
    for i, feed in enumerate(model_feeds(task, max(n, 4 * HOLDOUT) + HOLDOUT)):
        np.savez(folder / f"{i:05d}.npz", **feed)


# ---- the worker: one quantize call in a fresh process -------------------------------------


def quantize_once(tool: str, method: str, n: int, model: Path, feeds: Path, out: Path) -> dict:
    """Time one quantize call; the result has wall_s and, for onnxcc, its calibrate pass."""
    import compiler

    if tool == "onnxcc":
        done = []
        t0 = time.perf_counter()
        # Depthwise Convs float: calibration is measured here, not the depthwise choice, which
        # measures quantized variants after it (compiler/depthwise.py).
        result = compiler.compile(model, quantize="int8", calibration=feeds, calibration_method=method,
                                  calibration_samples=n, verify=False, depthwise="float",
                                  progress=lambda i, _: done.append(i))
        result.save(out)
        wall = time.perf_counter() - t0
        used = done[-1] if done else 0
        calibrate_s = sum(r.seconds for r in result.report.records if r.name == "calibrate")
        extra = {"calibrate_s": calibrate_s}
    else:
        files = sorted(feeds.glob("*.npz"))[HOLDOUT:HOLDOUT + n]
        t0 = time.perf_counter()
        used = quantize_static_npz(model, out, files, ORT_METHODS[method])
        wall, extra = time.perf_counter() - t0, {}
    if used != n:
        raise RuntimeError(f"{tool} calibrated on {used} feeds, not {n}")
    return {"wall_s": wall, **extra}


def worker(args) -> int:
    try:
        result = quantize_once(args.tool, args.method, args.n, Path(args.model), Path(args.feeds),
                               Path(args.out))
    except Exception as e:  # noqa: BLE001 - any failure of a tool is a result to report
        print(json.dumps({"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"}))
        return 1
    result.update(peak_bytes=peak_rss())
    print(json.dumps(result))
    return 0


# ---- the parent: run a worker under watch -------------------------------------------------


def prepare(task: str, samples: list[int], scratch: Path) -> tuple[Path, Path, Path]:
    """(the model, the model pre-processed for quantize_static, the feeds folder)."""
    from bench.ocr_data import model_path

    model = model_path(task)
    pre = scratch / f"{task}.pre.onnx"
    prepare_for_quantize_static(model, pre)
    feeds = scratch / f"{task}-feeds"
    write_feeds(task, max(samples), feeds)
    return model, pre, feeds


def cell(r: dict, notes: list[str]) -> str:
    if "error" not in r:
        return f"{r['wall_s']:.1f} s / {r['peak_bytes'] / GB:.2f} GB"
    if "killed_after_s" in r:
        return f"{r['error']} ({r['killed_after_s']:.0f} s)"
    if r["error"].startswith("crashed"):
        notes.append(r["error"])
        return f"crash [{len(notes)}]"
    return r["error"]


def print_table(samples: list[int], methods: list[str], results: dict) -> None:
    rows = [("tool / method", *(f"{n} samples" for n in samples))]
    notes: list[str] = []
    for tool in TOOLS:
        for m in methods:
            name = m if tool == "onnxcc" else ORT_METHODS[m]
            rows.append((f"{tool} {name}", *(cell(results[tool, m, n], notes) for n in samples)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    print("\n".join(lines))
    for i, note in enumerate(notes, 1):
        print(f"  [{i}] {note}")


def ratio(a: dict, b: dict, key: str) -> float | None:
    return a[key] / b[key] if "error" not in a and "error" not in b else None


def print_targets(samples: list[int], methods: list[str], results: dict) -> None:
    lo, hi = samples[0], samples[-1]
    print(f"target (a), onnxcc peak({hi}) / peak({lo}), at most 1.10 for 256 / 16:")
    for m in methods:
        r = ratio(results["onnxcc", m, hi], results["onnxcc", m, lo], "peak_bytes")
        verdict = "n/a" if r is None else f"{r:.3f}" + (
            f" ({'met' if r <= 1.10 else 'NOT met'})" if (lo, hi) == (16, 256) else "")
        print(f"  onnxcc {m}: {verdict}")
    if "entropy" not in methods:
        return
    print("target (b), quantize_static Entropy time / onnxcc entropy time, at least 3:")
    for n in samples:
        theirs, ours = results["quantize_static", "entropy", n], results["onnxcc", "entropy", n]
        r = ratio(theirs, ours, "wall_s")
        if r is not None:
            shown = f"{r:.2f} ({'met' if r >= 3 else 'NOT met'})"
        elif "killed_after_s" in theirs and "error" not in ours:
            bound = theirs["killed_after_s"] / ours["wall_s"]
            shown = (f"> {bound:.2f} (quantize_static {theirs['error']} after {theirs['killed_after_s']:.0f} s"
                     f"{', met' if bound >= 3 else ''})")
        else:
            shown = "n/a (not both completed)"
        print(f"  {n} samples: {shown}")
    # Where onnxcc's time goes: its calibrate pass against the whole compile + save.
    parts = [f"{m} {r['calibrate_s']:.1f} of {r['wall_s']:.1f} s" for m in methods
             if "error" not in (r := results["onnxcc", m, hi])]
    print(f"onnxcc calibrate pass at {hi} samples: " + ", ".join(parts))


def _onnxcc_version() -> str:
    text = (REPO / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', text, re.M).group(1)
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    return f"{version} ({commit or 'no git'})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    ap.add_argument("--samples", default="16,64,256", help="comma-separated sample counts")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--cap-gb", type=float, default=12, help="kill a run whose RSS exceeds this (GB)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per run")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("tool", "method", "model", "feeds", "out"):
        ap.add_argument(f"--{name}", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)

    import onnxruntime

    models, methods = args.models.split(","), args.methods.split(",")
    samples = sorted({int(s) for s in args.samples.split(",")})
    if samples[0] < 1:
        ap.error("--samples: counts must be at least 1")
    for name, given, known in (("model", models, MODELS), ("method", methods, METHODS)):
        if not set(given) <= set(known):
            ap.error(f"unknown {name} in {','.join(given)} (choose from {','.join(known)})")
    print(f"onnxruntime {onnxruntime.__version__}, onnxcc {_onnxcc_version()}, "
          f"{os.cpu_count()} cores, memory cap {args.cap_gb:g} GB, timeout {args.timeout:g} s, "
          f"load average {os.getloadavg()[0]:.2f}")
    print("cells: wall time of the quantize call (onnxcc: compile + save) / peak RSS of its process "
          "(VmHWM, imports included)\nquantize_static gets its input through quant_pre_process "
          "(skip_symbolic_shape=True), untimed; feeds pre-rendered to .npz, read one at a time by both")
    scratch = Path(tempfile.mkdtemp(prefix="calibration-cost-"))
    started = time.perf_counter()
    try:
        for task in models:
            model, pre, feeds = prepare(task, samples, scratch)
            shape = "1x3x48x192" if task == "cls" else f"1x3x48x{REC_WIDTH} (line crops cut to width {REC_WIDTH})"
            print(f"\n{task}: {model.name}, feeds {shape}", flush=True)
            results = {}
            for n in samples:
                for tool in TOOLS:
                    for m in methods:
                        cmd = [sys.executable, "-m", "bench.calibration_cost", "--worker", "--tool", tool,
                               "--method", m, "--n", str(n), "--model", str(model if tool == "onnxcc" else pre),
                               "--feeds", str(feeds), "--out", str(scratch / "out.onnx")]
                        results[tool, m, n] = measure(cmd, scratch, args.cap_gb * GB, args.timeout)
                        r = results[tool, m, n]
                        print(f"  {task} {tool} {m} {n}: {r['error'] if 'error' in r else cell(r, [])}",
                              file=sys.stderr, flush=True)
                        for leftover in scratch.glob("out.onnx*"):
                            leftover.unlink()
            print_table(samples, methods, results)
            print_targets(samples, methods, results)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\ntotal bench time {time.perf_counter() - started:.0f} s, load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
