"""AdaRound: rewrites/adaround.py (the rounding maths) on problems with known answers,
rewrites/adaround_weights.py (snapping weights so InsertQDQ stores exactly the chosen codes)
and compiler/adaround.py (statistics on the quantized prefix), the API and CLI options."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import compiler
import ir
from calibration.gram import InputStats
from calibration.scales import weight_params
from compiler.adaround import AdaRound, prefix_stats
from compiler.cli import main
from compiler.quantize import Calibrate
from ir.errors import CompileError
from rewrites.adaround import adaround, optimise, polish, problem, rounding_loss, rtn_codes
from rewrites.adaround_weights import AdaRoundWeights, weight_layers
from rewrites.qdq import InsertQDQ

TINY = Path(__file__).resolve().parent.parent / "fixtures" / "tiny_cnn.onnx"


def correlated_gram(f, seed=0, n=2000):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, f)) @ (np.eye(f) + 0.5 * rng.standard_normal((f, f)))
    return x.T @ x / n


# ---- the maths -----------------------------------------------------------------------------


def test_two_correlated_features_round_one_up_one_down():
    """w = [0.4, 0.35], scale 1, G = [[1, .9], [.9, 1]]: nearest is [0, 0] with error
    0.5345; rounding the first up cancels most of the second's error: [1, 0], 0.1045."""
    w, g = np.array([[0.4, 0.35]]), np.array([[1.0, 0.9], [0.9, 1.0]])
    assert rtn_codes(w, 1.0, 0, -8, 7).tolist() == [[0, 0]]
    assert rounding_loss([[0, 0]], w, g, 1.0, 0) == pytest.approx(0.5345)
    codes = adaround(w, g, 1.0, 0, -8, 7)
    assert codes.tolist() == [[1, 0]] and codes.dtype == np.int32
    assert rounding_loss(codes, w, g, 1.0, 0) == pytest.approx(0.1045)


def test_small_problem_reaches_the_brute_force_optimum_and_beats_nearest():
    rng = np.random.default_rng(3)
    w, g = rng.standard_normal((4, 8)) * 0.3, correlated_gram(8)
    scale = np.abs(w).max(axis=1, keepdims=True) / 7
    codes = adaround(w, g, scale, 0, -7, 7)
    rtn = rtn_codes(w, scale, 0, -7, 7)
    best = []
    for r in range(4):  # every floor/ceil choice of the row
        lo = np.floor(w[r] / scale[r])
        cands = [lo + np.array(bits) for bits in itertools.product((0, 1), repeat=8)]
        best.append(min(cands, key=lambda c: rounding_loss(c[None], w[r:r + 1], g, scale[r], 0)))
    optimum = rounding_loss(np.array(best), w, g, scale, 0)
    assert rounding_loss(codes, w, g, scale, 0) == pytest.approx(optimum)
    assert optimum < 0.5 * rounding_loss(rtn, w, g, scale, 0)


def test_with_identity_gram_nearest_is_optimal_and_the_soft_rounding_finds_it():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 20))
    scale = np.full((6, 1), 0.1, np.float32)
    rtn = rtn_codes(w, scale, 0, -128, 127)
    p = problem(w, np.eye(20), scale, 0, -128, 127)
    soft = optimise(p, iterations=300)
    assert np.array_equal(p.lo + p.step * (soft >= 0.5), rtn)
    assert np.array_equal(polish(p, rtn), rtn)  # no flip improves on the optimum
    assert np.array_equal(adaround(w, np.eye(20), scale, 0, -128, 127), rtn)


def test_codes_stay_in_range_with_zero_points_and_per_block_scales():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((3, 8)) * 4  # many weights beyond the 4-bit grid: saturated
    scale = np.repeat(np.array([[0.2, 0.5]] * 3, np.float32), 4, axis=1)  # blocks of 4 features
    zp = np.array([[1], [-2], [0]])
    g = correlated_gram(8, seed=4)
    codes = adaround(w, g, scale, zp, -8, 7)
    assert codes.shape == (3, 8) and codes.min() >= -8 and codes.max() <= 7
    assert rounding_loss(codes, w, g, scale, zp) <= rounding_loss(rtn_codes(w, scale, zp, -8, 7), w, g, scale, zp)


