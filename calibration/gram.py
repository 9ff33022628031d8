"""Input statistics of a linear layer for pruning's refit: the mean E[x] and the Gram matrix
E[x x^T] of the feature vectors the layer's weight multiplies (im2col patches for a Conv, the
last axis for Gemm/MatMul). Both are running float64 sums plus a row count, so memory is
O(F^2) whatever the number of samples, and two observers merge by adding their sums (shards
collected apart give the same statistics as one pass, up to float rounding).

Rows holding a NaN or Inf are counted and skipped: one of them would poison the whole Gram."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ir.errors import CompileError

# Rows are cast to float64 and multiplied in chunks of at most this many bytes (and rows),
# so a large activation never turns into one huge float64 patch matrix.
_CHUNK_BYTES = 32 << 20
_CHUNK_ROWS = 65536


@dataclass(frozen=True)
class FeatureLayout:
    """How an input activation becomes rows of features.

    "conv": x is [N, C, *spatial]; each output position gives one row, the zero-padded patch
    in (c, k0, k1, ...) order, i.e. the column order of W.reshape(O, -1) for group 1. A
    grouped conv's rows hold all C channels: group j's features are the slice
    [j*F/g, (j+1)*F/g). Empty strides/pads/dilations mean ONNX's defaults.
    "rows": the last axis holds the features, x.reshape(-1, F)."""

    kind: str
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()  # ONNX order: all begins, then all ends
    dilations: tuple[int, ...] = ()
    group: int = 1

    def __post_init__(self):
        if self.kind == "rows":
            if self.kernel or self.strides or self.pads or self.dilations or self.group != 1:
                raise CompileError("feature layout 'rows' takes no kernel, strides, pads, dilations or group")
            return
        if self.kind != "conv":
            raise CompileError(f"feature layout: unknown kind {self.kind!r} (expected 'conv' or 'rows')")
        k = _ints(self.kernel, "kernel", 1)
        if not k:
            raise CompileError("feature layout 'conv': empty kernel")
        n = len(k)
        fields = {"kernel": k,
                  "strides": _ints(self.strides, "strides", 1) or (1,) * n,
                  "pads": _ints(self.pads, "pads", 0) or (0,) * (2 * n),
                  "dilations": _ints(self.dilations, "dilations", 1) or (1,) * n}
        for name, v in fields.items():
            want = 2 * n if name == "pads" else n
            if len(v) != want:
                raise CompileError(f"feature layout 'conv': {name} {v} has {len(v)} values, "
                                   f"expected {want} for a {n}-D kernel")
            object.__setattr__(self, name, v)
        if not isinstance(self.group, int) or isinstance(self.group, bool) or self.group < 1:
            raise CompileError(f"feature layout 'conv': group must be a positive integer, got {self.group!r}")

    def __str__(self) -> str:
        if self.kind == "rows":
            return "rows"
        return (f"conv(kernel={list(self.kernel)}, strides={list(self.strides)}, pads={list(self.pads)}, "
                f"dilations={list(self.dilations)}, group={self.group})")


def _ints(v, name: str, least: int) -> tuple[int, ...]:
    t = tuple(v)
    if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= least for i in t):
        raise CompileError(f"feature layout 'conv': {name} must be integers >= {least}, got {list(t)}")
    return tuple(int(i) for i in t)


@dataclass
class InputStats:
    """Statistics of a linear layer's input features."""

    count: int  # rows (patches) seen
    mean: np.ndarray  # [F] float64, E[x]
    gram: np.ndarray | None  # [F, F] float64, E[x x^T]; None over MAX_GRAM_FEATURES features
    meansq: np.ndarray | None = None  # [F] float64, E[x^2] (the Gram's diagonal)

    def __post_init__(self):
        if self.meansq is None and self.gram is not None:
            self.meansq = np.diag(self.gram).copy()

    @property
    def features(self) -> int:
        return self.mean.size

    def covariance(self) -> np.ndarray:  # (needs the Gram)
        """E[(x - E x)(x - E x)^T]."""
        return self.gram - np.outer(self.mean, self.mean)


MAX_GRAM_FEATURES = 4096  # a 128 MiB Gram


