"""Weight-only low-bit MatMul (rewrites/weight_only.py, compiler/weight_only.py): the
MatMulNBits and blocked DequantizeLinear forms compute exactly the dequantized weights in
onnxruntime, onnxruntime fuses the DequantizeLinear form, Gemm's transB/alpha/bias, shared
and tied weights, embeddings, exclusions, option errors, the compile API and the CLI."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import compiler
import ir
from compiler.cli import main as cli_main
from ir import CompileError
from rewrites.block_quant import dequantize, rtn
from rewrites.weight_only import WeightOnly

RNG = np.random.default_rng(7)
K, N = 40, 24  # K is not a multiple of the block: the last block is short


def build(nodes, inits, inputs, opset=21, ir_version=10) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


def matmul_model(w, opset=21, ir_version=10) -> onnx.ModelProto:
    return build([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], {"w": w},
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, w.shape[0]])], opset, ir_version)


def ort_run(model: onnx.ModelProto, feed: dict, optimized: str | None = None):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if optimized \
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized:
        opts.optimized_model_filepath = optimized
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)[0]


def apply(proto: onnx.ModelProto, **options):
    model = ir.load(proto)
    result = WeightOnly(**options).run(model)
    return ir.to_proto(model), result.log


def weight_only_reference(w: np.ndarray, bits: int, block: int, symmetric=True) -> np.ndarray:
    """The [K, N] weight as the low-bit model holds it (rows of rtn are B's columns)."""
    return dequantize(*rtn(w.T.astype(np.float64), bits, block, symmetric), block).T


def test_matmul_becomes_matmulnbits_that_computes_the_dequantized_weight():
    w = RNG.standard_normal((K, N)).astype(np.float32)
    out, log = apply(matmul_model(w), bits=4, block_size=16, accuracy_level=0)
    assert log.by_rule() == {"WeightOnlyMatMul": 1}
    (node,) = out.graph.node
    assert (node.op_type, node.domain) == ("MatMulNBits", "com.microsoft")
    assert {a.name: a.i for a in node.attribute} == {"K": 40, "N": 24, "bits": 4, "block_size": 16,
                                                     "accuracy_level": 0}
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert [inits[i].shape for i in node.input[1:]] == [(24, 3, 8), (24, 3)]  # packed B, scales
    assert "w" not in inits and {o.domain: o.version for o in out.opset_import}["com.microsoft"] == 1
    x = RNG.standard_normal((2, 3, K)).astype(np.float32)
    np.testing.assert_allclose(ort_run(out, {"x": x}), x @ weight_only_reference(w, 4, 16), rtol=1e-5, atol=1e-5)


def test_default_accuracy_level_is_4():
    out, _ = apply(matmul_model(RNG.standard_normal((K, N)).astype(np.float32)), bits=2)
    assert {a.name: a.i for a in out.graph.node[0].attribute}["accuracy_level"] == 4


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("symmetric", [True, False])
def test_nbits_and_dq_forms_agree(bits, symmetric, tmp_path):
    opset, irv = (25, 13) if bits == 2 else (21, 10)
    w = RNG.standard_normal((K, N)).astype(np.float32)
    x = RNG.standard_normal((2, 3, K)).astype(np.float32)
    nbits, _ = apply(matmul_model(w, opset, irv), bits=bits, block_size=16, symmetric=symmetric, accuracy_level=0)
    dq, log = apply(matmul_model(w, opset, irv), bits=bits, block_size=16, symmetric=symmetric, format="dq")
    assert [n.op_type for n in dq.graph.node] == ["DequantizeLinear", "MatMul"]
    q = next(t for t in dq.graph.initializer if t.name.endswith(f"_q{bits}"))
    assert q.data_type == {8: TensorProto.INT8, 4: TensorProto.INT4, 2: TensorProto.INT2}[bits]
    assert len(dq.graph.node[0].input) == (2 if symmetric else 3)
    want = x @ weight_only_reference(w, bits, 16, symmetric)
    np.testing.assert_allclose(ort_run(nbits, {"x": x}), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ort_run(dq, {"x": x}), want, rtol=1e-5, atol=1e-5)
    # Deployed, onnxruntime turns the pair into its MatMulNBits kernel.
    fused = ort_run(dq, {"x": x}, optimized=str(tmp_path / "opt.onnx"))
    assert [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node] == ["MatMulNBits"]
    # The fused kernel quantizes x to int8 (accuracy_level 4): within a few parts in a thousand.
    assert np.abs(fused - want).max() < 0.02 * np.abs(want).max()


def test_dq_int2_keeps_float_what_onnxruntime_would_fuse_wrongly():
    w = RNG.standard_normal((K, 6)).astype(np.float32)
    out, log = apply(matmul_model(w, 25, 13), bits=2, format="dq")
    assert not log.by_rule() and [n.op_type for n in out.graph.node] == ["MatMul"]
    assert [c.detail for c in log if c.kind == "skip"] == [
        "N = 6 is not a multiple of 4: onnxruntime's fusion of int2 DequantizeLinear miscomputes it "
        "(the nbits format does not)"]
    out, log = apply(matmul_model(w, 25, 13), bits=2, format="nbits")
    assert log.by_rule() == {"WeightOnlyMatMul": 1}


def test_gemm_transb_alpha_and_bias():
    w = RNG.standard_normal((N, K)).astype(np.float32)  # transB: [N, K]
    c = RNG.standard_normal(N).astype(np.float32)
    model = build([helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="g", transB=1, alpha=0.5, beta=2.0)],
                  {"w": w, "c": c}, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, K])])
    x = RNG.standard_normal((3, K)).astype(np.float32)
    want = x @ (dequantize(*rtn(w.astype(np.float64) * 0.5, 4, 32), 32).T) + 2 * c
    nbits, log = apply(model, bits=4, accuracy_level=0)
    assert [n.op_type for n in nbits.graph.node] == ["MatMulNBits"] and len(nbits.graph.node[0].input) == 6
    np.testing.assert_allclose(ort_run(nbits, {"x": x}), want, rtol=1e-5, atol=1e-5)
    dq, _ = apply(model, bits=4, format="dq")
    assert [n.op_type for n in dq.graph.node] == ["DequantizeLinear", "MatMul", "Add"]
    np.testing.assert_allclose(ort_run(dq, {"x": x}), want, rtol=1e-5, atol=1e-5)