def test_a_batch_solves_each_problem_as_alone():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((3, 4, 9)) * 0.2
    grams = np.stack([correlated_gram(9, seed=s) for s in range(3)])
    scale = (np.abs(w).max(axis=2, keepdims=True) / 7).astype(np.float32)
    alone = np.stack([adaround(w[j], grams[j], scale[j], 0, -7, 7) for j in range(3)])
    assert np.array_equal(adaround(w, grams, scale, 0, -7, 7), alone)
    with pytest.raises(CompileError, match=r"^adaround: Gram shape \[9, 9\] does not match 9 features in 3 groups$"):
        adaround(w, grams[0], scale, 0, -7, 7)


def test_fixed_weights_keep_their_nearest_code():
    w, g = np.array([[0.4, 0.35]]), np.array([[1.0, 0.9], [0.9, 1.0]])
    assert adaround(w, g, 1.0, 0, -8, 7, fixed=[[True, False]]).tolist() == [[0, 1]]


def test_cross_covariance_fits_the_float_teacher():
    """With float inputs x and quantized ones x_hat = x + 0.3 x_1 in every feature,
    rounding against E[x x_hat^T] compensates the input error that G alone cannot see."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4000, 6))
    xh = x + 0.3 * x[:, :1]
    w = rng.standard_normal((5, 6))
    scale = np.abs(w).max(axis=1, keepdims=True) / 7
    g, cross = xh.T @ xh / 4000, x.T @ xh / 4000

    def teacher_error(codes):
        wq = scale * codes
        return np.mean(np.sum((x @ w.T - xh @ wq.T) ** 2, axis=1))

    plain, teacher = adaround(w, g, scale, 0, -7, 7), adaround(w, g, scale, 0, -7, 7, cross=cross)
    assert teacher_error(teacher) < teacher_error(plain)
    # the reported loss is the teacher's error up to its constant (W_q in float32, as stored)
    const = np.einsum("rf,fg,rg->", w, x.T @ x / 4000, w)
    assert rounding_loss(teacher, w, g, scale, 0, cross=cross) + const == pytest.approx(
        teacher_error(teacher), rel=1e-6)


@pytest.mark.parametrize("call, message", [
    (lambda: adaround(np.zeros(3), np.eye(3), 1.0, 0, -8, 7),
     r"^adaround: weight must be 2-D \[rows, F\] \(or a batch \[B, rows, F\]\), got shape \[3\]$"),
    (lambda: adaround(np.zeros((2, 3)), np.eye(4), 1.0, 0, -8, 7, where="conv1"),
     r"^adaround of 'conv1': Gram shape \[4, 4\] does not match 3 features$"),
    (lambda: adaround(np.zeros((2, 3)), np.eye(3), np.ones((3, 1)), 0, -8, 7),
     r"^adaround: scale, zero point or fixed mask does not broadcast to the weight's shape \[2, 3\]$"),
    (lambda: adaround(np.zeros((2, 3)), np.eye(3), 0.0, 0, -8, 7), r"^adaround: scale must be finite and positive$"),
    (lambda: adaround(np.zeros((2, 3)), np.eye(3), 1.0, 0, 7, 7), r"^adaround: empty code range \[7, 7\]$"),
    (lambda: adaround(np.zeros((2, 3)), np.eye(3), 1.0, 0, -8, 7, iterations=-1),
     r"^adaround: iterations must be >= 0, got -1$"),
])
def test_bad_arguments_are_refused(call, message):
    with pytest.raises(CompileError, match=message):
        call()


# ---- the pass ------------------------------------------------------------------------------


def small_model(seed=0):
    """Conv -> Relu -> grouped Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm
    (transB=0: weight [K, N]) -> Relu -> Gemm."""
    rng = np.random.default_rng(seed)
    inits = {"w1": (8, 3, 3, 3), "b1": (8,), "w2": (8, 4, 3, 3), "b2": (8,), "wg": (8, 12), "bg": (12,),
             "wh": (5, 12), "bh": (5,)}
    tensors = [numpy_helper.from_array(rng.normal(0, 0.3, s).astype(np.float32), n) for n, s in inits.items()]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", group=2, strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["rh"], name="relu3"),
        helper.make_node("Gemm", ["rh", "wh", "bh"], ["y"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], tensors)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def feeds(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 3, 12, 12)).astype(np.float32)} for _ in range(n)]


def calibrated(per_channel=True):
    model = ir.load(small_model())
    insert = InsertQDQ(per_channel=per_channel, input_shapes={"x": (1, 3, 12, 12)})
    Calibrate(insert=insert, feeds=feeds(), method="minmax", input_shapes={"x": (1, 3, 12, 12)}).run(model)
    return model, insert


def expected_codes(model, insert):
    """What adaround() chooses for each planned weight, from the same prefix statistics."""
    options = dict(target=insert.target, exclude=(), per_channel=insert.per_channel,
                   input_shapes=insert.input_shapes, weight_bits=8)
    prefix = ir.load(ir.to_proto(model))
    InsertQDQ(table=insert.table, per_channel=insert.per_channel, input_shapes=insert.input_shapes).run(prefix)
    stats = prefix_stats(model, prefix, options, feeds())
    out = {}
    for layer in weight_layers(model, input_shapes=insert.input_shapes):
        w = layer.node.inputs[layer.index].const.numpy()
        axis = layer.axis if insert.per_channel else None
        w2d = np.moveaxis(w, layer.axis, 0).reshape(w.shape[layer.axis], -1)
        scale = weight_params(w, axis).scale
        scale = scale.reshape(-1, 1) if axis is not None else scale
        mags = np.abs(w2d)
        fixed = mags == (mags.max(axis=1, keepdims=True) if axis is not None else mags.max())
        g, fg, per = stats[layer.node.name].gram, w2d.shape[1], w2d.shape[0] // layer.groups
        codes = np.concatenate([
            adaround(w2d[j * per:(j + 1) * per], g[j * fg:(j + 1) * fg, j * fg:(j + 1) * fg],
                     scale[j * per:(j + 1) * per] if axis is not None else scale, 0, -127, 127,
                     fixed=fixed[j * per:(j + 1) * per]) for j in range(layer.groups)])
        out[layer.node.name] = (codes, rtn_codes(w2d, scale, 0, -127, 127), layer.axis, w.shape)
    return out


@pytest.mark.parametrize("per_channel", [True, False])
def test_insert_qdq_stores_exactly_the_adaround_codes(per_channel):
    model, insert = calibrated(per_channel)
    expected = expected_codes(model, insert)
    before = {n.name: (n.op_type, [v.name if v is not None else None for v in n.inputs]) for n in model.graph.nodes}
    others = {name: v.const.numpy().copy() for name, v in model.graph.initializers.items()
              if not name.startswith("w")}
    result = AdaRound(insert=insert, feeds=feeds()).run(model)
    assert result.changed
    rounding = [c for c in result.log if c.kind == "rounding"]
    assert [c.target for c in rounding] == ["conv1", "conv2", "fc1", "fc2"]
    assert all("8-bit adaround: " in c.detail for c in rounding)
    # the float model is unchanged except for the weights
    assert [n.name for n in model.graph.nodes] == list(before)
    for node in model.graph.nodes:
        assert node.op_type == before[node.name][0]
        names = [v.name if v is not None else None for v in node.inputs]
        assert [a for i, a in enumerate(names) if i != 1] == [a for i, a in enumerate(before[node.name][1]) if i != 1]
    for name, value in others.items():
        np.testing.assert_array_equal(model.graph.initializers[name].const.numpy(), value)
    insert.run(model)
    moved = 0
    for node in model.graph.nodes:
        if node.name not in expected:
            continue
        codes, rtn, axis, shape = expected[node.name]
        dq = node.inputs[1].producer
        assert dq.op_type == "DequantizeLinear"
        stored = dq.inputs[0].const.numpy()
        assert stored.dtype == np.int8
        assert np.array_equal(np.moveaxis(stored, axis, 0).reshape(codes.shape), codes)
        moved += int(np.count_nonzero(codes != rtn))
    assert moved > 0  # AdaRound did change decisions, and InsertQDQ kept them


def test_adaround_lowers_the_error_of_the_quantized_model_outputs():
    """Each layer's error against its input statistics goes down, and so does the compiled
    model's output error on the calibration data (4 bits: large enough to see)."""
    import onnxruntime as ort

    def outputs(rounding):
        model = ir.load(small_model())
        snap = AdaRound(feeds=feeds(), weight_bits=4) if rounding == "adaround" \
            else AdaRoundWeights(rounding="rtn", weight_bits=4)
        snap.run(model)
        sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
        return np.concatenate([sess.run(None, f)[0] for f in feeds()])

    sess = ort.InferenceSession(small_model().SerializeToString(), providers=["CPUExecutionProvider"])
    ref = np.concatenate([sess.run(None, f)[0] for f in feeds()])
    err_rtn = np.mean((outputs("rtn") - ref) ** 2)
    err_ada = np.mean((outputs("adaround") - ref) ** 2)
    assert err_ada < 0.7 * err_rtn


