"""Portable fusions (rewrites/fusions.py): BatchNorm, per-channel Mul and bias Add folded into
Conv/ConvTranspose/Gemm/MatMul, MatMul + Add -> Gemm, LayerNormalization and Gelu.

Each rule: a positive test (golden text, change-log counts), negative tests (the exact
Reject reason) and equivalence in onnxruntime within the pipeline's tolerance
|a - b| <= 1e-5 + 1e-4 |b|, on random inputs and on realistic scales.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper, parser

import ir
from rewrites.base import Reject
from rewrites.fusions import (FuseBatchNorm, FuseConvAdd, FuseConvInputAffine, FuseConvMul, FuseGelu,
                              FuseHardSwish, FuseLayerNorm, FuseMatMulAdd, fuse)
from tests.real_models import find_model_files, realistic_feeds

ATOL, RTOL = 1e-5, 1e-4  # compiler/verify.py's Tolerance for exact pipelines


def parse(text: str) -> ir.Model:
    return ir.load(parser.parse_model(text))


def ort_run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    """onnxruntime with its own fusions off, so a difference is ours (DESIGN §5)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3  # fused-away weights stay for the dead-code pass: ORT warns
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_close(got: list, want: list) -> None:
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        excess = np.abs(a.astype(np.float64) - b) - (ATOL + RTOL * np.abs(b.astype(np.float64)))
        assert excess.max() <= 0, f"max abs diff {np.abs(a - b).max()}"


def fuse_and_compare(model: ir.Model, feeds: list[dict], rules=None) -> dict:
    """Run the pass, check invariants and outputs before vs after; return the rule counts."""
    before = ir.to_proto(model)
    result = (fuse() if rules is None else rules).run(model)
    ir.verify(model)
    after = ir.to_proto(model)
    onnx.checker.check_model(after)
    for f in feeds:
        assert_close(ort_run(after, f), ort_run(before, f))
    return dict(result.log.by_rule())


def ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph.nodes]


def node(model: ir.Model, op_type: str) -> ir.Node:
    return next(n for n in model.graph.nodes if n.op_type == op_type)


def verdict(rule, model: ir.Model, op_type: str):
    rule.model = model  # what the driver sets: the rule reads the opset from it
    return rule.match(node(model, op_type))


def init(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def build(nodes, inputs, outputs, inits, opset=21, ir_version=10) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = ir_version
    return ir.load(proto)


def tensor(name, shape, dtype=onnx.TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def bn_params(rng, c: int, realistic: bool = True) -> list[np.ndarray]:
    """scale, bias, mean, var; 'realistic': small variances (large 1/sqrt(var)), offset means."""
    scale = rng.normal(1.0, 0.3, c)
    bias = rng.normal(0.0, 0.5, c)
    mean = rng.normal(0.0, 2.0 if realistic else 0.5, c)
    var = rng.uniform(1e-3, 0.05, c) if realistic else rng.uniform(0.5, 2.0, c)
    return [p.astype(np.float32) for p in (scale, bias, mean, var)]


# -- BatchNormalization ---------------------------------------------------------------------

CONV_BN = """<ir_version: 10, opset_import: ["" : 21]>
g (float[1,2,3,3] x) => (float[1,2,3,3] y)
  <float[2,2,1,1] w = {1.0, 2.0, 3.0, 4.0}, float[2] b = {1.0, -1.0},
   float[2] scale = {2.0, 0.5}, float[2] shift = {0.5, 0.25},
   float[2] mean = {1.0, 3.0}, float[2] var = {4.0, 1.0}> {
  c = Conv(x, w, b)
  y = BatchNormalization<epsilon = 0.0>(c, scale, shift, mean, var)
}"""


def test_bn_folds_into_conv_golden_and_log():
    model = parse(CONV_BN)
    result = fuse().run(model)
    ir.verify(model)
    assert result.log.by_rule() == {"FuseBatchNorm": 1}
    assert result.log.by_kind() == {"add-initializer": 2, "set-input": 2, "replace-uses": 1, "remove-node": 1}
    # s = scale / sqrt(var) = [1, 0.5]; w' = w * s; b' = (b - mean) * s + shift
    assert ir.print_graph(model.graph) == (
        'graph "g" (%x: float32[1,2,3,3]) {\n'
        "  init %w = float32[2,2,1,1] [1.0, 2.0, 3.0, 4.0]\n"
        "  init %b = float32[2] [1.0, -1.0]\n"
        "  init %scale = float32[2] [2.0, 0.5]\n"
        "  init %shift = float32[2] [0.5, 0.25]\n"
        "  init %mean = float32[2] [1.0, 3.0]\n"
        "  init %var = float32[2] [4.0, 1.0]\n"
        "  init %w_fused = float32[2,2,1,1] [1.0, 2.0, 1.5, 2.0]\n"
        "  init %b_fused = float32[2] [0.5, -1.75]\n"
        "  %y: float32[1,2,3,3] = Conv(%x, %w_fused, %b_fused)  # Conv__1\n"
        "  return %y: float32[1,2,3,3]\n"
        "}\n")


def conv_bn(w: np.ndarray, params: list[np.ndarray], shape: list[int]) -> ir.Model:
    """x -> Conv(w, pads 1, no bias) -> BatchNormalization(params)."""
    out = [shape[0], w.shape[0], *shape[2:]]
    return build([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                  helper.make_node("BatchNormalization", ["c", "s", "t", "m", "v"], ["y"])],
                 [tensor("x", shape)], [tensor("y", out)],
                 [init("w", w), *(init(n, p) for n, p in zip("stmv", params))])


def test_bn_into_conv_keeps_numbers_on_realistic_statistics():
    """Statistics taken from the Conv's own outputs, as training leaves them."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.2, (8, 4, 3, 3)).astype(np.float32)
    conv = _conv_numpy(rng.normal(0.3, 1, (8, 4, 16, 16)), w, np.zeros(8))
    params = [rng.normal(1, 0.3, 8), rng.normal(0, 0.5, 8), conv.mean(axis=(0, 2, 3)), conv.var(axis=(0, 2, 3))]
    model = conv_bn(w, [p.astype(np.float32) for p in params], [2, 4, 16, 16])
    feeds = [{"x": rng.normal(0.3, 1, (2, 4, 16, 16)).astype(np.float32)},
             {"x": rng.normal(-1, 3, (2, 4, 16, 16)).astype(np.float32)}]  # off-distribution
    assert fuse_and_compare(model, feeds) == {"FuseBatchNorm": 1}
    assert ops(model) == ["Conv"]  # the bias-less Conv was replaced by one with a bias
    assert len(model.graph.nodes[0].inputs) == 3


def test_bn_fold_is_as_accurate_as_the_original_when_statistics_do_not_fit():
    """Variances far below the data's (1/sqrt(var) up to 30 on inputs of std 10): outputs
    near zero come from cancelling large terms, and both graphs round there. Folding keeps
    the error of the original against exact float64 arithmetic."""
    rng = np.random.default_rng(16)
    w = rng.normal(0, 0.2, (8, 4, 3, 3)).astype(np.float32)
    scale, shift, mean, var = bn_params(rng, 8)
    x = rng.normal(3, 10, (2, 4, 16, 16)).astype(np.float32)
    model = conv_bn(w, [scale, shift, mean, var], list(x.shape))
    before = ir.to_proto(model)
    fuse().run(model)
    exact = (_conv_numpy(x, w, np.zeros(8)) - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5) \
        * scale[:, None, None] + shift[:, None, None]
    original = np.abs(ort_run(before, {"x": x})[0] - exact).max()
    fused = np.abs(ort_run(ir.to_proto(model), {"x": x})[0] - exact).max()
    assert fused <= 2 * original, (fused, original)


def test_conv_bn_relu_net_folds_every_bn():
    """A small Conv -> BN -> Relu net, BN statistics taken from the convolutions' outputs."""
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (2, 3, 20, 20)).astype(np.float32)
    nodes, inits, prev, channels = [], [], "x", [3, 8, 8, 16]
    act = x.astype(np.float64)
    for i, (cin, cout) in enumerate(zip(channels, channels[1:])):
        w = rng.normal(0, np.sqrt(2 / (cin * 9)), (cout, cin, 3, 3)).astype(np.float32)
        b = rng.normal(0, 0.1, cout).astype(np.float32)
        inits += [init(f"w{i}", w), init(f"b{i}", b)]
        nodes.append(helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        conv = _conv_numpy(act, w, b)
        mean, var = conv.mean(axis=(0, 2, 3)), conv.var(axis=(0, 2, 3))
        scale, shift = rng.normal(1, 0.2, cout), rng.normal(0, 0.2, cout)
        inits += [init(f"{k}{i}", v) for k, v in zip("stmv", (scale, shift, mean, var))]
        nodes.append(helper.make_node("BatchNormalization", [f"c{i}", f"s{i}", f"t{i}", f"m{i}", f"v{i}"],
                                      [f"n{i}"], epsilon=1e-5))
        nodes.append(helper.make_node("Relu", [f"n{i}"], [f"r{i}"]))
        bn = (conv - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5) * scale[:, None, None] \
            + shift[:, None, None]
        act, prev = np.maximum(bn, 0), f"r{i}"
    model = build(nodes, [tensor("x", [2, 3, 20, 20])], [tensor(prev, [2, 16, 20, 20])], inits)
    feeds = [{"x": x}, {"x": rng.normal(0, 1, x.shape).astype(np.float32)}]
    assert fuse_and_compare(model, feeds) == {"FuseBatchNorm": 3}
    assert ops(model) == ["Conv", "Relu"] * 3


def _conv_numpy(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """3x3 'same' convolution in float64 (to compute realistic BN statistics)."""
    n, c, h, wd = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], h, wd))
    for dy in range(3):
        for dx in range(3):
            out += np.einsum("nchw,oc->nohw", padded[:, :, dy:dy + h, dx:dx + wd], w[:, :, dy, dx])
    return out + b[None, :, None, None]


