"""QDQ placement for onnxruntime's CPU EP (rewrites/qdq.py, rewrites/qdq_targets.py).

Small float models; the table comes from min/max ranges of the planned activations observed
with onnxruntime on random inputs. Checked: the plan, golden text around a Conv, accuracy
against the float model, which Conv/MatMul/Gemm onnxruntime turns into integer kernels (read
back from its optimized graph), graph outputs left float, exclusions, and the error messages.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import ir
from calibration.scales import params_from_range
from calibration.table import CalibrationTable, TableEntry
from ir import CompileError
from rewrites.base import Match, Reject
from rewrites.cleanup import DeadCodeElimination
from rewrites.integer_forms import HardSwishAsIntegerOps, IntegerForms
from rewrites.qdq import InsertQDQ, plan
from rewrites.qdq_targets import ORT_CPU

INTEGER_KERNELS = {"QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat"}


def _model(nodes, inits, x_shape, y_shape, opset=21, ir_version=10, seed=0):
    rng = np.random.default_rng(seed)
    tensors = [numpy_helper.from_array(rng.normal(0, scale, shape).astype(np.float32), name)
               for name, shape, scale in inits]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], tensors)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


def cnn(opset=21, ir_version=10) -> onnx.ModelProto:
    """Conv -> Relu -> MaxPool -> Conv -> GlobalAveragePool -> Flatten -> Gemm."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="fc", transB=1),
    ]
    inits = [("w1", (8, 3, 3, 3), 0.3), ("b1", (8,), 0.1), ("w2", (16, 8, 3, 3), 0.2),
             ("b2", (16,), 0.1), ("wg", (10, 16), 0.3), ("bg", (10,), 0.1)]
    return _model(nodes, inits, [1, 3, 16, 16], [1, 10], opset, ir_version)


def mlp() -> onnx.ModelProto:
    """MatMul -> Relu -> MatMul, weights [K, N]."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
             helper.make_node("Relu", ["m1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "w2"], ["y"], name="mm2")]
    return _model(nodes, [("w1", (32, 64), 0.2), ("w2", (64, 8), 0.2)], [4, 32], [4, 8])


def feeds(proto, n=8, seed=1):
    rng = np.random.default_rng(seed)
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    return [{"x": rng.normal(size=shape).astype(np.float32)} for _ in range(n)]


def session(proto, optimized_path=None):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if optimized_path is not None:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def minmax_table(proto, names, samples) -> CalibrationTable:
    """The planned activations' min/max over the samples, exposed as extra outputs."""
    aug = onnx.ModelProto()
    aug.CopyFrom(proto)
    inputs = {i.name for i in aug.graph.input}
    for name in names:
        if name not in inputs:
            aug.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    sess = session(aug)
    outs = [o.name for o in sess.get_outputs()]
    seen: dict[str, list] = {n: [] for n in names}
    for f in samples:
        values = {**dict(zip(outs, sess.run(None, f))), **f}
        for n in names:
            seen[n].append(values[n])
    table = CalibrationTable()
    for n in names:
        lo, hi = float(min(a.min() for a in seen[n])), float(max(a.max() for a in seen[n]))
        table[n] = TableEntry("minmax", (lo, hi), params_from_range(lo, hi, "uint8"),
                              {"count": 1, "nonfinite": 0, "min": lo, "max": hi})
    return table


def quantize(proto, **options):
    model = ir.load(proto)
    table = minmax_table(proto, plan(model, exclude=options.get("exclude", ())).activations, feeds(proto))
    result = InsertQDQ(table, **options).run(model)
    ir.verify(model)
    out = ir.to_proto(model)
    onnx.checker.check_model(out)
    return model, out, result


def cosine(a, b) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def optimized_ops(proto, tmp_path) -> list[str]:
    """The op types of the graph onnxruntime actually runs."""
    path = tmp_path / "optimized.onnx"
    session(proto, path)
    return [n.op_type for n in onnx.load(str(path)).graph.node]


# ---- the plan ---------------------------------------------------------------------------------