def test_layers_without_a_gram_keep_round_to_nearest_and_the_log_says_why():
    model, insert = calibrated()
    stats = {"conv1": InputStats(10, np.zeros(27), None, np.ones(27))}
    snap = AdaRoundWeights(stats=stats, input_shapes=insert.input_shapes)
    result = snap.run(model)
    assert not result.changed
    assert [(c.target, c.detail) for c in result.log] == [
        ("conv1", "round-to-nearest: 27 input features are over the Gram limit"),
        ("conv2", "round-to-nearest: no input statistics"),
        ("fc1", "round-to-nearest: no input statistics"),
        ("fc2", "round-to-nearest: no input statistics")]


def test_four_bit_rtn_snaps_weights_to_a_seven_step_grid():
    model = ir.load(small_model())
    AdaRoundWeights(rounding="rtn", weight_bits=4).run(model)
    layers = weight_layers(model)
    assert [layer.node.name for layer in layers] == ["conv1", "conv2", "fc1", "fc2"]
    for layer in layers:
        w = layer.node.inputs[layer.index].const.numpy()
        w2d = np.moveaxis(w, layer.axis, 0).reshape(w.shape[layer.axis], -1)
        steps = w2d / (np.abs(w2d).max(axis=1, keepdims=True) / 7)
        np.testing.assert_allclose(steps, np.rint(steps), atol=1e-4)
        assert len(np.unique(np.rint(steps))) <= 15


