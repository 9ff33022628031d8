"""QDQ placement for onnxruntime's CPU EP (rewrites/qdq.py, rewrites/qdq_targets.py).

Small float models; the table comes from min/max ranges of the planned activations observed
with onnxruntime on random inputs. Checked: the plan, golden text around a Conv, accuracy
against the float model, which Conv/MatMul/Gemm onnxruntime turns into integer kernels (read
back from its optimized graph), graph outputs left float, exclusions, and the error messages.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import ir
from calibration.scales import params_from_range
from calibration.table import CalibrationTable, TableEntry
from ir import CompileError
from rewrites.qdq import InsertQDQ, plan

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
    # conv1 still needs its output Q; nothing quantized reads c2, so GAP stays float
    assert p.activations == ["x", "r1", "f"]
    assert p.shared == {} and "pool1" not in p.nodes  # its only reader is the float conv2
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


def test_plan_depthwise_conv_stays_float_on_ort_cpu():
    """ORT's integer depthwise Conv is slower than its float one (qdq_targets.py): the
    pointwise Convs around it are quantized, the depthwise one is not."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="pw1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "wd"], ["d"], name="dw", group=8, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["d", "w2"], ["c2"], name="pw2"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["y"], name="gap")]
    proto = _model(nodes, [("w1", (8, 3, 1, 1), 0.3), ("wd", (8, 1, 3, 3), 0.3), ("w2", (4, 8, 1, 1), 0.3)],
                   [1, 3, 8, 8], [1, 4, 1, 1])
    p = plan(ir.load(proto))
    assert p.weighted == ["pw1", "pw2"] and p.activations == ["x", "r1", "d", "r2"]
    grouped = proto.graph.initializer[1]  # group 2 of 4 channels each: not depthwise
    grouped.CopyFrom(numpy_helper.from_array(np.ones((8, 4, 3, 3), np.float32), "wd"))
    proto.graph.node[2].attribute[0].i = 2
    assert plan(ir.load(proto)).weighted == ["pw1", "dw", "pw2"]


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