def test_bn_into_grouped_conv_transpose():
    rng = np.random.default_rng(2)
    w = rng.normal(0, 0.3, (4, 3, 2, 2)).astype(np.float32)  # [C_in, C_out/group, k, k], group 2
    model = build([helper.make_node("ConvTranspose", ["x", "w", "b"], ["c"], group=2, strides=[2, 2]),
                   helper.make_node("BatchNormalization", ["c", "s", "t", "m", "v"], ["y"])],
                  [tensor("x", [1, 4, 5, 5])], [tensor("y", [1, 6, 10, 10])],
                  [init("w", w), init("b", rng.normal(0, 1, 6)),
                   *(init(n, p) for n, p in zip("stmv", bn_params(rng, 6)))])
    feeds = [{"x": rng.normal(0, 1, (1, 4, 5, 5)).astype(np.float32)}]
    assert fuse_and_compare(model, feeds) == {"FuseBatchNorm": 1}
    assert ops(model) == ["ConvTranspose"]


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, [6], [3, 6]])
def test_bn_into_gemm(trans_b, c_shape):
    rng = np.random.default_rng(3)
    b = rng.normal(0, 0.5, (6, 5) if trans_b else (5, 6))
    inits = [init("b", b), *(init(n, p) for n, p in zip("stmv", bn_params(rng, 6)))]
    inputs = ["a", "b"]
    if c_shape is not None:
        inits.append(init("c", rng.normal(0, 1, c_shape)))
        inputs.append("c")
    model = build([helper.make_node("Gemm", inputs, ["g"], transB=trans_b, alpha=0.5, beta=2.0),
                   helper.make_node("BatchNormalization", ["g", "s", "t", "m", "v"], ["y"])],
                  [tensor("a", [3, 5])], [tensor("y", [3, 6])], inits)
    assert fuse_and_compare(model, [{"a": rng.normal(0, 1, (3, 5)).astype(np.float32)}]) == {"FuseBatchNorm": 1}
    gemm = model.graph.nodes[0]
    assert ops(model) == ["Gemm"] and "beta" not in gemm.attributes  # beta went into C


MATMUL_BN = """<ir_version: 10, opset_import: ["" : OPSET]>
g (float[N,2] a) => (float[N,2] y)
  <float[2,2] w = {1.0, 2.0, 3.0, 4.0}, float[2] scale = {2.0, 0.5}, float[2] shift = {0.0, 1.0},
   float[2] mean = {0.0, 2.0}, float[2] var = {1.0, 1.0}> {
  m = MatMul(a, w)
  y = BatchNormalization<epsilon = 0.0>(m, scale, shift, mean, var)
}"""