def test_plan_cnn():
    p = plan(ir.load(cnn()))
    assert p.weighted == ["conv1", "conv2", "fc"]
    assert p.nodes == ["conv1", "relu1", "pool1", "conv2", "gap", "flatten", "fc"]
    # Relu's output is calibrated (absorbed), MaxPool/Flatten share their input's scale, and
    # the Gemm's output is a graph output: QGemm with a float output, no Q.
    assert p.activations == ["x", "r1", "c2", "g"]
    assert p.shared == {"p1": "r1", "f": "g"}
    assert "y" not in p.quantized


def test_plan_excludes_by_name_and_op_type():
    p = plan(ir.load(cnn()), exclude=("conv2",))
    assert p.weighted == ["conv1", "fc"]
    # conv1 still needs its output Q; nothing quantized reads c2, so GAP stays float; the
    # Gemm's input Q goes before the Flatten, which then moves uint8
    assert p.activations == ["x", "r1", "g"]
    assert p.shared == {"f": "g"} and "pool1" not in p.nodes  # its only reader is the float conv2
    p = plan(ir.load(cnn()), exclude=("Gemm",))
    assert p.weighted == ["conv1", "conv2"]
    assert "flatten" not in p.nodes and "f" not in p.quantized  # no DQ -> Flatten -> Q -> float Gemm


def test_plan_leaves_ops_without_integer_kernels_alone():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Tanh", ["c"], ["t"], name="tanh"),
             helper.make_node("Sub", ["t", "x2"], ["y"], name="sub")]
    proto = _model(nodes, [("w", (4, 3, 1, 1), 0.3), ("x2", (1,), 1.0)], [1, 3, 4, 4], [1, 4, 4, 4])
    p = plan(ir.load(proto))
    assert p.nodes == ["conv"] and p.activations == ["x", "c"] and p.shared == {}


def test_plan_conv_with_graph_output_stays_float():
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    p = plan(ir.load(_model(nodes, [("w", (4, 3, 1, 1), 0.3)], [1, 3, 4, 4], [1, 4, 4, 4])))
    assert p.nodes == [] and p.activations == []


def depthwise_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="pw1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "wd"], ["d"], name="dw", group=8, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["d", "w2"], ["c2"], name="pw2"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["y"], name="gap")]
    return _model(nodes, [("w1", (8, 3, 1, 1), 0.3), ("wd", (8, 1, 3, 3), 0.3), ("w2", (4, 8, 1, 1), 0.3)],
                  ["N", 3, "H", "W"], ["N", 4, 1, 1])


def test_plan_depthwise_conv_stays_float_on_ort_cpu_unless_asked():
    """Int8 depthwise weights cost accuracy, and on small maps speed too (qdq_targets.py)."""
    model = ir.load(depthwise_model())
    p = plan(model)
    assert p.weighted == ["pw1", "pw2"] and p.activations == ["x", "r1", "d", "r2"]
    assert plan(model, replace(ORT_CPU, integer_depthwise=True)).weighted == ["pw1", "dw", "pw2"]


def test_an_image_stem_on_a_large_map_stays_float():
    """QLinearConv on 3 input channels loses to ORT's float NCHWc kernel (qdq_targets.py)."""
    model = ir.load(depthwise_model())  # pw1 reads the 3-channel image
    assert plan(model, input_shapes={"x": (1, 3, 80, 80)}).weighted == ["pw2"]  # 8x80x80 out
    assert plan(model, input_shapes={"x": (1, 3, 16, 16)}).weighted == ["pw1", "pw2"]  # small
    assert plan(model).weighted == ["pw1", "pw2"]  # [N, 8, H, W]: not known to be large
    no_rule = replace(ORT_CPU, float_stem_channels=0)
    assert plan(model, no_rule, input_shapes={"x": (1, 3, 80, 80)}).weighted == ["pw1", "pw2"]


