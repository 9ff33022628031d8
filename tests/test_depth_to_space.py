"""The depth-to-space pass: ConvTranspose heads become 1x1 Convs and one DepthToSpace, which
then moves past elementwise ops and narrowing 1x1 Convs and merges with the next one. Golden
text, rule counts, numbers against onnxruntime, and the rejects."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import ir
from rewrites.depth_to_space import (ConvTransposeToDepthToSpace, MergeDepthToSpace, SinkDepthToSpaceConv,
                                     SinkDepthToSpaceElementwise, depth_to_space)
from tests.test_fusions import assert_close, ort_run


def model(nodes, inits: dict[str, np.ndarray], x_shape, y_shape, opset: int = 17) -> ir.Model:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(a.astype(np.float32), name) for name, a in inits.items()])
    return ir.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8))


def run_and_compare(m: ir.Model, x_shape) -> dict:
    """Run the pass; outputs before and after must agree in onnxruntime. Returns rule counts."""
    before = ir.to_proto(m)
    result = depth_to_space().run(m)
    ir.verify(m)
    after = ir.to_proto(m)
    onnx.checker.check_model(after)
    feed = {"x": np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)}
    assert_close(ort_run(after, feed), ort_run(before, feed))
    return dict(result.log.by_rule())


def conv_transpose(name: str, x: str, y: str, s: int = 2, **attrs):
    return helper.make_node("ConvTranspose", [x, f"{name}_w", f"{name}_b"], [y], name=name, strides=[s, s], **attrs)


def weights(c_in: int, c_out: int, k: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((c_in, c_out, k, k)), "b": rng.standard_normal(c_out)}


def test_conv_transpose_becomes_a_1x1_conv_and_depth_to_space_golden():
    w = np.arange(16, dtype=np.float32).reshape(1, 4, 2, 2)[:, :1].repeat(2, axis=0)  # [2, 1, 2, 2]
    m = model([conv_transpose("up", "x", "y")], {"up_w": w, "up_b": np.array([0.5])}, [1, 2, 3, 3], [1, 1, 6, 6])
    assert run_and_compare(m, [1, 2, 3, 3]) == {"ConvTransposeToDepthToSpace": 1}
    assert ir.print_graph(m.graph) == (
        'graph "g" (%x: float32[1,2,3,3]) {\n'
        "  init %up_w = float32[2,1,2,2] [0.0, 1.0, 2.0, 3.0, 0.0, 1.0, 2.0, 3.0]\n"  # dead-code removes them
        "  init %up_b = float32[1] [0.5]\n"
        "  init %up_w_as_conv_w = float32[4,2,1,1] [0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]\n"
        "  init %up_w_as_conv_b = float32[4] [0.5, 0.5, 0.5, 0.5]\n"
        "  %up_out: float32[1,4,3,3] = Conv(%x, %up_w_as_conv_w, %up_w_as_conv_b) {kernel_shape=[1, 1]}  # up\n"
        '  %y: float32[1,1,6,6] = DepthToSpace(%up_out) {blocksize=2, mode="CRD"}  # up_depth_to_space\n'
        "  return %y: float32[1,1,6,6]\n"
        "}\n")


def test_a_detector_head_ends_in_one_depth_to_space():
    """PP-OCR's DB head: ConvTranspose, Relu, ConvTranspose to one channel, Sigmoid."""
    a, b = weights(8, 8, 2, 1), weights(8, 1, 2, 2)
    inits = {"t0_w": a["w"], "t0_b": a["b"], "t1_w": b["w"], "t1_b": b["b"]}
    nodes = [conv_transpose("t0", "x", "u"), helper.make_node("Relu", ["u"], ["r"], name="act"),
             conv_transpose("t1", "r", "v"), helper.make_node("Sigmoid", ["v"], ["y"], name="prob")]
    m = model(nodes, inits, [1, 8, 5, 7], [1, 1, 20, 28])
    assert run_and_compare(m, [1, 8, 5, 7]) == {"ConvTransposeToDepthToSpace": 2, "SinkDepthToSpaceElementwise": 3,
                                                "SinkDepthToSpaceConv": 1, "MergeDepthToSpace": 1}
    m = ir.load(ir.to_proto(m))  # dead nodes go
    ops = [(n.op_type, n.name) for n in m.graph.nodes]
    assert ops == [("Conv", "t0"), ("Relu", "act"), ("Conv", "t1"), ("Sigmoid", "prob"),
                   ("DepthToSpace", "t1_depth_to_space")]
    assert m.graph.nodes[-1].attributes["blocksize"].value == 4
    assert m.graph.nodes[2].inputs[1].const.numpy().shape == (16, 32, 1, 1)  # 8 -> 1 channels per block


