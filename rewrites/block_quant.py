"""Block-wise low-bit quantization maths for weight-only MatMul: scales and zero points per
block of consecutive features, round to nearest, and the bit packing onnxruntime's
MatMulNBits and GatherBlockQuantized read.

Conventions: a weight is a float64 matrix w [R, F] (R rows: a MatMul's output columns; F
features: its reduction axis K), cut along F into blocks of `block` features (the last one
may be short). Codes q are signed integers in [qmin, qmax] = [-2^(b-1), 2^(b-1) - 1] and a
block dequantizes to scale * (q - zero), zero a signed integer of the same range.

Symmetric blocks (zero 0) map the block's extreme value to qmin, so every one of the 2^b
codes is used and the sign of the scale follows the extreme's (4-bit: [-8, 7] · |scale|
covers the larger side exactly); asymmetric blocks span [min(w, 0), max(w, 0)]. Either way
the range is then shrunk by the factor of SHRINK with the least squared error of the block:
clipping a few outliers rounds the rest more finely (decisive at 2 bits)."""

from __future__ import annotations

import numpy as np

BITS = (2, 4, 8)
# Candidate range factors, tried per block (1 = the full range).
SHRINK = tuple(1.0 - 0.05 * i for i in range(11))


def signed_range(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def blocks_of(features: int, block: int) -> int:
    return -(-features // block)


def expand(p: np.ndarray, block: int, features: int) -> np.ndarray:
    """Per-block parameters [R, nb] repeated over their features: [R, F]."""
    return np.repeat(p, block, axis=1)[:, :features]


def _padded(w: np.ndarray, block: int) -> np.ndarray:
    """w [R, F] as [R, nb, block], the last block padded with zeros (exactly representable
    under both schemes, so padding never changes a block's parameters or error)."""
    r, f = w.shape
    nb = blocks_of(f, block)
    out = np.zeros((r, nb * block))
    out[:, :f] = w
    return out.reshape(r, nb, block)


def block_params(w: np.ndarray, bits: int, block: int, symmetric: bool = True,
                 search: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(scale [R, nb] float64, zero [R, nb] int64) for w [R, F]; `search` picks each block's
    range shrink factor from SHRINK by squared error, else the full range is used."""
    qmin, qmax = signed_range(bits)
    x = _padded(np.asarray(w, np.float64), block)
    if symmetric:
        idx = np.abs(x).argmax(axis=2)[..., None]
        extreme = np.take_along_axis(x, idx, axis=2)[..., 0]
        base = extreme / qmin  # the extreme lands on qmin
        zero = np.zeros(base.shape, np.int64)
        candidates = [(base * f, zero) for f in (SHRINK if search else (1.0,))]
    else:
        lo, hi = np.minimum(x.min(axis=2), 0.0), np.maximum(x.max(axis=2), 0.0)
        candidates = []
        for f in SHRINK if search else (1.0,):
            scale = (hi - lo) * f / (qmax - qmin)
            safe = np.where(scale == 0, 1.0, scale)
            candidates.append((scale, np.clip(np.rint(qmin - lo * f / safe), qmin, qmax).astype(np.int64)))
    best_scale, best_zero, best_err = None, None, None
    for scale, zero in candidates:
        scale = np.where(scale == 0, 1.0, scale)  # an all-zero block: any scale, codes 0
        q = np.clip(np.rint(x / scale[..., None]) + zero[..., None], qmin, qmax)
        err = np.sum((x - scale[..., None] * (q - zero[..., None])) ** 2, axis=2)
        if best_err is None:
            best_scale, best_zero, best_err = scale, zero, err
            continue
        better = err < best_err
        best_scale = np.where(better, scale, best_scale)
        best_zero = np.where(better, zero, best_zero)
        best_err = np.minimum(err, best_err)
    return best_scale, best_zero


def round_codes(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """Round to nearest: codes [R, F] int64 for w [R, F] and parameters broadcastable to it."""
    qmin, qmax = signed_range(bits)
    return np.clip(np.rint(w / scale) + zero, qmin, qmax).astype(np.int64)


def rtn(w: np.ndarray, bits: int, block: int, symmetric: bool = True,
        search: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes [R, F], scale [R, nb], zero [R, nb]) by round to nearest."""
    w = np.asarray(w, np.float64)
    scale, zero = block_params(w, bits, block, symmetric, search)
    f = w.shape[1]
    return round_codes(w, expand(scale, block, f), expand(zero, block, f), bits), scale, zero


def dequantize(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, block: int) -> np.ndarray:
    f = codes.shape[1]
    return expand(scale, block, f) * (codes - expand(zero, block, f))


def pack(unsigned: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes [R, n] packed along the last axis, lowest bits first, into uint8
    [R, ceil(n * bits / 8)] (the tail padded with zero codes)."""
    per = 8 // bits
    r, n = unsigned.shape
    width = blocks_of(n, per) * per
    u = np.zeros((r, width), np.uint8)
    u[:, :n] = unsigned
    u = u.reshape(r, width // per, per)
    out = np.zeros((r, width // per), np.uint8)
    for i in range(per):
        out |= u[..., i] << np.uint8(bits * i)
    return out


def nbits_weight(codes: np.ndarray, bits: int, block: int) -> np.ndarray:
    """MatMulNBits' B: codes [N, K] as unsigned (q - qmin), each block packed:
    uint8 [N, nb, block * bits / 8] (the last block zero-padded)."""
    qmin, _ = signed_range(bits)
    n, k = codes.shape
    nb = blocks_of(k, block)
    u = np.full((n, nb * block), -qmin, np.int64)  # padding: the code of 0
    u[:, :k] = codes - qmin
    return pack(u.reshape(n * nb, block), bits).reshape(n, nb, block * bits // 8)


def nbits_zero_points(zero: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits' zero points: zero [N, nb] as unsigned, packed per row: uint8
    [N, ceil(nb * bits / 8)]."""
    qmin, _ = signed_range(bits)
    return pack(zero - qmin, bits)