def test_tensor_sizes_come_from_the_calibration_inputs():
    target, d = ORT_CPU, ir.load(depthwise_model()).graph.nodes[2].outputs[0]
    assert not target.is_small(d)  # [N, 8, H, W]: unknown sizes may be large
    assert target.is_small(d, {"d": ("N", 8, 8, 8)}) and not target.is_small(d, {"d": ("N", 8, "H", 8)})
    assert not target.is_small(d, {"d": (128, 8, 8, 8)})  # the whole tensor counts, batch included


def gated_model() -> onnx.ModelProto:
    """Conv -> x * HardSigmoid(gate) * 0.5 + 0.25 -> Conv: the constant operands, a float
    activation operand and a positive scalar Mul of an integer op's neighbourhood."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c1"], ["g"], name="gap"),
             helper.make_node("HardSigmoid", ["g"], ["gate"], name="hsig"),
             helper.make_node("Mul", ["c1", "gate"], ["m"], name="mul_gate"),
             helper.make_node("Mul", ["m", "half"], ["h"], name="mul_half"),
             helper.make_node("Add", ["h", "quarter"], ["a"], name="add_quarter"),
             helper.make_node("Conv", ["a", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["y"], name="gap2")]
    proto = _model(nodes, [("w1", (8, 3, 3, 3), 0.3), ("w2", (4, 8, 3, 3), 0.2)], [1, 3, 16, 16], [1, 4, 1, 1])
    proto.graph.initializer.extend([numpy_helper.from_array(np.array(0.5, np.float32), "half"),
                                    numpy_helper.from_array(np.array(0.25, np.float32), "quarter")])
    return proto


def test_plan_integer_ops_take_constants_float_operands_and_rescaling():
    p = plan(ir.load(gated_model()))
    # the gate (a float op's output) gets its own range so the Mul runs as QLinearMul; the
    # Mul by 0.5 is a rescaled DequantizeLinear; the 0.25 is stored as uint8
    assert p.nodes == ["conv1", "gap", "mul_gate", "mul_half", "add_quarter", "conv2", "relu2"]
    assert p.activations == ["x", "c1", "g", "gate", "m", "a", "r2"]
    assert p.scaled == {"h": ("m", 0.5)} and p.constants == [("add_quarter", 1)]
    # on small maps the Mul and Add with a float or constant operand stay float
    small = plan(ir.load(gated_model()), input_shapes={"x": (1, 3, 16, 16)})
    assert "add_quarter" not in small.nodes and "mul_gate" not in small.nodes and small.constants == []


def test_rescaled_and_constant_operands_run_as_integer_kernels(tmp_path):
    proto = gated_model()
    model, _, _ = quantize(proto)
    DeadCodeElimination().run(model)
    assert "mul_half" not in {n.name for n in model.graph.nodes}  # its factor went into a DQ scale
    inits = model.graph.initializers
    np.testing.assert_allclose(inits["h_scale"].tensor.numpy(), inits["m_scale"].tensor.numpy() * 0.5, rtol=1e-6)
    assert inits["quarter_quantized"].tensor.numpy().dtype == np.uint8
    out = ir.to_proto(model)
    ops = optimized_ops(out, tmp_path)
    assert ops.count("QLinearMul") == 1 and ops.count("QLinearAdd") == 1 and ops.count("QLinearConv") == 2
    assert not {"Mul", "Add"} & set(ops)
    for f in feeds(proto, 4, seed=7):
        assert cosine(session(out).run(None, f)[0], session(proto).run(None, f)[0]) > 0.99


def test_big_or_nonpositive_constants_do_not_rescale():
    proto = gated_model()
    proto.graph.initializer[-2].CopyFrom(numpy_helper.from_array(np.array(-0.5, np.float32), "half"))
    p = plan(ir.load(proto))
    assert p.scaled == {} and "mul_half" in p.nodes  # a QLinearMul with a uint8 constant instead
    assert ("mul_half", 1) in p.constants
    proto.graph.initializer[-1].CopyFrom(numpy_helper.from_array(np.zeros(5000, np.float32), "quarter"))
    assert "add_quarter" not in plan(ir.load(proto)).nodes  # 5000 values: not a small constant


# ---- insertion ---------------------------------------------------------------------------------


GOLDEN_CONV1 = """\
%w1_DequantizeLinear_out: float32[8,3,3,3] = DequantizeLinear(%w1_quantized, %w1_scale, %w1_zero_point) {axis=0}  # w1_DequantizeLinear
%b1_DequantizeLinear_out: float32[8] = DequantizeLinear(%b1_quantized, %b1_scale, %b1_zero_point) {axis=0}  # b1_DequantizeLinear
%x_QuantizeLinear_out: uint8[1,3,16,16] = QuantizeLinear(%x, %x_scale, %x_zero_point)  # x_QuantizeLinear
%x_DequantizeLinear_out: float32[1,3,16,16] = DequantizeLinear(%x_QuantizeLinear_out, %x_scale, %x_zero_point)  # x_DequantizeLinear
%c1: ? = Conv(%x_DequantizeLinear_out, %w1_DequantizeLinear_out, %b1_DequantizeLinear_out) {pads=[1, 1, 1, 1]}  # conv1
%r1: ? = Relu(%c1)  # relu1
%r1_QuantizeLinear_out: uint8[...] = QuantizeLinear(%r1, %r1_scale, %r1_zero_point)  # r1_QuantizeLinear
%r1_DequantizeLinear_out: float32[...] = DequantizeLinear(%r1_QuantizeLinear_out, %r1_scale, %r1_zero_point)  # r1_DequantizeLinear
%p1: ? = MaxPool(%r1_DequantizeLinear_out) {kernel_shape=[2, 2], strides=[2, 2]}  # pool1
%w2_DequantizeLinear_out: float32[16,8,3,3] = DequantizeLinear(%w2_quantized, %w2_scale, %w2_zero_point) {axis=0}  # w2_DequantizeLinear
%b2_DequantizeLinear_out: float32[16] = DequantizeLinear(%b2_quantized, %b2_scale, %b2_zero_point) {axis=0}  # b2_DequantizeLinear
%p1_QuantizeLinear_out: uint8[...] = QuantizeLinear(%p1, %r1_scale, %r1_zero_point)  # p1_QuantizeLinear
%p1_DequantizeLinear_out: float32[...] = DequantizeLinear(%p1_QuantizeLinear_out, %r1_scale, %r1_zero_point)  # p1_DequantizeLinear
%c2: ? = Conv(%p1_DequantizeLinear_out, %w2_DequantizeLinear_out, %b2_DequantizeLinear_out) {pads=[1, 1, 1, 1]}  # conv2"""