def test_bn_into_matmul_makes_gemm():
    model = parse(MATMUL_BN.replace("OPSET", "21"))
    result = fuse().run(model)
    ir.verify(model)
    assert result.log.by_rule() == {"FuseBatchNorm": 1}
    assert ir.print_graph(model.graph).splitlines()[-4:] == [
        "  init %MatMul__1_bias_fused = float32[2] [0.0, 0.0]",
        "  %y: float32[N,2] = Gemm(%a, %w_fused, %MatMul__1_bias_fused)  # MatMul__1",
        "  return %y: float32[N,2]",
        "}"]
    a = np.random.default_rng(4).normal(0, 1, (7, 2)).astype(np.float32)
    model = parse(MATMUL_BN.replace("OPSET", "21"))
    assert fuse_and_compare(model, [{"a": a}]) == {"FuseBatchNorm": 1}


def test_bn_into_matmul_before_opset_7_makes_matmul_add():
    model = parse(MATMUL_BN.replace("OPSET", "6").replace("epsilon = 0.0", "epsilon = 0.0, is_test = 1"))
    fuse().run(model)
    ir.verify(model)
    assert ops(model) == ["MatMul", "Add"]


def test_bn_rejects():
    conv_also_read = CONV_BN.replace("(float[1,2,3,3] y)", "(float[1,2,3,3] y, float[1,2,3,3] c)")
    assert verdict(FuseBatchNorm(), parse(conv_also_read), "BatchNormalization") == \
        Reject("Conv output is read by other nodes too")
    scale_is_input = CONV_BN.replace("(float[1,2,3,3] x)", "(float[1,2,3,3] x, float[2] scale)") \
        .replace("float[2] scale = {2.0, 0.5}, ", "")
    assert verdict(FuseBatchNorm(), parse(scale_is_input), "BatchNormalization") == \
        Reject("BatchNormalization scale, bias, mean or variance is not constant")
    training = CONV_BN.replace("epsilon = 0.0", "epsilon = 0.0, training_mode = 1")
    assert verdict(FuseBatchNorm(), parse(training), "BatchNormalization") == \
        Reject("BatchNormalization in training mode")
    stats = CONV_BN.replace("(float[1,2,3,3] y)", "(float[1,2,3,3] y, float[2] rm)") \
        .replace("y = BatchNormalization<epsilon = 0.0>", "y, rm, rv = BatchNormalization<epsilon = 0.0>")
    assert verdict(FuseBatchNorm(), parse(stats), "BatchNormalization") == \
        Reject("BatchNormalization statistics outputs are used")
    relu = CONV_BN.replace("c = Conv(x, w, b)", "c = Relu(x)")
    assert verdict(FuseBatchNorm(), parse(relu), "BatchNormalization") == \
        Reject("input is not produced by Conv, ConvTranspose, Gemm or MatMul")
    weight_is_input = CONV_BN.replace("(float[1,2,3,3] x)", "(float[1,2,3,3] x, float[2,2,1,1] w)") \
        .replace("float[2,2,1,1] w = {1.0, 2.0, 3.0, 4.0}, ", "")
    assert verdict(FuseBatchNorm(), parse(weight_is_input), "BatchNormalization") == \
        Reject("Conv weight is not a float constant")
    rank3 = MATMUL_BN.replace("OPSET", "21").replace("float[N,2] a", "float[B,N,2] a") \
        .replace("float[N,2] y", "float[B,N,2] y")
    assert verdict(FuseBatchNorm(), parse(rank3), "BatchNormalization") == \
        Reject("MatMul activations are not known to be rank 2")
    model = parse(conv_also_read)
    assert not fuse().run(model).changed


# -- bias Add and per-channel Mul into Conv --------------------------------------------------

CONV_ADD = """<ir_version: 10, opset_import: ["" : 21]>
g (float[1,2,3,3] x) => (float[1,2,3,3] y)
  <float[2,2,1,1] w = {1.0, 2.0, 3.0, 4.0}, float[2] b = {1.0, -1.0}, float[2,1,1] c = {0.5, 2.0}> {
  t = Conv(x, w, b)
  y = Add(t, c)
}"""


def test_bias_add_into_conv_golden():
    model = parse(CONV_ADD)
    result = fuse().run(model)
    ir.verify(model)
    assert result.log.by_rule() == {"FuseConvAdd": 1}
    assert ir.print_graph(model.graph) == (
        'graph "g" (%x: float32[1,2,3,3]) {\n'
        "  init %w = float32[2,2,1,1] [1.0, 2.0, 3.0, 4.0]\n"
        "  init %b = float32[2] [1.0, -1.0]\n"
        "  init %c = float32[2,1,1] [0.5, 2.0]\n"
        "  init %b_fused = float32[2] [1.5, 1.0]\n"
        "  %y: float32[1,2,3,3] = Conv(%x, %w, %b_fused)  # Conv__1\n"
        "  return %y: float32[1,2,3,3]\n"
        "}\n")


@pytest.mark.parametrize("shape", [[1, 4, 1, 1], [4, 1, 1], [], [1], [1, 1, 1, 1]])
@pytest.mark.parametrize("op", ["Add", "Mul"])
@pytest.mark.parametrize("const_first", [False, True])
def test_channel_add_and_mul_into_conv_keep_numbers(shape, op, const_first):
    rng = np.random.default_rng(5)
    operands = ["k", "t"] if const_first else ["t", "k"]
    model = build([helper.make_node("Conv", ["x", "w"], ["t"], group=2),
                   helper.make_node(op, operands, ["y"])],
                  [tensor("x", [1, 4, 6, 6])], [tensor("y", [1, 4, 4, 4])],
                  [init("w", rng.normal(0, 0.5, (4, 2, 3, 3))), init("k", rng.normal(1, 0.5, shape))])
    feeds = [{"x": rng.normal(0, 1, (1, 4, 6, 6)).astype(np.float32)}]
    assert fuse_and_compare(model, feeds) == {f"FuseConv{op}": 1}
    assert ops(model) == ["Conv"]


def test_scale_then_shift_after_conv_transpose_fold_in_turn():
    """PP-OCRv4's learnable affine blocks: Conv -> Mul(scalar) -> Add(scalar)."""
    rng = np.random.default_rng(6)
    model = build([helper.make_node("ConvTranspose", ["x", "w", "b"], ["t"], strides=[2, 2]),
                   helper.make_node("Mul", ["s", "t"], ["u"]),
                   helper.make_node("Add", ["u", "k"], ["y"])],
                  [tensor("x", [1, 3, 4, 4])], [tensor("y", [1, 2, 8, 8])],
                  [init("w", rng.normal(0, 0.5, (3, 2, 2, 2))), init("b", rng.normal(0, 1, 2)),
                   init("s", [1.7]), init("k", [-0.3])])
    feeds = [{"x": rng.normal(0, 1, (1, 3, 4, 4)).astype(np.float32)}]
    assert fuse_and_compare(model, feeds) == {"FuseConvMul": 1, "FuseConvAdd": 1}
    assert ops(model) == ["ConvTranspose"]


