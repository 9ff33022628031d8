"""SmoothQuant (rewrites/smooth_quant.py, compiler/smooth_quant.py): the pass keeps the float
outputs in onnxruntime for each kind of producer, s follows the formula, groups whose
activation another op reads are refused, the per-layer alpha choice finds the known best,
the reservoir stays bounded, the compile option helps a model with activation outliers, and
misuse gets exact messages."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import ir
from calibration.table import CalibrationTable
from compiler.api import compile
from compiler.cli import main
from compiler.smooth_quant import GRID, RowObserver, choose_alpha, w8a8_error
from ir import CompileError
from rewrites.qdq import plan
from rewrites.smooth_quant import EPS, SmoothQuant, smooth_groups, smoothing_scales

K = 8


def make(nodes, inits, x_shape=(2, 5, K), outputs=(("y", None),), opset=17, extra_inputs=()):
    """A float model with input x; `inits` are (name, array) pairs."""
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape)), *extra_inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        [numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def rand(*shape, seed=0, scale=1.0):
    return np.random.default_rng(seed + sum(shape)).normal(0, scale, shape).astype(np.float32)


def run(proto_or_model, x):
    proto = ir.to_proto(proto_or_model) if isinstance(proto_or_model, ir.Model) else proto_or_model
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def smoothed(proto, act_max, **kw):
    """(the smoothed IR model, the pass result)."""
    model = ir.load(proto)
    return model, SmoothQuant(act_max=act_max, **kw).run(model)


def init(model, name_prefix):
    """The array of the one initializer whose name starts with `name_prefix`."""
    found = [v for n, v in model.graph.initializers.items() if n.startswith(name_prefix)]
    assert len(found) == 1, [n for n in model.graph.initializers]
    return found[0].tensor.numpy()


def assert_same_outputs(a, b, x, rtol=1e-5, atol=1e-5):
    for ya, yb in zip(run(a, x), run(b, x)):
        np.testing.assert_allclose(ya, yb, rtol=rtol, atol=atol)


X = rand(2, 5, K, seed=1)
ACT_MAX = np.linspace(0.5, 40.0, K)  # one channel much larger than the rest


# ---- the maths ------------------------------------------------------------------------------


def test_scales_follow_the_formula():
    a = np.array([4.0, 1.0, 100.0, 0.25])
    w = np.array([0.5, 2.0, 0.1, 1.0])
    for alpha in (0.0, 0.3, 0.5, 0.8, 1.0):
        np.testing.assert_allclose(smoothing_scales(a, w, alpha), a ** alpha / w ** (1 - alpha), rtol=1e-15)
    assert smoothing_scales([9.0], [4.0], 0.5)[0] == pytest.approx(1.5)
    # Dead channels and zero weight rows are floored, never divided by.
    s = smoothing_scales([0.0, 1.0], [1.0, 0.0], 0.5)
    np.testing.assert_allclose(s, [EPS ** 0.5, 1 / EPS ** 0.5])


# ---- exact in float -------------------------------------------------------------------------


def layernorm_matmul():
    gamma, beta, w = rand(K, seed=2) + 2, rand(K, seed=3), rand(K, 6, seed=4)
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="ln", axis=-1),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="mm")]
    return make(nodes, [("gamma", gamma), ("beta", beta), ("w", w)]), gamma, beta, w


def test_layernorm_matmul_keeps_outputs_and_scales_gamma_beta_and_rows():
    proto, gamma, beta, w = layernorm_matmul()
    model, result = smoothed(proto, {"h": ACT_MAX}, alpha=0.5)
    assert result.changed and result.log.by_rule() == {"smooth-quant": 1}
    s = ACT_MAX ** 0.5 / np.abs(w).max(axis=1) ** 0.5
    np.testing.assert_allclose(init(model, "gamma"), gamma / s, rtol=1e-6)
    np.testing.assert_allclose(init(model, "beta"), beta / s, rtol=1e-6)
    np.testing.assert_allclose(init(model, "w"), w * s[:, None], rtol=1e-6)
    assert set(model.graph.initializers) == {"gamma_smoothed", "beta_smoothed", "w_smoothed"}
    assert_same_outputs(proto, model, X)


def test_qkv_projections_share_one_scale_from_all_their_weights():
    gamma, wq, wk, wv = rand(K, seed=5) + 2, rand(K, 4, seed=6), rand(K, 4, seed=7), rand(K, 4, seed=8, scale=3)
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma"], ["h"], name="ln"),
             helper.make_node("MatMul", ["h", "wq"], ["q"], name="q"),
             helper.make_node("MatMul", ["h", "wk"], ["k"], name="k"),
             helper.make_node("MatMul", ["h", "wv"], ["v"], name="v")]
    proto = make(nodes, [("gamma", gamma), ("wq", wq), ("wk", wk), ("wv", wv)],
                 outputs=(("q", None), ("k", None), ("v", None)))
    groups, _ = smooth_groups(ir.load(proto))
    assert [(g.x.name, [n.name for n in g.consumers]) for g in groups] == [("h", ["q", "k", "v"])]
    model, result = smoothed(proto, {"h": ACT_MAX}, alpha=0.6)
    w_max = np.abs(np.concatenate([wq, wk, wv], axis=1)).max(axis=1)
    s = ACT_MAX ** 0.6 / w_max ** 0.4
    for name, w in (("wq", wq), ("wk", wk), ("wv", wv)):
        np.testing.assert_allclose(init(model, name), w * s[:, None], rtol=1e-6)
    np.testing.assert_allclose(init(model, "gamma"), gamma / s, rtol=1e-6)
    assert "1 reader" not in str(list(result.log)) and "3 reader(s)" in str(list(result.log))
    assert_same_outputs(proto, model, X)


def test_matmul_add_matmul_folds_into_the_first_weight_columns_and_bias():
    w1, b1, w2 = rand(K, K, seed=9), rand(K, seed=10), rand(K, 3, seed=11)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m"], name="mm1"),
             helper.make_node("Add", ["b1", "m"], ["h"], name="bias"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2")]
    proto = make(nodes, [("w1", w1), ("b1", b1), ("w2", w2)])
    model, result = smoothed(proto, {"h": ACT_MAX}, alpha=0.5)
    s = smoothing_scales(ACT_MAX, np.abs(w2).max(axis=1), 0.5)
    np.testing.assert_allclose(init(model, "w1"), w1 / s[None, :], rtol=1e-6)
    np.testing.assert_allclose(init(model, "b1"), b1 / s, rtol=1e-6)
    np.testing.assert_allclose(init(model, "w2"), w2 * s[:, None], rtol=1e-6)
    # x itself (a graph input) has no producer: refused and logged, nothing else.
    assert [(c.kind, c.target, c.detail) for c in result.log if c.kind == "refuse"] == \
        [("refuse", "%x", "a graph input or constant: no producer to fold 1/s into")]
    assert_same_outputs(proto, model, X)


def test_gemm_transposed_weights_and_per_channel_mul():
    w1, c1, w2, c2 = rand(K, 6, seed=12), rand(K, seed=13), rand(3, K, seed=14), rand(K, seed=15) + 3
    nodes = [helper.make_node("Gemm", ["x", "w1", "c1"], ["g"], name="g1", transB=1),  # w1 [K, 6]^T
             helper.make_node("Mul", ["g", "c2"], ["h"], name="scale"),
             helper.make_node("Gemm", ["h", "w2"], ["y"], name="g2", transB=1)]
    proto = make(nodes, [("w1", w1), ("c1", c1), ("w2", w2), ("c2", c2)], x_shape=(4, 6), outputs=(("y", None),))
    xs = rand(4, 6, seed=16)
    model, result = smoothed(proto, {"h": ACT_MAX, "g": ACT_MAX[::-1].copy()}, alpha=0.5)
    # g feeds no linear layer, so its statistics are unused; h's producer is the per-channel Mul.
    assert result.log.by_rule() == {"smooth-quant": 1}
    s = smoothing_scales(ACT_MAX, np.abs(w2).max(axis=0), 0.5)
    np.testing.assert_allclose(init(model, "c2"), c2 / s, rtol=1e-6)
    np.testing.assert_allclose(init(model, "w2"), w2 * s[None, :], rtol=1e-6)
    assert_same_outputs(proto, model, xs)


def test_gemm_producer_with_bias_into_transposed_gemm():
    w1, c1, w2 = rand(6, K, seed=26), rand(1, K, seed=27), rand(3, K, seed=28)
    nodes = [helper.make_node("Gemm", ["x", "w1", "c1"], ["h"], name="g1", alpha=0.5, beta=2.0),
             helper.make_node("Gemm", ["h", "w2"], ["y"], name="g2", transB=1)]
    proto = make(nodes, [("w1", w1), ("c1", c1), ("w2", w2)], x_shape=(4, 6))
    xs = rand(4, 6, seed=29)
    model, result = smoothed(proto, {"h": ACT_MAX}, alpha=0.3)
    s = smoothing_scales(ACT_MAX, np.abs(w2).max(axis=0), 0.3)
    np.testing.assert_allclose(init(model, "w1"), w1 / s[None, :], rtol=1e-6)
    np.testing.assert_allclose(init(model, "c1"), c1 / s[None, :], rtol=1e-6)
    np.testing.assert_allclose(init(model, "w2"), w2 * s[None, :], rtol=1e-6)
    assert_same_outputs(proto, model, xs)


def test_decomposed_layernorm_with_a_shape_reader():
    """x * gamma + beta (LayerNorm below opset 17, as Paddle exports it); a Shape reading the
    activation sees nothing change."""
    gamma, beta, w = rand(K, seed=17) + 2, rand(K, seed=18), rand(K, 4, seed=19)
    nodes = [helper.make_node("Mul", ["x", "gamma"], ["m"], name="mul"),
             helper.make_node("Add", ["m", "beta"], ["h"], name="add"),
             helper.make_node("Shape", ["h"], ["shape"], name="shape"),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="mm")]
    proto = make(nodes, [("gamma", gamma), ("beta", beta), ("w", w)], opset=13)
    proto.graph.output.append(helper.make_tensor_value_info("shape", TensorProto.INT64, [3]))
    model, result = smoothed(proto, {"h": ACT_MAX}, alpha=0.5)
    assert result.log.by_rule() == {"smooth-quant": 1}
    s = smoothing_scales(ACT_MAX, np.abs(w).max(axis=1), 0.5)
    np.testing.assert_allclose(init(model, "gamma"), gamma / s, rtol=1e-6)
    np.testing.assert_allclose(init(model, "beta"), beta / s, rtol=1e-6)
    assert_same_outputs(proto, model, X)


# ---- refusals -------------------------------------------------------------------------------


def refused(proto, act_max):
    model, result = smoothed(proto, act_max)
    assert not result.changed and result.log.by_rule() == {}
    assert_same_outputs(proto, model, X)
    return [(c.target, c.detail) for c in result.log if c.kind == "refuse"]


def test_refuses_a_layernorm_whose_output_a_residual_add_also_reads():
    gamma, w = rand(K, seed=20) + 2, rand(K, K, seed=21)
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma"], ["h"], name="ln"),
             helper.make_node("MatMul", ["h", "w"], ["m"], name="mm"),
             helper.make_node("Add", ["h", "m"], ["y"], name="residual")]
    proto = make(nodes, [("gamma", gamma), ("w", w)])
    assert refused(proto, {"h": ACT_MAX}) == [("%h", "also read by Add 'residual', which would see the change")]


def test_refuses_graph_outputs_scalar_muls_and_shared_linear_outputs():
    gamma, w = rand(K, seed=22) + 2, rand(K, 4, seed=23)
    out = [helper.make_node("LayerNormalization", ["x", "gamma"], ["h"], name="ln"),
           helper.make_node("MatMul", ["h", "w"], ["y"], name="mm")]
    proto = make(out, [("gamma", gamma), ("w", w)], outputs=(("y", None), ("h", None)))
    assert refused(proto, {"h": ACT_MAX})[-1] == ("%h", "a graph output, which would see the change")

    scalar = [helper.make_node("Mul", ["x", "half"], ["h"], name="half"),
              helper.make_node("MatMul", ["h", "w"], ["y"], name="mm")]
    proto = make(scalar, [("half", np.float32(0.5)), ("w", w)])
    assert refused(proto, {"h": ACT_MAX})[-1] == (
        "%h", "produced by Mul 'half': its constant is not per channel (a scalar Mul stays a free rescale "
              "when quantized)")

    w1 = rand(K, K, seed=24)
    shared = [helper.make_node("MatMul", ["x", "w1"], ["m"], name="mm1"),
              helper.make_node("Add", ["m", "b"], ["h"], name="bias"),
              helper.make_node("MatMul", ["h", "w"], ["y"], name="mm2"),
              helper.make_node("Relu", ["m"], ["r"], name="relu")]
    proto = make(shared, [("w1", w1), ("b", rand(K, seed=25)), ("w", w)], outputs=(("y", None), ("r", None)))
    assert refused(proto, {"h": ACT_MAX})[-1] == ("%h", "produced by Add 'bias': its other operand has other readers")


def test_groups_without_statistics_or_with_alpha_none_are_left():
    proto, *_ = layernorm_matmul()
    _, result = smoothed(proto, {})
    assert not result.changed
    _, result = smoothed(proto, {"h": ACT_MAX}, alphas={"h": None})
    assert not result.changed and [(c.kind, c.target) for c in result.log if c.kind == "keep"] == [("keep", "%h")]


# ---- alpha choice and the reservoir ----------------------------------------------------------


def outlier_case(m=(127.0, 1.0), rows=64):
    """X channels take 0 or m_j, W is +-1: at alpha 1, s = m, X/s is 0 or 1 and s W has
    entries +-127 and +-1 with scale 1, so W8A8 is exact there and nowhere else on the grid;
    unsmoothed, channel 1's 1 rounds to 2 steps of 127/255."""
    rng = np.random.default_rng(0)
    x = (rng.integers(0, 2, (rows, 2)) * np.array(m)).astype(np.float32)
    x[rng.random(rows) < 0.9, 0] = 0  # mostly channel 1 makes the output: its rounding shows
    x[0] = m  # every channel reaches its max
    w = np.where(rng.integers(0, 2, (2, 5)) > 0, 1.0, -1.0).astype(np.float32)
    w[:, 0] = 1.0
    proto = make([helper.make_node("LayerNormalization", ["x", "gamma"], ["h"], name="ln"),
                  helper.make_node("MatMul", ["h", "w"], ["y"], name="mm")],
                 [("gamma", np.ones(2)), ("w", w)], x_shape=(rows, 2))
    group = smooth_groups(ir.load(proto))[0][0]
    obs = RowObserver(2, rows)
    obs.update(x)
    return group, obs