def test_golden_qdq_around_conv():
    model, _, result = quantize(cnn())
    text = ir.print_model(model)
    lines = [line.strip() for line in text.splitlines()]
    start = lines.index(GOLDEN_CONV1.splitlines()[0])
    assert "\n".join(lines[start:start + len(GOLDEN_CONV1.splitlines())]) == GOLDEN_CONV1
    inits = model.graph.initializers
    assert inits["w1_quantized"].tensor.numpy().dtype == np.int8
    assert inits["b1_quantized"].tensor.numpy().dtype == np.int32
    assert not {"w1", "b1", "w2", "b2", "wg", "bg"} & set(inits)  # float weights are gone
    assert inits["r1_zero_point"].tensor.numpy() == 0  # Relu's range starts at 0: ORT drops it
    # the bias scale is input scale * weight scale, per output channel
    want = inits["x_scale"].tensor.numpy().astype(np.float64) * inits["w1_scale"].tensor.numpy()
    np.testing.assert_allclose(inits["b1_scale"].tensor.numpy(), want, rtol=1e-6)
    assert result.changed and result.log.by_kind()["add-node"] == 18


def test_weights_round_trip_within_half_a_step():
    proto = cnn()
    model, _, _ = quantize(proto)
    w = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "w2"))
    inits = model.graph.initializers
    scale = inits["w2_scale"].tensor.numpy()
    back = inits["w2_quantized"].tensor.numpy().astype(np.float32) * scale[:, None, None, None]
    assert np.all(np.abs(back - w) <= scale[:, None, None, None] / 2 + 1e-7)


