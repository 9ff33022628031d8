"""Digits benchmark model: a small real CNN with a real accuracy metric.

scikit-learn's bundled digits dataset (1797 8x8 grey images of 0-9, no download)
is upsampled to 32x32 so the convolutions are big enough for int8 kernels to
matter, split once into train / calib / test, and a small CNN (Conv+BatchNorm+ReLU
blocks, two MaxPools, GlobalAveragePool, Linear) is trained on it in torch and
exported to ONNX with its BatchNorms left in, for the compiler to fold.

The exported model is cached (`~/.cache/onnxcc-bench/digits_cnn.onnx`), tagged
with VERSION so a stale cache is retrained rather than reused. Calibration feeds
come from the calib split only; accuracy is measured on the test split only.

    python -m bench.digits            # build (or reuse) the model, print accuracy and latency
    python -m bench.digits --force    # retrain even if the cached model is current
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort

if TYPE_CHECKING:
    import torch

# Bump whenever the data, architecture or training changes: a cached model with
# another version is retrained.
VERSION = "digits-cnn-1"
DEFAULT_PATH = Path.home() / ".cache" / "onnxcc-bench" / "digits_cnn.onnx"
SIZE = 32  # input side after upsampling
SEED = 0
CHANNELS = (32, 64, 128, 128)
EPOCHS = 6
BATCH = 64
LR = 3e-3
_VERSION_KEY = "onnxcc_bench_version"
_TRAIN_SECONDS_KEY = "onnxcc_bench_train_seconds"


def _resize_matrix(src: int, dst: int) -> np.ndarray:
    """[dst, src] bilinear interpolation weights with half-pixel centres and edge clamping,
    i.e. torch's interpolate(mode="bilinear", align_corners=False) along one axis."""
    pos = np.maximum((np.arange(dst) + 0.5) * src / dst - 0.5, 0.0)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, src - 1)
    frac = pos - lo
    m = np.zeros((dst, src))
    np.add.at(m, (np.arange(dst), lo), 1 - frac)
    np.add.at(m, (np.arange(dst), hi), frac)
    return m


@functools.lru_cache(maxsize=1)
def _splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train" | "calib" | "test": (x float32 [N, 1, 32, 32] in [0, 1], y int64 [N])}:
    60 / 15 / 25 %, stratified, always the same."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    m = _resize_matrix(digits.images.shape[1], SIZE)
    # Pixels are 0..16; resizing in numpy keeps torch out of the feeds / accuracy path.
    x = (m @ (digits.images / 16.0) @ m.T).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    rest, test = train_test_split(np.arange(len(y)), test_size=0.25, stratify=y, random_state=SEED)
    # 20 % of the remaining 75 % is 15 % of the whole.
    train, calib = train_test_split(rest, test_size=0.2, stratify=y[rest], random_state=SEED)
    splits = {}
    for name, idx in (("train", train), ("calib", calib), ("test", test)):
        xs, ys = x[idx], y[idx]
        # Shared by every caller through the cache: read-only so no caller can alter another's data.
        xs.flags.writeable = ys.flags.writeable = False
        splits[name] = (xs, ys)
    return splits


def test_set() -> tuple[np.ndarray, np.ndarray]:
    """(x float32 [N, 1, 32, 32], y int64 [N]) of the held-out test split (450 images)."""
    return _splits()["test"]


def calibration_feeds(n: int, batch: int = 1) -> list[dict[str, np.ndarray]]:
    """The first `n` images of the calib split as feeds {"x": float32 [batch, 1, 32, 32]};
    the last feed is smaller when `batch` does not divide `n`."""
    x, _ = _splits()["calib"]
    if not 0 < n <= len(x):
        raise ValueError(f"n must be in 1..{len(x)} (the calib split), got {n}")
    if batch < 1:
        raise ValueError(f"batch must be positive, got {batch}")
    return [{"x": x[i:min(i + batch, n)]} for i in range(0, n, batch)]


