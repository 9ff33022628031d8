"""Streaming observers: updated in place batch by batch, memory independent of the number of
samples, mergeable so shards can be collected in parallel. NaN and Inf are counted, never
observed (one stray Inf would otherwise make every range useless).

The histogram lives on a universal grid: bin width 2**e for an integer e, bin edges at integer
multiples of the width. Any two such grids nest, so widening the range (or merging another
histogram) adds whole bins together and never smears counts. The width is always the smallest
power of two that covers the exact [min, max] seen so far with `bins` bins (never below a floor
that depends only on the magnitude of the data), so the result depends only on the data, not
on how it was split into batches or shards: streaming, one-shot and merged histograms are
identical, and merge is exactly associative and commutative.
"""

from __future__ import annotations

import math

import numpy as np

from ir.errors import CompileError

DEFAULT_BINS = 2048
# The finest width allowed, relative to the largest magnitude seen: keeps bin indices far from
# int64/float64 limits when the data is (nearly) constant.
_MIN_WIDTH_BITS = 40
_MIN_EXPONENT = -1074 + _MIN_WIDTH_BITS  # floor when everything seen is exactly 0


def _finite(x) -> tuple[np.ndarray, int]:
    """x as a flat float64 array of its finite values, and how many values were dropped."""
    a = np.asarray(x, dtype=np.float64).ravel()
    ok = np.isfinite(a)
    if ok.all():
        return a, 0
    return a[ok], int(a.size - np.count_nonzero(ok))


def _num(v):
    """A float for JSON: None for the +/-inf of an empty observer."""
    return float(v) if math.isfinite(v) else None


def _get(d: dict, key: str, kind: str):
    if not isinstance(d, dict) or key not in d:
        raise CompileError(f"{kind} observer: missing key '{key}'")
    return d[key]