def test_cnn_runs_close_to_float_with_integer_kernels(tmp_path):
    proto = cnn()
    _, out, _ = quantize(proto)
    ref, q = session(proto), session(out)
    for f in feeds(proto, 4, seed=7):  # held out: not the calibration feeds
        assert cosine(q.run(None, f)[0], ref.run(None, f)[0]) > 0.99
    ops = optimized_ops(out, tmp_path)
    assert ops.count("QLinearConv") == 2 and ops.count("QGemm") == 1
    assert not {"Conv", "Gemm", "Relu"} & set(ops)
    assert "QLinearGlobalAveragePool" in ops and "MaxPool" in ops  # MaxPool runs on uint8


def test_matmul_model(tmp_path):
    proto = mlp()
    model, out, _ = quantize(proto)
    assert plan(ir.load(proto)).activations == ["x", "r1"]
    # [K, N] weights: one scale per column, axis 1
    dq = next(n for n in model.graph.nodes if n.name == "w1_DequantizeLinear")
    assert dq.attributes["axis"].value == 1
    assert model.graph.initializers["w1_scale"].tensor.shape == (64,)
    ref, q = session(proto), session(out)
    for f in feeds(proto, 4, seed=7):
        assert cosine(q.run(None, f)[0], ref.run(None, f)[0]) > 0.99
    ops = optimized_ops(out, tmp_path)
    assert "MatMul" not in ops and sum(op in INTEGER_KERNELS for op in ops) == 2


def test_graph_outputs_are_never_quantized():
    model, out, _ = quantize(cnn())
    y = model.graph.outputs[0]
    assert y.name == "y" and y.producer.op_type == "Gemm"
    assert all(n.op_type != "QuantizeLinear" for n, _ in y.uses)
    assert [o.name for o in out.graph.output] == ["y"]


def test_what_reaches_an_output_by_moving_values_only_stays_float():
    """A detector's head after the depth-to-space pass: Conv -> Sigmoid -> DepthToSpace ->
    output. The Sigmoid's output is the output rearranged: a range that clipped it (entropy
    put 0.299 under DB's 0.3 threshold) would change what the user reads."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2", "b2"], ["c2"], name="conv2"),
             helper.make_node("Sigmoid", ["c2"], ["s"], name="sigmoid"),
             helper.make_node("DepthToSpace", ["s"], ["y"], name="d2s", blocksize=2, mode="CRD")]
    inits = [("w1", (8, 3, 3, 3), 0.3), ("b1", (8,), 0.1), ("w2", (4, 8, 1, 1), 0.3), ("b2", (4,), 0.1)]
    p = plan(ir.load(_model(nodes, inits, [1, 3, 8, 8], [1, 1, 16, 16])))
    assert p.nodes == ["conv1", "relu", "conv2"]
    assert p.activations == ["x", "r", "c2"]


def test_exclusion_leaves_node_float(tmp_path):
    for exclude, float_op in ((("Gemm",), "Gemm"), (("conv2",), "Conv")):
        _, out, _ = quantize(cnn(), exclude=exclude)
        ops = optimized_ops(out, tmp_path)
        assert ops.count(float_op) == 1, exclude
        node = next(n for n in out.graph.node if n.op_type == float_op and n.name in ("fc", "conv2"))
        weights = {i.name for i in out.graph.initializer}
        assert node.input[1] in weights and node.input[1] in ("wg", "w2")  # float weight kept
    _, out, _ = quantize(cnn(), exclude=("Gemm",))
    assert optimized_ops(out, tmp_path).count("QLinearConv") == 2


def test_per_tensor_weights():
    model, out, _ = quantize(cnn(), per_channel=False)
    assert model.graph.initializers["w1_scale"].tensor.shape == ()
    assert "axis" not in next(n for n in model.graph.nodes if n.name == "w1_DequantizeLinear").attributes
    f = feeds(cnn(), 1, seed=7)[0]
    assert cosine(session(out).run(None, f)[0], session(cnn()).run(None, f)[0]) > 0.99


def test_per_channel_below_opset_13_is_refused():
    model = ir.load(cnn(opset=12, ir_version=7))
    with pytest.raises(CompileError) as e:
        InsertQDQ(CalibrationTable()).run(model)
    assert str(e.value) == ("quantize: per-channel weights need opset >= 13, the model has opset 12 "
                            "(upgrade the model or quantize weights per tensor: --per-tensor-weights)")


def test_missing_table_entry():
    proto = cnn()
    table = minmax_table(proto, ["x", "r1", "c2", "g"], feeds(proto, 2))
    del table.entries["c2"]
    with pytest.raises(CompileError) as e:
        InsertQDQ(table).run(ir.load(proto))
    assert str(e.value) == "quantize: the calibration table has no entry for tensor 'c2'"


def test_residual_add_runs_as_qlinear_add(tmp_path):
    """Add of two quantized activations is an integer op; its Relu is absorbed."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["r1", "c2"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["ra"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["ra"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wg"], ["y"], name="fc", transB=1)]
    proto = _model(nodes, [("w1", (8, 3, 3, 3), 0.3), ("w2", (8, 8, 3, 3), 0.2), ("wg", (4, 8), 0.3)],
                   [1, 3, 8, 8], [1, 4])
    p = plan(ir.load(proto))
    assert p.activations == ["x", "r1", "c2", "ra", "g"] and p.shared == {"f": "g"}
    _, out, _ = quantize(proto)
    ops = optimized_ops(out, tmp_path)
    assert ops.count("QLinearAdd") == 1 and ops.count("QLinearConv") == 2 and "Relu" not in ops
    f = feeds(proto, 1, seed=7)[0]
    assert cosine(session(out).run(None, f)[0], session(proto).run(None, f)[0]) > 0.99


