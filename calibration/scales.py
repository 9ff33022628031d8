"""Quantization maths: choosing a range from an observer, turning a range into quantization
parameters, and QuantizeLinear/DequantizeLinear in numpy with ONNX's semantics.

Conventions (see docs/DESIGN.md §6):
- Asymmetric: the range is widened to include 0, scale = (hi - lo) / (qmax - qmin),
  zero_point = round_half_even(qmin - lo / scale) computed in float64, then clipped. So
  [-1, 1] in uint8 gives scale 2/255 and zero point 128 (127.5 rounds to even).
- Symmetric: a = max(|lo|, |hi|), scale = a / 127 (a / 32767 for 16 bits), zero point 0 for
  signed types and 128 (32768) for unsigned ones: ±a maps to ±127 steps around the zero point.
- Scales are float32 (what the model stores) and never below MIN_SCALE, so an all-zero tensor
  still gets a usable scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from calibration.observers import HistogramObserver, MinMaxObserver
from ir.errors import CompileError

QRANGES = {"uint8": (0, 255), "int8": (-128, 127), "uint16": (0, 65535), "int16": (-32768, 32767)}
METHODS = ("minmax", "percentile", "entropy", "mse")
MIN_SCALE = 1e-8


def qrange(dtype: str) -> tuple[int, int]:
    if dtype not in QRANGES:
        raise CompileError(f"quantization dtype {dtype!r} is not supported (expected one of {', '.join(QRANGES)})")
    return QRANGES[dtype]


@dataclass(frozen=True, eq=False)
class QuantParams:
    """scale (float32) and zero_point (of `dtype`): 0-d arrays per tensor, or 1-d arrays with one
    entry per channel along `axis`."""

    scale: np.ndarray
    zero_point: np.ndarray
    dtype: str
    axis: int | None = None

    def __post_init__(self):
        qrange(self.dtype)
        scale = np.asarray(self.scale, dtype=np.float32)
        zp = np.asarray(self.zero_point)
        if scale.shape != zp.shape or scale.ndim != (0 if self.axis is None else 1):
            raise CompileError(
                f"quant params: scale {scale.shape} and zero point {zp.shape} do not fit axis {self.axis}")
        if not (np.isfinite(scale).all() and (scale > 0).all()):
            raise CompileError("quant params: scale must be finite and positive")
        lo, hi = qrange(self.dtype)
        if not (np.all(zp == np.round(zp)) and np.all((zp >= lo) & (zp <= hi))):
            raise CompileError(f"quant params: zero point outside the {self.dtype} range [{lo}, {hi}]")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "zero_point", zp.astype(self.dtype))

    def __eq__(self, other) -> bool:
        return (isinstance(other, QuantParams) and (self.dtype, self.axis) == (other.dtype, other.axis)
                and np.array_equal(self.scale, other.scale) and np.array_equal(self.zero_point, other.zero_point))

    def _along(self, a: np.ndarray, shape: tuple) -> np.ndarray:
        """a shaped to broadcast against a tensor of this shape along our axis."""
        if self.axis is None:
            return a
        axis = self.axis + len(shape) if self.axis < 0 else self.axis
        if not 0 <= axis < len(shape) or shape[axis] != a.size:
            raise CompileError(f"quant params: {a.size} channels on axis {self.axis} do not fit shape {tuple(shape)}")
        dims = [1] * len(shape)
        dims[axis] = a.size
        return a.reshape(dims)


def params_from_range(lo, hi, dtype: str = "uint8", symmetric: bool = False, axis: int | None = None,
                      min_scale: float = MIN_SCALE) -> QuantParams:
    """Quantization parameters for the range [lo, hi] (scalars, or arrays per channel with axis)."""
    qmin, qmax = qrange(dtype)
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()) or np.any(lo > hi):
        raise CompileError(f"quant params: invalid range [{lo}, {hi}]")
    if symmetric:
        half = (qmax - qmin) // 2  # 127 or 32767: keeps zero exact and ±a symmetric
        scale = np.maximum(np.maximum(np.abs(lo), np.abs(hi)) / half, min_scale)
        zp = np.full(scale.shape, 0 if qmin < 0 else half + 1)
    else:
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)  # zero must be exact (padding, ReLU)
        scale = np.maximum((hi - lo) / (qmax - qmin), min_scale)
        zp = np.clip(np.rint(qmin - lo / scale), qmin, qmax)
    return QuantParams(scale.astype(np.float32), zp, dtype, axis)


def weight_params(w, axis: int | None = 0, dtype: str = "int8", min_scale: float = MIN_SCALE) -> QuantParams:
    """Symmetric weight parameters, per channel along axis (per tensor with axis None):
    scale = max|w| / 127, zero point 0."""
    w = np.asarray(w, dtype=np.float64)
    if axis is None:
        a = np.max(np.abs(w)) if w.size else 0.0
    else:
        if not -w.ndim <= axis < w.ndim:
            raise CompileError(f"weight params: axis {axis} out of range for shape {w.shape}")
        a = np.max(np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)), axis=1, initial=0.0)
    return params_from_range(-a, a, dtype, symmetric=True, axis=axis, min_scale=min_scale)


def quantize(x, p: QuantParams) -> np.ndarray:
    """ONNX QuantizeLinear: saturate(round_half_even(x / scale) + zero_point), in float32.
    NaN maps to the zero point (ONNX leaves it undefined)."""
    x = np.asarray(x, dtype=np.float32)
    y = np.rint(x / p._along(p.scale, x.shape)).astype(np.float64) + p._along(p.zero_point, x.shape)
    qmin, qmax = qrange(p.dtype)
    y = np.where(np.isnan(y), p._along(p.zero_point, x.shape), y)
    return np.clip(y, qmin, qmax).astype(p.dtype)


def dequantize(q, p: QuantParams) -> np.ndarray:
    """ONNX DequantizeLinear: (q - zero_point) * scale, in float32."""
    q = np.asarray(q)
    zp = p._along(p.zero_point, q.shape).astype(np.float32)
    return (q.astype(np.float32) - zp) * p._along(p.scale, q.shape)


# ---- range selection ----------------------------------------------------------------------


def select_range(obs, method: str = "minmax", *, symmetric: bool = False, dtype: str | None = None,
                 level: float = 99.99, levels: int | None = None):
    """The (lo, hi) range to quantize with, chosen from an observer.

    percentile: symmetric keeps `level`% of |x|; two-sided keeps the central `level`% of x
      (each tail loses (100 - level) / 2 %).
    entropy: TensorRT's KL search on the |x| histogram with `levels` quantization levels
      (default: the steps that cover the larger side in the final quantization, 128 when
      symmetric, 256 for non-negative data, between for asymmetric ranges).
    mse: the threshold minimizing the expected squared error for `dtype` (default uint8, or
      int8 when symmetric).
    A threshold t from entropy/mse becomes (-t, t) when symmetric, else the observed range
    clipped to [-t, t]. Scalars come back as floats; per-channel minmax observers give arrays."""
    lo, hi = _select_range(obs, method, symmetric, dtype, level, levels)
    if np.ndim(lo):
        return np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    return float(lo), float(hi)


def _select_range(obs, method, symmetric, dtype, level, levels):
    if method not in METHODS:
        raise CompileError(f"calibration method {method!r} is unknown (expected one of {', '.join(METHODS)})")
    if not isinstance(obs, (MinMaxObserver, HistogramObserver)):
        raise CompileError(f"calibration: expected an observer, got {type(obs).__name__}")
    if method != "minmax" and not isinstance(obs, HistogramObserver):
        raise CompileError(f"calibration method '{method}' needs a histogram observer")
    if obs.count == 0:  # nothing finite seen: a degenerate range, params_from_range copes
        lo, hi = (np.zeros_like(obs.min), np.zeros_like(obs.max)) if np.ndim(obs.min) else (0.0, 0.0)
        return lo, hi
    if method == "minmax":
        lo, hi = obs.min, obs.max
        if symmetric:
            a = np.maximum(np.abs(lo), np.abs(hi))
            return -a, a
        return lo, hi
    if method == "percentile":
        if not 0 < level <= 100:
            raise CompileError(f"percentile level must be in (0, 100], got {level}")
        if symmetric:
            counts, width = _folded(obs)
            t = _quantile(counts, 0.0, width, level / 100)
            t = min(t, max(abs(obs.min), abs(obs.max)))
            return -t, t
        tail = (1 - level / 100) / 2
        lo = _quantile(obs.counts, obs.lo * obs.width, obs.width, tail)
        hi = _quantile(obs.counts, obs.lo * obs.width, obs.width, 1 - tail)
        return min(max(lo, obs.min), obs.max), min(max(hi, obs.min), obs.max)
    if method == "entropy":
        if levels is not None and (not isinstance(levels, int) or levels < 2):
            raise CompileError(f"entropy levels must be an integer >= 2, got {levels!r}")
        counts, width = _folded(obs)
        t = _entropy_threshold(counts, width, levels or _levels_of_larger_side(obs, symmetric))
    else:
        t = _mse_threshold(obs, dtype or ("int8" if symmetric else "uint8"), symmetric)
    t = min(t, max(abs(obs.min), abs(obs.max)))
    if symmetric:
        return -t, t
    return min(max(obs.min, -t), t), min(max(obs.max, -t), t)  # the observed range clipped to [-t, t]


def _levels_of_larger_side(obs: HistogramObserver, symmetric: bool) -> int:
    """How many of the 256 steps cover [0, max |x|]: 128 for a symmetric range; for an
    asymmetric one the larger side's share (all 256 for non-negative data). Fewer levels than
    the quantizer really has make the KL search clip harder than it should."""
    if symmetric:
        return 128
    lo, hi = min(obs.min, 0.0), max(obs.max, 0.0)
    larger = max(-lo, hi)
    return max(2, int(round(256 * larger / (hi - lo)))) if hi > lo else 256


def _folded(obs: HistogramObserver, max_bins: int | None = None) -> tuple[np.ndarray, float]:
    """The histogram of |x|: bins [k w, (k + 1) w) from 0. The grid has an edge at 0, so folding
    is exact; merging pairs of bins keeps it within max_bins (default: the observer's)."""
    max_bins = max_bins or obs.bins
    nz = np.nonzero(obs.counts)[0]
    idx = nz + obs.lo
    idx = np.where(idx < 0, -idx - 1, idx)  # [-k-1, -k) w folds onto [k, k + 1) w
    width = obs.width
    while idx.max() + 1 > max_bins:
        idx, width = idx >> 1, width * 2
    out = np.zeros(int(idx.max()) + 1, dtype=np.int64)
    np.add.at(out, idx, obs.counts[nz])
    return out, width


def _quantile(counts: np.ndarray, start: float, width: float, q: float) -> float:
    """The q-quantile of a histogram whose first bin starts at `start`, linear within a bin."""
    cum = np.cumsum(counts)
    target = q * cum[-1]
    k = min(int(np.searchsorted(cum, target)), len(counts) - 1)
    before = cum[k - 1] if k else 0
    frac = (target - before) / counts[k] if counts[k] else 0.0
    return start + (k + min(max(frac, 0.0), 1.0)) * width


MAX_CLIPPED = 1e-3  # the share of values the entropy threshold may clip
KL_CANDIDATES = 32


def _entropy_threshold(counts: np.ndarray, width: float, levels: int) -> float:
    """TensorRT's calibration: for each candidate threshold bin i, P is the histogram up to i with
    the clipped mass added to its last bin, Q is the same bins (without the clipped mass) merged
    into `levels` groups and spread back over the non-empty bins; the threshold is the i with the
    smallest KL(P || Q)."""
    n = len(counts)
    if n <= levels:
        return n * width  # already no finer than the quantization: nothing to clip
    counts = counts.astype(np.float64)
    clipped = np.cumsum(counts[::-1])[::-1]  # clipped[i] = mass at or beyond bin i
    # KL compares shapes, not distances: a mode beyond the threshold folds into P's last bin
    # unseen (PP-OCR rec: 1% of a ReLU output sits at 14.5-14.9 and KL alone picks 4.0).
    # Candidates that clip more than MAX_CLIPPED of the values are not considered.
    first = max(levels, int(np.argmax(clipped <= MAX_CLIPPED * clipped[0])))
    # Running sums give each level's mass and non-empty bins, and sum(c log c), without a
    # pass over the bins per candidate: a candidate costs O(levels), all of a round at once.
    sums = _RunningSums(counts, clipped)

    # Coarse to fine, KL_CANDIDATES tries each: the threshold ends within about 0.3% of the
    # range of the best bin.
    step = max(1, (n - first) // KL_CANDIDATES)
    coarse = list(range(first, n, step)) + [n]
    tried = dict(zip(coarse, sums.kl(np.array(coarse), levels).tolist()))
    best = min(tried, key=lambda i: (tried[i], i))
    fine = max(1, 2 * step // KL_CANDIDATES)
    finer = [i for i in range(max(first, best - step + 1), min(n, best + step), fine) if i not in tried]
    tried.update(zip(finer, sums.kl(np.array(finer, dtype=np.int64), levels).tolist()))
    best = min(tried, key=lambda i: (tried[i], i))
    return best * width


class _RunningSums:
    """Prefix sums of a histogram for KL(P || Q) at many candidate thresholds."""

    def __init__(self, counts: np.ndarray, clipped: np.ndarray):
        self.counts, self.n = counts, len(counts)
        self.clipped = np.append(clipped, 0.0)  # clipped[n]: nothing beyond the last bin
        self.mass = np.concatenate([[0.0], np.cumsum(counts)])
        self.filled = np.concatenate([[0], np.cumsum(counts > 0)])
        self.c_log_c = np.concatenate([[0.0], np.cumsum(_x_log_x(counts))])

    def kl(self, ends: np.ndarray, levels: int, eps: float = 1e-4) -> np.ndarray:
        """For each candidate end bin i: P is counts[:i] with the mass clipped at i added to its
        last bin; Q merges the same bins (without the clipped mass) into `levels` groups, the
        remainder joining the last, and spreads each group's mass evenly over its bins where
        P is not empty. Q bins left empty under P's mass get eps counts (the usual smoothing,
        which makes clipping into a gap before the outliers costly). Q and P sum to 1 over
        P's non-empty bins; KL is inf when Q has no mass there at all (everything clipped:
        smoothing would fake a shape)."""
        i = ends[:, None]
        per_level = i // levels
        starts = np.arange(levels)[None, :] * per_level
        stops = np.concatenate([starts[:, 1:], i], axis=1)
        mass = self.mass[stops] - self.mass[starts]  # Q's mass per level
        support = self.filled[stops] - self.filled[starts]
        last = self.counts[ends - 1]
        tail = last + self.clipped[ends]  # P's last bin
        support[:, -1] += (tail > 0) & (last == 0)  # the clipped mass fills an empty last bin
        p_mass = mass.copy()
        p_mass[:, -1] += self.clipped[ends]  # P's mass per level
        q_bin = np.where(mass > 0, mass / np.maximum(support, 1), eps)  # Q on each of P's bins
        q_total = (q_bin * support).sum(axis=1)
        p_total = self.mass[-1]
        p_log_p = self.c_log_c[ends - 1] + _x_log_x(tail)  # sum of p log p over P's bins
        with np.errstate(divide="ignore"):
            p_log_q = (p_mass * np.log(q_bin)).sum(axis=1)
        kl = (p_log_p - p_log_q) / p_total - np.log(p_total) + np.log(q_total)
        kl[((mass > 0) & (p_mass > 0)).sum(axis=1) == 0] = math.inf
        return kl


def _x_log_x(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x * np.log(np.where(x > 0, x, 1.0))


def _mse_threshold(obs: HistogramObserver, dtype: str, symmetric: bool) -> float:
    """The threshold t minimizing the expected squared error over the histogram: values inside
    the range cost scale**2 / 12 (uniform rounding error), clipped values their distance to the
    range. Candidates are the edges of the |x| histogram; the last one keeps everything."""
    folded, fwidth = _folded(obs)
    nz = np.nonzero(obs.counts)[0]
    h = obs.counts[nz].astype(np.float64)
    c = (nz + obs.lo + 0.5) * obs.width  # bin centres
    amax = max(abs(obs.min), abs(obs.max))
    candidates = np.minimum(np.arange(1, len(folded) + 1) * fwidth, amax)
    qmin, qmax = qrange(dtype)
    if symmetric:
        lo, hi = -candidates, candidates
        scale = candidates / ((qmax - qmin) // 2)
    else:  # as params_from_range will: the clipped range, widened to include 0
        lo = np.minimum(np.maximum(obs.min, -candidates), 0.0)
        hi = np.maximum(np.minimum(obs.max, candidates), 0.0)
        scale = (hi - lo) / (qmax - qmin)
    errors = np.empty(len(candidates))
    for start in range(0, len(candidates), 256):  # candidates x bins at a time, bounded memory
        part = slice(start, start + 256)
        clipped = np.clip(c[None, :], lo[part, None], hi[part, None])
        cost = np.where(clipped == c[None, :], scale[part, None] ** 2 / 12, (c[None, :] - clipped) ** 2)
        errors[part] = (h * cost).sum(axis=1)
    best = int(np.argmin(errors))  # the first of equal errors, as the scan in order did
    return float(candidates[best]) if errors[best] < math.inf else float(amax)