def test_conv_add_and_mul_rejects():
    last_axis = CONV_ADD.replace("float[2,1,1] c = {0.5, 2.0}", "float[2] c = {0.5, 2.0}")
    assert verdict(FuseConvAdd(), parse(last_axis), "Add") == \
        Reject("constant does not broadcast per output channel")
    grows = CONV_ADD.replace("float[2,1,1] c = {0.5, 2.0}", "float[2,2,1,1] c = {0.5, 2.0, 1.0, 1.0}") \
        .replace("float[1,2,3,3] y", "float[2,2,3,3] y")
    assert verdict(FuseConvAdd(), parse(grows), "Add") == \
        Reject("constant does not broadcast per output channel")
    dynamic = CONV_ADD.replace("(float[1,2,3,3] x)", "(float[1,2,3,3] x, float[2,1,1] c)") \
        .replace(", float[2,1,1] c = {0.5, 2.0}", "")
    assert verdict(FuseConvAdd(), parse(dynamic), "Add") == Reject("Add has no constant operand")
    also_read = CONV_ADD.replace("(float[1,2,3,3] y)", "(float[1,2,3,3] y, float[1,2,3,3] t)")
    assert verdict(FuseConvAdd(), parse(also_read), "Add") == Reject("Conv output is read by other nodes too")
    mul = CONV_ADD.replace("y = Add(t, c)", "y = Mul(t, c)").replace("t = Conv(x, w, b)", "t = Relu(x)")
    assert verdict(FuseConvMul(), parse(mul), "Mul") == Reject("input is not produced by Conv or ConvTranspose")
    bias_is_input = CONV_ADD.replace("(float[1,2,3,3] x)", "(float[1,2,3,3] x, float[2] b)") \
        .replace("float[2] b = {1.0, -1.0}, ", "")
    assert verdict(FuseConvAdd(), parse(bias_is_input), "Add") == Reject("Conv bias is not constant")


# -- per-channel Mul and Add into the Conv after them -----------------------------------------

INPUT_AFFINE = """<ir_version: 10, opset_import: ["" : 21]>
g (float[1,2,3,3] x) => (float[1,2,3,3] y)
  <float[2,2,1,1] w = {1.0, 2.0, 3.0, 4.0}, float s = {2.0}, float k = {0.5}> {
  r = Relu(x)
  u = Mul(r, s)
  v = Add(u, k)
  y = Conv <pads = [0, 0, 0, 0]> (v, w)
}"""


def test_affine_block_into_the_next_conv_golden():
    """PP-OCRv4's learnable affine block after an activation: Mul(scalar), Add(scalar), Conv."""
    model = parse(INPUT_AFFINE)
    result = fuse().run(model)
    ir.verify(model)
    assert result.log.by_rule() == {"FuseConvInputAffine": 2}
    assert ir.print_graph(model.graph) == (
        'graph "g" (%x: float32[1,2,3,3]) {\n'
        "  init %w = float32[2,2,1,1] [1.0, 2.0, 3.0, 4.0]\n"
        "  init %s = float32[] [2.0]\n"
        "  init %k = float32[] [0.5]\n"
        "  init %Conv__1_bias_shifted = float32[2] [1.5, 3.5]\n"
        "  init %w_scaled = float32[2,2,1,1] [2.0, 4.0, 6.0, 8.0]\n"
        "  %r: ? = Relu(%x)  # Relu__1\n"
        "  %y: float32[1,2,3,3] = Conv(%r, %w_scaled, %Conv__1_bias_shifted) {pads=[0, 0, 0, 0]}  # Conv__1\n"
        "  return %y: float32[1,2,3,3]\n"
        "}\n")


@pytest.mark.parametrize("shape", [[1, 4, 1, 1], [4, 1, 1], [], [1]])
@pytest.mark.parametrize("op, pads", [("Mul", [1, 1, 1, 1]), ("Mul", [0, 0, 0, 0]), ("Add", [0, 0, 0, 0])])
@pytest.mark.parametrize("bias", [False, True])
def test_channel_mul_and_add_into_the_next_conv_keep_numbers(shape, op, pads, bias):
    rng = np.random.default_rng(8)
    inits = [init("w", rng.normal(0, 0.5, (6, 2, 3, 3))), init("k", rng.normal(1, 0.5, shape))]
    inits += [init("b", rng.normal(0, 1, 6))] if bias else []
    model = build([helper.make_node(op, ["k", "x"], ["t"]),
                   helper.make_node("Conv", ["t", "w"] + (["b"] if bias else []), ["y"], group=2, pads=pads,
                                    strides=[2, 2])],
                  [tensor("x", [1, 4, 7, 7])], [tensor("y", [1, 6, 4 if pads[0] else 3, 4 if pads[0] else 3])], inits)
    feeds = [{"x": rng.normal(0, 1, (1, 4, 7, 7)).astype(np.float32)}]
    assert fuse_and_compare(model, feeds) == {"FuseConvInputAffine": 1}
    assert ops(model) == ["Conv"]


def test_conv_input_affine_rejects():
    padded = INPUT_AFFINE.replace("pads = [0, 0, 0, 0]", "pads = [1, 1, 1, 1]").replace("float[1,2,3,3] y", "float[1,2,5,5] y")
    assert verdict(FuseConvInputAffine(), parse(padded), "Conv") == \
        Reject("Conv pads its input: the border would lose the Add")
    same = INPUT_AFFINE.replace("pads = [0, 0, 0, 0]", "auto_pad = \"SAME_UPPER\"")
    assert verdict(FuseConvInputAffine(), parse(same), "Conv") == \
        Reject("Conv pads its input: the border would lose the Add")
    last_axis = INPUT_AFFINE.replace("float k = {0.5}", "float[3] k = {0.5, 0.5, 0.5}")
    vector = INPUT_AFFINE.replace("float k = {0.5}", "float[2,1,1] k = {0.5, 0.5}")
    assert verdict(FuseConvInputAffine(), parse(last_axis), "Conv") == \
        Reject("constant does not broadcast per input channel")
    dynamic = INPUT_AFFINE.replace("(float[1,2,3,3] x)", "(float[1,2,3,3] x, float k)").replace(", float k = {0.5}", "")
    assert verdict(FuseConvInputAffine(), parse(dynamic), "Conv") == Reject("Add has no single constant operand")
    assert verdict(FuseConvInputAffine(), parse(vector), "Conv") == \
        Reject("Add input is not known to have the Conv's 2 channels")
    relu = INPUT_AFFINE.replace("y = Conv <pads = [0, 0, 0, 0]> (v, w)", "y = Conv <pads = [0, 0, 0, 0]> (r, w)")
    assert verdict(FuseConvInputAffine(), parse(relu), "Conv") == Reject("input is not produced by Mul or Add")