# ---- integer forms: HardSwish as ops with integer kernels ---------------------------------------


HARDSWISH_CNN = """<ir_version: 8, opset_import: ["" : 14]>
g (float[1,3,16,16] x) => (float[1,4,1,1] y) {
  c1 = Conv<pads = [1, 1, 1, 1]>(x, w1)
  h = HardSwish(c1)
  c2 = Conv<pads = [1, 1, 1, 1]>(h, w2)
  r2 = Relu(c2)
  y = GlobalAveragePool(r2)
}"""


def hardswish_cnn() -> onnx.ModelProto:
    proto = onnx.parser.parse_model(HARDSWISH_CNN)
    rng = np.random.default_rng(3)
    proto.graph.initializer.extend([
        numpy_helper.from_array(rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.2, (4, 8, 3, 3)).astype(np.float32), "w2")])
    return proto


def test_integer_forms_golden_and_numbers():
    proto = hardswish_cnn()
    model = ir.load(proto)
    result = IntegerForms().run(model)
    assert result.log.by_rule() == {"HardSwishAsIntegerOps": 1}
    lines = [line.strip() for line in ir.print_graph(model.graph).splitlines() if "init " not in line]
    assert lines[2:7] == [
        "%HardSwish__1_add3_out: ? = Add(%c1, %HardSwish__1_three)  # HardSwish__1_add3",
        "%HardSwish__1_relu6_out: ? = Clip(%HardSwish__1_add3_out, %HardSwish__1_zero, %HardSwish__1_six)"
        "  # HardSwish__1_relu6",
        "%HardSwish__1_sixth_out: ? = Mul(%HardSwish__1_relu6_out, %HardSwish__1_sixth)  # HardSwish__1_sixth",
        "%HardSwish__1_hardswish_out: ? = Mul(%c1, %HardSwish__1_sixth_out)  # HardSwish__1_hardswish",
        "%c2: ? = Conv(%HardSwish__1_hardswish_out, %w2) {pads=[1, 1, 1, 1]}  # Conv__2"]
    for f in feeds(proto, 3, seed=9):  # the same function, in float
        want, got = session(proto).run(None, f)[0], session(ir.to_proto(model)).run(None, f)[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_hardswish_runs_as_qlinear_add_and_mul(tmp_path):
    proto = hardswish_cnn()
    model = ir.load(proto)
    IntegerForms().run(model)
    lowered = ir.to_proto(model)
    p = plan(model)
    assert p.scaled == {"HardSwish__1_sixth_out": ("HardSwish__1_relu6_out", pytest.approx(1 / 6))}
    assert p.constants == [("HardSwish__1_add3", 1)]
    assert "HardSwish__1_relu6_out" in p.activations  # after the Clip: its range is [0, 6]
    table = minmax_table(lowered, p.activations, feeds(lowered))
    InsertQDQ(table).run(model)
    DeadCodeElimination().run(model)
    out = ir.to_proto(model)
    ops = optimized_ops(out, tmp_path)
    assert ops.count("QLinearAdd") == 1 and ops.count("QLinearMul") == 1 and ops.count("QLinearConv") == 2
    assert not {"HardSwish", "HardSigmoid", "Clip", "Mul", "Add"} & set(ops)
    for f in feeds(proto, 4, seed=7):
        assert cosine(session(out).run(None, f)[0], session(proto).run(None, f)[0]) > 0.99


def test_integer_forms_leave_small_excluded_and_other_hardsigmoids():
    model = ir.load(hardswish_cnn())
    assert not IntegerForms(input_shapes={"x": (1, 3, 16, 16)}).run(model).changed  # 2048 values: small
    assert not IntegerForms(exclude=("HardSwish",)).run(model).changed
    rule = HardSwishAsIntegerOps()
    rule.model = model
    assert rule.match(model.graph.nodes[1]) == Match([model.graph.nodes[1]], {"x": model.graph.nodes[0].outputs[0]})
    hs = ir.load(onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 14]>
g (float[1,L] x) => (float[1,L] y) { s = HardSigmoid<alpha = 0.2, beta = 0.5>(x)  y = Mul(x, s) }"""))
    rule.model = hs
    assert rule.match(hs.graph.nodes[1]) == Reject("not HardSwish(x) or x * HardSigmoid(x, 1/6, 0.5)")


def concat_of_upsampled() -> onnx.ModelProto:
    """Conv -> Concat([conv out, Resize(Tanh(low-res conv out))]) -> Conv -> Tanh: the Concat's second
    input comes from a float op (Tanh has no integer kernel) through an upsampling Resize."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "w2"], ["c2"], name="conv_low", strides=[2, 2]),
             helper.make_node("Tanh", ["c2"], ["t"], name="tanh"),
             helper.make_node("Resize", ["t", "", "up"], ["u"], name="upsample", mode="nearest"),
             helper.make_node("Concat", ["c1", "u"], ["cat"], name="concat", axis=1),
             helper.make_node("Conv", ["cat", "w3"], ["c3"], name="conv_out"),
             helper.make_node("Tanh", ["c3"], ["y"], name="tanh_out")]
    proto = _model(nodes, [("w1", (8, 3, 3, 3), 0.3), ("w2", (8, 3, 2, 2), 0.3), ("w3", (4, 16, 1, 1), 0.3)],
                   [1, 3, 16, 16], [1, 4, 16, 16])
    proto.graph.initializer.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "up"))
    return proto


def test_a_concat_input_from_a_float_op_is_quantized_before_its_resize(tmp_path):
    p = plan(ir.load(concat_of_upsampled()))
    # the Q goes on the Tanh's output, before the upsampling: the Resize moves uint8 and
    # QLinearConcat requantizes its two inputs' scales
    assert p.nodes == ["conv1", "conv_low", "upsample", "concat", "conv_out"]
    assert p.activations == ["x", "c1", "c2", "t", "cat", "c3"] and p.shared == {"u": "t"}
    proto = concat_of_upsampled()
    _, out, _ = quantize(proto)
    ops = optimized_ops(out, tmp_path)
    assert ops.count("QLinearConcat") == 1 and "Concat" not in ops and ops.count("QLinearConv") == 3
    for f in feeds(proto, 4, seed=7):
        assert cosine(session(out).run(None, f)[0], session(proto).run(None, f)[0]) > 0.99
