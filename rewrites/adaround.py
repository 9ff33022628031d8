"""AdaRound (Nagel et al. 2020): choose, for every weight, whether to round down or up so
that the layer's output error on calibration data is smallest, instead of rounding each
weight to its nearest grid point on its own.

For a layer y = W x with input statistics G = E[x x^T] (x from the already-quantized prefix),
the output error of quantized weights W_q = s * (codes - zp) is, summed over output rows,

    L(W_q) = sum_r (W_q - W)_r G (W_q - W)_r^T

a quadratic, so its gradient 2 (W_q - W) G is exact and numpy is enough. With the float
model's inputs x and the quantized prefix's x_hat, `cross` = E[x x_hat^T] and G = E[x_hat
x_hat^T] give the teacher's error E||W x - W_q x_hat||^2 = W_q G W_q^T - 2 W cross W_q^T +
const instead. Measured on bench/adaround.py's models and data (one quantized prefix with
round-to-nearest weights), it over-corrects, since the earlier layers' errors it compensates
are then changed by their own AdaRound (4-bit weights: digits CNN 0.887 -> 0.482 against
0.991 with G alone, classifier 0.923 -> 0.541 against 0.969); it would need the prefix
re-run after every layer. So the compiler uses G alone and `cross` stays a function option.

Each code is floor(w/s) + zp + h with h in [0, 1] relaxed to a rectified sigmoid h(V),
optimised with Adam from the round-to-nearest point while a regulariser 1 - |2h - 1|^beta,
its beta annealed from 20 to 2, pushes every h to 0 or 1. Then coordinate descent on the
exact loss flips single codes between the same two grid points while that lowers it (Adam
converges slowly on the ill-conditioned Grams of real layers; the flips are exact). The
result is the better of that and round-to-nearest, so it is never worse than rounding.

Cost: one [rows, F] x [F, F] product per soft iteration and per sweep of flips; early
stopping ends the soft phase once every h is 0 or 1 and no decision has changed for a while,
and the flips once a sweep changes nothing."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ir.errors import CompileError

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch: h reaches 0 and 1 exactly
ITERATIONS = 100  # soft-rounding steps: the coordinate-descent polish does most of the work
# (on PP-OCRv4 recognizer layers, 500 soft steps alone left 0.24-0.70 of round-to-nearest's
# error; 100 steps plus the polish 0.01-0.35, in a fifth of the time)
WARMUP = 0.2  # share of the iterations without the regulariser (free reconstruction first)
REG = 1.0  # regulariser weight against the loss in squared grid steps per weight (0.3-3 do
# equally well on random correlated problems; 0.01 keeps most weights at nearest)
BETA = (20.0, 2.0)
LR = 0.05
CHECK = 50  # iterations between early-stopping checks
SWEEPS = 10  # coordinate-descent sweeps after the soft rounding (stops early when none moves)
# Multiply-adds of Gram products a layer's soft phase may take (rows * F^2 per iteration):
# bigger layers get fewer soft iterations, none at all past WORK (a 4096 x 4096 MatMul), and
# rely on the flips. About 2 s of one core.
WORK = 3e10


def auto_iterations(rows: int, features: int) -> int:
    """Soft iterations for a [rows, features] weight: ITERATIONS within the WORK budget."""
    return int(min(ITERATIONS, WORK // max(rows * features * features, 1)))


@dataclass(frozen=True)
class Problem:
    """One layer's rounding problem in float64, code units: u = w / scale."""

    w: np.ndarray  # [rows, F]
    scale: np.ndarray  # broadcast to [rows, F]
    zero_point: np.ndarray  # broadcast to [rows, F]
    gram: np.ndarray  # [F, F]
    target: np.ndarray  # [rows, F]: w @ G, or w @ cross
    lo: np.ndarray  # [rows, F] lower code (clipped into [qmin, qmax])
    step: np.ndarray  # [rows, F] 1 where rounding up is possible, else 0
    nearest: np.ndarray  # [rows, F] round-to-nearest codes (ONNX QuantizeLinear)
    fixed: np.ndarray  # [rows, F] bool: kept at nearest


def rtn_codes(w, scale, zero_point, qmin: int, qmax: int) -> np.ndarray:
    """Round-to-nearest codes as ONNX QuantizeLinear computes them (float32 division, half to
    even, saturated): what InsertQDQ stores for the same parameters."""
    w = np.asarray(w, np.float32)
    y = np.rint(w / np.asarray(scale, np.float32)).astype(np.float64) + np.asarray(zero_point, np.float64)
    return np.clip(y, qmin, qmax).astype(np.int32)


def dequantized(codes, scale, zero_point) -> np.ndarray:
    """scale * (codes - zero_point) in float32, as DequantizeLinear computes it."""
    return ((np.asarray(codes, np.float64) - np.asarray(zero_point, np.float64)).astype(np.float32)
            * np.asarray(scale, np.float32))


