"""Block-wise low-bit maths (rewrites/block_quant.py) and GPTQ (rewrites/gptq.py): known
scales, codes and packed bytes; GPTQ's update against a hand computation; GPTQ equals
round-to-nearest when the inputs are uncorrelated and beats it when they are not."""

from __future__ import annotations

import numpy as np
import pytest

from ir import CompileError
from rewrites.block_quant import block_params, dequantize, nbits_weight, nbits_zero_points, pack, rtn
from rewrites.gptq import gptq, output_error

RNG = np.random.default_rng(11)


def correlated_gram(f: int, rows: int = 4000) -> np.ndarray:
    x = RNG.standard_normal((rows, f)) @ RNG.standard_normal((f, f)) * 0.3 + RNG.standard_normal((rows, f))
    return x.T @ x / rows


def test_symmetric_block_maps_its_extreme_to_qmin():
    # 4-bit: the extreme 0.7 becomes code -8, so the scale is 0.7 / -8 (negative).
    scale, zero = block_params(np.array([[0.7, -0.35, 0.1]]), 4, 16, search=False)
    assert scale.tolist() == [[0.7 / -8]] and zero.tolist() == [[0]]
    codes, _, _ = rtn(np.array([[0.7, -0.35, 0.1]]), 4, 16, search=False)
    assert codes.tolist() == [[-8, 4, -1]]
    # A negative extreme gives a positive scale; 2-bit codes are -2..1.
    codes, scale, _ = rtn(np.array([[-1.0, 0.5, 0.2]]), 2, 16, search=False)
    assert scale.tolist() == [[0.5]] and codes.tolist() == [[-2, 1, 0]]


def test_asymmetric_block_spans_min_to_max_with_zero():
    codes, scale, zero = rtn(np.array([[0.0, 1.5, 0.75]]), 2, 16, symmetric=False, search=False)
    assert scale.tolist() == [[0.5]] and zero.tolist() == [[-2]]
    assert codes.tolist() == [[-2, 1, 0]]  # 0.75 / 0.5 = 1.5 rounds half to even: 2 - 2
    assert dequantize(codes, scale, zero, 16).tolist() == [[0.0, 1.5, 1.0]]


def test_zero_block_and_short_last_block():
    w = RNG.standard_normal((3, 40))
    w[1, 16:32] = 0.0
    codes, scale, zero = rtn(w, 4, 16)
    assert scale.shape == (3, 3) and codes.shape == (3, 40)
    assert np.all(codes[1, 16:32] == 0)
    # The short last block has the parameters it would have alone: padding changes nothing.
    alone = block_params(w[:, 32:], 4, 16)
    assert np.array_equal(alone[0][:, 0], scale[:, 2]) and np.array_equal(alone[1][:, 0], zero[:, 2])


def test_range_search_never_worse_and_clips_an_outlier():
    w = RNG.standard_normal((64, 128))
    for bits in (2, 4, 8):
        for symmetric in (True, False):
            full = dequantize(*rtn(w, bits, 32, symmetric, search=False), 32)
            best = dequantize(*rtn(w, bits, 32, symmetric), 32)
            assert np.sum((best - w) ** 2) <= np.sum((full - w) ** 2)
    # One outlier in a 2-bit block: the full range leaves every other weight at 0.
    block = np.array([[4.0] + [0.9, -0.8, 0.7, -0.9] * 3 + [0.0, 0.0, 0.0]])
    codes_full = rtn(block, 2, 16, search=False)[0]
    codes = rtn(block, 2, 16)[0]
    assert np.count_nonzero(codes_full) == 1 and np.count_nonzero(codes) == 13


