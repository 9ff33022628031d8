"""Refit of a consumer layer after some of its input features were pruned away.

The layer computes y = W x + b; after pruning only x_K (the kept features) remains. With the
input statistics of calibration (mean m, covariance C = E[x x^T] - m m^T):

- "none":  W' = W[:, K], b' = b.
- "bias":  W' = W[:, K], b' = b + W[:, R] m_R (R = removed): the output mean is exact.
- "lstsq": W' = W[:, K] + D, b' = b + W[:, R] m_R - D m_K, with D minimising
           E||W_R x_R - D x_K||^2 over the centred calibration rows + lam ||D S^1/2||^2,
           i.e. D = W_R C_RK (C_KK + lam S)^-1, S = diag(C_KK) (a ridge free of the features'
           scales). This is the least-squares fit of W x + b by W' x_K + b' (the bias is
           free, so the fit is on centred rows); the ridge pulls D
           towards 0, i.e. towards "bias" mode, never towards a zero weight, so damping can
           only move the result between the exact fit and "bias".

Everything is float64; the caller casts to the model's type."""

from __future__ import annotations

import numpy as np

from calibration.gram import InputStats
from ir.errors import CompileError

MODES = ("none", "bias", "lstsq")
# Ridge on the kept features' correlation matrix (so the fit does not depend on how each
# feature is scaled): just enough to make singular ones (duplicated features) solvable
# without visibly biasing the fit...
DAMP = 1e-10
# ...unless there are too few rows for the fit to mean anything: with fewer than
# FEW_ROWS * (kept + 1) rows an exact fit mostly memorises the calibration samples.
FEW_ROWS = 4
FEW_ROWS_DAMP = 1e-2
# A kept feature whose variance is below this fraction of its E[x^2] is a constant up to the
# rounding of E[x^2] - E[x]^2: the bias already covers it, and regressing on its rounding
# noise would give it a huge weight.
CONSTANT = 1e-10


def refit(weight2d: np.ndarray, bias: np.ndarray | None, kept: np.ndarray,
          stats: InputStats | None, mode: str, *, damp: float | None = None,
          where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """weight2d: [O, F], features ordered as the stats' FeatureLayout says; bias: [O] or None;
    kept: sorted indices of the features that remain. Returns ([O, len(kept)], [O]) float64.
    `damp` overrides the automatic ridge (relative to each kept feature's variance); `where` names
    the layer in errors."""
    at = f" of '{where}'" if where else ""
    w = np.asarray(weight2d, dtype=np.float64)
    if w.ndim != 2:
        raise CompileError(f"refit{at}: weight must be 2-D [O, F], got shape {list(w.shape)}")
    o, f = w.shape
    b = np.zeros(o) if bias is None else np.asarray(bias, dtype=np.float64)
    if b.shape != (o,):
        raise CompileError(f"refit{at}: bias shape {list(b.shape)} does not match {o} outputs")
    k = _kept(kept, f, at)
    if mode not in MODES:
        raise CompileError(f"refit{at}: unknown mode {mode!r} (expected one of {', '.join(MODES)})")
    w_k = w[:, k]
    if mode == "none":
        return w_k.copy(), b.copy()
    if stats is None:
        raise CompileError(f"refit{at}: mode '{mode}' needs input statistics from calibration")
    if stats.mean.shape != (f,) or (stats.gram is not None and stats.gram.shape != (f, f)):
        raise CompileError(f"refit{at}: statistics of {stats.mean.size} features for a weight of {f}")
    removed = np.setdiff1d(np.arange(f), k, assume_unique=True)
    w_r = w[:, removed]
    m = stats.mean
    b_bias = b + w_r @ m[removed]
    if mode == "bias" or removed.size == 0 or k.size == 0 or stats.gram is None:  # (too many features)
        return w_k.copy(), b_bias
    delta = _delta(w_r, stats, k, removed, damp)
    if delta is None:
        return w_k.copy(), b_bias
    return w_k + delta, b_bias - delta @ m[k]


def _kept(kept, f: int, at: str) -> np.ndarray:
    k = np.asarray(kept)
    if k.ndim != 1 or (k.size and not np.issubdtype(k.dtype, np.integer)):
        raise CompileError(f"refit{at}: kept must be a 1-D array of feature indices")
    k = k.astype(np.int64)
    if k.size and (k[0] < 0 or k[-1] >= f or np.any(np.diff(k) <= 0)):
        raise CompileError(f"refit{at}: kept indices must be sorted, unique and within 0..{f - 1}")
    return k


def _delta(w_r: np.ndarray, stats: InputStats, k: np.ndarray, removed: np.ndarray,
           damp: float | None) -> np.ndarray | None:
    """D = W_R C_RK (C_KK + lam S)^-1 (S = diag C_KK) over the kept features that vary, or
    None when it does not beat D = 0 ("bias")."""
    m, g = stats.mean, stats.gram
    var = np.diag(g)[k] - m[k] ** 2
    live = var > CONSTANT * np.diag(g)[k]
    if not live.any():  # kept features all constant: nothing to regress on
        return None
    kl = k[live]
    sd = np.sqrt(var[live])
    corr = (g[np.ix_(kl, kl)] - np.outer(m[kl], m[kl])) / np.outer(sd, sd)
    c_lr = g[np.ix_(kl, removed)] - np.outer(m[kl], m[removed])
    rhs = (c_lr @ w_r.T) / sd[:, None]  # [kl, O] = S^-1/2 C_KR W_R^T
    if damp is None:
        damp = FEW_ROWS_DAMP if stats.count < FEW_ROWS * (k.size + 1) else DAMP
    a = corr + np.eye(kl.size) * damp
    try:
        sol = np.linalg.solve(a, rhs)
    except np.linalg.LinAlgError:  # numerically singular even with the ridge
        sol = np.linalg.lstsq(a, rhs, rcond=None)[0]
    # Gain over "bias" on the calibration rows, 2 tr(D C_KR W_R^T) - tr(D C_KK D^T), is >= 0
    # in exact arithmetic; a rounding disaster must never make the refit worse than "bias".
    gain = 2.0 * float(np.sum(sol * rhs)) - float(np.sum((corr @ sol) * sol))
    if not np.isfinite(gain) or gain < 0 or not np.all(np.isfinite(sol)):
        return None
    delta = np.zeros((w_r.shape[0], k.size))
    delta[:, live] = (sol / sd[:, None]).T
    return delta


def output_error(weight2d: np.ndarray, bias: np.ndarray | None, kept: np.ndarray,
                 new_weight: np.ndarray, new_bias: np.ndarray, stats: InputStats) -> float:
    """E||W x + b - (W' x_K + b')||^2 over the calibration rows, from the statistics alone."""
    w = np.asarray(weight2d, dtype=np.float64)
    o = w.shape[0]
    d = w.copy()
    d[:, np.asarray(kept, dtype=np.int64)] -= new_weight
    b = np.zeros(o) if bias is None else np.asarray(bias, dtype=np.float64)
    db = b - np.asarray(new_bias, dtype=np.float64)
    # E||D x + db||^2 = tr(D G D^T) + 2 db.(D m) + ||db||^2
    return float(np.sum((d @ stats.gram) * d) + 2.0 * db @ (d @ stats.mean) + db @ db)
