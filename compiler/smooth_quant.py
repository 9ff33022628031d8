"""SmoothQuant in the compiler: the activation statistics it needs come from onnxruntime runs
on the calibration data, and alpha is chosen per layer by the layer's simulated W8A8 error.

For every smoothing group (rewrites/smooth_quant.py) whose readers the QDQ plan quantizes,
one streaming pass over the calibration feeds gathers the per-channel min/max of the
activation (max|X_j| gives s) and, for alpha "auto", a bounded uniform sample of its rows
(reservoir sampling: memory is RESERVOIR_ROWS x K per group whatever the number of feeds).
For each alpha of the grid, and for leaving the group as it is, the sampled rows are
quantized as the QDQ plan will (uint8 per tensor, with the calibration method's range, and
int8 per-channel weights) and the relative error sum_c ||X W_c - Q(X/s) Q(s W_c)||^2 /
||X W_c||^2 over the group's readers is measured (on a fixed sample of COLUMNS output
columns of each reader: per-channel weights are quantized column by column, so the sample
estimates the whole error at a bounded cost); the smallest wins, and a group no alpha
improves is left alone. Layers are chosen independently, each against the float model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from calibration.collect import collect
from calibration.observers import HistogramObserver, MinMaxObserver
from calibration.scales import dequantize, params_from_range, quantize, select_range, weight_params
from ir import Model
from rewrites.base import Change, Pass, PassResult
from rewrites.qdq import plan
from rewrites.qdq_targets import ORT_CPU, Target
from rewrites.smooth_quant import SmoothGroup, SmoothQuant, smooth_groups, smoothing_scales, weight_rows

from .errors import CompileError

GRID = tuple(i / 10 for i in range(11))  # alpha 0, 0.1, ..., 1
RESERVOIR_ROWS = 512  # rows kept per group for the error: enough to rank alphas, cheap to multiply
COLUMNS = 256  # output columns per reader the error is measured on: cost O(grid x rows x K x 256)
_SEED = 0


def parse_alpha(value) -> float | str:
    """The `smooth_quant` option: 'auto' or a number in [0, 1]."""
    if value == "auto":
        return "auto"
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) and 0 <= value <= 1
    if not ok:
        raise CompileError(f"smooth_quant must be a number in [0, 1] or 'auto', got {value!r}")
    return float(value)


class RowObserver:
    """Per-channel min/max of the last axis, plus (when `rows` > 0) a uniform reservoir sample
    of `rows` rows x.reshape(-1, K), seeded, so the same feeds always give the same sample."""

    kind = "smooth-rows"

    def __init__(self, channels: int, rows: int, seed: int = _SEED):
        self.channels, self.capacity = channels, rows
        self.minmax = MinMaxObserver(axis=-1)
        self.sample = np.zeros((0, channels), np.float32)
        self.seen = 0
        self._rng = np.random.default_rng(seed)

    def update(self, x) -> None:
        x = np.asarray(x, np.float32)
        if x.ndim == 0 or x.shape[-1] != self.channels:
            raise CompileError(f"smooth-quant: activation of shape {list(x.shape)}, expected "
                               f"{self.channels} channels on the last axis")
        self.minmax.update(x)
        if not self.capacity:
            return
        rows = x.reshape(-1, self.channels)
        rows = rows[np.isfinite(rows).all(axis=1)]
        room = self.capacity - len(self.sample)
        if room > 0:
            self.sample = np.concatenate([self.sample, rows[:room]])
            self.seen += min(room, len(rows))
            rows = rows[room:]
        if not len(rows):
            return
        # Algorithm R: the t-th row seen replaces a random slot with probability capacity / t.
        t = self.seen + 1 + np.arange(len(rows))
        slots = (self._rng.random(len(rows)) * t).astype(np.int64)
        for i in np.flatnonzero(slots < self.capacity):
            self.sample[slots[i]] = rows[i]
        self.seen += len(rows)

    @property
    def absmax(self) -> np.ndarray:
        return np.maximum(np.abs(self.minmax.min), np.abs(self.minmax.max))


def w8a8_error(x: np.ndarray, weights: list[np.ndarray], s: np.ndarray | None, lo: np.ndarray,
               hi: np.ndarray, method: str = "minmax", per_channel: bool = True,
               reference: list[np.ndarray] | None = None) -> float:
    """Relative squared output error of the readers' weights ([K, N] each) on rows x [R, K]
    when X/s is quantized to uint8 per tensor and s W to int8 per output channel (s None: as
    is). The activation range is [min_j lo_j / s_j, max_j hi_j / s_j] for minmax (exact over
    all the data seen), else the method's choice on the sampled rows. `reference`: the float
    outputs x @ W, when the caller already has them."""
    s = np.ones(x.shape[1]) if s is None else s
    xs = (x / s).astype(np.float32)
    if method == "minmax":
        a_lo, a_hi = float(np.min(lo / s)), float(np.max(hi / s))
    else:
        obs = HistogramObserver()
        obs.update(xs)
        a_lo, a_hi = select_range(obs, method)
    xp = params_from_range(a_lo, a_hi, "uint8")
    xq = dequantize(quantize(xs, xp), xp)
    reference = reference or [x @ w.astype(np.float32) for w in weights]
    err = ref = 0.0
    for w, y in zip(weights, reference):
        sw = w * s[:, None]
        wp = weight_params(sw, 1 if per_channel else None, "int8")
        # float32 products: the errors measured are 1e-6 or more of |y|, far above its rounding
        d = (y - xq @ dequantize(quantize(sw, wp), wp)).astype(np.float64)
        err += float(np.sum(d * d))
        ref += float(np.sum(y.astype(np.float64) ** 2))
    return err / ref if ref > 0 else err


def choose_alpha(group: SmoothGroup, obs: RowObserver, grid=GRID, method: str = "minmax",
                 per_channel: bool = True) -> tuple[float | None, float, float]:
    """(best alpha or None when none beats leaving the group, its error, the error as is)."""
    weights = [weight_rows(n) for n in group.consumers]
    if per_channel:  # each output column has its own scale: a sample of them estimates the error
        rng = np.random.default_rng(_SEED)
        weights = [w if w.shape[1] <= COLUMNS else w[:, np.sort(rng.choice(w.shape[1], COLUMNS, replace=False))]
                   for w in weights]
    lo, hi, x = obs.minmax.min, obs.minmax.max, obs.sample
    reference = [x @ w.astype(np.float32) for w in weights]
    plain = w8a8_error(x, weights, None, lo, hi, method, per_channel, reference)
    best, best_err = None, plain
    for alpha in grid:
        s = smoothing_scales(obs.absmax, group.weight_max(), alpha)
        err = w8a8_error(x, weights, s, lo, hi, method, per_channel, reference)
        if err < best_err:  # strictly better: ties keep the model as it is
            best, best_err = alpha, err
    return best, best_err, plain


@dataclass
class CalibratedSmoothQuant(Pass):
    """Gather each quantized smoothing group's activation statistics on `feeds`, choose alpha
    (a fixed number, or "auto": per group from `grid` by simulated W8A8 error) and fold the
    scales (rewrites/smooth_quant.py: SmoothQuant). Exact in float."""

    name = "smooth-quant"
    exact = True
    alpha: float | str = "auto"
    feeds: Any = None
    method: str = "mse"  # the calibration method, simulated when choosing alpha
    target: Target = ORT_CPU
    exclude: tuple[str, ...] = ()
    per_channel: bool = True
    grid: tuple[float, ...] = GRID
    rows: int = RESERVOIR_ROWS
    progress: Callable[..., None] | None = None

    def run(self, model: Model) -> PassResult:
        alpha = parse_alpha(self.alpha)
        if self.feeds is None:
            raise CompileError("smooth_quant needs calibration data (--calib DIR) to measure activations")
        quantized = set(plan(model, self.target, self.exclude).weighted)
        groups = [g for g in smooth_groups(model)[0] if any(n.name in quantized for n in g.consumers)]
        auto = alpha == "auto"
        observers = {g.x.name: RowObserver(g.channels, self.rows if auto else 0) for g in groups}
        if observers:
            progress = None if self.progress is None else (lambda d, t: self.progress(d, t, "smooth-quant"))
            if not collect(model, observers, self.feeds, progress=progress):
                raise CompileError("calibration data holds no feeds")
        act_max = {name: obs.absmax for name, obs in observers.items()}
        notes, alphas = [], {}
        if auto:
            for g in groups:
                best, err, plain = choose_alpha(g, observers[g.x.name], self.grid, self.method, self.per_channel)
                alphas[g.x.name] = best
                notes.append(Change(self.name, "choose", f"%{g.x.name}",
                                    f"alpha {'none' if best is None else f'{best:g}'}: simulated W8A8 "
                                    f"error {err:.3g} (unsmoothed {plain:.3g})"))
        result = SmoothQuant(act_max=act_max, alpha=0.5 if auto else alpha, alphas=alphas).run(model)
        for change in notes:
            result.log.record(change)
        return result