def test_shared_weight_is_stored_once_and_a_weight_read_elsewhere_stays_float():
    w = RNG.standard_normal((K, K)).astype(np.float32)
    shared = build([helper.make_node("MatMul", ["x", "w"], ["h"], name="a"),
                    helper.make_node("MatMul", ["h", "w"], ["y"], name="b")],
                   {"w": w}, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, K])])
    out, log = apply(shared, bits=4)
    assert log.by_rule() == {"WeightOnlyMatMul": 2} and len(out.graph.initializer) == 2
    assert out.graph.node[0].input[1:] == out.graph.node[1].input[1:]
    tied = build([helper.make_node("MatMul", ["x", "w"], ["h"], name="a"),
                  helper.make_node("Add", ["h", "w"], ["y"], name="add")],
                 {"w": w}, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [K, K])])
    out, log = apply(tied, bits=4)
    assert not log.by_rule() and [n.op_type for n in out.graph.node] == ["MatMul", "Add"]
    assert [c.detail for c in log if c.kind == "skip"] == ["weight %w is also read by add"]


def two_layers() -> onnx.ModelProto:
    return build([helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"),
                  helper.make_node("Relu", ["h"], ["r"]),
                  helper.make_node("MatMul", ["r", "w2"], ["y"], name="second")],
                 {"w1": RNG.standard_normal((K, 64)).astype(np.float32),
                  "w2": RNG.standard_normal((64, N)).astype(np.float32)},
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", K])])


def test_dq_notes_a_matmul_onnxruntime_will_not_fuse(tmp_path):
    out, log = apply(two_layers(), format="dq")
    assert [(c.target, c.detail) for c in log if c.kind == "note"] == \
        [("first", "followed by Relu/Clip: onnxruntime does not fuse it, the nbits format does")]
    ort_run(out, {"x": np.zeros((2, K), np.float32)}, optimized=str(tmp_path / "opt.onnx"))
    assert [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node] == \
        ["DequantizeLinear", "MatMul", "Relu", "MatMulNBits"]


def test_exclusions():
    out, log = apply(two_layers(), exclude=("first",))
    assert log.by_rule() == {"WeightOnlyMatMul": 1}
    assert [n.op_type for n in out.graph.node] == ["MatMul", "Relu", "MatMulNBits"]
    out, log = apply(two_layers(), exclude=("MatMul",))
    assert not log.by_rule()
    with pytest.raises(CompileError, match=r"^weight-only: exclude 'nope' is neither a node name nor an op "
                                           r"type of the model$"):
        apply(two_layers(), exclude=("nope",))


def embedding_model(opset=21, tied=False) -> onnx.ModelProto:
    table = RNG.standard_normal((50, 32)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed")]
    if tied:  # the output head reads the same table
        nodes += [helper.make_node("Transpose", ["table"], ["t"]), helper.make_node("MatMul", ["e", "t"], ["y"])]
    else:
        nodes += [helper.make_node("Identity", ["e"], ["y"])]
    return build(nodes, {"table": table}, [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])], opset)