# -- MatMul + Add -> Gemm ---------------------------------------------------------------------

MATMUL_ADD = """<ir_version: 10, opset_import: ["" : 21]>
g (float[M,3] a) => (float[M,2] y)
  <float[3,2] w = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0}, float[2] c = {0.5, -0.5}> {
  m = MatMul(a, w)
  y = Add(c, m)
}"""


def test_matmul_add_to_gemm_golden():
    model = parse(MATMUL_ADD)
    result = fuse().run(model)
    ir.verify(model)
    assert result.log.by_rule() == {"FuseMatMulAdd": 1}
    assert ir.print_graph(model.graph) == (
        'graph "g" (%a: float32[M,3]) {\n'
        "  init %w = float32[3,2] [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]\n"
        "  init %c = float32[2] [0.5, -0.5]\n"
        "  %y: float32[M,2] = Gemm(%a, %w, %c)  # MatMul__1\n"
        "  return %y: float32[M,2]\n"
        "}\n")


@pytest.mark.parametrize("c_shape", [[6], [1, 6], [4, 6], [4, 1], [], [1, 1]])
def test_matmul_add_to_gemm_keeps_numbers(c_shape):
    rng = np.random.default_rng(7)
    model = build([helper.make_node("MatMul", ["a", "w"], ["m"]), helper.make_node("Add", ["m", "c"], ["y"])],
                  [tensor("a", [4, 5])], [tensor("y", [4, 6])],
                  [init("w", rng.normal(0, 1, (5, 6))), init("c", rng.normal(0, 1, c_shape))])
    assert fuse_and_compare(model, [{"a": rng.normal(0, 1, (4, 5)).astype(np.float32)}]) == {"FuseMatMulAdd": 1}
    assert ops(model) == ["Gemm"]


def test_matmul_add_rejects():
    rank3 = MATMUL_ADD.replace("float[M,3] a", "float[B,M,3] a").replace("float[M,2] y", "float[B,M,2] y")
    assert verdict(FuseMatMulAdd(), parse(rank3), "Add") == Reject("MatMul activations are not known to be rank 2")
    full_c = MATMUL_ADD.replace("float[2] c = {0.5, -0.5}", "float[2,2] c = {0.5, -0.5, 1.0, 1.0}")
    assert verdict(FuseMatMulAdd(), parse(full_c), "Add") == Reject("Add operand does not broadcast to [M, N]")
    also_read = MATMUL_ADD.replace("(float[M,2] y)", "(float[M,2] y, float[M,2] m)")
    assert verdict(FuseMatMulAdd(), parse(also_read), "Add") == Reject("MatMul output is read by other nodes too")
    dynamic_w = MATMUL_ADD.replace("(float[M,3] a)", "(float[M,3] a, float[3,2] w)") \
        .replace("float[3,2] w = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0}, ", "")
    assert verdict(FuseMatMulAdd(), parse(dynamic_w), "Add") == Reject("MatMul weight is not a 2-D float constant")


# -- LayerNormalization -----------------------------------------------------------------------

LAYER_NORM = """<ir_version: IRV, opset_import: ["" : OPSET]>
g (float[2,5,8] x) => (float[2,5,8] y) <float[8] gamma = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0},
   float[8] beta = {0.5, 0.5, 0.5, 0.5, -0.5, -0.5, -0.5, -0.5}> {
  mean = ReduceMean<axes = [-1]>(x)
  d = Sub(x, mean)
  two = Constant<value = float {2.0}>()
  sq = Pow(d, two)
  var = ReduceMean<axes = [-1]>(sq)
  eps = Constant<value = float {1e-5}>()
  ve = Add(var, eps)
  s = Sqrt(ve)
  n = Div(d, s)
  g1 = Mul(n, gamma)
  y = Add(g1, beta)
}"""


def layer_norm(*swaps: tuple[str, str], opset: int = 17, ir_version: int = 8) -> ir.Model:
    """LAYER_NORM with text substitutions."""
    text = LAYER_NORM.replace("IRV", str(ir_version)).replace("OPSET", str(opset))
    for old, new in swaps:
        assert old in text, old
        text = text.replace(old, new)
    return parse(text)


def test_layer_norm_golden():
    model = layer_norm()
    result = fuse().run(model)
    ir.verify(model)
    assert result.log.by_rule() == {"FuseLayerNorm": 1}
    assert result.log.by_kind()["remove-node"] == 11  # 9 ops, 2 Constants
    assert ir.print_graph(model.graph) == (
        'graph "g" (%x: float32[2,5,8]) {\n'
        "  init %gamma = float32[8] [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]\n"
        "  init %beta = float32[8] [0.5, 0.5, 0.5, 0.5, -0.5, -0.5, -0.5, -0.5]\n"
        "  %y: float32[2,5,8] = LayerNormalization(%x, %gamma, %beta) {axis=-1, epsilon=9.999999747378752e-06}"
        "  # Add__2_layernorm\n"
        "  return %y: float32[2,5,8]\n"
        "}\n")


LN_FEEDS = [(0.0, 1.0), (3.0, 0.5), (0.0, 30.0)]  # (mean, std): standard, offset, wide


def ln_feeds(shape, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(m, s, shape).astype(np.float32)} for m, s in LN_FEEDS]


NO_AFFINE = [("  g1 = Mul(n, gamma)\n", ""), ("y = Add(g1, beta)", "y = Relu(n)")]

