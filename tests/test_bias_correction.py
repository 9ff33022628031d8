"""Bias correction (rewrites/bias_correction.py, compiler/recovery.py): the Gaussian
expectations of activations against closed forms and Monte Carlo, the mean shift against
onnxruntime, the pass removing the mean error it targets, BatchNorm statistics tied through the
optimize pipeline, and the options' errors."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import compiler
import ir
from calibration.gram import FeatureStatsObserver
from calibration.scales import dequantize, quantize, weight_params
from compiler.cli import main
from compiler.pass_manager import PassManager
from compiler.pipeline import get_pipeline
from compiler.recovery import TieBatchNorm, empirical_means, read_batchnorms
from rewrites.bias_correction import (RELU, BiasCorrection, analytic_means, clip_pieces, gaussian_expectation,
                                      hard_sigmoid_pieces, leaky_relu_pieces, mean_shift)
from rewrites.channel_rules import input_layout
from rewrites.patterns import const


def rng(seed=0):
    return np.random.default_rng(seed)


# ---- E[f(h)], h ~ N(mu, sigma^2) ------------------------------------------------------------

MU = np.array([-4.0, -1.0, 0.0, 0.7, 2.5, 5.0])
SIGMA = np.array([1.0, 0.5, 2.0, 1.3, 3.0, 0.2])


def test_relu_expectation_is_the_closed_form():
    z = MU / SIGMA
    phi = np.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    cdf = np.array([0.5 * (1 + math.erf(t / math.sqrt(2))) for t in z])
    np.testing.assert_allclose(gaussian_expectation(RELU, MU, SIGMA), MU * cdf + SIGMA * phi, rtol=1e-12)


@pytest.mark.parametrize("name, pieces, f", [
    ("relu6", clip_pieces(0.0, 6.0), lambda h: np.clip(h, 0, 6)),
    ("leaky", leaky_relu_pieces(0.1), lambda h: np.where(h > 0, h, 0.1 * h)),
    ("hardsigmoid", hard_sigmoid_pieces(0.2, 0.5), lambda h: np.clip(0.2 * h + 0.5, 0, 1)),
    ("hardswish", hard_sigmoid_pieces(1 / 6, 0.5, times_x=True), lambda h: h * np.clip(h / 6 + 0.5, 0, 1)),
])
def test_activation_expectations_match_monte_carlo(name, pieces, f):
    h = MU[:, None] + SIGMA[:, None] * rng(1).standard_normal((MU.size, 400_000))
    mc = f(h).mean(axis=1)
    err = f(h).std(axis=1) / math.sqrt(h.shape[1])  # the Monte Carlo estimate's own spread
    assert np.all(np.abs(gaussian_expectation(pieces, MU, SIGMA) - mc) < 5 * err + 1e-12), name


def test_a_channel_without_spread_takes_the_activation_at_its_mean():
    got = gaussian_expectation(hard_sigmoid_pieces(1 / 6, 0.5, times_x=True), [-4.0, 1.0, 4.0], [0.0, 0.0, 0.0])
    np.testing.assert_allclose(got, [0.0, 1.0 * (1 / 6 + 0.5), 4.0])


# ---- the correction -----------------------------------------------------------------------


def conv_model(w, b, group=1, pads=(1, 1, 1, 1), op="Conv", tail=False):
    """One layer; with `tail` a Sigmoid after it, so the layer's output is not a graph output
    and the QDQ plan quantizes it."""
    inputs = ["x", "w"] + (["b"] if b is not None else [])
    attrs = {"group": group, "pads": list(pads)} if op == "Conv" else {}
    nodes = [helper.make_node(op, inputs, ["h" if tail else "y"], name="layer", **attrs)]
    nodes += [helper.make_node("Sigmoid", ["h"], ["y"], name="tail")] if tail else []
    inits = [numpy_helper.from_array(w, "w")] + ([numpy_helper.from_array(b, "b")] if b is not None else [])
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def run(proto, x):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def quantized(w, per_channel):
    p = weight_params(w, 0 if per_channel else None)
    return dequantize(quantize(w, p), p)


def layer_case(group, seed=0):
    """A Conv whose output channels differ in scale (so per-tensor rounding is coarse) and an
    input with a large mean per channel (so the rounding error has a mean)."""
    w = (rng(seed).normal(size=(8, 8 // group, 3, 3)) * np.linspace(0.05, 3, 8)[:, None, None, None]).astype(np.float32)
    b = rng(seed + 1).normal(size=8).astype(np.float32)
    x = (rng(seed + 2).normal(size=(4, 8, 9, 9)) + 3 * rng(seed + 3).normal(size=(1, 8, 1, 1))).astype(np.float32)
    return w, b, x


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_mean_shift_is_the_output_mean_error_in_onnxruntime(group, per_channel):
    w, b, x = layer_case(group)
    model = ir.load(conv_model(w, b, group))
    node = model.graph.nodes[0]
    patch_mean = FeatureStatsObserver(input_layout(node), max_gram_features=0).update(x).stats.mean
    shift = mean_shift(node, patch_mean, per_channel=per_channel)
    error = run(conv_model(quantized(w, per_channel), b, group), x) - run(conv_model(w, b, group), x)
    error = error.mean(axis=(0, 2, 3))
    np.testing.assert_allclose(shift, error, atol=2e-6 * np.abs(error).max())
    assert np.abs(error).max() > 1e-3  # the case has an error worth removing


@pytest.mark.parametrize("per_channel", [True, False])
def test_bias_correction_removes_the_mean_error_it_targets(per_channel):
    w, b, x = layer_case(1, seed=5)
    model = ir.load(conv_model(w, b, tail=True))
    node = model.graph.nodes[0]
    mean = FeatureStatsObserver(input_layout(node), max_gram_features=0).update(x).stats.mean
    result = BiasCorrection(means={"layer": mean}, per_channel=per_channel).run(model)
    assert result.log.by_rule() == {"bias-correction": 1}
    corrected = const(model.graph.nodes[0].inputs[2])
    float_mean = run(conv_model(w, b), x).mean(axis=(0, 2, 3))
    naive = run(conv_model(quantized(w, per_channel), b), x).mean(axis=(0, 2, 3))
    fixed = run(conv_model(quantized(w, per_channel), corrected), x).mean(axis=(0, 2, 3))
    assert np.abs(naive - float_mean).max() > 1e-3
    np.testing.assert_allclose(fixed, float_mean, atol=1e-5 * np.abs(float_mean).max())


def test_a_layer_without_bias_gets_one_and_a_matmul_is_skipped():
    w, _, x = layer_case(1, seed=7)
    model = ir.load(conv_model(w, None, tail=True))
    mean = FeatureStatsObserver(input_layout(model.graph.nodes[0]), max_gram_features=0).update(x).stats.mean
    result = BiasCorrection(means={"layer": mean}).run(model)
    node, _ = model.graph.nodes
    assert node.op_type == "Conv" and len(node.inputs) == 3
    assert result.log.by_rule() == {"bias-correction": 1}
    np.testing.assert_allclose(const(node.inputs[2]), -mean_shift(ir.load(conv_model(w, None)).graph.nodes[0], mean),
                               rtol=1e-6)
    mm = ir.load(conv_model(rng(1).normal(size=(6, 4)).astype(np.float32), None, op="MatMul", tail=True))
    result = BiasCorrection(means={"layer": np.ones(6)}).run(mm)
    assert not result.changed
    assert [(c.kind, c.target, c.detail) for c in result.log] == [("skip", "layer", "MatMul has no bias")]


def test_input_means_of_the_wrong_size_are_refused():
    w, b, _ = layer_case(1)
    model = ir.load(conv_model(w, b, tail=True))
    with pytest.raises(compiler.CompileError) as e:
        BiasCorrection(means={"layer": np.ones(5)}).run(model)
    assert str(e.value) == "bias correction of 'layer': 5 input means for 8 channels of a [3, 3] kernel"


# ---- BatchNorm statistics through the pipeline ---------------------------------------------------


def bn_model(act="Relu"):
    """conv1 -> BatchNorm -> act -> conv2 -> BatchNorm -> Sigmoid -> y."""
    g = rng(3)
    inits = {"w1": g.normal(size=(4, 3, 3, 3)).astype(np.float32),
             "w2": g.normal(size=(5, 4, 1, 1)).astype(np.float32)}
    for k, c in (("1", 4), ("2", 5)):
        inits.update({f"gamma{k}": g.uniform(0.5, 2, c).astype(np.float32),
                      f"beta{k}": g.normal(size=c).astype(np.float32),
                      f"mean{k}": g.normal(size=c).astype(np.float32),
                      f"var{k}": g.uniform(0.5, 2, c).astype(np.float32)})
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "gamma1", "beta1", "mean1", "var1"], ["n1"], name="bn1"),
             helper.make_node(act, ["n1"], ["a"], name="act"),
             helper.make_node("Conv", ["a", "w2"], ["c2"], name="conv2"),
             helper.make_node("BatchNormalization", ["c2", "gamma2", "beta2", "mean2", "var2"], ["n2"], name="bn2"),
             helper.make_node("Sigmoid", ["n2"], ["y"], name="tail")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), inits


def test_batchnorm_statistics_are_tied_to_the_folded_layers_and_give_the_relu_mean():
    proto, inits = bn_model()
    model = ir.load(proto)
    tie = TieBatchNorm(records=read_batchnorms(model))
    PassManager(get_pipeline("default") + [tie], []).run(model)
    assert [(node.op_type, record.name) for node, record in tie.ties] == [("Conv", "bn1"), ("Conv", "bn2")]
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.nodes)
    pre = tie.preactivation(model, {})
    first, second = [n for n in model.graph.nodes if n.op_type == "Conv"]
    assert second.inputs[0].producer.op_type == "Relu"
    means, reasons = analytic_means(model, [n.name for n in model.graph.nodes if n.op_type == "Conv"], pre)
    std = np.abs(inits["gamma1"].astype(np.float64)) * np.sqrt(inits["var1"] / (inits["var1"] + 1e-5))
    np.testing.assert_allclose(means[second.name], gaussian_expectation(RELU, inits["beta1"], std))
    assert reasons == {first.name: "input %x is a graph input or constant"}


def test_a_batchnorm_left_unfolded_breaks_the_tie_loudly():
    proto, _ = bn_model()
    with pytest.raises(compiler.CompileError) as e:
        compiler.compile(proto, pipeline="lossless", quantize="int8", calibration=calib_feeds(),
                         bias_correction="analytic", min_cosine=0.0)
    assert str(e.value) == ("analytic bias correction: BatchNormalization 'bn1' after 'conv1' matches no layer "
                            "after optimization; use --bias-correction empirical")


def calib_feeds(n=10):
    return [{"x": rng(100 + i).normal(size=(2, 3, 8, 8)).astype(np.float32)} for i in range(n)]


def test_empirical_means_are_the_mean_patches_of_each_layer_input():
    proto, _ = bn_model()
    model = ir.load(proto)
    PassManager(get_pipeline("default"), []).run(model)
    first = model.graph.nodes[0]
    feeds = calib_feeds(3)
    means = empirical_means(model, [first.name], feeds)
    expected = FeatureStatsObserver(input_layout(first), max_gram_features=0)
    for f in feeds:
        expected.update(f["x"])
    np.testing.assert_allclose(means[first.name], expected.stats.mean)


@pytest.mark.parametrize("mode", ["analytic", "empirical"])
def test_compile_corrects_biases_just_before_qdq(mode):
    proto, _ = bn_model()
    result = compiler.compile(proto, quantize="int8", calibration=calib_feeds(), per_channel=False,
                              equalize=True, bias_correction=mode, min_cosine=0.9)
    names = [r.name for r in result.report.records]
    assert names[names.index("bias-correction") + 1] == "quantize"
    assert names.index("equalize") < names.index("calibrate") < names.index("bias-correction")
    record = result.report.records[names.index("bias-correction")]
    # analytic: only the layer after the Relu has a known input mean; empirical: both
    assert record.log.by_rule() == {"bias-correction": 1 if mode == "analytic" else 2}


@pytest.mark.parametrize("options, message", [
    ({"bias_correction": "mean"}, "unknown bias correction 'mean' (choose from: analytic, empirical)"),
    ({"bias_correction": "analytic"}, "bias correction compensates weight quantization: it needs quantize='int8'"),
    ({"quantize": "int8", "calibration_table": "unused.json", "bias_correction": "empirical"},
     "empirical bias correction needs calibration data (--calib DIR), not only a calibration table; "
     "or use --bias-correction analytic"),
    ({"quantize": "int8", "calibration": "feeds", "bias_correction": "empirical", "accuracy_budget": 0.01},
     "bias correction with an accuracy budget is not supported: layers the budget keeps float would keep a "
     "corrected bias"),
])
def test_option_errors(options, message, tmp_path):
    if options.get("calibration") == "feeds":
        options["calibration"] = calib_feeds()
    if "calibration_table" in options:
        options["calibration_table"] = None  # the check comes before the table is read
    with pytest.raises(compiler.CompileError) as e:
        compiler.compile(bn_model()[0], **options)
    assert str(e.value) == message


def test_analytic_needs_batchnorms():
    w, b, _ = layer_case(1)
    with pytest.raises(compiler.CompileError) as e:
        compiler.compile(conv_model(w, b), quantize="int8", calibration=calib_feeds(), bias_correction="analytic")
    assert str(e.value) == ("analytic bias correction reads BatchNormalization statistics and the model has none "
                            "after a Conv/Gemm/MatMul; use --bias-correction empirical")


def test_cli_bias_correction_flag(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(bn_model()[0], model)
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, feed in enumerate(calib_feeds()):
        np.savez(calib / f"{i}.npz", **feed)
    out = tmp_path / "out.onnx"
    assert main(["compile", str(model), "-o", str(out), "--quantize", "int8", "--calib", str(calib),
                 "--bias-correction", "analytic", "--min-cosine", "0.9"]) == 0
    assert "bias-correction" in capsys.readouterr().out
    assert main(["compile", str(model), "-o", str(out), "--bias-correction", "empirical"]) == 2
    assert capsys.readouterr().err.strip() == ("onnxcc: error: --equalize, --bias-correction and --absorb-high-bias "
                                               "need --quantize int8")
    assert main(["compile", str(model), "-o", str(out), "--quantize", "int8", "--bias-correction", "mean"]) == 2
    assert "invalid choice: 'mean'" in capsys.readouterr().err
    onnx.save(high_bias_model(), model)
    assert main(["compile", str(model), "-o", str(out), "--quantize", "int8", "--calib", str(calib),
                 "--equalize", "--absorb-high-bias", "--bias-correction", "empirical"]) == 0
    assert "absorb-bias 1" in capsys.readouterr().out  # the pass table's rewrites column


def test_a_layer_rebuilt_with_a_bias_keeps_its_calibrated_range():
    w, _, _ = layer_case(1, seed=7)
    feeds = [{"x": (rng(50 + i).normal(size=(2, 8, 9, 9)) + 2).astype(np.float32)} for i in range(8)]
    result = compiler.compile(conv_model(w, None, tail=True), quantize="int8", calibration=feeds,
                              bias_correction="empirical", per_channel=False, min_cosine=0.9)
    names = [r.name for r in result.report.records]
    assert result.report.records[names.index("bias-correction")].log.by_rule() == {"bias-correction": 1}
    conv = next(n for n in result.model.graph.node if n.op_type == "Conv")
    assert len(conv.input) == 3 and conv.input[2].endswith("_DequantizeLinear_out")


# ---- high-bias absorption as a compile option ---------------------------------------------------


def high_bias_model():
    """bn_model with BatchNorm shifts well above three deviations on three channels, and
    statistics that describe conv1's output on calib_feeds (3x3x3 patches of N(0, 1) inputs
    with N(0, 1) weights: mean 0, variance about 27)."""
    proto, inits = bn_model()
    for init in proto.graph.initializer:
        if init.name in ("mean1", "var1"):
            init.CopyFrom(numpy_helper.from_array(np.full(4, 0.0 if init.name == "mean1" else 27.0, np.float32),
                                                  init.name))
        if init.name == "beta1":
            init.CopyFrom(numpy_helper.from_array(np.array([6.0, 0.2, 8.0, 5.0], np.float32), "beta1"))
        if init.name == "gamma1":
            init.CopyFrom(numpy_helper.from_array(np.array([1.0, 1.0, 1.5, 0.5], np.float32), "gamma1"))
    return proto


def test_compile_absorbs_high_biases_after_equalizing():
    result = compiler.compile(high_bias_model(), quantize="int8", calibration=calib_feeds(), equalize=True,
                              absorb_high_bias=True, bias_correction="empirical")
    names = [r.name for r in result.report.records]
    assert names.index("equalize") < names.index("absorb-bias") < names.index("calibrate")
    record = result.report.records[names.index("absorb-bias")]
    assert record.changed and record.log.by_rule() == {"absorb-bias": 1}
    assert result.report.verification.ok


@pytest.mark.parametrize("options, message", [
    ({"absorb_high_bias": True}, "high-bias absorption prepares activations for quantization: it needs "
                                 "quantize='int8'"),
    ({"quantize": "int8", "absorb_high_bias": True, "bias_correction": "analytic"},
     "high-bias absorption moves biases the BatchNorm statistics describe: use --bias-correction empirical "
     "with it"),
])
def test_absorption_option_errors(options, message):
    with pytest.raises(compiler.CompileError) as e:
        compiler.compile(high_bias_model(), calibration=calib_feeds() if "quantize" in options else None, **options)
    assert str(e.value) == message


def test_absorption_needs_batchnorms():
    w, b, _ = layer_case(1)
    with pytest.raises(compiler.CompileError) as e:
        compiler.compile(conv_model(w, b), quantize="int8", calibration=calib_feeds(), absorb_high_bias=True)
    assert str(e.value) == ("high-bias absorption reads BatchNormalization statistics and the model has none "
                            "after a Conv/Gemm/MatMul")