def test_alpha_choice_finds_the_exact_case():
    group, obs = outlier_case()
    alpha, err, plain = choose_alpha(group, obs)
    assert alpha == 1.0 and err < 1e-12 and plain > 1e-9
    errors = [w8a8_error(obs.sample, [np.asarray(group.consumers[0].inputs[1].const.numpy(), np.float64)],
                         smoothing_scales(obs.absmax, group.weight_max(), a), obs.minmax.min, obs.minmax.max)
              for a in GRID]
    assert int(np.argmin(errors)) == GRID.index(1.0) and sorted(errors)[1] > 1e-9


def test_alpha_choice_keeps_a_group_nothing_improves():
    group, obs = outlier_case(m=(1.0, 1.0))  # s = 1 for every alpha: no alpha beats leaving it
    alpha, err, plain = choose_alpha(group, obs)
    assert alpha is None and err == plain


def test_reservoir_is_bounded_uniform_and_seeded():
    rows = np.repeat(np.arange(10000, dtype=np.float32)[:, None], 2, axis=1)  # row i is (i, i)
    a, b = RowObserver(2, 64), RowObserver(2, 64)
    for chunk in np.split(rows, 50):
        a.update(chunk[None])  # [1, 200, 2]
        b.update(chunk[None])
    assert a.sample.shape == (64, 2) and a.seen == 10000
    np.testing.assert_array_equal(a.sample, b.sample)
    np.testing.assert_array_equal(a.absmax, [9999, 9999])
    # Drawn from the whole stream, not its start: most rows come from after the first 5000.
    assert np.mean(a.sample[:, 0] >= 5000) > 0.3
    with pytest.raises(CompileError, match=r"^smooth-quant: activation of shape \[4, 3\], expected 2 channels "
                                           r"on the last axis$"):
        a.update(np.zeros((4, 3)))