@pytest.mark.parametrize("fmt,op", [("nbits", "GatherBlockQuantized"), ("dq", "DequantizeLinear")])
def test_embeddings_become_int4(fmt, op):
    proto = embedding_model()
    table = numpy_helper.to_array(proto.graph.initializer[0])
    out, log = apply(proto, bits=8, format=fmt, embeddings=True, block_size=16)
    assert log.by_rule() == {"WeightOnlyGather": 1} and out.graph.node[0].op_type == op
    ids = np.array([[1, 49, 0], [7, 7, 3]], np.int64)
    want = dequantize(*rtn(table.astype(np.float64), 4, 16), 16)[ids]
    np.testing.assert_allclose(ort_run(out, {"ids": ids}), want, rtol=1e-6, atol=1e-6)
    out, log = apply(embedding_model(tied=True), embeddings=True)
    assert not log.by_rule().get("WeightOnlyGather")
    assert "%table: also read by another op than Gather on axis 0" in [f"{c.target}: {c.detail}" for c in log]


def test_dq_refuses_an_old_opset():
    with pytest.raises(CompileError, match=r"^weight-only: 2-bit blocked DequantizeLinear needs opset 25, the model "
                                           r"has opset 21 \(use the nbits format, or upgrade the model\)$"):
        apply(matmul_model(np.ones((K, N), np.float32)), bits=2, format="dq")


@pytest.mark.parametrize("options,message", [
    ({"bits": 3}, "weight-only: bits must be one of 2, 4, 8, got 3"),
    ({"block_size": 24}, "weight-only: block size must be a power of two >= 16, got 24"),
    ({"block_size": 8}, "weight-only: block size must be a power of two >= 16, got 8"),
    ({"format": "qdq"}, "weight-only: unknown format 'qdq' (expected nbits or dq)"),
    ({"rounding": "awq"}, "weight-only: unknown rounding 'awq' (expected rtn, gptq or adaround)"),
])
def test_option_errors(options, message):
    with pytest.raises(CompileError) as e:
        WeightOnly(**options)
    assert str(e.value) == message


def test_gptq_in_the_pass_needs_statistics():
    with pytest.raises(CompileError, match=r"^weight-only: rounding 'gptq' has no input statistics for 'first' "
                                           r"\(it needs calibration data\)$"):
        apply(two_layers(), rounding="gptq")


MIX = RNG.standard_normal((K, K))  # correlated inputs: where GPTQ and AdaRound pay


def calibration(n=24):
    return [{"x": (RNG.standard_normal((8, K)) @ MIX).astype(np.float32)} for _ in range(n)]


def mean_squared_error(result, proto, feeds):
    return float(np.mean([np.mean((ort_run(result.model, f) - ort_run(proto, f)) ** 2) for f in feeds]))


def test_compile_rtn_gptq_adaround():
    proto, feeds = two_layers(), calibration()
    test = calibration(4)
    errors = {}
    for rounding in ("rtn", "gptq", "adaround"):
        result = compiler.compile(proto, weight_only="int2", weight_rounding=rounding, calibration=feeds,
                                  min_cosine=0.5)
        assert f"int2 weights (nbits, block 32, {rounding}): 2 MatMul/Gemm low-bit" in result.report.headline()
        assert result.report.integer_kernels.kernels == {"MatMulNBits": 2}
        errors[rounding] = mean_squared_error(result, proto, test)
    assert errors["gptq"] < 0.8 * errors["rtn"] and errors["adaround"] < 0.8 * errors["rtn"]