class FeatureStatsObserver:
    """Streaming mean and Gram of a layer's input features; `name` only labels errors."""

    kind = "feature-stats"

    def __init__(self, layout: FeatureLayout, name: str = "", max_gram_features: int | None = None):
        if not isinstance(layout, FeatureLayout):
            raise CompileError(f"feature stats{_at(name)}: layout must be a FeatureLayout, got {type(layout).__name__}")
        self.layout = layout
        self.name = name
        self.count = 0  # finite rows accumulated
        self.nonfinite = 0  # rows skipped for a NaN/Inf
        self.sum: np.ndarray | None = None  # [F] float64, fixed by the first update
        self.outer: np.ndarray | None = None  # [F, F] float64, sum of x x^T
        self.sumsq: np.ndarray | None = None  # [F] float64, sum of x^2
        # Past this many features only the mean and E[x^2] are kept: the Gram of a Flatten
        # into a Gemm (25088 features in VGG) would take gigabytes.
        self.max_gram_features = MAX_GRAM_FEATURES if max_gram_features is None else max_gram_features

    @property
    def features(self) -> int | None:
        return None if self.sum is None else self.sum.size

    def update(self, x) -> "FeatureStatsObserver":
        """Accumulate the rows of one activation x, as onnxruntime gives it."""
        x = np.asarray(x)
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise CompileError(f"feature stats{_at(self.name)}: expected a numeric tensor, got {x.dtype}")
        for rows in self._chunks(x):
            self._add(rows)
        return self

    def merge(self, other: "FeatureStatsObserver") -> "FeatureStatsObserver":
        if not isinstance(other, FeatureStatsObserver) or other.layout != self.layout:
            raise CompileError(f"feature stats{_at(self.name)}: cannot merge observers of different layouts")
        self.nonfinite += other.nonfinite
        if other.sum is None:
            return self
        self._fix_features(other.sum.size)
        self.sum += other.sum
        self.sumsq += other.sumsq
        if self.outer is not None:
            self.outer += other.outer
        self.count += other.count
        return self

    @property
    def stats(self) -> InputStats:
        if not self.count:
            raise CompileError(f"feature stats{_at(self.name)}: no finite rows observed")
        mean = self.sum / self.count
        if self.outer is None:
            return InputStats(self.count, mean, None, self.sumsq / self.count)
        gram = self.outer / self.count
        gram = (gram + gram.T) * 0.5  # exactly symmetric for the solvers
        return InputStats(self.count, mean, gram)

    def summary(self) -> dict:
        return {"count": self.count, "nonfinite": self.nonfinite, "features": self.features}

    # ---- internals -----------------------------------------------------------------------

    def _fix_features(self, f: int) -> None:
        if self.sum is None:
            self.sum = np.zeros(f, dtype=np.float64)
            self.sumsq = np.zeros(f, dtype=np.float64)
            self.outer = np.zeros((f, f), dtype=np.float64) if f <= self.max_gram_features else None
        elif f != self.sum.size:
            raise CompileError(f"feature stats{_at(self.name)}: {f} features per row for layout "
                               f"{self.layout}, expected {self.sum.size} as before")

    def _add(self, rows: np.ndarray) -> None:
        """rows: [R, F] float64, C-contiguous (a fresh copy we may filter)."""
        ok = np.isfinite(rows).all(axis=1)
        if not ok.all():
            self.nonfinite += int(rows.shape[0] - np.count_nonzero(ok))
            rows = rows[ok]
        if not rows.shape[0]:
            return
        self.count += rows.shape[0]
        self.sum += rows.sum(axis=0)
        self.sumsq += np.einsum("rf,rf->f", rows, rows)
        if self.outer is not None:
            # rows.T @ rows on one buffer: numpy calls BLAS syrk (half the work of a general gemm).
            self.outer += rows.T @ rows

    def _chunks(self, x: np.ndarray):
        """[R, F] float64 copies of x's rows, a bounded number of bytes at a time."""
        if self.layout.kind == "rows":
            if x.ndim < 1 or x.shape[-1] == 0:
                raise CompileError(f"feature stats{_at(self.name)}: layout rows needs a last axis of "
                                   f"features, got shape {list(x.shape)}")
            f = x.shape[-1]
            self._fix_features(f)
            flat = x.reshape(-1, f)
            step = _rows_per_chunk(f)
            for i in range(0, flat.shape[0], step):
                yield np.array(flat[i:i + step], dtype=np.float64)
            return
        patches = self._patches(x)  # [N, *out, C, *kernel], a strided view
        n, nk = x.shape[0], len(self.layout.kernel)
        out = patches.shape[1:1 + nk]
        f = x.shape[1] * math.prod(self.layout.kernel)
        self._fix_features(f)
        # Chunk over the batch, or over the leading output axis when one sample is too big.
        per_sample = math.prod(out)
        if not per_sample or not n:
            return
        step = _rows_per_chunk(f)
        if per_sample <= step:
            k = step // per_sample
            for i in range(0, n, k):
                yield np.array(patches[i:i + k], dtype=np.float64).reshape(-1, f)
            return
        k = max(1, step // (per_sample // out[0]))
        for i in range(n):
            for j in range(0, out[0], k):
                yield np.array(patches[i, j:j + k], dtype=np.float64).reshape(-1, f)

    def _patches(self, x: np.ndarray) -> np.ndarray:
        lay = self.layout
        nk = len(lay.kernel)
        if x.ndim != 2 + nk:
            raise CompileError(f"feature stats{_at(self.name)}: layout {lay} needs a {2 + nk}-D input "
                               f"[N, C, ...], got shape {list(x.shape)}")
        if lay.group > 1 and x.shape[1] % lay.group:
            raise CompileError(f"feature stats{_at(self.name)}: {x.shape[1]} channels do not split into "
                               f"{lay.group} groups")
        begins, ends = lay.pads[:nk], lay.pads[nk:]
        # Zero padding is part of what the conv sees, so padded positions are rows too.
        if any(lay.pads):
            x = np.pad(x, [(0, 0), (0, 0)] + list(zip(begins, ends)))
        extent = tuple(d * (k - 1) + 1 for k, d in zip(lay.kernel, lay.dilations))
        if any(s < e for s, e in zip(x.shape[2:], extent)):
            raise CompileError(f"feature stats{_at(self.name)}: padded input {list(x.shape)} is smaller "
                               f"than the dilated kernel {list(extent)} of layout {lay}")
        spatial = tuple(range(2, 2 + nk))
        v = sliding_window_view(x, extent, axis=spatial)  # [N, C, *positions, *extent]
        v = v[(slice(None), slice(None))
              + tuple(slice(None, None, s) for s in lay.strides)
              + tuple(slice(None, None, d) for d in lay.dilations)]
        # -> [N, *out, C, *kernel]: one row per output position, features in (c, k...) order.
        return v.transpose((0, *spatial, 1, *range(2 + nk, 2 + 2 * nk)))


def _rows_per_chunk(f: int) -> int:
    return max(1, min(_CHUNK_ROWS, _CHUNK_BYTES // (8 * max(f, 1))))


def _at(name: str) -> str:
    return f" of '{name}'" if name else ""