# ---- the compile option ----------------------------------------------------------------------


def outlier_mlp(d=32, seq=16, outliers=(3, 17), scale=40.0):
    """LayerNorm -> MatMul -> Relu -> MatMul whose LayerNorm output has a few channels `scale`
    times larger, undone in the next weight rows (a transformer's activation outliers)."""
    rng = np.random.default_rng(7)
    gamma = rng.uniform(0.5, 1.5, d).astype(np.float32)
    beta = rng.normal(0, 0.1, d).astype(np.float32)
    w1 = rng.normal(0, d ** -0.5, (d, 64)).astype(np.float32)
    gamma[list(outliers)] *= scale
    beta[list(outliers)] *= scale
    w1[list(outliers)] /= scale
    w2 = rng.normal(0, 0.125, (64, 8)).astype(np.float32)
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="ln"),
             helper.make_node("MatMul", ["h", "w1"], ["m"], name="fc1"),
             helper.make_node("Relu", ["m"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    return make(nodes, [("gamma", gamma), ("beta", beta), ("w1", w1), ("w2", w2)], x_shape=(1, seq, d))


def mlp_feeds(n, seed):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (1, 16, 32)).astype(np.float32)} for _ in range(n)]


def test_compile_smooth_quant_recovers_the_outlier_loss():
    proto, calib, feeds = outlier_mlp(), mlp_feeds(24, 1), mlp_feeds(4, 2)
    kw = dict(quantize="int8", calibration=calib, feeds=feeds, min_cosine=0.0, calibration_method="minmax")
    plain = compile(proto, **kw).report
    half = compile(proto, smooth_quant=0.5, **kw).report
    auto = compile(proto, smooth_quant="auto", **kw)
    cos = lambda r: min(o.cosine for o in r.verification.outputs)  # noqa: E731
    assert cos(plain) < 0.999 < cos(half) and cos(auto.report) > 0.999
    for report in (half, auto.report):
        rec = next(r for r in report.records if r.name == "smooth-quant")
        assert rec.log.by_rule() == {"smooth-quant": 1}
        assert "2 of 2 Conv/MatMul/Gemm" in str(report.integer_kernels)
    rec = next(r for r in auto.report.records if r.name == "smooth-quant")
    [choice] = [c for c in rec.log if c.kind == "choose"]
    assert choice.target == "%h" and choice.detail.startswith("alpha ")
    # Placement: smoothing runs after the optimize pipeline and before calibration.
    names = [r.name for r in auto.report.records]
    assert names.index("smooth-quant") < names.index("calibrate") and names.index("fuse") < names.index("smooth-quant")


