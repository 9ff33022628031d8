"""A small seeded transformer encoder stack exported from torch, for the transformer benchmarks
and tests.

Token embedding (Gather) plus learned positions, then `layers` pre-norm encoder layers
(LayerNorm -> Q/K/V projections -> scaled dot-product attention -> output projection ->
residual; LayerNorm -> MLP with GELU -> residual), a final LayerNorm and a linear head to the
vocabulary. The weights are random (seeded), not trained: the benchmarks compare a compiled
model with its float self, so what matters is the shape of the computation and the spread of
the activations, not what it predicts.

``outliers=True`` reproduces what real LLMs show and what SmoothQuant is about: a few hidden
channels of every LayerNorm output are tens of times larger than the rest. The chosen LayerNorm
gamma/beta channels are multiplied by ``OUTLIER_SCALE`` and the matching input rows of the
projections reading that LayerNorm divided by it, so the float model computes exactly what the
model without outliers computes (up to rounding) while its activations are much harder to
quantize per tensor.

Exported with the TorchScript exporter (``dynamo=False``; opset 17, so LayerNorm is one
LayerNormalization node), batch dimension dynamic, input ``ids`` int64 [batch, seq], output
``logits`` float32 [batch, seq, vocab]. Files are cached by their parameters under
``~/.cache/onnxcc-bench/`` (``cached_transformer``); nothing here is committed.

    python -m bench.transformer          # export (or reuse) both variants, print their sizes
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import onnx

VERSION = "transformer-1"  # bump when the architecture or initialisation changes
CACHE_DIR = Path.home() / ".cache" / "onnxcc-bench"
OUTLIER_CHANNELS = 4  # hidden channels made large in every LayerNorm output
OUTLIER_SCALE = 40.0
INPUT_NAME, OUTPUT_NAME = "ids", "logits"
_VERSION_KEY = "onnxcc_bench_version"


def _build(layers: int, d_model: int, heads: int, ffn: int, seq: int, vocab: int,
           outliers: bool, seed: int):
    import torch
    from torch import nn

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
            self.q, self.k, self.v = (nn.Linear(d_model, d_model) for _ in range(3))
            self.o = nn.Linear(d_model, d_model)
            self.fc1, self.fc2 = nn.Linear(d_model, ffn), nn.Linear(ffn, d_model)

        def forward(self, x):
            b, t, _ = x.shape
            h = self.ln1(x)

            def split(p):  # [b, t, d] -> [b, heads, t, d / heads]
                return p(h).reshape(b, t, heads, d_model // heads).transpose(1, 2)

            q, k, v = split(self.q), split(self.k), split(self.v)
            att = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(d_model // heads), dim=-1)
            x = x + self.o((att @ v).transpose(1, 2).reshape(b, t, d_model))
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, d_model)
            self.pos = nn.Parameter(torch.randn(1, seq, d_model) * 0.1)
            self.layers = nn.ModuleList(Layer() for _ in range(layers))
            self.ln = nn.LayerNorm(d_model)
            self.head = nn.Linear(d_model, vocab)

        def forward(self, ids):
            x = self.embed(ids) + self.pos
            for layer in self.layers:
                x = layer(x)
            return self.head(self.ln(x))

    torch.manual_seed(seed)
    model = Encoder().eval()
    with torch.no_grad():
        # Untrained LayerNorms are gamma 1, beta 0; give them a trained-looking spread.
        norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
        for ln in norms:
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.normal_(0.0, 0.1)
        if outliers:
            rng = np.random.default_rng(seed + 1)
            channels = torch.as_tensor(rng.choice(d_model, OUTLIER_CHANNELS, replace=False))
            readers = [(l.ln1, (l.q, l.k, l.v)) for l in model.layers]
            readers += [(l.ln2, (l.fc1,)) for l in model.layers] + [(model.ln, (model.head,))]
            for ln, linears in readers:
                ln.weight[channels] *= OUTLIER_SCALE
                ln.bias[channels] *= OUTLIER_SCALE
                for linear in linears:  # weight [out, in]: undo the scale on the input side
                    linear.weight[:, channels] /= OUTLIER_SCALE
    return model


def export_transformer(path: str | os.PathLike, *, layers: int = 4, d_model: int = 256,
                       heads: int = 4, ffn: int = 1024, seq: int = 64, vocab: int = 1000,
                       outliers: bool = False, seed: int = 0) -> Path:
    """Export the seeded encoder stack to `path` (written through a temporary name) and return
    it. Input ``ids`` int64 [batch, seq], output ``logits`` float32 [batch, seq, vocab]."""
    import torch

    if d_model % heads:
        raise ValueError(f"d_model ({d_model}) must be a multiple of heads ({heads})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = _build(layers, d_model, heads, ffn, seq, vocab, outliers, seed)
    example = torch.zeros(1, seq, dtype=torch.int64)
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(tmp), dynamo=False, opset_version=17,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    proto = onnx.load(str(tmp))
    onnx.helper.set_model_props(proto, {_VERSION_KEY: VERSION})
    onnx.save(proto, str(tmp))
    os.replace(tmp, path)
    return path


def cached_transformer(**params) -> Path:
    """The exported model for these `export_transformer` keyword parameters, from the cache
    (``~/.cache/onnxcc-bench/transformer-<hash>.onnx``), exporting it on first use."""
    key = json.dumps({"version": VERSION, **params}, sort_keys=True)
    path = CACHE_DIR / f"transformer-{hashlib.sha256(key.encode()).hexdigest()[:16]}.onnx"
    if not path.exists():
        export_transformer(path, **params)
    return path


def transformer_feeds(n: int, seed: int, *, seq: int = 64, vocab: int = 1000,
                      batch: int = 1) -> list[dict[str, np.ndarray]]:
    """`n` seeded feeds {"ids": int64 [batch, seq]} of uniform random token ids; different
    seeds give independent feeds (use one seed for calibration, another for evaluation)."""
    if n < 1 or batch < 1:
        raise ValueError(f"n and batch must be positive, got n={n}, batch={batch}")
    rng = np.random.default_rng(seed)
    return [{INPUT_NAME: rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)}
            for _ in range(n)]


def main() -> None:
    for outliers in (False, True):
        path = cached_transformer(outliers=outliers)
        model = onnx.load(str(path))
        ops: dict[str, int] = {}
        for node in model.graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
        print(f"outliers={outliers}: {path} ({path.stat().st_size / 2**20:.1f} MiB) "
              + " ".join(f"{k}:{v}" for k, v in sorted(ops.items())))


if __name__ == "__main__":
    main()