@pytest.mark.parametrize("s1,s2,channels", [(2, 3, 2), (3, 2, 1)])
def test_two_depth_to_spaces_merge_into_one_with_the_channels_permuted(s1, s2, channels):
    rng = np.random.default_rng(s1 * 10 + s2)
    n = channels * (s1 * s2) ** 2
    inits = {"w": rng.standard_normal((n, 3, 1, 1)), "b": rng.standard_normal(n)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
             helper.make_node("Tanh", ["c"], ["t"], name="tanh"),
             helper.make_node("DepthToSpace", ["t"], ["d"], name="first", blocksize=s1, mode="CRD"),
             helper.make_node("DepthToSpace", ["d"], ["y"], name="second", blocksize=s2, mode="CRD")]
    m = model(nodes, inits, [1, 3, 2, 3], [1, channels, 2 * s1 * s2, 3 * s1 * s2])
    assert run_and_compare(m, [1, 3, 2, 3]) == {"MergeDepthToSpace": 1}
    m = ir.load(ir.to_proto(m))
    assert [n.op_type for n in m.graph.nodes] == ["Conv", "Tanh", "DepthToSpace"]


def test_a_dcr_depth_to_space_moves_past_elementwise_ops_only():
    nodes = [helper.make_node("DepthToSpace", ["x"], ["d"], name="d2s", blocksize=2),  # DCR, the default
             helper.make_node("Clip", ["d", "lo", "hi"], ["c"], name="clip"),
             helper.make_node("Conv", ["c", "w"], ["y"], name="conv")]
    inits = {"lo": np.array(0.0), "hi": np.array(6.0), "w": np.ones((1, 2, 1, 1))}
    m = model(nodes, inits, [1, 8, 2, 2], [1, 1, 4, 4])
    assert run_and_compare(m, [1, 8, 2, 2]) == {"SinkDepthToSpaceElementwise": 1}
    m = ir.load(ir.to_proto(m))
    assert [(n.op_type, n.name) for n in m.graph.nodes] == [("Clip", "clip"), ("DepthToSpace", "d2s"), ("Conv", "conv")]
    assert SinkDepthToSpaceConv().match(m.graph.nodes[1]).reason == "not CRD mode"


def node_of(nodes, inits, x_shape, y_shape, opset: int = 17) -> ir.Node:
    return model(nodes, inits, x_shape, y_shape, opset).graph.nodes[0]


@pytest.mark.parametrize("attrs,kernel,reason", [
    ({}, 3, "stride differs from the kernel: blocks overlap or leave gaps"),
    ({"pads": [1, 1, 1, 1]}, 2, "padded, or its output shape is set"),
    ({"output_padding": [1, 1]}, 2, "padded, or its output shape is set"),
    ({"group": 2}, 2, "grouped or dilated"),
])
def test_conv_transposes_that_are_not_blockwise_are_left_alone(attrs, kernel, reason):
    w = weights(2, 1 if attrs.get("group") else 2, kernel, 0)
    node = node_of([conv_transpose("up", "x", "y", **attrs)], {"up_w": w["w"], "up_b": w["b"][:2]},
                   [1, 2, 3, 3], None)
    assert ConvTransposeToDepthToSpace().match(node).reason == reason


def test_no_crd_depth_to_space_before_opset_11():
    w = weights(2, 2, 2, 0)
    rule = ConvTransposeToDepthToSpace()
    m = model([conv_transpose("up", "x", "y")], {"up_w": w["w"], "up_b": w["b"]}, [1, 2, 3, 3], None, opset=10)
    rule.model = m
    assert rule.match(m.graph.nodes[0]).reason == "DepthToSpace has no CRD mode before opset 11"


@pytest.mark.parametrize("c_in,c_out", [(2, 3), (64, 32)])
def test_a_conv_that_narrows_too_little_keeps_the_depth_to_space_before_it(c_in, c_out):
    nodes = [helper.make_node("DepthToSpace", ["x"], ["d"], name="d2s", blocksize=2, mode="CRD"),
             helper.make_node("Conv", ["d", "w"], ["y"], name="conv")]
    node = node_of(nodes, {"w": np.ones((c_out, c_in, 1, 1))}, [1, 4 * c_in, 2, 2], None)
    assert SinkDepthToSpaceConv().match(node).reason == \
        f"the Conv's {c_in} -> {c_out} channels narrow too little to pay for its zeros"


def test_a_depth_to_space_read_twice_stays():
    nodes = [helper.make_node("DepthToSpace", ["x"], ["d"], name="d2s", blocksize=2, mode="CRD"),
             helper.make_node("Relu", ["d"], ["r"], name="relu"),
             helper.make_node("Add", ["r", "d"], ["y"], name="add")]
    node = node_of(nodes, {}, [1, 8, 2, 2], None)
    assert SinkDepthToSpaceElementwise().match(node).reason == "not read by one elementwise op alone"
    assert MergeDepthToSpace().match(node).reason == "not followed by another CRD DepthToSpace alone"


def test_a_grouped_conv_keeps_its_channels_in_place():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", group=2),
             helper.make_node("DepthToSpace", ["c"], ["d"], name="first", blocksize=2, mode="CRD"),
             helper.make_node("DepthToSpace", ["d"], ["y"], name="second", blocksize=2, mode="CRD")]
    m = model(nodes, {"w": np.ones((16, 1, 1, 1))}, [1, 2, 2, 2], None)
    assert MergeDepthToSpace().match(m.graph.nodes[1]).reason == \
        "the Conv is grouped: its output channels cannot be permuted"
