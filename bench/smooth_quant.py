"""SmoothQuant before W8A8: what it buys on a transformer stack with activation outliers, on
the same stack without them, and on the PP-OCRv4 recognizer (whose SVTR neck has MatMuls
after LayerNorms).

    python -m bench.smooth_quant [--calib 32] [--eval 16] [--rec-test 300] [--runs 20]

Each model is compiled with `quantize="int8"` and the same calibration feeds three times:
plain, `smooth_quant=0.5` and `smooth_quant="auto"`. Every quantized model is compared with
its float model in the same run on the same held-out inputs: the output cosine (all outputs
of all inputs, flattened), the share of positions whose arg-max (token, character) is
unchanged, character accuracy for the recognizer (bench/ocr_data.py test split), and the
one-thread latency ratio to float (models run in turn, median). The smoothing groups found,
and whether the QDQ plan quantizes their readers, are printed per model: smoothing a layer
that stays float would buy nothing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from bench import ocr_data
from bench.quantize import latencies
from bench.transformer import cached_transformer, transformer_feeds

SETTINGS = (("int8", None), ("int8 + smooth 0.5", 0.5), ("int8 + smooth auto", "auto"))


@dataclass
class Task:
    name: str
    model: Path
    calibration: list[dict]
    inputs: list[dict]  # held-out inputs the outputs are compared on
    latency_feed: dict
    accuracy: Callable[[str], float] | None = None


def transformer_task(outliers: bool, n_calib: int, n_eval: int) -> Task:
    kind = "with activation outliers" if outliers else "without outliers"
    inputs = transformer_feeds(n_eval, seed=1)
    return Task(f"transformer (4 layers, d_model 256, seq 64) {kind}", cached_transformer(outliers=outliers),
                transformer_feeds(n_calib, seed=0), inputs, inputs[0])


def rec_task(n_calib: int, n_eval: int, n_test: int) -> Task:
    samples = ocr_data.rec_samples("test", n_test)
    inputs = [ocr_data.rec_feed(img) for img, _ in samples[:n_eval]]
    return Task("PP-OCRv4 recognizer", ocr_data.model_path("rec"), ocr_data.calibration_feeds("rec", n_calib),
                inputs, inputs[len(inputs) // 2], lambda path: ocr_data.evaluate("rec", path, samples))


def outputs(path, inputs: list[dict]) -> list[np.ndarray]:
    sess = ocr_data.session(path)
    return [sess.run(None, feed)[0] for feed in inputs]


def compare(ref: list[np.ndarray], got: list[np.ndarray]) -> tuple[float, float]:
    """(cosine of all outputs flattened, share of positions with the same arg-max)."""
    a = np.concatenate([r.ravel() for r in ref]).astype(np.float64)
    b = np.concatenate([g.ravel() for g in got]).astype(np.float64)
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    same = np.concatenate([(r.argmax(-1) == g.argmax(-1)).ravel() for r, g in zip(ref, got)])
    return cosine, float(same.mean())


def smoothing_summary(path: Path) -> str:
    """The smoothing groups of the optimized float model, and how many of their readers the
    QDQ plan quantizes (weighted Conv/MatMul/Gemm with int8 weights)."""
    import ir
    from compiler.pass_manager import PassManager
    from compiler.pipeline import get_pipeline
    from rewrites.qdq import plan
    from rewrites.smooth_quant import smooth_groups

    model = ir.load(str(path))
    PassManager(get_pipeline("default"), []).run(model)
    groups, refused = smooth_groups(model)
    weighted = set(plan(model).weighted)
    readers = [n.name for g in groups for n in g.consumers]
    quantized = sum(n in weighted for n in readers)
    kinds = sorted({g.producer.op_type for g in groups})
    return (f"{len(groups)} smoothing groups (producers: {', '.join(kinds) or '-'}), {quantized} of their "
            f"{len(readers)} readers quantized by the QDQ plan; {len(refused)} linear-layer inputs refused")


def run_task(task: Task, runs: int) -> list[str]:
    import compiler

    ref = outputs(task.model, task.inputs)
    lines = [f"{task.name}: {len(task.calibration)} calibration feeds, {len(task.inputs)} held-out inputs",
             f"  {smoothing_summary(task.model)}"]
    head = f"  {'setting':20s} {'cosine':>9s} {'argmax same':>11s}"
    head += f" {'char acc':>8s}" if task.accuracy else ""
    lines.append(head + f" {'latency':>8s}  {'compile':>7s}  integer kernels / alphas chosen")
    paths, rows = [task.model], [("float", 1.0, 1.0, task.accuracy(str(task.model)) if task.accuracy else None,
                                   0.0, "")]
    with tempfile.TemporaryDirectory(prefix="onnxcc-bench-smooth-") as tmp:
        for i, (setting, alpha) in enumerate(SETTINGS):
            start = time.perf_counter()
            # Depthwise Convs float, as when the README's figures were measured.
            result = compiler.compile(str(task.model), quantize="int8", calibration=task.calibration,
                                      smooth_quant=alpha, min_cosine=0.0, depthwise="float")
            seconds = time.perf_counter() - start
            path = result.save(Path(tmp) / f"q{i}.onnx")
            cosine, same = compare(ref, outputs(path, task.inputs))
            acc = task.accuracy(str(path)) if task.accuracy else None
            kernels = str(result.report.integer_kernels).split(" run as")[0]
            rows.append((setting, cosine, same, acc, seconds, f"{kernels}{_alphas(result.report)}"))
            paths.append(path)
        ms = latencies(paths, task.latency_feed, runs)
    for (setting, cosine, same, acc, seconds, note), t in zip(rows, ms):
        line = f"  {setting:20s} {cosine:9.6f} {same:11.4f}"
        line += f" {acc:8.4f}" if acc is not None else ""
        lines.append(line + f" {t / ms[0]:7.2f}x  {seconds:6.1f}s  {note}")
    return lines


def _alphas(report) -> str:
    record = next((r for r in report.records if r.name == "smooth-quant"), None)
    if record is None:
        return ""
    chosen = [c.detail.split(":")[0].removeprefix("alpha ") for c in record.log if c.kind == "choose"]
    smoothed = record.log.by_rule().get("smooth-quant", 0)
    return f"; {smoothed} smoothed" + (f", alphas {' '.join(chosen)}" if chosen else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=32, help="calibration feeds per model")
    ap.add_argument("--eval", type=int, default=16, help="held-out inputs the outputs are compared on")
    ap.add_argument("--rec-test", type=int, default=300, help="test lines for the recognizer's char accuracy")
    ap.add_argument("--runs", type=int, default=20, help="latency rounds (at least)")
    args = ap.parse_args(argv)
    tasks = [lambda: transformer_task(True, args.calib, args.eval),
             lambda: transformer_task(False, args.calib, args.eval),
             lambda: rec_task(args.calib, args.eval, args.rec_test)]
    for make in tasks:
        print("\n".join(run_task(make(), args.runs)), flush=True)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
