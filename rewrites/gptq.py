"""GPTQ (Frantar et al. 2022): round a linear layer's weights one input feature at a time,
moving each rounding error onto the features not rounded yet, so that the layer's output
error on the calibration rows, E||(W_q - W) x||^2 = tr((W_q - W) H (W_q - W)^T) with H the
Gram matrix E[x x^T] of its inputs, stays small.

With U the upper Cholesky factor of H^-1 (H^-1 = U^T U), rounding feature i leaves the error
e = (w_i - q_i) / U_ii, and the optimal correction of the later features is
w_j -= e U_ij (j > i): the Optimal Brain Surgeon update restricted to what is still free.
Corrections are applied lazily, a batch of features at a time (one matrix product per batch
for everything after it). Block-wise scales are computed as the rounding reaches each
block, from the weights as corrected so far; batches hold whole blocks so no block is cut.

Pure numpy, float64; the caller casts."""

from __future__ import annotations

import numpy as np

from ir.errors import CompileError

from .block_quant import block_params, blocks_of, round_codes

DAMP = 0.01  # ridge added to H: this share of its mean diagonal
LAZY = 128  # features per lazy batch (rounded to whole blocks)


def gptq(w: np.ndarray, gram: np.ndarray, bits: int, block: int, symmetric: bool = True,
         damp: float = DAMP, lazy: int = LAZY, search: bool = True, where: str = "",
         factor: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [R, F] (rows are output channels, F input features), gram [F, F] = E[x x^T].
    Returns (codes [R, F] int64, scale [R, nb] float64, zero [R, nb] int64); `search`
    chooses block ranges by squared error as rtn does (block_quant.block_params). `factor`
    is `inverse_factor(gram, damp)` when the caller already has it (layers reading one input)."""
    at = f" of '{where}'" if where else ""
    w = np.array(w, dtype=np.float64)
    if w.ndim != 2:
        raise CompileError(f"gptq{at}: weight must be 2-D [rows, features], got shape {list(w.shape)}")
    r, f = w.shape
    h = np.array(gram, dtype=np.float64)
    if h.shape != (f, f):
        raise CompileError(f"gptq{at}: Gram matrix of shape {list(h.shape)} for {f} features")
    u = inverse_factor(h, damp, where) if factor is None else factor
    # A feature that is always 0 multiplies nothing: its weights may as well be 0.
    w[:, np.diag(h) <= 0] = 0.0

    nb = blocks_of(f, block)
    codes = np.zeros((r, f), np.int64)
    scale, zero = np.zeros((r, nb)), np.zeros((r, nb), np.int64)
    batch = max(block, lazy // block * block)
    for b0 in range(0, f, batch):
        b1 = min(f, b0 + batch)
        wb = w[:, b0:b1]  # a view: corrections inside the batch land in w
        errors = np.zeros((r, b1 - b0))
        for i in range(b1 - b0):
            col = b0 + i
            if col % block == 0:
                s, z = block_params(wb[:, i:i + block], bits, block, symmetric, search)
                scale[:, col // block], zero[:, col // block] = s[:, 0], z[:, 0]
            s, z = scale[:, col // block], zero[:, col // block]
            q = round_codes(wb[:, i], s, z, bits)
            codes[:, col] = q
            err = (wb[:, i] - s * (q - z)) / u[col, col]
            wb[:, i + 1:] -= np.outer(err, u[col, col + 1:b1])
            errors[:, i] = err
        w[:, b1:] -= errors @ u[b0:b1, b1:]
    return codes, scale, zero


def inverse_factor(gram: np.ndarray, damp: float = DAMP, where: str = "") -> np.ndarray:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, H the Gram with a unit
    diagonal for features that are always 0; the ridge grows tenfold (a few times) while H is
    numerically singular."""
    at = f" of '{where}'" if where else ""
    h = np.array(gram, dtype=np.float64)
    if not np.all(np.isfinite(h)):
        raise CompileError(f"gptq{at}: the Gram matrix holds NaN or Inf")
    if not damp >= 0:
        raise CompileError(f"gptq{at}: damp must be >= 0, got {damp!r}")
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    mean = float(np.mean(np.diag(h)))
    eye = np.eye(h.shape[0])
    for attempt in range(6):
        lam = mean * (damp if attempt == 0 else max(damp, 1e-8) * 10 ** attempt)
        try:
            lower = np.linalg.cholesky(h + lam * eye)
            inv = np.linalg.inv(lower)  # H^-1 = inv^T inv
            return np.linalg.cholesky(inv.T @ inv).T
        except np.linalg.LinAlgError:
            continue
    raise CompileError(f"gptq{at}: the Gram matrix is not positive definite even with a ridge")


def output_error(w: np.ndarray, w_q: np.ndarray, gram: np.ndarray) -> float:
    """tr((W_q - W) G (W_q - W)^T): the layer's mean squared output error on the rows G
    came from (summed over outputs)."""
    d = np.asarray(w_q, np.float64) - np.asarray(w, np.float64)
    return float(np.sum((d @ np.asarray(gram, np.float64)) * d))