def rounding_loss(codes, w, gram, scale, zero_point, cross=None) -> float:
    """The layer's output error for `codes`: sum_r (W_q - W)_r G (W_q - W)_r^T, or with `cross`
    the teacher's error W_q G W_q^T - 2 W cross W_q^T without its constant W E[x x^T] W^T."""
    w = np.asarray(w, np.float64)
    g = np.asarray(gram, np.float64)
    wq = dequantized(codes, scale, zero_point).astype(np.float64)
    if cross is None:
        d = wq - w
        return float(np.sum((d @ g) * d))
    return float(np.sum((wq @ g) * wq) - 2 * np.sum((w @ np.asarray(cross, np.float64)) * wq))


def adaround(w, gram, scale, zero_point, qmin: int, qmax: int, *, cross=None, fixed=None,
             iterations: int | None = None, reg: float = REG, lr: float = LR, sweeps: int = SWEEPS,
             where: str = "") -> np.ndarray:
    """Integer codes (int32, w's shape) in [qmin, qmax] minimising the layer's output error.

    w: [rows, F]; gram: [F, F] E[x x^T] of the layer's (quantized-prefix) input features;
    or a batch of independent problems, w [B, rows, F] with gram [B, F, F] (a grouped Conv);
    scale, zero_point: broadcastable to w (per row [rows, 1], per tensor, or per block
    [rows, F]); cross: optional [F, F] E[x x_hat^T] (float input against quantized input);
    fixed: optional boolean mask (broadcastable to w) of weights kept at round-to-nearest
    (the ones that define a symmetric scale); iterations: soft-rounding steps (None:
    auto_iterations); sweeps: most coordinate-descent sweeps. `where` names the layer in errors."""
    p = problem(w, gram, scale, zero_point, qmin, qmax, cross=cross, fixed=fixed, where=where)
    if iterations is None:
        iterations = auto_iterations(*p.w.shape[-2:])
    if iterations < 0:
        raise CompileError(f"adaround{_at(where)}: iterations must be >= 0, got {iterations}")
    if sweeps < 0:
        raise CompileError(f"adaround{_at(where)}: sweeps must be >= 0, got {sweeps}")
    rtn = p.nearest.astype(np.int32)
    codes = rtn
    if p.step.any() and iterations:
        codes = (p.lo + p.step * (optimise(p, iterations=iterations, reg=reg, lr=lr) >= 0.5)).astype(np.int32)
    if sweeps:
        codes = polish(p, codes, sweeps=sweeps)
    # rows are independent problems: each keeps the better of its two roundings
    better = _row_loss(p, codes) <= _row_loss(p, rtn)
    return np.where(better[..., None], codes, rtn)


def polish(p: Problem, codes: np.ndarray, *, sweeps: int = SWEEPS) -> np.ndarray:
    """Coordinate descent on the exact loss: feature by feature (every row at once, rows are
    independent), flip a code to the other grid point around its weight when that lowers the
    row's loss. Each flip only lowers the loss, and one sweep costs one Gram product, like one
    soft-rounding iteration."""
    c = codes.astype(np.float64)
    s = p.scale
    # AdaRound's choice: each code stays one of the two grid points around its weight
    lo, hi = p.lo, p.lo + p.step
    e = (s * (c - p.zero_point)) @ p.gram - p.target  # half the gradient of the loss in W_q
    diag = np.diagonal(p.gram, axis1=-2, axis2=-1)[..., None, :]  # [..., 1, F]
    for _ in range(sweeps):
        moved = 0
        for i in range(c.shape[-1]):
            si, ei, ci, di = s[..., i], e[..., i], c[..., i], diag[..., i]
            best_t = np.zeros_like(ci)
            best = -1e-12 * np.maximum(di, 1e-300) + np.zeros_like(ci)  # strictly better only
            for t in (1.0, -1.0):
                change = 2 * t * si * ei + si * si * di
                ok = (change < best) & (ci + t >= lo[..., i]) & (ci + t <= hi[..., i])
                best_t = np.where(ok, t, best_t)
                best = np.where(ok, change, best)
            if best_t.any():
                c[..., i] += best_t
                e += (best_t * si)[..., None] * p.gram[..., i, None, :]
                moved += int(np.count_nonzero(best_t))
        if not moved:
            break
    return c.astype(np.int32)


