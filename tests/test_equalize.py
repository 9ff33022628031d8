"""Cross-layer equalization (rewrites/equalize.py): float outputs unchanged in onnxruntime on
Conv/Relu/Conv, depthwise chains, squeeze-excitation gates and Gemm/MatMul; per-channel
ranges equal after one step; what stops a chain; the lossy mode; the compile and CLI options."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import compiler
import ir
from compiler.cli import main
from rewrites.equalize import CrossLayerEqualization, find_chains
from rewrites.patterns import const


def rng(seed=0):
    return np.random.default_rng(seed)


def spread_weight(shape, axis, seed):
    """Random weights whose channels along `axis` differ in scale by up to 100x."""
    w = rng(seed).normal(size=shape)
    scale = np.logspace(-1, 1, shape[axis])
    dims = [1] * len(shape)
    dims[axis] = -1
    return (w * scale.reshape(dims)).astype(np.float32)


def make(nodes, inits, x_shape, opset=17):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def run(model, x):
    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def assert_same(actual, expected):
    """Equal up to float32 rounding at the outputs' scale (sums of ~50 products cancel)."""
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def equalized(proto, **options):
    """(the equalized IR model, the pass result, the pass) after shape inference."""
    model = ir.load(proto)
    from rewrites.shapes import InferShapes

    InferShapes().run(model)
    p = CrossLayerEqualization(**options)
    return model, p.run(model), p


def weights(model):
    return {n.name: const(n.inputs[1]) for n in model.graph.nodes if n.op_type in ("Conv", "Gemm", "MatMul")}