def test_compile_option_errors():
    proto, calib = outlier_mlp(), mlp_feeds(8, 1)
    cases = [
        (dict(quantize="int8", calibration=calib, smooth_quant=1.5),
         "smooth_quant must be a number in [0, 1] or 'auto', got 1.5"),
        (dict(quantize="int8", calibration=calib, smooth_quant="half"),
         "smooth_quant must be a number in [0, 1] or 'auto', got 'half'"),
        (dict(quantize="int8", calibration=calib, smooth_quant=True),
         "smooth_quant must be a number in [0, 1] or 'auto', got True"),
        (dict(smooth_quant=0.5),
         "smooth_quant prepares a model for int8 quantization: it needs quantize='int8'"),
        (dict(quantize="int8", calibration_table=CalibrationTable(), smooth_quant="auto"),
         "smooth_quant needs calibration data (it measures activations), not only a calibration table"),
    ]
    for kwargs, message in cases:
        with pytest.raises(CompileError) as e:
            compile(proto, **kwargs)
        assert str(e.value) == message


def test_pass_errors():
    with pytest.raises(CompileError) as e:
        SmoothQuant(alpha=2)
    assert str(e.value) == "smooth-quant: alpha must be a number in [0, 1], got 2"
    with pytest.raises(CompileError) as e:
        SmoothQuant(alphas={"h": -0.1})
    assert str(e.value) == "smooth-quant: alpha of 'h' must be a number in [0, 1], got -0.1"
    proto, *_ = layernorm_matmul()
    with pytest.raises(CompileError) as e:
        smoothed(proto, {"h": np.ones(K - 1)})
    assert str(e.value) == "smooth-quant: max|X| of 'h' has shape [7], its readers' weights have 8 input channels"
    with pytest.raises(CompileError) as e:
        smoothed(proto, {"h": np.full(K, np.nan)})
    assert str(e.value) == "smooth-quant: max|X| of 'h' must be finite and non-negative"