def problem(w, gram, scale, zero_point, qmin: int, qmax: int, *, cross=None, fixed=None, where: str = "") -> Problem:
    """Validate and set up the arrays (float64)."""
    at = _at(where)
    w = np.asarray(w, np.float64)
    if w.ndim not in (2, 3):
        raise CompileError(f"adaround{at}: weight must be 2-D [rows, F] (or a batch [B, rows, F]), "
                           f"got shape {list(w.shape)}")
    f = w.shape[-1]
    want = w.shape[:-2] + (f, f)
    g = np.asarray(gram, np.float64)
    if g.shape != want:
        raise CompileError(f"adaround{at}: Gram shape {list(g.shape)} does not match {f} features"
                           + (f" in {w.shape[0]} groups" if w.ndim == 3 else ""))
    if cross is not None and np.shape(cross) != want:
        raise CompileError(f"adaround{at}: cross shape {list(np.shape(cross))} does not match the Gram's {list(want)}")
    if not qmin < qmax:
        raise CompileError(f"adaround{at}: empty code range [{qmin}, {qmax}]")
    try:
        s = np.broadcast_to(np.asarray(scale, np.float32), w.shape)
        zp = np.broadcast_to(np.asarray(zero_point, np.float64), w.shape)
        keep = None if fixed is None else np.broadcast_to(np.asarray(fixed, bool), w.shape)
    except ValueError:
        raise CompileError(f"adaround{at}: scale, zero point or fixed mask does not broadcast to the "
                           f"weight's shape {list(w.shape)}") from None
    if not (np.isfinite(s).all() and (s > 0).all()):
        raise CompileError(f"adaround{at}: scale must be finite and positive")
    if not (np.isfinite(w).all() and np.isfinite(g).all()):
        raise CompileError(f"adaround{at}: weight and Gram must be finite")
    nearest = rtn_codes(w, s, zp, qmin, qmax)
    base = np.floor((w.astype(np.float32) / s).astype(np.float64)) + zp
    lo = np.clip(base, qmin, qmax)
    step = np.clip(base + 1, qmin, qmax) - lo
    if keep is not None:  # a fixed weight has one choice: its nearest code
        lo = np.where(keep, nearest, lo)
        step = np.where(keep, 0.0, step)
    target = w @ (g if cross is None else np.asarray(cross, np.float64))
    fixed = np.zeros(w.shape, bool) if keep is None else np.array(keep)
    return Problem(w, s.astype(np.float64), zp, g, target, lo, step, nearest.astype(np.float64), fixed)


def optimise(p: Problem, *, iterations: int = ITERATIONS, reg: float = REG, lr: float = LR,
             beta: tuple[float, float] = BETA, warmup: float = WARMUP) -> np.ndarray:
    """The soft rounding h in [0, 1] (rows x F) after Adam on loss / norm + reg * mean(1 -
    |2h - 1|^beta). The loss is normalised by the cost of a one-step error in every weight,
    so `reg` means the same for every layer."""
    movable = p.step > 0
    frac = np.clip((p.w / p.scale + p.zero_point) - p.lo, 0.0, 1.0)  # round-to-nearest start
    frac = np.where(movable, frac, 0.0)
    v = -np.log((ZETA - GAMMA) / (np.clip(frac, 1e-3, 1 - 1e-3) - GAMMA) - 1)
    sstep = p.scale * p.step  # d W_q / d h
    # per problem of a batch, so a batch solves each problem as it would alone
    norm = np.sum(sstep ** 2 * np.diagonal(p.gram, axis1=-2, axis2=-1)[..., None, :], axis=(-2, -1), keepdims=True)
    norm = np.where(norm > 0, norm, 1.0)
    n = np.maximum(np.sum(movable, axis=(-2, -1), keepdims=True), 1)
    # float32 products: the Gram multiply is the whole cost, and the decisions are binary
    g32 = p.gram.astype(np.float32)
    base = (p.scale * (p.lo - p.zero_point)).astype(np.float32)
    target = p.target.astype(np.float32)
    m1, m2 = np.zeros_like(v), np.zeros_like(v)
    b1, b2, eps = 0.9, 0.999, 1e-8
    start = int(warmup * iterations)
    hard = v >= 0
    stable = 0
    for t in range(1, iterations + 1):
        sig = 1.0 / (1.0 + np.exp(-v))
        h_raw = sig * (ZETA - GAMMA) + GAMMA
        h = np.clip(h_raw, 0.0, 1.0)
        wq = base + (sstep * h).astype(np.float32)
        grad_h = (2.0 / norm) * (wq @ g32 - target).astype(np.float64) * sstep
        if t > start:
            b = beta[0] + (beta[1] - beta[0]) * (t - start) / max(iterations - start, 1)
            a = 2 * h - 1
            # d/dh of 1 - |2h - 1|^b
            grad_h += (reg / n) * (-2 * b * np.sign(a) * np.abs(a) ** (b - 1))
        inside = (h_raw > 0) & (h_raw < 1)
        grad = np.where(inside & movable, grad_h * sig * (1 - sig) * (ZETA - GAMMA), 0.0)
        m1 = b1 * m1 + (1 - b1) * grad
        m2 = b2 * m2 + (1 - b2) * grad * grad
        v -= lr * (m1 / (1 - b1 ** t)) / (np.sqrt(m2 / (1 - b2 ** t)) + eps)
        if t > start and t % CHECK == 0:
            now = v >= 0
            settled = not np.any(inside & movable)
            stable = stable + 1 if settled and np.array_equal(now, hard) else 0
            hard = now
            if stable >= 2:
                break
    sig = 1.0 / (1.0 + np.exp(-v))
    return np.where(movable, np.clip(sig * (ZETA - GAMMA) + GAMMA, 0.0, 1.0), 0.0)


def _row_loss(p: Problem, codes: np.ndarray) -> np.ndarray:
    """Each row's exact loss (up to a constant) in float64: W_q G W_q^T - 2 target W_q^T."""
    wq = p.scale * (codes - p.zero_point)
    return np.sum((wq @ p.gram - 2 * p.target) * wq, axis=-1)


def _at(where: str) -> str:
    return f" of '{where}'" if where else ""