LN_VARIANTS = {
    "plain": [],
    "mul_square": [("sq = Pow(d, two)", "sq = Mul(d, d)")],
    "positive_axis": [("axes = [-1]", "axes = [2]")],
    "no_affine": NO_AFFINE,
    "only_beta": [("  g1 = Mul(n, gamma)\n", ""), ("y = Add(g1, beta)", "y = Add(beta, n)")],
    "scalar_gamma": [("g1 = Mul(n, gamma)", "g1 = Mul(two, n)")],
    "eps_first": [("ve = Add(var, eps)", "ve = Add(eps, var)")],
    "two_axes": [("axes = [-1]", "axes = [-2, -1]"), *NO_AFFINE],
}


@pytest.mark.parametrize("variant", LN_VARIANTS)
def test_layer_norm_variants_keep_numbers(variant):
    model = layer_norm(*LN_VARIANTS[variant])
    assert fuse_and_compare(model, ln_feeds((2, 5, 8), 8)) == {"FuseLayerNorm": 1}
    assert "LayerNormalization" in ops(model)
    assert not {"ReduceMean", "Sqrt", "Div", "Mul", "Add"} & set(ops(model))


def test_layer_norm_over_two_trailing_axes_gets_full_scale():
    model = layer_norm(*LN_VARIANTS["two_axes"])
    fuse().run(model)
    ln = node(model, "LayerNormalization")
    assert ln.attributes["axis"].value == -2
    assert ln.inputs[1].const.shape == (5, 8) and len(ln.inputs) == 2  # ones; no B


def test_layer_norm_with_axes_input_at_opset_18():
    proto = onnx.version_converter.convert_version(ir.to_proto(layer_norm()), 18)
    model = ir.load(proto)
    assert node(model, "ReduceMean").inputs[1] is not None  # axes is an input now
    assert fuse_and_compare(model, ln_feeds((2, 5, 8), 9)) == {"FuseLayerNorm": 1}
    assert ops(model) == ["LayerNormalization"]


def test_layer_norm_rejects():
    def reason(model):
        return verdict(FuseLayerNorm(), model, "Div")

    assert reason(layer_norm(opset=14, ir_version=7)) == Reject("LayerNormalization needs opset 17")
    assert not fuse().run(layer_norm(opset=14, ir_version=7)).changed
    shared = layer_norm(("(float[2,5,8] y)", "(float[2,5,8] y, float[2,5,1] var)"))
    assert reason(shared) == Reject("an intermediate value is used outside the pattern")
    assert reason(layer_norm(("axes = [-1]", "axes = [1]"))) == \
        Reject("ReduceMean axes are not the same trailing dimensions")
    assert reason(layer_norm(("d = Sub(x, mean)", "d = Sub(mean, x)"))) == \
        Reject("Sub does not subtract the ReduceMean of its own input")
    dynamic = layer_norm(("float[2,5,8] x", "float[2,5,H] x"), ("float[2,5,8] y", "float[2,5,H] y"))
    assert reason(dynamic) == Reject("normalized dimensions are not static")
    assert reason(layer_norm(("sq = Pow(d, two)", "sq = Pow(d, eps)"))) == \
        Reject("variance is not the ReduceMean of Pow(d, 2) or Mul(d, d)")


def test_layer_norm_gamma_that_grows_the_output_stays_outside():
    """A Mul after the Div that broadcasts beyond the normalized shape is not gamma."""
    model = layer_norm(("float[2,5,8] y", "float[3,2,5,8] y"),
                       ("float[8] gamma = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0}",
                        "float[3,1,1,1] gamma = {1.0, 2.0, 3.0}"))
    assert fuse_and_compare(model, ln_feeds((2, 5, 8), 11)) == {"FuseLayerNorm": 1}
    assert ops(model) == ["LayerNormalization", "Mul", "Add"]


# -- Gelu ------------------------------------------------------------------------------------

GELU = """<ir_version: IRV, opset_import: ["" : OPSET]>
g (float[2,8] x) => (float[2,8] y) {
  c = Constant<value = float {1.4142135}>()
  one = Constant<value = float {1.0}>()
  h = Constant<value = float {0.5}>()
  z = Div(x, c)
  e = Erf(z)
  a = Add(e, one)
  m = Mul(x, a)
  y = Mul(m, h)
}"""


def gelu(*swaps: tuple[str, str], opset: int = 20, ir_version: int = 9) -> ir.Model:
    """GELU with text substitutions."""
    text = GELU.replace("IRV", str(ir_version)).replace("OPSET", str(opset))
    for old, new in swaps:
        assert old in text, old
        text = text.replace(old, new)
    return parse(text)


def test_gelu_golden():
    model = gelu()
    result = fuse().run(model)
    ir.verify(model)
    assert result.log.by_rule() == {"FuseGelu": 1}
    assert result.log.by_kind()["remove-node"] == 8  # 5 ops, 3 Constants
    assert ir.print_graph(model.graph) == (
        'graph "g" (%x: float32[2,8]) {\n'
        '  %y: float32[2,8] = Gelu(%x) {approximate="none"}  # Mul__2_gelu\n'
        "  return %y: float32[2,8]\n"
        "}\n")


GELU_SCALES = [1.0, 4.0, 100.0]  # std of x

GELU_VARIANTS = {
    "torch": [],
    "mul_by_rsqrt2": [("float {1.4142135}", "float {0.70710677}"), ("Div(x, c)", "Mul(c, x)")],
    "half_first": [("m = Mul(x, a)", "m = Mul(x, h)"), ("y = Mul(m, h)", "y = Mul(a, m)")],
    "half_inside": [("m = Mul(x, a)", "m = Mul(h, a)"), ("y = Mul(m, h)", "y = Mul(x, m)")],
    "const_left": [("a = Add(e, one)", "a = Add(one, e)"), ("y = Mul(m, h)", "y = Mul(h, m)")],
}


@pytest.mark.parametrize("variant", GELU_VARIANTS)
def test_gelu_orderings_keep_numbers(variant):
    model = gelu(*GELU_VARIANTS[variant])
    rng = np.random.default_rng(12)
    feeds = [{"x": rng.normal(0, s, (2, 8)).astype(np.float32)} for s in GELU_SCALES]
    assert fuse_and_compare(model, feeds) == {"FuseGelu": 1}
    assert ops(model) == ["Gelu"]