def test_cli_flag(tmp_path, capsys):
    proto = outlier_mlp()
    src, calib = tmp_path / "m.onnx", tmp_path / "calib"
    onnx.save(proto, src)
    calib.mkdir()
    for i, feed in enumerate(mlp_feeds(8, 1)):
        np.savez(calib / f"{i}.npz", **feed)
    out = tmp_path / "q.onnx"
    assert main(["compile", str(src), "-o", str(out), "--quantize", "int8", "--calib", str(calib),
                 "--smooth-quant", "--min-cosine", "0"]) == 0
    assert "smooth-quant" in capsys.readouterr().out and out.exists()
    assert main(["compile", str(src), "-o", str(out), "--smooth-quant", "0.5"]) == 2
    assert capsys.readouterr().err.strip() == "onnxcc: error: --smooth-quant needs --quantize int8"
    assert main(["compile", str(src), "-o", str(out), "--quantize", "int8", "--smooth-quant", "lots"]) == 2
    assert "expected a number in [0, 1] or 'auto', got 'lots'" in capsys.readouterr().err


# ---- QDQ: a weighted op reading a rescaled tensor (GELU's trailing * 0.5) ----------------------


def test_quantize_matmul_reading_a_rescaled_tensor():
    w1, w2 = rand(K, K, seed=30), rand(K, 4, seed=31)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
             helper.make_node("Add", ["a", "a"], ["sq"], name="double"),
             helper.make_node("Mul", ["sq", "half"], ["h"], name="half"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2")]
    proto = make(nodes, [("w1", w1), ("half", np.float32(0.5)), ("w2", w2)])
    model = ir.load(proto)
    p = plan(model)
    assert p.scaled == {"h": ("sq", 0.5)} and p.weighted == ["mm1", "mm2"]
    r = compile(proto, quantize="int8", calibration=[{"x": rand(2, 5, K, seed=i)} for i in range(10)],
                feeds=[{"x": X}], min_cosine=0.0)
    assert min(o.cosine for o in r.report.verification.outputs) > 0.99
    assert "2 of 2 Conv/MatMul/Gemm" in str(r.report.integer_kernels)


# ---- a torch transformer export (bench/transformer.py) -----------------------------------------


@pytest.mark.slow
def test_torch_transformer_with_outliers(tmp_path):
    pytest.importorskip("torch", reason="torch is not installed: the export tests need it")
    from bench.transformer import export_transformer, transformer_feeds

    size = dict(layers=1, d_model=32, heads=2, ffn=64, seq=8, vocab=50)
    plain = export_transformer(tmp_path / "plain.onnx", **size)
    outliers = export_transformer(tmp_path / "outliers.onnx", outliers=True, **size)
    feeds = transformer_feeds(4, seed=1, seq=8, vocab=50)
    for feed in feeds:  # the outliers are undone in the next weights: the same function
        np.testing.assert_allclose(run_feed(outliers, feed), run_feed(plain, feed), rtol=1e-4, atol=1e-5)
    kw = dict(quantize="int8", calibration=transformer_feeds(16, seed=0, seq=8, vocab=50), feeds=feeds,
              min_cosine=0.0)
    cos = lambda r: min(o.cosine for o in r.report.verification.outputs)  # noqa: E731
    before, after = compile(str(outliers), **kw), compile(str(outliers), smooth_quant=0.5, **kw)
    rec = next(r for r in after.report.records if r.name == "smooth-quant")
    assert rec.log.by_rule() == {"smooth-quant": 3}  # ln1 -> Q/K/V, ln2 -> fc1, final ln -> head
    assert "3 reader(s)" in " ".join(c.detail for c in rec.log)
    assert cos(before) < 0.995 < 0.999 < cos(after)


def run_feed(path, feed):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)[0]
