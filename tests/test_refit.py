"""Pruning's statistics and recovery maths: calibration/gram.py (mean and Gram of a layer's
input features, im2col patches for Conv) and rewrites/refit.py (none / bias / lstsq refit of
a consumer whose input features were pruned), checked against explicit loops, closed forms
and, end to end, against onnxruntime on a Conv -> Relu -> Conv model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibration import gram as gram_module
from calibration.gram import FeatureLayout, FeatureStatsObserver, InputStats
from ir.errors import CompileError
from rewrites.refit import output_error, refit


def rng(seed=0):
    return np.random.default_rng(seed)


def im2col(x, kernel, strides, pads, dilations):
    """The conv's patches by plain loops: one row per output position, (c, k...) order."""
    nk = len(kernel)
    xp = np.pad(x.astype(np.float64), [(0, 0), (0, 0)] + list(zip(pads[:nk], pads[nk:])))
    out = [(xp.shape[2 + i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(nk)]
    rows = []
    for n in range(x.shape[0]):
        for pos in itertools.product(*map(range, out)):
            row = []
            for c in range(x.shape[1]):
                for k in itertools.product(*map(range, kernel)):
                    idx = tuple(pos[i] * strides[i] + k[i] * dilations[i] for i in range(nk))
                    row.append(xp[(n, c) + idx])
            rows.append(row)
    return np.array(rows)


def observe(layout, *xs):
    obs = FeatureStatsObserver(layout)
    for x in xs:
        obs.update(x)
    return obs


def assert_stats_close(a: InputStats, b: InputStats, tol=1e-12):
    assert a.count == b.count
    np.testing.assert_allclose(a.mean, b.mean, rtol=tol, atol=tol)
    np.testing.assert_allclose(a.gram, b.gram, rtol=tol, atol=tol)


# ---- observers ----------------------------------------------------------------------------

CONV_CASES = [  # shape, kernel, strides, pads, dilations
    ((2, 3, 7, 6), (3, 2), (2, 1), (1, 0, 2, 1), (1, 2)),
    ((1, 2, 5, 5), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    ((3, 4, 6, 8), (1, 1), (2, 3), (0, 0, 0, 0), (1, 1)),
    ((2, 2, 9, 7), (2, 3), (3, 2), (0, 2, 1, 0), (3, 2)),
    ((2, 3, 11), (3,), (2,), (2, 1), (2,)),
    ((1, 2, 4), (5,), (1,), (3, 2), (1,)),
    ((1, 2, 4, 5, 3), (2, 3, 1), (1, 2, 1), (1, 0, 0, 0, 1, 1), (2, 1, 1)),
]


@pytest.mark.parametrize("shape,kernel,strides,pads,dilations", CONV_CASES)
def test_conv_patches_match_explicit_im2col(shape, kernel, strides, pads, dilations):
    x = rng(1).normal(size=shape).astype(np.float32)
    s = observe(FeatureLayout("conv", kernel, strides, pads, dilations), x).stats
    rows = im2col(x, kernel, strides, pads, dilations)
    assert s.count == rows.shape[0] and s.features == shape[1] * np.prod(kernel)
    np.testing.assert_allclose(s.mean, rows.mean(axis=0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(s.gram, rows.T @ rows / rows.shape[0], rtol=1e-12, atol=1e-14)


def test_conv_defaults_fill_in():
    lay = FeatureLayout("conv", kernel=(3, 3))
    assert (lay.strides, lay.pads, lay.dilations) == ((1, 1), (0, 0, 0, 0), (1, 1))
    x = rng(2).normal(size=(1, 2, 5, 4))
    s = observe(lay, x).stats
    np.testing.assert_allclose(s.gram, (r := im2col(x, (3, 3), (1, 1), (0,) * 4, (1, 1))).T @ r / len(r))


def test_conv_feature_order_matches_weight_reshape():
    """Patch features dot W.reshape(O, -1) is the convolution itself (cross-correlation)."""
    r = rng(3)
    x, w = r.normal(size=(1, 3, 6, 5)), r.normal(size=(4, 3, 3, 2))
    lay = FeatureLayout("conv", (3, 2), (1, 2), (1, 1, 0, 1), (1, 1))
    rows = np.concatenate(list(FeatureStatsObserver(lay)._chunks(x)))
    xp = np.pad(x, [(0, 0), (0, 0), (1, 0), (1, 1)])
    direct = [np.sum(w[o] * xp[0, :, i:i + 3, j:j + 2]) for i in range(xp.shape[2] - 2)
              for j in range(0, xp.shape[3] - 1, 2) for o in range(4)]
    np.testing.assert_allclose((rows @ w.reshape(4, -1).T).ravel(), direct, rtol=1e-12)


def test_streaming_equals_one_update():
    r = rng(4)
    batches = [r.normal(size=(n, 3, 8, 7)).astype(np.float32) + i for i, n in enumerate((1, 3, 2, 1))]
    lay = FeatureLayout("conv", (3, 3), (1, 2), (1, 1, 1, 1))
    assert_stats_close(observe(lay, *batches).stats, observe(lay, np.concatenate(batches)).stats)
    rows = FeatureLayout("rows")
    assert_stats_close(observe(rows, *batches).stats, observe(rows, np.concatenate(batches)).stats)


@pytest.mark.parametrize("budget", [8 * 27 * 5, 8 * 27 * 40, 8 * 27 * 1000])
def test_chunking_does_not_change_the_result(monkeypatch, budget):
    """Chunks of 5 rows (inside one sample), 40 rows (whole samples) and everything at once."""
    x = rng(5).normal(size=(4, 3, 9, 8))
    lay = FeatureLayout("conv", (3, 3), (1, 1), (1, 1, 1, 1))
    whole = observe(lay, x).stats
    monkeypatch.setattr(gram_module, "_CHUNK_BYTES", budget)
    assert_stats_close(observe(lay, x).stats, whole)
    rows = im2col(x, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    np.testing.assert_allclose(whole.gram, rows.T @ rows / len(rows), rtol=1e-12)


def test_merge_equals_one_shot_and_is_associative():
    r = rng(6)
    xs = [r.normal(size=(2, 4, 6, 6)) * (i + 1) for i in range(3)]
    lay = FeatureLayout("conv", (2, 2), (2, 2))
    one = observe(lay, *xs).stats
    a, b, c = (observe(lay, x) for x in xs)
    left = observe(lay, xs[0]).merge(observe(lay, xs[1])).merge(observe(lay, xs[2]))
    right = a.merge(b.merge(c))
    assert_stats_close(left.stats, one)
    assert_stats_close(right.stats, one)
    assert_stats_close(FeatureStatsObserver(lay).merge(observe(lay, *xs)).stats, one)  # empty + full
    with pytest.raises(CompileError, match="different layouts"):
        a.merge(FeatureStatsObserver(FeatureLayout("rows")))


def test_rows_layout():
    x = rng(7).normal(size=(2, 5, 7)).astype(np.float16)
    s = observe(FeatureLayout("rows"), x[:1], x[1:]).stats
    flat = x.astype(np.float64).reshape(-1, 7)
    assert s.count == 10 and s.features == 7
    np.testing.assert_allclose(s.mean, flat.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(s.gram, flat.T @ flat / 10, rtol=1e-12)
    np.testing.assert_allclose(s.covariance(), np.cov(flat.T, bias=True), atol=1e-12)


def test_over_the_gram_limit_only_the_mean_and_square_mean_are_kept():
    x = rng(8).normal(size=(40, 12))
    big = FeatureStatsObserver(FeatureLayout("rows"), max_gram_features=11).update(x[:25]).update(x[25:])
    s = big.stats
    assert s.gram is None and big.outer is None
    np.testing.assert_allclose(s.mean, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(s.meansq, (x ** 2).mean(axis=0), rtol=1e-12)
    full = observe(FeatureLayout("rows"), x).stats
    np.testing.assert_allclose(full.meansq, np.diag(full.gram), rtol=1e-12)
    w, b = rng(9).normal(size=(3, 12)), rng(10).normal(size=3)
    kept = np.array([0, 1, 4, 7, 9])
    for got, want in zip(refit(w, b, kept, s, "lstsq"), refit(w, b, kept, full, "bias")):
        np.testing.assert_allclose(got, want, rtol=1e-12)  # without the Gram, lstsq is the bias refit


def test_nonfinite_rows_are_skipped():
    x = rng(8).normal(size=(6, 4))
    y = x.copy()
    y[2, 1], y[4, 3] = np.nan, np.inf
    obs = observe(FeatureLayout("rows"), y)
    assert (obs.count, obs.nonfinite) == (4, 2)
    assert_stats_close(obs.stats, observe(FeatureLayout("rows"), x[[0, 1, 3, 5]]).stats)


@pytest.mark.parametrize("layout,x,message", [
    (FeatureLayout("conv", (3, 3)), np.zeros((1, 2, 5)), r"needs a 4-D input \[N, C, ...\], got shape \[1, 2, 5\]"),
    (FeatureLayout("conv", (3, 3), dilations=(2, 1)), np.zeros((1, 2, 4, 4)), "smaller than the dilated kernel"),
    (FeatureLayout("conv", (1, 1), group=2), np.zeros((1, 3, 4, 4)), "3 channels do not split into 2 groups"),
    (FeatureLayout("rows"), np.zeros(()), "needs a last axis of features"),
    (FeatureLayout("rows"), np.array(["a"]), "expected a numeric tensor"),
])
def test_bad_inputs_name_the_tensor(layout, x, message):
    obs = FeatureStatsObserver(layout, name="act_7")
    with pytest.raises(CompileError, match=f"feature stats of 'act_7': .*{message}"):
        obs.update(x)


def test_feature_count_is_fixed_by_the_first_update():
    obs = observe(FeatureLayout("conv", (3, 3), pads=(1, 1, 1, 1)), np.zeros((1, 2, 4, 4)))
    with pytest.raises(CompileError, match="27 features per row .* expected 18"):
        obs.update(np.zeros((1, 3, 4, 4)))
    with pytest.raises(CompileError, match="no finite rows observed"):
        FeatureStatsObserver(FeatureLayout("rows")).stats


@pytest.mark.parametrize("kwargs,message", [
    (dict(kind="dense"), "unknown kind 'dense'"),
    (dict(kind="conv"), "empty kernel"),
    (dict(kind="conv", kernel=(3, 3), pads=(1, 1)), r"pads \(1, 1\) has 2 values, expected 4"),
    (dict(kind="conv", kernel=(3, 0)), "kernel must be integers >= 1"),
    (dict(kind="conv", kernel=(3,), pads=(-1, 0)), "pads must be integers >= 0"),
    (dict(kind="rows", kernel=(3,)), "'rows' takes no kernel"),
])
def test_bad_layouts(kwargs, message):
    with pytest.raises(CompileError, match=message):
        FeatureLayout(**kwargs)


# ---- refit --------------------------------------------------------------------------------


def correlated_rows(n=4000, f=12, seed=9):
    """Rows with correlated features, non-zero means and unequal scales."""
    r = rng(seed)
    mix = r.normal(size=(f, f)) * 0.5 + np.eye(f)
    x = r.normal(size=(n, f)) @ mix + r.normal(size=f) * 2
    return np.maximum(x, 0) + 0.1 * x  # a little non-linearity, like a leaky activation


def rows_stats(x) -> InputStats:
    return observe(FeatureLayout("rows"), x).stats


def sample_error(w, b, kept, w2, b2, x):
    return np.mean(np.sum((x @ w.T + b - (x[:, kept] @ w2.T + b2)) ** 2, axis=1))


def test_lstsq_is_exact_when_removed_features_are_linear_in_kept_ones():
    r = rng(10)
    base = r.normal(size=(3000, 6)) * r.uniform(0.5, 3, size=6) + r.normal(size=6)
    mix = r.normal(size=(6, 3))
    x = np.concatenate([base, base @ mix + np.array([1.5, -2.0, 0.3])], axis=1)  # 3 affine features
    perm = r.permutation(9)
    x = x[:, perm]
    kept = np.sort(np.argsort(perm)[:6])  # where the base columns went
    w, b = r.normal(size=(5, 9)), r.normal(size=5)
    s = rows_stats(x)
    w2, b2 = refit(w, b, kept, s, "lstsq")
    assert w2.shape == (5, 6) and b2.shape == (5,)
    np.testing.assert_allclose(x[:, kept] @ w2.T + b2, x @ w.T + b, atol=1e-8, rtol=0)


def test_bias_mode_removes_the_mean_error():
    x = correlated_rows()
    r = rng(11)
    w, b = r.normal(size=(4, 12)), r.normal(size=4)
    kept = np.array([0, 2, 3, 5, 8, 9, 11])
    w2, b2 = refit(w, b, kept, rows_stats(x), "bias")
    np.testing.assert_array_equal(w2, w[:, kept])
    mean_err = np.mean(x @ w.T + b - (x[:, kept] @ w2.T + b2), axis=0)
    assert np.abs(mean_err).max() < 1e-9
    wn, bn = refit(w, b, kept, rows_stats(x), "none")
    assert np.abs(np.mean(x @ w.T + b - (x[:, kept] @ wn.T + bn), axis=0)).max() > 0.1


@pytest.mark.parametrize("seed", range(4))
def test_lstsq_beats_bias_beats_none(seed):
    x = correlated_rows(seed=seed)
    r = rng(100 + seed)
    w, b = r.normal(size=(6, 12)), r.normal(size=6)
    kept = np.sort(r.choice(12, 8, replace=False))
    s = rows_stats(x)
    errors = {}
    for mode in ("none", "bias", "lstsq"):
        w2, b2 = refit(w, b, kept, s, mode)
        errors[mode] = sample_error(w, b, kept, w2, b2, x)
        # the closed form from the statistics is the error over the calibration rows
        assert output_error(w, b, kept, w2, b2, s) == pytest.approx(errors[mode], rel=1e-9, abs=1e-9)
    assert errors["lstsq"] < errors["bias"] < errors["none"]
    assert errors["lstsq"] < 0.8 * errors["bias"]


def test_keeping_everything_is_the_identity():
    x = correlated_rows(f=7)
    r = rng(12)
    w, b = r.normal(size=(3, 7)), r.normal(size=3)
    for mode in ("none", "bias", "lstsq"):
        w2, b2 = refit(w, b, np.arange(7), rows_stats(x), mode)
        np.testing.assert_array_equal(w2, w)
        np.testing.assert_array_equal(b2, b)
    w2, b2 = refit(w, None, np.arange(7), None, "none")
    np.testing.assert_array_equal(b2, np.zeros(3))


def test_keeping_nothing_leaves_the_mean():
    x = correlated_rows(f=5)
    w = rng(13).normal(size=(2, 5))
    for mode in ("bias", "lstsq"):
        w2, b2 = refit(w, None, np.array([], dtype=np.int64), rows_stats(x), mode)
        assert w2.shape == (2, 0)
        np.testing.assert_allclose(b2, w @ x.mean(axis=0), rtol=1e-12)


def test_singular_and_few_rows_never_worse_than_bias():
    r = rng(14)
    x = correlated_rows(n=500, f=10)
    x[:, 3] = 0.0  # a dead channel
    x[:, 6] = x[:, 1]  # a duplicated one
    w, b = r.normal(size=(4, 10)), r.normal(size=4)
    kept = np.array([0, 1, 3, 4, 6, 7, 9])
    for rows in (x, x[:20]):  # 20 rows < 4 * (7 + 1): damped fit
        s = rows_stats(rows)
        w2, b2 = refit(w, b, kept, s, "lstsq")
        assert np.all(np.isfinite(w2)) and np.all(np.isfinite(b2))
        e_lstsq = sample_error(w, b, kept, w2, b2, rows)
        e_bias = sample_error(w, b, kept, *refit(w, b, kept, s, "bias"), rows)
        assert e_lstsq <= e_bias + 1e-9
    # A huge ridge is "bias" mode, never a zeroed weight.
    s = rows_stats(x)
    np.testing.assert_allclose(refit(w, b, kept, s, "lstsq", damp=1e12)[1], refit(w, b, kept, s, "bias")[1],
                               rtol=1e-6)


def test_constant_kept_features_fall_back_to_bias():
    x = np.ones((50, 4)) * np.array([1.0, 2.0, 0.0, 0.0])
    x[:, 2:] = rng(15).normal(size=(50, 2))
    w = rng(16).normal(size=(2, 4))
    s = rows_stats(x)
    for a, b in zip(refit(w, None, np.array([0, 1]), s, "lstsq"), refit(w, None, np.array([0, 1]), s, "bias")):
        np.testing.assert_array_equal(a, b)


def test_constant_kept_feature_keeps_its_weight():
    """A dead channel with a bias (a constant, not zero) must not soak up rounding noise."""
    x = correlated_rows(n=2000, f=8, seed=18)
    x[:, 2] = 3.7
    w, b = rng(19).normal(size=(3, 8)), rng(20).normal(size=3)
    kept = np.array([0, 1, 2, 4, 6])
    w2, _ = refit(w, b, kept, rows_stats(x), "lstsq")
    np.testing.assert_array_equal(w2[:, 2], w[:, 2])


def test_lstsq_does_not_depend_on_feature_scales():
    """Rescaling input feature i by s_i (e.g. by equalization upstream) rescales its refit
    weight column by 1/s_i and changes nothing else."""
    x = correlated_rows(f=9, seed=21)
    scales = rng(22).uniform(1e-3, 1e3, size=9)
    w, b = rng(23).normal(size=(4, 9)), rng(24).normal(size=4)
    kept = np.array([1, 2, 4, 5, 7])
    w_a, b_a = refit(w, b, kept, rows_stats(x[:20]), "lstsq")  # few rows: the ridge matters
    w_b, b_b = refit(w / scales, b, kept, rows_stats(x[:20] * scales), "lstsq")
    np.testing.assert_allclose(w_b * scales[kept], w_a, rtol=1e-7)
    np.testing.assert_allclose(b_b, b_a, rtol=1e-7)


@pytest.mark.parametrize("args,message", [
    ((np.zeros(4), None, [0], None, "none"), r"weight must be 2-D \[O, F\]"),
    ((np.zeros((2, 4)), np.zeros(3), [0], None, "none"), r"bias shape \[3\] does not match 2 outputs"),
    ((np.zeros((2, 4)), None, [2, 1], None, "none"), "sorted, unique and within 0..3"),
    ((np.zeros((2, 4)), None, [0, 4], None, "none"), "sorted, unique and within 0..3"),
    ((np.zeros((2, 4)), None, [0.5], None, "none"), "1-D array of feature indices"),
    ((np.zeros((2, 4)), None, [0], None, "ols"), "unknown mode 'ols'"),
    ((np.zeros((2, 4)), None, [0], None, "lstsq"), "mode 'lstsq' needs input statistics"),
    ((np.zeros((2, 4)), None, [0], InputStats(1, np.zeros(3), np.zeros((3, 3))), "bias"),
     "statistics of 3 features for a weight of 4"),
])
def test_refit_errors(args, message):
    with pytest.raises(CompileError, match=f"refit of 'conv_2': .*{message}"):
        refit(*args, where="conv_2")


# ---- end to end in onnxruntime ------------------------------------------------------------


def two_convs(w1, b1, w2, b2):
    """x -> Conv(w1, pad 1) -> Relu (exposed as 'act') -> Conv(w2, stride 2, pad 1) -> y."""
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"),
                                                                           (b2, "b2"))]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["act"]),
        helper.make_node("Conv", ["act", "w2", "b2"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1]),
    ]
    f = TensorProto.FLOAT
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, ["N", w1.shape[1], 12, 12])],
                              [helper.make_tensor_value_info("y", f, None),
                               helper.make_tensor_value_info("act", f, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model, feeds):
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [sess.run(None, {"x": x}) for x in feeds]


def test_end_to_end_refit_of_the_next_conv_in_onnxruntime():
    r = rng(17)
    c_in, c_mid, c_out = 3, 16, 8
    w1, b1 = r.normal(size=(c_mid, c_in, 3, 3)) * 0.4, r.normal(size=c_mid) * 0.2
    w2, b2 = r.normal(size=(c_out, c_mid, 3, 3)) * 0.2, r.normal(size=c_out) * 0.1
    feeds = [r.normal(size=(4, c_in, 12, 12)).astype(np.float32) for _ in range(3)]
    float_model = two_convs(w1, b1, w2, b2)
    reference = run(float_model, feeds)

    obs = FeatureStatsObserver(FeatureLayout("conv", (3, 3), (2, 2), (1, 1, 1, 1)), name="act")
    for y, act in reference:
        obs.update(act)
    stats = obs.stats

    keep_channels = np.sort(np.argsort(-np.abs(w1).sum(axis=(1, 2, 3)))[:c_mid * 3 // 4])  # drop 25%
    kept = (keep_channels[:, None] * 9 + np.arange(9)).ravel()  # a channel is its 9 kernel taps
    errors, predicted = {}, {}
    for mode in ("none", "bias", "lstsq"):
        w2k, b2k = refit(w2.reshape(c_out, -1), b2, kept, stats, mode)
        pruned = two_convs(w1[keep_channels], b1[keep_channels], w2k.reshape(c_out, len(keep_channels), 3, 3), b2k)
        outs = run(pruned, feeds)
        diff = np.concatenate([(o[0] - ref[0]).transpose(0, 2, 3, 1).reshape(-1, c_out)
                               for o, ref in zip(outs, reference)])
        errors[mode] = float(np.mean(np.sum(diff.astype(np.float64) ** 2, axis=1)))
        predicted[mode] = output_error(w2.reshape(c_out, -1), b2, kept, w2k, b2k, stats)
    for mode in errors:  # the statistics predict what onnxruntime measures (float32 rounding aside)
        assert errors[mode] == pytest.approx(predicted[mode], rel=1e-3, abs=1e-6)
    assert errors["lstsq"] < errors["bias"] < errors["none"]
    assert errors["lstsq"] < 0.9 * errors["bias"]