def _metadata(path: Path) -> dict[str, str]:
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def _train() -> tuple[torch.nn.Module, float]:
    """Train the CNN on the train split; returns (eval-mode model, training seconds)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def block(cin: int, cout: int) -> list[nn.Module]:
        # No conv bias: the BatchNorm right after it has its own shift.
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    c1, c2, c3, c4 = CHANNELS
    x, y = (torch.tensor(a) for a in _splits()["train"])
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    # A fixed thread count fixes the reduction order, so the weights are the same every run.
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(SEED)
        model = nn.Sequential(
            *block(1, c1), *block(c1, c2), nn.MaxPool2d(2),
            *block(c2, c3), nn.MaxPool2d(2),
            *block(c3, c4),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c4, 10),
        )
        steps_per_epoch = -(-len(y) // BATCH)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
        # One-cycle reaches high accuracy in few epochs, which keeps the build short.
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=EPOCHS * steps_per_epoch)
        order = torch.Generator().manual_seed(SEED)
        start = time.perf_counter()
        model.train()
        for _ in range(EPOCHS):
            for idx in torch.randperm(len(y), generator=order).split(BATCH):
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                schedule.step()
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return model.eval(), seconds


def build(path: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Path of the exported float model, training and exporting it first unless a model
    of this VERSION is already there (or `force`)."""
    path = Path(path) if path is not None else DEFAULT_PATH
    if not force and path.exists() and _metadata(path).get(_VERSION_KEY) == VERSION:
        return path
    import torch  # only here: using a cached model needs no torch

    model, seconds = _train()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    example = torch.tensor(calibration_feeds(1)[0]["x"])
    # The exporter folds eval-mode BatchNorm into the Conv weights as part of constant
    # folding; that fold is the compiler's job here, so it is turned off. The legacy
    # (TorchScript) exporter is deliberate: its DeprecationWarning is noise.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (example,), str(tmp), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                          do_constant_folding=False)
    proto = onnx.load(str(tmp))
    onnx.helper.set_model_props(proto, {_VERSION_KEY: VERSION, _TRAIN_SECONDS_KEY: f"{seconds:.2f}"})
    onnx.save(proto, str(tmp))
    # Write then rename, so an interrupted build never leaves a half-written cached model.
    os.replace(tmp, path)
    return path


def _session(model: str | os.PathLike | ort.InferenceSession) -> ort.InferenceSession:
    if isinstance(model, ort.InferenceSession):
        return model
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def accuracy(model: str | os.PathLike | ort.InferenceSession, batch: int = 64) -> float:
    """Top-1 accuracy on the test split, run by onnxruntime (CPU, one thread when given a path)."""
    session = _session(model)
    x, y = test_set()
    predicted = np.concatenate([session.run(["logits"], {"x": x[i:i + batch]})[0].argmax(axis=1)
                                for i in range(0, len(x), batch)])
    return float((predicted == y).mean())


def _latency_ms(session: ort.InferenceSession, x: np.ndarray, runs: int = 50) -> float:
    """Median wall time of one run, after a few warm-up runs."""
    for _ in range(5):
        session.run(None, {"x": x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", type=Path, default=None, help=f"model file (default {DEFAULT_PATH})")
    parser.add_argument("--force", action="store_true", help="retrain even if the cached model is current")
    args = parser.parse_args(argv)

    path = build(args.path, force=args.force)
    session = _session(path)
    x, _ = test_set()
    print(f"model:          {path} ({VERSION})")
    print(f"training time:  {float(_metadata(path)[_TRAIN_SECONDS_KEY]):.1f} s (2 threads, when it was built)")
    print(f"test accuracy:  {accuracy(session):.4f} ({len(x)} images, float, onnxruntime)")
    print(f"latency:        {_latency_ms(session, x[:BATCH]):.2f} ms per batch of {BATCH} (onnxruntime, 1 thread)")


if __name__ == "__main__":
    main()