class MinMaxObserver:
    """Running min/max; per channel along `axis` when axis is not None."""

    kind = "minmax"

    def __init__(self, axis: int | None = None):
        self.axis = axis
        self.min: np.ndarray | float = math.inf  # an array of shape (C,) per channel
        self.max: np.ndarray | float = -math.inf
        self.count = 0  # finite values observed
        self.nonfinite = 0  # NaN/Inf values ignored

    def update(self, x) -> "MinMaxObserver":
        x = np.asarray(x)
        if self.axis is None:
            a, bad = _finite(x)
            self.nonfinite += bad
            self.count += a.size
            if a.size:
                self.min = min(self.min, float(a.min()))
                self.max = max(self.max, float(a.max()))
            return self
        if not -x.ndim <= self.axis < x.ndim:
            raise CompileError(f"minmax observer: axis {self.axis} out of range for shape {x.shape}")
        a = np.moveaxis(np.asarray(x, dtype=np.float64), self.axis, 0).reshape(x.shape[self.axis], -1)
        ok = np.isfinite(a)
        self.nonfinite += int(a.size - np.count_nonzero(ok))
        self.count += int(np.count_nonzero(ok))
        lo = np.where(ok, a, np.inf).min(axis=1, initial=np.inf)
        hi = np.where(ok, a, -np.inf).max(axis=1, initial=-np.inf)
        self._fold_channels(lo, hi)
        return self

    def _fold_channels(self, lo: np.ndarray, hi: np.ndarray) -> None:
        if np.ndim(self.min) == 0:  # first batch fixes the channel count
            self.min, self.max = lo, hi
        elif lo.shape != self.min.shape:
            raise CompileError(
                f"minmax observer: {lo.size} channels along axis {self.axis}, expected {self.min.size}")
        else:
            self.min, self.max = np.minimum(self.min, lo), np.maximum(self.max, hi)

    def merge(self, other: "MinMaxObserver") -> "MinMaxObserver":
        if not isinstance(other, MinMaxObserver) or other.axis != self.axis:
            raise CompileError("minmax observer: cannot merge observers of different kinds or axes")
        self.count += other.count
        self.nonfinite += other.nonfinite
        if self.axis is None:
            self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        elif np.ndim(other.min):
            self._fold_channels(np.array(other.min), np.array(other.max))
        return self

    def summary(self) -> dict:
        lo, hi = np.min(self.min), np.max(self.max)
        return {"count": self.count, "nonfinite": self.nonfinite, "min": _num(lo), "max": _num(hi)}

    def to_dict(self) -> dict:
        # Per channel: one entry per channel, none before the first batch fixed the count.
        per_channel = self.axis is not None
        return {
            "kind": self.kind,
            "axis": self.axis,
            "count": self.count,
            "nonfinite": self.nonfinite,
            "min": [_num(v) for v in np.ravel(self.min) if np.ndim(self.min)] if per_channel else _num(self.min),
            "max": [_num(v) for v in np.ravel(self.max) if np.ndim(self.max)] if per_channel else _num(self.max),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "MinMaxObserver":
        axis = _get(d, "axis", cls.kind)
        if axis is not None and (not isinstance(axis, int) or isinstance(axis, bool)):
            raise CompileError(f"minmax observer: 'axis' must be an integer or null, got {axis!r}")
        obs = cls(axis)
        obs.count = _count(d, "count", cls.kind)
        obs.nonfinite = _count(d, "nonfinite", cls.kind)
        lo, hi = _get(d, "min", cls.kind), _get(d, "max", cls.kind)
        if axis is None:
            obs.min = math.inf if lo is None else _float(lo, "min", cls.kind)
            obs.max = -math.inf if hi is None else _float(hi, "max", cls.kind)
        else:
            if not isinstance(lo, list) or not isinstance(hi, list) or len(lo) != len(hi):
                raise CompileError("minmax observer: per-channel 'min' and 'max' must be lists of one length")
            if lo:
                obs.min = np.array([math.inf if v is None else _float(v, "min", cls.kind) for v in lo])
                obs.max = np.array([-math.inf if v is None else _float(v, "max", cls.kind) for v in hi])
        return obs


class HistogramObserver:
    """Fixed-size histogram over a growing range on the power-of-two grid, plus exact min/max.

    Bin k covers [(lo + k) * 2**exponent, (lo + k + 1) * 2**exponent)."""

    kind = "histogram"

    def __init__(self, bins: int = DEFAULT_BINS):
        if not isinstance(bins, int) or isinstance(bins, bool) or bins < 2:
            raise CompileError(f"histogram observer: bins must be an integer >= 2, got {bins!r}")
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.int64)
        self.exponent: int | None = None  # None until the first finite value
        self.lo = 0  # index of the first bin on the grid of width 2**exponent
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self.nonfinite = 0

    @property
    def width(self) -> float:
        return math.ldexp(1.0, self.exponent) if self.exponent is not None else 0.0

    def edges(self) -> np.ndarray:
        """The bins + 1 bin edges (all zero before anything was observed)."""
        if self.exponent is None:
            return np.zeros(self.bins + 1)
        return np.ldexp(np.arange(self.lo, self.lo + self.bins + 1, dtype=np.float64), self.exponent)

    def _fits(self, e: int, lo: float, hi: float) -> bool:
        return math.floor(math.ldexp(hi, -e)) - math.floor(math.ldexp(lo, -e)) <= self.bins - 1

    def _exponent_for(self, e: int | None, lo: float, hi: float) -> int:
        """The smallest exponent >= e (and the floor) whose grid covers [lo, hi] with our bins.
        Coverage is monotone in the exponent, so stepping up from a lower bound finds it."""
        amax = max(abs(lo), abs(hi))
        floor = math.frexp(amax)[1] - _MIN_WIDTH_BITS if amax > 0 else _MIN_EXPONENT
        start = max(floor, e if e is not None else floor)
        if hi > lo:  # a width below (hi - lo) / bins can never cover (divided first: no overflow)
            start = max(start, math.floor(math.log2(hi / self.bins - lo / self.bins)) - 1)
        while not self._fits(start, lo, hi):
            start += 1
        return start

    def _rebin(self, e: int, lo: int) -> np.ndarray:
        """Our counts on the coarser grid (e, lo): whole bins add up, nothing is split."""
        out = np.zeros(self.bins, dtype=np.int64)
        if self.exponent is None:
            return out
        nz = np.nonzero(self.counts)[0]
        shift = e - self.exponent
        # Arithmetic shift is floor division by 2**shift, negative indices included.
        idx = ((nz + self.lo) >> shift) - lo
        np.add.at(out, idx, self.counts[nz])
        return out

    def _grow(self, e_min: int | None, lo: float, hi: float) -> None:
        e = self._exponent_for(e_min, lo, hi)
        first = math.floor(math.ldexp(lo, -e))
        if (e, first) != (self.exponent, self.lo):  # most batches fit the grid they found
            self.counts = self._rebin(e, first)
            self.exponent, self.lo = e, first
        self.min, self.max = lo, hi

    def update(self, x) -> "HistogramObserver":
        x = np.asarray(x)
        if x.size == 0:
            return self
        x_lo, x_hi = float(x.min()), float(x.max())  # NaN or inf here when any value is
        if math.isfinite(x_lo) and math.isfinite(x_hi):
            a = x.astype(np.float64).ravel()  # a copy we may scale in place
        else:
            a, bad = _finite(x)
            self.nonfinite += bad
            if a.size == 0:
                return self
            a = a.copy() if a.base is not None or a is x else a
            x_lo, x_hi = float(a.min()), float(a.max())
        lo, hi = min(self.min, x_lo), max(self.max, x_hi)
        self._grow(self.exponent, lo, hi)
        # x * 2**-e is exact in float64, so each value lands in the bin it would on any grid.
        np.ldexp(a, -self.exponent, out=a)
        np.floor(a, out=a)
        idx = a.astype(np.int64)
        idx -= self.lo
        self.counts += np.bincount(idx, minlength=self.bins)
        self.count += a.size
        return self

    def merge(self, other: "HistogramObserver") -> "HistogramObserver":
        if not isinstance(other, HistogramObserver) or other.bins != self.bins:
            raise CompileError("histogram observer: cannot merge histograms of different sizes")
        self.nonfinite += other.nonfinite
        if other.exponent is None:
            return self
        lo, hi = min(self.min, other.min), max(self.max, other.max)
        e = other.exponent if self.exponent is None else max(self.exponent, other.exponent)
        self._grow(e, lo, hi)
        self.counts += other._rebin(self.exponent, self.lo)
        self.count += other.count
        return self

    def summary(self) -> dict:
        return {"count": self.count, "nonfinite": self.nonfinite, "min": _num(self.min), "max": _num(self.max)}

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "bins": self.bins,
            "exponent": self.exponent,
            "lo": self.lo,
            "counts": self.counts.tolist(),
            **self.summary(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "HistogramObserver":
        obs = cls(_count(d, "bins", cls.kind))
        counts = _get(d, "counts", cls.kind)
        if not isinstance(counts, list) or len(counts) != obs.bins or \
                not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise CompileError(f"histogram observer: 'counts' must be {obs.bins} non-negative integers")
        obs.counts = np.array(counts, dtype=np.int64)
        obs.count = _count(d, "count", cls.kind)
        obs.nonfinite = _count(d, "nonfinite", cls.kind)
        e, lo = _get(d, "exponent", cls.kind), _get(d, "lo", cls.kind)
        if e is None:
            if obs.count or obs.counts.any():
                raise CompileError("histogram observer: counts without an 'exponent'")
            return obs
        # Bounds of any grid update() can make: float64 exponents, indices far inside int64.
        if not (isinstance(e, int) and isinstance(lo, int) and -1100 <= e <= 1100 and abs(lo) <= 2**53) \
                or isinstance(e, bool) or isinstance(lo, bool):
            raise CompileError("histogram observer: 'exponent' and 'lo' must be integers of a valid grid")
        obs.exponent, obs.lo = e, lo
        obs.min = _float(_get(d, "min", cls.kind), "min", cls.kind)
        obs.max = _float(_get(d, "max", cls.kind), "max", cls.kind)
        if int(obs.counts.sum()) != obs.count:
            raise CompileError("histogram observer: 'count' does not match the sum of 'counts'")
        return obs


def _count(d: dict, key: str, kind: str) -> int:
    v = _get(d, key, kind)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise CompileError(f"{kind} observer: '{key}' must be a non-negative integer, got {v!r}")
    return v


def _float(v, key: str, kind: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise CompileError(f"{kind} observer: '{key}' must be a finite number, got {v!r}")
    return float(v)


def observer_from_dict(d: dict) -> MinMaxObserver | HistogramObserver:
    kind = d.get("kind") if isinstance(d, dict) else None
    classes = {c.kind: c for c in (MinMaxObserver, HistogramObserver)}
    if kind not in classes:
        raise CompileError(f"observer: unknown kind {kind!r} (expected 'minmax' or 'histogram')")
    return classes[kind].from_dict(d)
