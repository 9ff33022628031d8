"""Data-free recovery for per-tensor W8A8: cross-layer equalization and bias correction.

    python -m bench.equalize [--tasks cls,det] [--calib N] [--test N]    # about 6 CPU-minutes

Each model is quantized by onnxcc with one weight scale per tensor (`per_channel=False`, where
MobileNet-style depthwise layers suffer most) with and without the recovery passes, on the same
calibration feeds, and scored on the same test set and metric as bench/quantize.py
(bench/ocr_data.py): the direction classifier's accuracy, the detector's line F1. "cosine" is
that of all test outputs, concatenated, with the float model's; "error" the mean absolute
difference of the outputs. Rows:

  per-tensor                       plain rounding, as `--per-tensor-weights`
  + equalization                   `--equalize` (exact: only through Relu-like ops)
  + bias correction analytic       `--bias-correction analytic` (BatchNorm statistics)
  + bias correction empirical      `--bias-correction empirical` (calibration data)
  + high-bias absorption           `--equalize --absorb-high-bias` (BatchNorm statistics)
  + equalization through HardSwish the lossy choice rewrites/equalize.py does not make by
                                   default: scale through ReLU6/HardSwish as if Relu
  per-channel                      the default weights, for reference
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from bench import ocr_data

TASKS = ("cls", "det")
DEFAULT_CALIB = {"cls": 64, "det": 16}
DEFAULT_TEST = {"cls": 4000, "det": 30}
# (label, compile options, tasks); "lossy" builds its pipeline here. The
# detector has only 3 BatchNorms and its HardSwish chains end in affine blocks (Mul, Add), so
# absorption and the lossy equalization find nothing there and are not run on it.
SETTINGS = [
    ("per-tensor", {}, TASKS),
    ("+ equalization", {"equalize": True}, TASKS),
    ("+ bias correction analytic", {"bias_correction": "analytic"}, TASKS),
    ("+ bias correction empirical", {"bias_correction": "empirical"}, TASKS),
    ("+ equalization + bias correction analytic", {"equalize": True, "bias_correction": "analytic"}, ("cls",)),
    ("+ equalization + bias correction empirical", {"equalize": True, "bias_correction": "empirical"}, TASKS),
    ("+ equalization + high-bias absorption", {"equalize": True, "absorb_high_bias": True}, ("cls",)),
    ("+ equalization + absorption + bias corr. empirical",
     {"equalize": True, "absorb_high_bias": True, "bias_correction": "empirical"}, ("cls",)),
    ("+ equalization through HardSwish (lossy)", {"lossy": True}, ("cls",)),
    ("per-channel (reference)", {"per_channel": True}, TASKS),
]


def session(model):
    """One-thread onnxruntime session on a path or serialized model."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts,
                                providers=["CPUExecutionProvider"])


def outputs(task: str, session, samples) -> np.ndarray:
    """Every test output, flattened and concatenated."""
    feed = {"cls": ocr_data.cls_feed, "det": lambda im: ocr_data.det_feed(im)[0]}[task]
    return np.concatenate([session.run(None, feed(img))[0].ravel() for img, _ in samples])


def compile_setting(task: str, calibration: list[dict], options: dict):
    import compiler
    from compiler.pipeline import get_pipeline
    from rewrites.equalize import CrossLayerEqualization

    options = dict(options)
    pipeline = "default"
    if options.pop("lossy", False):
        pipeline = get_pipeline("default") + [CrossLayerEqualization(through_nonlinear=True)]
    per_channel = options.pop("per_channel", False)
    # The benchmark judges accuracy itself: write the model whatever its cosine.
    # Depthwise Convs float, as when the README's figures were measured: the subject here is
    # weight rounding, not the depthwise choice.
    return compiler.compile(str(ocr_data.model_path(task)), pipeline=pipeline, quantize="int8",
                            calibration=calibration, per_channel=per_channel, min_cosine=0.0,
                            depthwise="float", **options)


def run_task(task: str, n_calib: int, n_test: int) -> list[str]:
    samples = getattr(ocr_data, f"{task}_samples")("test", n_test)
    calibration = ocr_data.calibration_feeds(task, n_calib)
    metric_name = {"cls": "accuracy", "det": "line F1"}[task]
    float_session = session(ocr_data.model_path(task))
    base_metric = ocr_data.evaluate(task, float_session, samples)
    reference = outputs(task, float_session, samples)
    lines = [f"{task}: {ocr_data.model_path(task).name}, {metric_name} on {len(samples)} test samples, "
             f"{len(calibration)} calibration feeds",
             f"  {'setting':52s} {metric_name:>9s} {'vs float':>9s} {'cosine':>9s} {'error':>9s} {'compile':>8s}",
             f"  {'float':52s} {base_metric:9.4f}"]
    for label, options, tasks in SETTINGS:
        if task not in tasks:
            continue
        start = time.perf_counter()
        result = compile_setting(task, calibration, options)
        took = time.perf_counter() - start
        sess = session(result.model.SerializeToString())
        metric = ocr_data.evaluate(task, sess, samples)
        out = outputs(task, sess, samples)
        cosine = float(out @ reference / (np.linalg.norm(out) * np.linalg.norm(reference)))
        error = float(np.mean(np.abs(out - reference)))
        lines.append(f"  {label:52s} {metric:9.4f} {100 * (metric - base_metric):+7.2f}pp {cosine:9.6f} "
                     f"{error:9.5f} {took:7.1f}s")
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--calib", type=int, help="calibration feeds (default: cls 64, det 16)")
    ap.add_argument("--test", type=int, help="test samples (default: cls 4000, det 30)")
    args = ap.parse_args(argv)
    for task in args.tasks.split(","):
        if task not in TASKS:
            ap.error(f"unknown task '{task}' (choose from: {', '.join(TASKS)})")
        lines = run_task(task, args.calib or DEFAULT_CALIB[task], args.test or DEFAULT_TEST[task])
        print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