GELU_TANH = """<ir_version: 9, opset_import: ["" : 20]>
g (float[2,8] x) => (float[2,8] y) {
  three = Constant<value = float {3.0}>()
  c = Constant<value = float {0.044715}>()
  k = Constant<value = float {0.7978846}>()
  one = Constant<value = float {1.0}>()
  h = Constant<value = float {0.5}>()
  p = Pow(x, three)
  t = Mul(p, c)
  i = Add(x, t)
  u = Mul(i, k)
  th = Tanh(u)
  a = Add(th, one)
  hx = Mul(h, x)
  y = Mul(hx, a)
}"""


def test_gelu_tanh_form_with_pow():
    """The 'gelu_new' form: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))."""
    model = parse(GELU_TANH)
    rng = np.random.default_rng(17)
    feeds = [{"x": rng.normal(0, s, (2, 8)).astype(np.float32)} for s in GELU_SCALES]
    assert fuse_and_compare(model, feeds) == {"FuseGelu": 1}
    assert ops(model) == ["Gelu"] and node(model, "Gelu").attributes["approximate"].value == b"tanh"
    wrong = parse(GELU_TANH.replace("0.044715", "0.05"))
    rule = FuseGelu()
    rule.model = wrong
    assert rule.match(wrong.graph.nodes[-1]) == Reject("not x * 0.5 * (1 + Erf(x / sqrt(2))) or its tanh form")


def test_gelu_rejects():
    rule = FuseGelu()

    def reason(model, index=-1):
        rule.model = model
        return rule.match(model.graph.nodes[index])

    low = gelu(opset=14, ir_version=7)
    assert reason(low) == Reject("Gelu needs opset 20")
    assert reason(low, -2) == Reject("not a product of three factors")  # the inner Mul(x, a)
    assert not fuse().run(low).changed
    not_gelu = Reject("not x * 0.5 * (1 + Erf(x / sqrt(2))) or its tanh form")
    assert reason(gelu(("float {1.4142135}", "float {1.5}"))) == not_gelu
    assert reason(gelu(("float {0.5}", "float {0.25}"))) == not_gelu
    assert reason(gelu(("(float[2,8] y)", "(float[2,8] y, float[2,8] e)"))) == not_gelu  # Erf read outside
    assert reason(gelu(("z = Div(x, c)", "z = Div(h, c)"))) == not_gelu  # Erf of another value


# -- HardSwish -------------------------------------------------------------------------------

HARDSWISH = """<ir_version: 8, opset_import: ["" : OPSET]>
g (float[2,8] x) => (float[2,8] y) {
  three = Constant<value = float {3.0}>()
  zero = Constant<value = float {0.0}>()
  six = Constant<value = float {6.0}>()
  a = Add(x, three)
  c = Clip(a, zero, six)
  m = Mul(x, c)
  y = Div(m, six)
}"""


def hardswish(*swaps: tuple[str, str], opset: int = 14) -> ir.Model:
    text = HARDSWISH.replace("OPSET", str(opset))
    for old, new in swaps:
        assert old in text, old
        text = text.replace(old, new)
    return parse(text)


def test_hardswish_golden():
    model = hardswish()
    result = fuse().run(model)
    ir.verify(model)
    assert result.log.by_rule() == {"FuseHardSwish": 1}
    assert result.log.by_kind()["remove-node"] == 7  # 4 ops, 3 Constants
    assert ir.print_graph(model.graph) == (
        'graph "g" (%x: float32[2,8]) {\n'
        "  %y: float32[2,8] = HardSwish(%x)  # Div__1_hardswish\n"
        "  return %y: float32[2,8]\n"
        "}\n")


def test_hardswish_below_opset_14_is_hardsigmoid_times_x():
    model = hardswish(opset=13)
    assert fuse().run(model).log.by_rule() == {"FuseHardSwish": 1}
    assert ir.print_graph(model.graph) == (
        'graph "g" (%x: float32[2,8]) {\n'
        "  %Div__1_hardsigmoid_out: float32[2,8] = HardSigmoid(%x) {alpha=0.1666666716337204, beta=0.5}"
        "  # Div__1_hardsigmoid\n"
        "  %y: float32[2,8] = Mul(%x, %Div__1_hardsigmoid_out)  # Div__1_hardswish\n"
        "  return %y: float32[2,8]\n"
        "}\n")
    assert not fuse().run(model).changed  # already the fused form at this opset


HARDSWISH_VARIANTS = {
    "paddle": [],
    "times_sixth": [("y = Div(m, six)", "y = Mul(sixth, m)"),
                    ("six = Constant", "sixth = Constant<value = float {0.16666667}>()\n  six = Constant")],
    "sixth_inside": [("m = Mul(x, c)", "d = Div(c, six)"), ("y = Div(m, six)", "y = Mul(d, x)")],
    "const_left": [("a = Add(x, three)", "a = Add(three, x)"), ("m = Mul(x, c)", "m = Mul(c, x)")],
    "opset_10_clip": [("c = Clip(a, zero, six)", "c = Clip<min = 0.0, max = 6.0>(a)"), ("OPSET", "10")],
    "hardsigmoid": [("a = Add(x, three)", "h = HardSigmoid<alpha = 0.16666667, beta = 0.5>(x)"),
                    ("c = Clip(a, zero, six)", ""), ("m = Mul(x, c)", ""), ("y = Div(m, six)", "y = Mul(x, h)")],
}


@pytest.mark.parametrize("variant", HARDSWISH_VARIANTS)
def test_hardswish_forms_keep_numbers(variant):
    swaps = HARDSWISH_VARIANTS[variant]
    opset = 10 if variant == "opset_10_clip" else 14
    model = hardswish(*[s for s in swaps if s[0] != "OPSET"], opset=opset)
    rng = np.random.default_rng(21)
    feeds = [{"x": rng.normal(0, s, (2, 8)).astype(np.float32)} for s in (1.0, 3.0, 10.0)]
    assert fuse_and_compare(model, feeds) == {"FuseHardSwish": 1}
    fused = [op for op in ops(model) if op != "Constant"]  # the variants leave some unused
    assert fused == (["HardSwish"] if opset >= 14 else ["HardSigmoid", "Mul"])