def conv_relu_conv(act="Relu", act_inputs=(), extra=None):
    inits = {"w1": spread_weight((6, 3, 3, 3), 0, 1), "b1": rng(2).normal(size=6).astype(np.float32),
             "w2": spread_weight((4, 6, 3, 3), 1, 3), "b2": rng(4).normal(size=4).astype(np.float32)}
    inits.update(extra or {})
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node(act, ["h", *act_inputs], ["a"], name="act"),
             helper.make_node("Conv", ["a", "w2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    return make(nodes, inits, [2, 3, 8, 8])


X = rng(9).normal(size=(2, 3, 8, 8)).astype(np.float32)


def test_conv_relu_conv_keeps_the_outputs_and_equalizes_the_ranges_in_one_step():
    proto = conv_relu_conv()
    model, result, p = equalized(proto, max_sweeps=1)
    assert result.changed and result.log.by_rule() == {"equalize": 1}
    assert p.exact
    assert_same(run(model, X), run(proto, X))
    w = weights(model)
    r1 = np.abs(w["conv1"]).reshape(6, -1).max(axis=1)
    r2 = np.abs(w["conv2"]).transpose(1, 0, 2, 3).reshape(6, -1).max(axis=1)
    np.testing.assert_allclose(r1, r2, rtol=1e-6)
    # s_i = sqrt(r1_i / r2_i) of the original weights, and the bias follows its channel
    w1, w2 = numpy_helper.to_array(proto.graph.initializer[0]), numpy_helper.to_array(proto.graph.initializer[2])
    s = np.sqrt(np.abs(w1).reshape(6, -1).max(1) / np.abs(w2).transpose(1, 0, 2, 3).reshape(6, -1).max(1))
    np.testing.assert_allclose(p.scales["conv1"], s, rtol=1e-6)
    b1 = numpy_helper.to_array(proto.graph.initializer[1])
    np.testing.assert_allclose(const(model.graph.nodes[0].inputs[2]), b1 / s, rtol=1e-6)


def test_depthwise_chain_converges_and_keeps_the_outputs():
    inits = {"w1": spread_weight((8, 3, 1, 1), 0, 1), "wd": spread_weight((8, 1, 3, 3), 0, 2),
             "bd": rng(3).normal(size=8).astype(np.float32), "w3": spread_weight((5, 8, 1, 1), 1, 4)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h1"], name="expand"),
             helper.make_node("Relu", ["h1"], ["a1"]),
             helper.make_node("Conv", ["a1", "wd", "bd"], ["h2"], name="dw", group=8, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h2"], ["a2"]),
             helper.make_node("MaxPool", ["a2"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p", "w3"], ["y"], name="project")]
    proto = make(nodes, inits, [2, 3, 8, 8])
    model, result, _ = equalized(proto)
    assert result.log.by_rule() == {"equalize": 2}
    assert_same(run(model, X), run(proto, X))
    w = weights(model)
    # converged: both sides of both chains have the same range per channel
    np.testing.assert_allclose(np.abs(w["expand"]).reshape(8, -1).max(1), np.abs(w["dw"]).reshape(8, -1).max(1),
                               rtol=1e-3)
    np.testing.assert_allclose(np.abs(w["dw"]).reshape(8, -1).max(1), np.abs(w["project"]).max(axis=(0, 2, 3)),
                               rtol=1e-3)


def test_squeeze_excitation_gate_is_compensated_in_its_own_branch():
    inits = {"w1": spread_weight((6, 3, 3, 3), 0, 1), "ws1": spread_weight((2, 6, 1, 1), 1, 2),
             "ws2": rng(3).normal(size=(6, 2, 1, 1)).astype(np.float32), "w3": spread_weight((4, 6, 1, 1), 1, 4)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("GlobalAveragePool", ["a"], ["g0"]),
             helper.make_node("Conv", ["g0", "ws1"], ["g1"], name="se1"),
             helper.make_node("Relu", ["g1"], ["g2"]),
             helper.make_node("Conv", ["g2", "ws2"], ["g3"], name="se2"),
             helper.make_node("HardSigmoid", ["g3"], ["gate"]),
             helper.make_node("Mul", ["a", "gate"], ["m"]),
             helper.make_node("Conv", ["m", "w3"], ["y"], name="project")]
    proto = make(nodes, inits, [2, 3, 8, 8])
    model, result, _ = equalized(proto)
    chains, _ = find_chains(model)
    assert {c.producer.node.name: sorted(x.node.name for x in c.consumers) for c in chains} == \
        {"conv1": ["project", "se1"], "se1": ["se2"]}
    assert_same(run(model, X), run(proto, X))


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_relu_gemm_and_matmul_keep_the_outputs(trans_b):
    w1 = spread_weight((5, 7) if trans_b else (7, 5), 0 if trans_b else 1, 1)
    inits = {"w1": w1, "b1": rng(2).normal(size=5).astype(np.float32), "w2": spread_weight((5, 4), 0, 3),
             "w3": spread_weight((4, 3), 1, 5)}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=trans_b),
             helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "w2"], ["h2"], name="fc2"),
             helper.make_node("LeakyRelu", ["h2"], ["a2"], alpha=0.1),
             helper.make_node("Gemm", ["a2", "w3"], ["y"], name="fc3")]
    proto = make(nodes, inits, [3, 7])
    model, result, _ = equalized(proto)
    assert result.log.by_rule() == {"equalize": 2}
    x = rng(6).normal(size=(3, 7)).astype(np.float32)
    assert_same(run(model, x), run(proto, x))


def skips(result):
    return {c.target: c.detail for c in result.log if c.kind == "skip"}


def test_nonhomogeneous_activations_stop_the_chain_by_default():
    model, result, p = equalized(conv_relu_conv("HardSwish"))
    assert not result.changed and p.exact
    assert skips(result) == {
        "conv1": "HardSwish 'act' does not commute with per-channel scaling (not homogeneous)",
        "conv2": "%y is a graph output"}
    clip6 = conv_relu_conv("Clip", ("lo", "hi"), {"lo": np.array(0, np.float32), "hi": np.array(6, np.float32)})
    _, result, _ = equalized(clip6)
    assert skips(result)["conv1"] == ("Clip 'act' does not commute with per-channel scaling "
                                      "(bounds other than 0 move with the scale)")
    relu_as_clip = conv_relu_conv("Clip", ("lo",), {"lo": np.array(0, np.float32)})
    model, result, _ = equalized(relu_as_clip)
    assert result.log.by_rule() == {"equalize": 1}
    assert_same(run(model, X), run(relu_as_clip, X))


def test_through_nonlinear_scales_through_relu6_and_says_it_is_lossy():
    proto = conv_relu_conv("Clip", ("lo", "hi"), {"lo": np.array(0, np.float32), "hi": np.array(6, np.float32)})
    model, result, p = equalized(proto, through_nonlinear=True)
    assert not p.exact and result.log.by_rule() == {"equalize": 1}
    (match,) = [c for c in result.log if c.kind == "match"]
    assert match.detail.endswith("; lossy through Clip 'act'")


def test_residual_add_and_two_scaled_factors_stop_the_chain():
    inits = {"w1": spread_weight((3, 3, 1, 1), 0, 1), "w2": spread_weight((3, 3, 1, 1), 1, 2)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1"),
             helper.make_node("Relu", ["h"], ["a"], name="relu"),
             helper.make_node("Add", ["a", "x"], ["r"], name="residual"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    _, result, _ = equalized(make(nodes, inits, [1, 3, 4, 4]))
    assert skips(result)["conv1"] == "Add 'residual' does not commute with per-channel scaling"
    nodes[2] = helper.make_node("Mul", ["a", "a"], ["r"], name="square")
    _, result, _ = equalized(make(nodes, inits, [1, 3, 4, 4]))
    assert skips(result)["conv1"] == "Mul 'square' multiplies two scaled tensors"


# ---- the compiler --------------------------------------------------------------------------


@pytest.fixture
def calib(tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    for i in range(8):
        np.savez(folder / f"{i}.npz", x=rng(i).normal(size=(2, 3, 8, 8)).astype(np.float32))
    return folder


def test_compile_equalizes_before_calibrating(calib):
    result = compiler.compile(conv_relu_conv(), quantize="int8", calibration=calib, per_channel=False,
                              equalize=True, min_cosine=0.9)
    names = [r.name for r in result.report.records]
    assert names.index("equalize") < names.index("integer-forms") < names.index("calibrate")
    record = result.report.records[names.index("equalize")]
    assert record.log.by_rule() == {"equalize": 1}


def test_equalize_needs_quantize():
    with pytest.raises(compiler.CompileError) as e:
        compiler.compile(conv_relu_conv(), equalize=True)
    assert str(e.value) == "equalization prepares weights for quantization: it needs quantize='int8'"


def test_cli_equalize_flag(calib, tmp_path, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(conv_relu_conv(), model)
    out = tmp_path / "out.onnx"
    assert main(["compile", str(model), "-o", str(out), "--quantize", "int8", "--calib", str(calib),
                 "--per-tensor-weights", "--equalize", "--min-cosine", "0.9"]) == 0
    assert "equalize" in capsys.readouterr().out
    assert main(["compile", str(model), "-o", str(out), "--equalize"]) == 2
    assert capsys.readouterr().err.strip() == ("onnxcc: error: --equalize, --bias-correction and --absorb-high-bias "
                                               "need --quantize int8")


@pytest.mark.slow
def test_direction_classifier_equalizes_exactly_and_ties_all_its_batchnorms():
    from compiler.pass_manager import PassManager
    from compiler.pipeline import get_pipeline
    from compiler.recovery import TieBatchNorm, read_batchnorms
    from tests.real_models import find_model_files

    files = [p for p in find_model_files("rapidocr_onnxruntime") if "cls" in p.name]
    if not files:
        pytest.skip("rapidocr-onnxruntime not installed: pip install --no-deps rapidocr-onnxruntime")
    proto = onnx.load(str(files[0]))
    model = ir.load(proto)
    tie = TieBatchNorm(records=read_batchnorms(model))
    equalize = CrossLayerEqualization()
    records = PassManager(get_pipeline("default") + [tie, equalize], []).run(model)
    assert len(tie.ties) == 35
    assert records[-1].log.by_rule() == {"equalize": 16}  # the Relu blocks; HardSwish ones stay
    x = rng(1).uniform(-1, 1, size=(2, 3, 48, 192)).astype(np.float32)
    sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                for m in (proto, ir.to_proto(model))]
    a, b = (s.run(None, {s.get_inputs()[0].name: x})[0] for s in sessions)
    np.testing.assert_allclose(b, a, atol=1e-5)


# ---- high-bias absorption ---------------------------------------------------------------------


def absorbable(pads):
    g = rng(11)
    inits = {"w1": np.abs(g.normal(size=(4, 3, 1, 1))).astype(np.float32),
             "b1": np.array([5.0, 0.5, 8.0, 3.0], np.float32),
             "w2": g.normal(size=(2, 4, 3, 3)).astype(np.float32), "b2": np.array([0.1, -0.2], np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1"),
             helper.make_node("Relu", ["h"], ["a"], name="relu"),
             helper.make_node("MaxPool", ["a"], ["p"], kernel_shape=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["p", "w2", "b2"], ["y"], name="conv2", pads=pads)]
    return make(nodes, inits, [2, 3, 8, 8])


def test_high_bias_absorption_moves_the_certain_part_of_the_bias_into_the_next_layer():
    from rewrites.absorb_bias import HighBiasAbsorption

    proto = absorbable([0, 0, 0, 0])
    model = ir.load(proto)
    mean, std = np.array([5.0, 0.5, 8.0, 3.0]), np.array([1.0, 1.0, 2.0, 0.5])
    p = HighBiasAbsorption(preactivation={"conv1": (mean, std)})
    result = p.run(model)
    assert not p.exact and result.log.by_rule() == {"absorb-bias": 1}
    np.testing.assert_allclose(p.absorbed["conv1"], [2.0, 0.0, 2.0, 1.5])
    np.testing.assert_allclose(const(model.graph.nodes[0].inputs[2]), [3.0, 0.5, 6.0, 1.5])
    x = np.abs(X)  # x >= 0 and w1 >= 0: h >= b1 >= c, where the absorption is exact
    assert_same(run(model, x), run(proto, x))
    model = ir.load(absorbable([1, 1, 1, 1]))
    result = HighBiasAbsorption(preactivation={"conv1": (mean, std)}).run(model)
    assert not result.changed
    assert skips(result) == {"conv1": "Conv 'conv2' pads its input with zeros, which the shift does not reach"}