def test_packing_is_lowest_bits_first():
    assert pack(np.array([[1, 2, 3]]), 4).tolist() == [[0x21, 0x03]]
    assert pack(np.array([[1, 2, 3, 0, 1]]), 2).tolist() == [[1 | 2 << 2 | 3 << 4, 1]]
    assert pack(np.array([[200, 7]]), 8).tolist() == [[200, 7]]
    # MatMulNBits' B: unsigned codes (q + 8 at 4 bits) per block, the short block padded with 8s.
    codes = np.array([[-8, 7, 0] + [1] * 13 + [2, -1]])  # one row, K = 18, block 16
    b = nbits_weight(codes, 4, 16)
    assert b.shape == (1, 2, 8)
    assert b[0, 0, :2].tolist() == [0xF0, 0x98] and b[0, 1].tolist() == [0x7A] + [0x88] * 7
    assert nbits_zero_points(np.array([[0, -8, 7]]), 4).tolist() == [[0x08 | 0x00 << 4, 0x0F]]


def test_gptq_is_rtn_when_inputs_are_uncorrelated():
    w = RNG.standard_normal((16, 96))
    for bits in (2, 4, 8):
        for symmetric in (True, False):
            got, want = gptq(w, np.diag(RNG.uniform(0.5, 2, 96)), bits, 32, symmetric), rtn(w, bits, 32, symmetric)
            assert all(np.array_equal(a, b) for a, b in zip(got, want))


def test_gptq_update_by_hand():
    # H couples features 0 and 1: rounding 0.65 to 7 * 0.0875 leaves +0.0375, and the
    # optimal correction of feature 1 is -H10/H11 * 0.0375... expressed on w:
    # w1 += 0.5 * 0.0375 -> 0.22875 / -0.0875 = -2.61 -> -3 (nearest alone: -2.4 -> -2).
    w = np.array([[0.65, 0.21, 0.7]])
    h = np.array([[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]])
    codes, scale, _ = gptq(w, h, 4, 16, damp=0.0, search=False)
    assert scale.tolist() == [[-0.0875]]
    assert codes.tolist() == [[-7, -3, -8]]
    near = rtn(w, 4, 16, search=False)[0]
    assert near.tolist() == [[-7, -2, -8]]
    assert output_error(w, codes * -0.0875, h) < output_error(w, near * -0.0875, h)


@pytest.mark.parametrize("bits", [2, 4])
def test_gptq_beats_rtn_on_correlated_inputs(bits):
    w = RNG.standard_normal((48, 128))
    g = correlated_gram(128)
    e_rtn = output_error(w, dequantize(*rtn(w, bits, 32), 32), g)
    e_gptq = output_error(w, dequantize(*gptq(w, g, bits, 32), 32), g)
    assert e_gptq < 0.9 * e_rtn


def test_lazy_batches_do_not_change_the_result():
    w = RNG.standard_normal((8, 128))
    g = correlated_gram(128)
    a = gptq(w, g, 4, 16, lazy=16)
    b = gptq(w, g, 4, 16, lazy=128)
    # The same sums in another order: scales agree to rounding, codes exactly.
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[2], b[2])
    np.testing.assert_allclose(a[1], b[1], rtol=1e-12)


def test_dead_features_get_zero_weights():
    w = RNG.standard_normal((4, 32))
    g = correlated_gram(32)
    g[5, :] = g[:, 5] = 0.0
    codes, _, zero = gptq(w, g, 4, 16)
    assert np.all(codes[:, 5] == zero[:, 0])


def test_gptq_errors():
    with pytest.raises(CompileError, match=r"^gptq of 'mm': Gram matrix of shape \[3, 3\] for 4 features$"):
        gptq(np.zeros((2, 4)), np.eye(3), 4, 16, where="mm")
    with pytest.raises(CompileError, match=r"^gptq: the Gram matrix holds NaN or Inf$"):
        gptq(np.zeros((2, 2)), np.array([[1.0, np.nan], [np.nan, 1.0]]), 4, 16)
    with pytest.raises(CompileError, match=r"^gptq: weight must be 2-D \[rows, features\], got shape \[4\]$"):
        gptq(np.zeros(4), np.eye(4), 4, 16)