def test_hardswish_rejects():
    rule = FuseHardSwish()

    def reason(model):
        rule.model = model
        return rule.match(model.graph.nodes[-1])

    not_hs = Reject("not x * Clip(x + 3, 0, 6) / 6 or x * HardSigmoid(x)")
    assert reason(hardswish(("y = Div(m, six)", "y = Div(m, three)"))) == not_hs  # / 3
    assert reason(hardswish(("c = Clip(a, zero, six)", "c = Clip(a, zero, three)"))) == not_hs  # relu3
    assert reason(hardswish(("m = Mul(x, c)", "m = Mul(a, c)"))) == not_hs  # (x + 3) * ...
    assert reason(hardswish(("(float[2,8] y)", "(float[2,8] y, float[2,8] c)"))) == not_hs  # Clip read outside
    model = hardswish(("y = Div(m, six)", "y = Mul(m, three)"))  # x * relu6(x + 3) * 3
    assert not fuse().run(model).changed
    low = hardswish(("a = Add(x, three)", "h = HardSigmoid<alpha = 0.16666667, beta = 0.5>(x)"),
                    ("c = Clip(a, zero, six)", ""), ("m = Mul(x, c)", ""), ("y = Div(m, six)", "y = Mul(x, h)"),
                    opset=13)
    assert reason(low) == Reject("already HardSigmoid * x; HardSwish needs opset 14")


# -- torch exports ---------------------------------------------------------------------------

def torch_export(module, shape, opset: int) -> onnx.ModelProto:
    torch = pytest.importorskip("torch", reason="torch is not installed: the export tests need it")
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.randn(*shape),), buf, dynamo=False, opset_version=opset,
                          input_names=["x"], output_names=["y"])
    return onnx.load_from_string(buf.getvalue())


def retarget(proto: onnx.ModelProto, opset: int, ir_version: int) -> ir.Model:
    """An opset-14 export converted to `opset` (torch writes these ops itself from there)."""
    converted = onnx.version_converter.convert_version(proto, opset)
    converted.ir_version = ir_version
    return ir.load(converted)


def _trained_layer_norm(torch, hidden: int):
    ln = torch.nn.LayerNorm(hidden)
    with torch.no_grad():
        ln.weight.normal_(1.0, 0.2)
        ln.bias.normal_(0.0, 0.2)
    return ln


@pytest.mark.parametrize("opset,ir_version", [(17, 8), (18, 8), (21, 10)])
def test_torch_layer_norm_export(opset, ir_version):
    torch = pytest.importorskip("torch", reason="torch is not installed: the export tests need it")
    torch.manual_seed(0)
    model = retarget(torch_export(_trained_layer_norm(torch, 64), (3, 7, 64), 14), opset, ir_version)
    assert fuse_and_compare(model, ln_feeds((3, 7, 64), 13)) == {"FuseLayerNorm": 1}
    assert ops(model) == ["LayerNormalization"]


def test_torch_layer_norm_export_at_opset_14_is_rejected():
    torch = pytest.importorskip("torch", reason="torch is not installed: the export tests need it")
    model = ir.load(torch_export(torch.nn.LayerNorm(16), (2, 16), 14))
    assert verdict(FuseLayerNorm(), model, "Div") == Reject("LayerNormalization needs opset 17")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_torch_gelu_export(approximate):
    torch = pytest.importorskip("torch", reason="torch is not installed: the export tests need it")
    model = retarget(torch_export(torch.nn.GELU(approximate=approximate), (4, 32), 14), 20, 9)
    rng = np.random.default_rng(14)
    feeds = [{"x": rng.normal(0, s, (4, 32)).astype(np.float32)} for s in GELU_SCALES]
    assert fuse_and_compare(model, feeds) == {"FuseGelu": 1}
    assert ops(model) == ["Gelu"]
    assert node(model, "Gelu").attributes["approximate"].value == approximate.encode()


def test_torch_transformer_block():
    """LayerNorm -> Linear -> GELU -> Linear, exported at 14 and moved to opset 20."""
    torch = pytest.importorskip("torch", reason="torch is not installed: the export tests need it")
    torch.manual_seed(1)
    block = torch.nn.Sequential(_trained_layer_norm(torch, 32), torch.nn.Linear(32, 64), torch.nn.GELU(),
                                torch.nn.Linear(64, 32))
    model = retarget(torch_export(block, (5, 32), 14), 20, 9)
    rng = np.random.default_rng(15)
    feeds = [{"x": rng.normal(m, s, (5, 32)).astype(np.float32)} for m, s in LN_FEEDS]
    counts = fuse_and_compare(model, feeds)
    assert counts.get("FuseLayerNorm") == 1 and counts.get("FuseGelu") == 1
    assert ops(model) == ["LayerNormalization", "Gemm", "Gelu", "Gemm"]


# -- the pass --------------------------------------------------------------------------------

def test_fuse_pass_is_named_and_settles():
    p = fuse()
    assert p.name == "fuse"
    assert [type(r).__name__ for r in p.rules] == ["FuseBatchNorm", "FuseConvAdd", "FuseConvMul",
                                                  "FuseConvInputAffine", "FuseMatMulAdd", "FuseLayerNorm", "FuseGelu",
                                                  "FuseHardSwish"]
    model = parse(CONV_BN)
    assert p.run(model).changed
    assert not fuse().run(model).changed


def test_fused_graph_output_keeps_its_name():
    model = parse(CONV_ADD)
    fuse().run(model)
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert model.graph.outputs[0].producer.op_type == "Conv"


OCR_MODELS = find_model_files("rapidocr_onnxruntime")
OCR_FOLDS = {  # rewrites per rule on the shipped models, and nodes before -> after
    "ch_PP-OCRv4_det_infer.onnx": ({"FuseBatchNorm": 3, "FuseConvMul": 28, "FuseConvAdd": 30,
                                    "FuseHardSwish": 24, "FuseConvInputAffine": 26}, 672, 307),
    "ch_PP-OCRv4_rec_infer.onnx": ({"FuseBatchNorm": 6, "FuseConvMul": 28, "FuseConvAdd": 28,
                                    "FuseHardSwish": 28, "FuseConvInputAffine": 24}, 860, 452),
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": ({"FuseBatchNorm": 35, "FuseHardSwish": 18}, 566, 248),
}


@pytest.mark.parametrize("path", OCR_MODELS or [None], ids=lambda p: p.name if p else "absent")
def test_real_ocr_models(path):
    if path is None:
        pytest.skip("rapidocr_onnxruntime is not installed (pip install rapidocr_onnxruntime)")
    model = ir.load(path)
    before = len(model.graph.nodes)
    counts = fuse_and_compare(model, realistic_feeds(path))
    if path.name in OCR_FOLDS:
        assert (counts, before, len(model.graph.nodes)) == OCR_FOLDS[path.name]
