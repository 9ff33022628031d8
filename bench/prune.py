"""Pruning: onnxcc's channel and unstructured pruning against the float model, same run.

    python -m bench.prune [--tasks rec,det,cls,digits] [--calib N] [--runs R] [--ratios 0.1,0.2,0.3]
                          [--sparsities 0.5,0.7,0.9] [--test N]

Models, metrics and data are bench/quantize.py's (bench/ocr_data.py, bench/digits.py):
  rec     PP-OCRv4 recognizer: character accuracy on text lines rendered from real sentences
  det     PP-OCRv4 detector: text-line F1 (IoU 0.5) on rendered pages
  cls     PP-OCR direction classifier: accuracy on upright / upside-down lines
  digits  a small CNN trained on scikit-learn's digits: test accuracy
Calibration (statistics for the refit and the activation importance, and int8 calibration) uses
other sentences and other fonts than the test (the "calib" split).

Settings, each one call of `compiler.compile` in this process with verify=False (the metric
here is the judge, not the compiler's cosine budget), timed from the call to the saved file;
every channel setting gets the calibration feeds, as a user would give them:
  onnxcc, no pruning               the default pipeline alone: what compiling gives without pruning
  channel R%                       prune_mode="channel" at each --ratios R with the defaults: the
                                   importance is the error the refit cannot recover, the refit is
                                   least squares on the calibration statistics, kept counts are
                                   multiples of 16
  channel R%, no refit             refit="none" (plain slicing)
  channel 20%, bias refit          refit="bias" (the removed channels' mean put in the bias)
  channel 20%, l1 importance       channels ranked by their weights' L1 norm
  channel 20%, multiples of 8      prune_multiple=8
  channel 20% + int8               pruned, refit, then calibrated and quantized (quantize="int8")
  unstructured S% layer | global   prune_mode="unstructured" at each --sparsities S, one share per
                                   layer or one global threshold on LAMP scores, stored as sparse
                                   initializers where that is smaller (sparse_storage=True)
Metric as the difference to float in points (pp); cosine: the first output's cosine with
float's on the latency input (breaks ties of a metric at its ceiling). Latency: onnxruntime CPU EP, one thread, the
float model and every channel setting run in turn on the same input (bench/quantize.py's
`latencies`), as a ratio to float; unstructured zeros give no speed in onnxruntime (sparse
initializers are made dense at load), so those rows have none. Size: the file, and the file
deflated (zlib level 6), each as a ratio to float's. The targets of issue 6 close the output.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench import quantize as qbench
from bench.quantize import DEFAULT_CALIB, TASKS, Row, Task, _size, latencies, make_task

RATIOS = (0.1, 0.2, 0.3)
SPARSITIES = (0.5, 0.7, 0.9)
TARGET_RATIO = 0.2  # the acceptance's share of channels removed, and where the extra settings run
TARGET_POINTS = 1.0  # the pruned metric stays within this many points of float
TARGET_LATENCY = 0.75  # ... at this latency ratio or less


@dataclass
class Setting:
    name: str
    kind: str  # "reference", "channel" or "unstructured"
    options: dict = field(default_factory=dict)  # compile's keyword arguments, less the model
    calibrated: bool = False  # give it the calibration feeds


@dataclass
class PruneRow(Row):
    kind: str = "reference"
    options: dict = field(default_factory=dict)
    zipped_bytes: int | None = None
    pruned: str | None = None  # the compile report's pruning summary
    cosine: float | None = None  # of the first output with float's, on the latency input
    trace: str | None = None  # the traceback of a failed compile


def settings(ratios, sparsities) -> list[Setting]:
    out = [Setting("onnxcc, no pruning", "reference")]
    for r in sorted(set(ratios) | {TARGET_RATIO}):
        out.append(_channel(f"channel {_pct(r)}", r))  # the defaults: activation importance, lstsq refit
        out.append(_channel(f"channel {_pct(r)}, no refit", r, refit="none"))
        if r == TARGET_RATIO:
            out.append(_channel(f"channel {_pct(r)}, bias refit", r, refit="bias"))
            out.append(_channel(f"channel {_pct(r)}, l1 importance", r, prune_importance="l1"))
            out.append(_channel(f"channel {_pct(r)}, multiples of 8", r, prune_multiple=8))
            # Depthwise Convs float, as when the README's figures were measured.
            out.append(_channel(f"channel {_pct(r)} + int8", r, quantize="int8", depthwise="float"))
    for s in sparsities:
        for scope in ("layer", "global"):
            out.append(Setting(f"unstructured {_pct(s)} {scope}", "unstructured",
                               dict(prune=s, prune_mode="unstructured", prune_scope=scope, sparse_storage=True)))
    return out


def _channel(name: str, ratio: float, **options) -> Setting:
    # Every channel setting gets the calibration feeds, as a user would give them.
    return Setting(name, "channel", dict(prune=ratio, prune_mode="channel", **options), calibrated=True)


def _pct(share: float) -> str:
    return f"{100 * share:g}%"


def _zipped(path: Path) -> int:
    data = path.read_bytes()
    extra = path.with_name(path.name + ".data")
    if extra.exists():
        data += extra.read_bytes()
    return len(zlib.compress(data, 6))


def _first_line(e: BaseException) -> str:
    """The root cause's type and first line, after the failing pass's name when a pass failed."""
    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    where = re.search(r"pass \d+ '([^']+)' failed", str(e)) if root is not e else None
    line = (str(root).strip().splitlines() or [""])[0][:150]
    return (f"{where.group(1)}: " if where else "") + f"{type(root).__name__}: {line}"


def compile_setting(task: Task, setting: Setting, out: Path) -> PruneRow:
    row = PruneRow(setting.name, kind=setting.kind, options=setting.options)
    start = time.perf_counter()
    try:
        import compiler  # here: a pruning module that does not import yet fails its settings only

        result = compiler.compile(str(task.model), verify=False, min_cosine=0.0,
                                  calibration=task.calibration if setting.calibrated else None,
                                  **setting.options)
        result.save(out)
    except Exception as e:  # noqa: BLE001 - a setting that fails is a result to report
        row.error, row.trace = f"error: {_first_line(e)}", traceback.format_exc()
    row.seconds = time.perf_counter() - start
    if row.error is None:
        row.path, row.size_bytes, row.zipped_bytes = out, _size(out), _zipped(out)
        row.pruned = getattr(result.report, "pruning", None)
    return row


def run_task(task: Task, plan: list[Setting], runs: int) -> list[PruneRow]:
    with tempfile.TemporaryDirectory(prefix=f"onnxcc-bench-prune-{task.name}-") as tmp:
        rows = [PruneRow("float", path=task.model, size_bytes=_size(task.model), zipped_bytes=_zipped(task.model))]
        for i, setting in enumerate(plan):
            row = compile_setting(task, setting, Path(tmp) / f"p{i}.onnx")
            rows.append(row)
            print(f"  {task.name}: {setting.name}: " + (row.error or f"{row.seconds:.1f} s"),
                  file=sys.stderr, flush=True)
        for r in rows:
            if r.error is None:
                try:
                    r.metric = task.evaluate(r.path)
                except Exception as e:  # noqa: BLE001 - a model that does not run is a result
                    r.error, r.trace = f"does not run: {_first_line(e)}", traceback.format_exc()
        _cosines(rows, task.latency_feed)
        timed = [r for r in rows if r.error is None and r.kind != "unstructured"]
        for r, ms in zip(timed, latencies([r.path for r in timed], task.latency_feed, runs)):
            r.latency_ms = ms
    return rows


def _cosines(rows: list[PruneRow], feed: dict) -> None:
    """Each model's first output against float's on one input: a finer measure than a task
    metric at its ceiling (the detector's F1 is 1.000 for most settings)."""
    reference = None
    for r in rows:
        if r.error is None:
            out = qbench.session(r.path).run(None, feed)[0].astype(np.float64).ravel()
            reference = out if reference is None else reference
            r.cosine = float(out @ reference / (np.linalg.norm(out) * np.linalg.norm(reference) + 1e-30))


def report(task: Task, rows: list[PruneRow]) -> str:
    base = rows[0]
    lines = [f"{task.name}: {task.model.name}, {task.metric_name}, {len(task.calibration)} calibration feeds",
             f"  {'setting':36s} {task.metric_name:>13s} {'vs float':>9s} {'cosine':>8s} {'latency':>10s} {'ratio':>5s} "
             f"{'size':>9s} {'ratio':>5s} {'zipped':>9s} {'ratio':>5s} {'compile':>8s}"]
    for r in rows:
        took = "" if r.seconds is None else f"{r.seconds:.1f} s"
        if r.error is not None:
            lines.append(f"  {r.setting:36s} {r.error}  ({took})")
            continue
        delta = "" if r is base else f"{100 * (r.metric - base.metric):+.2f} pp"
        latency = ratio = ""
        if r.latency_ms is not None:
            latency, ratio = f"{r.latency_ms:7.2f} ms", f"{r.latency_ms / base.latency_ms:.2f}"
        cosine = "" if r.cosine is None else f"{r.cosine:.5f}"
        lines.append(f"  {r.setting:36s} {r.metric:13.4f} {delta:>9s} {cosine:>8s} {latency:>10s} {ratio:>5s} "
                     f"{r.size_bytes / 1e6:6.2f} MB {r.size_bytes / base.size_bytes:5.2f} "
                     f"{r.zipped_bytes / 1e6:6.2f} MB {r.zipped_bytes / base.zipped_bytes:5.2f} {took:>8s}")
    pruned: dict[str, list[str]] = {}  # the compiler's pruning summary -> the settings it fits
    for r in rows:
        if r.pruned and r.error is None:
            pruned.setdefault(r.pruned, []).append(r.setting)
    for summary, names in pruned.items():
        more = f" (+{len(names) - 1} more)" if len(names) > 1 else ""
        lines.append(f"    {names[0]}{more}: {summary}")
    return "\n".join(lines)


def _find(rows: list[PruneRow], **options) -> PruneRow | None:
    """The channel row compiled with exactly these options."""
    return next((r for r in rows if r.kind == "channel" and r.options == options), None)


def targets(name: str, rows: list[PruneRow]) -> list[str]:
    """The acceptance lines of one model: "met" / "not met" with the numbers behind them."""
    base = rows[0]
    at = dict(prune=TARGET_RATIO, prune_mode="channel")
    refit, plain = _find(rows, **at), _find(rows, **at, refit="none")
    pct = _pct(TARGET_RATIO)
    out = []
    if refit is None or refit.error is not None:
        why = "failed" if refit else "not run"
        out.append(f"  {name}: {pct} channels, lstsq: metric not measured ({why}): not met")
        out.append(f"  {name}: {pct} channels, lstsq: latency not measured ({why}): not met")
    else:
        loss = 100 * (base.metric - refit.metric)
        ok = loss <= TARGET_POINTS
        out.append(f"  {name}: {pct} channels, lstsq: metric {refit.metric:.4f} vs float {base.metric:.4f}, "
                   f"loses {loss:.2f} pp (<= {TARGET_POINTS:g}): {'met' if ok else 'not met'}")
        ratio = refit.latency_ms / base.latency_ms
        # Compiling alone (BatchNorm folding, fusions) already gives some speed: say how much is pruning's.
        plain_compile = rows[1] if rows[1].kind == "reference" and rows[1].latency_ms else None
        own = f", {refit.latency_ms / plain_compile.latency_ms:.2f}x onnxcc without pruning" if plain_compile else ""
        out.append(f"  {name}: {pct} channels, lstsq: latency {ratio:.2f}x float{own} (<= {TARGET_LATENCY:g}x "
                   f"float): {'met' if ratio <= TARGET_LATENCY else 'not met'}")
    if refit is None or plain is None or refit.error is not None or plain.error is not None:
        out.append(f"  {name}: refit beats no refit at {pct}: not measured: not met")
    else:
        # A tie of the task metric (at its ceiling) is broken by the output's cosine with float's.
        beats = (refit.metric, refit.cosine) > (plain.metric, plain.cosine)
        tie = (f" (tied; output cosine {refit.cosine:.5f} vs {plain.cosine:.5f})"
               if refit.metric == plain.metric else "")
        out.append(f"  {name}: refit beats no refit at {pct}: lstsq {refit.metric:.4f} vs none {plain.metric:.4f}"
                   f"{tie}: {'met' if beats else 'not met'}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--calib", type=int, help="calibration feeds (default: 64, det 16)")
    ap.add_argument("--runs", type=int, default=20, help="latency rounds")
    ap.add_argument("--ratios", default=",".join(f"{r:g}" for r in RATIOS),
                    help=f"shares of channels removed (the extra settings run at {TARGET_RATIO:g})")
    ap.add_argument("--sparsities", default=",".join(f"{s:g}" for s in SPARSITIES),
                    help="unstructured sparsities ('' for none)")
    ap.add_argument("--test", type=int, help="test samples per OCR task (default: bench/quantize.py's TEST_SIZE)")
    args = ap.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",") if r]
    sparsities = [float(s) for s in args.sparsities.split(",") if s]
    plan = settings(ratios, sparsities)
    if args.test:
        qbench.TEST_SIZE = {k: args.test for k in qbench.TEST_SIZE}  # make_task reads it
    import onnxruntime

    print(f"onnxruntime {onnxruntime.__version__}, {os.cpu_count()} cores, one inference thread")
    start = time.perf_counter()
    results: dict[str, list[PruneRow]] = {}
    for name in args.tasks.split(","):
        task = make_task(name, args.calib or DEFAULT_CALIB[name])
        results[name] = run_task(task, plan, args.runs)
        print(report(task, results[name]), flush=True)
    print(f"targets (issue 6), channels at {_pct(TARGET_RATIO)}, default options (refit lstsq):")
    lines = [line for name, rows in results.items() for line in targets(name, rows)]
    print("\n".join(lines))
    print(f"  all: {'met' if all(line.endswith(': met') for line in lines) else 'not met'}")
    failed: dict[str, list[str]] = {}  # traceback -> the settings that raised it
    for name, rows in results.items():
        for r in rows:
            if r.trace:
                failed.setdefault(r.trace.rstrip(), []).append(f"{name}: {r.setting}")
    if failed:
        print(f"errors ({sum(map(len, failed.values()))} settings, {len(failed)} distinct), tracebacks:")
        for trace, where in failed.items():
            print(f"--- {'; '.join(where)}\n{trace}")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