def test_compile_errors():
    proto = two_layers()
    with pytest.raises(CompileError, match=r"^weight rounding 'gptq' needs calibration data \(--calib DIR\): it "
                                           r"rounds against each MatMul's inputs$"):
        compiler.compile(proto, weight_only="int4", weight_rounding="gptq")
    with pytest.raises(CompileError, match=r"^unknown weight-only mode 'int3' \(choose from: int8, int4, int2\)$"):
        compiler.compile(proto, weight_only="int3")
    with pytest.raises(CompileError, match=r"^block size must be a power of two >= 16 \(onnxruntime's MatMulNBits\), "
                                           r"got 48$"):
        compiler.compile(proto, weight_only="int4", block_size=48)
    with pytest.raises(CompileError, match=r"^unknown weight format 'qdq' \(choose from: nbits, dq\)$"):
        compiler.compile(proto, weight_only="int4", weight_format="qdq")
    with pytest.raises(CompileError, match=r"^block_size, weight_format, quantize_embeddings and "
                                           r"weight_only_exclude are for weight-only quantization: they need "
                                           r"weight_only$"):
        compiler.compile(proto, quantize_embeddings=True)
    with pytest.raises(CompileError, match=r"^weight_rounding 'gptq' is for quantized weights: it needs "
                                           r"quantize='int8'$"):
        compiler.compile(proto, weight_rounding="gptq")


def test_compile_dq_upgrades_the_opset_and_checks_the_cosine_budget():
    proto = build([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                  {"w": RNG.standard_normal((K, N)).astype(np.float32)},
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, K])], opset=17, ir_version=8)
    result = compiler.compile(proto, weight_only="int2", weight_format="dq", min_cosine=0.5)
    assert "opset upgraded from 17 to 25 for int2 weights as DequantizeLinear" in result.report.notes
    assert result.model.ir_version == 13 and result.report.verification.ok
    with pytest.raises(compiler.VerificationError):  # 2-bit plain rounding is far from float
        compiler.compile(proto, weight_only="int2", min_cosine=0.999)


def test_weight_only_with_int8_quantization_of_the_rest():
    conv = build([helper.make_node("Conv", ["x", "cw"], ["c"], name="conv"),
                  helper.make_node("Relu", ["c"], ["r"]),
                  helper.make_node("Flatten", ["r"], ["f"]),
                  helper.make_node("MatMul", ["f", "w"], ["y"], name="mm")],
                 {"cw": RNG.standard_normal((8, 3, 3, 3)).astype(np.float32),
                  "w": RNG.standard_normal((8 * 4 * 4, N)).astype(np.float32)},
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])])
    feeds = [{"x": RNG.standard_normal((1, 3, 6, 6)).astype(np.float32)} for _ in range(12)]
    result = compiler.compile(conv, weight_only="int4", quantize="int8", calibration=feeds, min_cosine=0.9)
    assert result.report.integer_kernels.kernels == {"MatMulNBits": 1, "QLinearConv": 1}


def test_cli(tmp_path, capsys):
    path, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(two_layers(), str(path))
    assert cli_main(["compile", str(path), "-o", str(out), "--weight-only", "int8", "--block-size", "16",
                     "--min-cosine", "0.9"]) == 0
    assert "int8 weights (nbits, block 16, rtn): 2 MatMul/Gemm low-bit" in capsys.readouterr().out
    assert [n.op_type for n in onnx.load(str(out)).graph.node] == ["MatMulNBits", "Relu", "MatMulNBits"]
    assert cli_main(["compile", str(path), "-o", str(out), "--block-size", "64"]) == 2
    assert "--block-size, --weight-format and --quantize-embeddings need --weight-only" in capsys.readouterr().err


@pytest.mark.slow
def test_recognizer_w4_gptq_beats_rtn():
    from tests.real_models import find_model_files, realistic_feeds

    files = [p for p in find_model_files("rapidocr_onnxruntime") if "rec" in p.name]
    if not files:
        pytest.skip("rapidocr-onnxruntime not installed: pip install --no-deps rapidocr-onnxruntime")
    feeds = [f for seed in range(5) for f in realistic_feeds(files[0], seed)]
    cosine = {}
    for rounding in ("rtn", "gptq"):
        result = compiler.compile(str(files[0]), weight_only="int4", weight_rounding=rounding, calibration=feeds,
                                  min_cosine=0.9)
        assert f"int4 weights (nbits, block 32, {rounding}): 9 MatMul/Gemm low-bit" in result.report.headline()
        cosine[rounding] = min(o.cosine for o in result.report.verification.outputs)
    # The MatMuls with a constant weight: attention projections, MLPs and the 6625-wide head.
    assert result.report.file_size_after[0] < 0.7 * result.report.file_size_before[0]
    assert cosine["gptq"] > cosine["rtn"]