def test_pass_option_errors():
    model = ir.load(small_model())
    with pytest.raises(CompileError, match=r"^adaround: weight_bits must be an integer from 2 to 8, got 9$"):
        AdaRoundWeights(weight_bits=9).run(model)
    with pytest.raises(CompileError, match=r"^adaround: unknown rounding 'gptq' \(choose from: rtn, adaround\)$"):
        AdaRoundWeights(rounding="gptq").run(model)
    with pytest.raises(CompileError, match=r"^adaround: 8-bit rounding runs after calibration "
                                           r"\(it needs the calibration table\)$"):
        AdaRound(feeds=feeds()).run(model)


# ---- API and CLI ---------------------------------------------------------------------------


def test_compile_with_adaround_verifies_and_keeps_every_integer_kernel():
    rtn = compiler.compile(small_model(), quantize="int8", calibration=feeds(12))
    ada = compiler.compile(small_model(), quantize="int8", calibration=feeds(12), weight_rounding="adaround")
    record = next(r for r in ada.report.records if r.name == "adaround")
    assert record.log.by_kind()["rounding"] == 4
    assert ada.report.verification.ok
    assert ada.report.integer_kernels.kernels == rtn.report.integer_kernels.kernels
    assert [r.name for r in ada.report.records][-4:] == ["calibrate", "adaround", "quantize", "dead-code"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(quantize="int8", calibration=feeds(6), weight_rounding="nearest"),
     r"^unknown weight rounding 'nearest' for quantize='int8' \(choose from: rtn, adaround\)$"),
    (dict(weight_rounding="adaround"),
     r"^weight_rounding 'adaround' is for quantized weights: it needs quantize='int8'$"),
])
def test_api_errors(kwargs, message):
    with pytest.raises(CompileError, match=message):
        compiler.compile(small_model(), **kwargs)


def test_adaround_needs_data_not_only_a_table(tmp_path):
    first = compiler.compile(small_model(), quantize="int8", calibration=feeds(6))
    path = tmp_path / "t.json"
    first.calibration_table.save(path)
    with pytest.raises(CompileError, match=r"^weight rounding 'adaround' needs calibration data \(--calib DIR\), "
                                           r"not only a calibration table$"):
        compiler.compile(small_model(), quantize="int8", calibration_table=path, weight_rounding="adaround")


def test_cli_weight_rounding(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    src.write_bytes(small_model().SerializeToString())
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, f in enumerate(feeds(8)):
        np.savez(calib / f"{i}.npz", **f)
    assert main(["compile", str(src), "-o", str(tmp_path / "o.onnx"), "--weight-rounding", "adaround"]) == 2
    assert capsys.readouterr().err.endswith("--weight-rounding adaround needs --quantize int8 or --weight-only\n")
    assert main(["compile", str(src), "-o", str(tmp_path / "q.onnx"), "--quantize", "int8", "--calib", str(calib),
                 "--weight-rounding", "adaround"]) == 0
    assert "adaround" in capsys.readouterr().out
