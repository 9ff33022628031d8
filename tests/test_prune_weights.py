"""Weight pruning (rewrites/prune.py) and sparse storage (rewrites/sparse_storage.py).

Per-layer counts are exact; global LAMP hits the overall target without wiping out a layer
of small weights; exemptions; 2:4 masks along each op's reduction axis; shared weights;
the report; sparse initializers that onnxruntime runs bit-identically to the dense model.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import ir
from rewrites.prune import PruneWeights, lamp_scores, sparsity_report
from rewrites.sparse_storage import StoreSparse
from tests.conformance import identical, run_ort
from tests.textmodels import parse

RNG = np.random.default_rng(6)


def init(name: str, array, dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype), name)


def tensor(name, shape, dtype=onnx.TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def build(nodes, inputs, outputs, inits, opset=21) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 10
    return ir.load(proto)


def net() -> ir.Model:
    """Conv c1 -> Relu -> Conv c2 -> Relu -> Conv c3 (1x1) -> pool -> Gemm g1 -> MatMul m1."""
    w = {"w1": (16, 8, 3, 3), "w2": (16, 16, 3, 3), "w3": (16, 16, 1, 1), "wg": (16, 12), "wm": (12, 8)}
    inits = [init(k, RNG.standard_normal(s)) for k, s in w.items()]
    inits += [init("b1", RNG.standard_normal(16)), init("bg", RNG.standard_normal(12))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a1"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["a2"], name="c2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a2"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3"], ["a3"], name="c3"),
             helper.make_node("GlobalAveragePool", ["a3"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "wg", "bg"], ["g"], name="g1"),
             helper.make_node("MatMul", ["g", "wm"], ["y"], name="m1")]
    return build(nodes, [tensor("x", [2, 8, 6, 6])], [tensor("y", [2, 8])], inits)


def weight(model: ir.Model, node_name: str) -> np.ndarray:
    node = next(n for n in model.graph.nodes if n.name == node_name)
    return node.inputs[1].const.numpy()


def zeros(a: np.ndarray) -> int:
    return int(a.size - np.count_nonzero(a))


def details(log, kind: str) -> dict[str, str]:
    return {c.target: c.detail for c in log if c.kind == kind}


def prune(model: ir.Model, **options):
    """Run the pass, check the invariants, and that onnxruntime computes what the original
    graph computes with the pruned weights put in place of the old ones."""
    original = ir.to_proto(model)
    result = PruneWeights(**options).run(model)
    ir.verify(model)
    after = ir.to_proto(model)
    onnx.checker.check_model(after)
    pruned = {n.outputs[0].name: n.inputs[1].const.numpy() for n in model.graph.nodes
              if len(n.inputs) > 1 and n.inputs[1] is not None and n.inputs[1].const is not None}
    arrays = {n.input[1]: pruned[n.output[0]] for n in original.graph.node if n.output[0] in pruned}
    for t in original.graph.initializer:
        if t.name in arrays:
            t.CopyFrom(numpy_helper.from_array(arrays[t.name], t.name))
    for n in original.graph.node:
        if n.op_type == "Constant" and n.output[0] in arrays:
            n.attribute[0].t.CopyFrom(numpy_helper.from_array(arrays[n.output[0]]))
    x = [RNG.standard_normal(v.shape).astype(helper.tensor_dtype_to_np_dtype(v.dtype))
         for v in model.graph.inputs]
    assert identical(run_ort(after, x), run_ort(original, x)) is None
    return result


# -- unstructured, per layer ----------------------------------------------------------------


def test_layer_scope_zeroes_exactly_the_smallest_share_of_each_weight():
    model = net()
    before = {n: weight(model, n) for n in ("c1", "c2", "c3", "g1", "m1")}
    result = prune(model, sparsity=0.3, exempt_first_last=False)
    assert result.changed
    for name, w in before.items():
        pruned = weight(model, name)
        assert zeros(pruned) == math.floor(0.3 * w.size + 0.5), name
        kept = pruned != 0
        assert np.array_equal(pruned[kept], w[kept])  # survivors keep their exact values
        assert np.abs(w[~kept]).max() <= np.abs(w[kept]).min()
    assert details(result.log, "prune") == {f"%{w}": "sparsity 0.00 -> 0.30"
                                            for w in ("w1", "w2", "w3", "wg", "wm")}
    assert result.log.by_kind()["remove-initializer"] == 5  # the dense weights are gone
    assert sorted(model.graph.initializers) == ["b1", "bg", "w1_pruned", "w2_pruned", "w3_pruned",
                                                "wg_pruned", "wm_pruned"]
    assert np.count_nonzero(model.graph.initializers["b1"].const.numpy()) == 16  # biases whole


def test_zeros_already_there_count_towards_the_target():
    w = RNG.standard_normal((8, 5))
    w.reshape(-1)[:16] = 0  # 40% zeros

    def model():
        return build([helper.make_node("MatMul", ["x", "w"], ["y"], name="m")], [tensor("x", [2, 8])],
                     [tensor("y", [2, 5])], [init("w", w)])
    result = PruneWeights(sparsity=0.3, exempt_first_last=False).run(model())
    assert not result.changed and "prune" not in result.log.by_kind()
    m = model()
    result = prune(m, sparsity=0.5, exempt_first_last=False)
    assert zeros(weight(m, "m")) == 20
    assert details(result.log, "prune") == {"%w": "sparsity 0.40 -> 0.50"}


def test_a_tensor_is_never_emptied():
    model = build([helper.make_node("MatMul", ["x", "w"], ["y"], name="m")], [tensor("x", [1, 2])],
                  [tensor("y", [1, 1])], [init("w", [[1.0], [-2.0]])])
    prune(model, sparsity=0.99, exempt_first_last=False)
    assert weight(model, "m").tolist() == [[0.0], [-2.0]]


def test_float16_weights_stay_float16():
    model = build([helper.make_node("MatMul", ["x", "w"], ["y"], name="m")],
                  [tensor("x", [2, 8], onnx.TensorProto.FLOAT16)], [tensor("y", [2, 4], onnx.TensorProto.FLOAT16)],
                  [init("w", RNG.standard_normal((8, 4)), np.float16)])
    PruneWeights(sparsity=0.5, exempt_first_last=False).run(model)
    w = weight(model, "m")
    assert w.dtype == np.float16 and zeros(w) == 16


def test_constant_node_weights_are_pruned_and_the_node_removed():
    model = parse("""<ir_version: 10, opset_import: ["" : 21]>
g (float[1,4] x) => (float[1,1] y) {
  w = Constant<value = float[4,1] {1.0, -4.0, 3.0, -2.0}>()
  y = MatMul(x, w)
}""")
    result = prune(model, sparsity=0.5, exempt_first_last=False)
    assert [n.op_type for n in model.graph.nodes] == ["MatMul"]
    assert model.graph.nodes[0].inputs[1].const.numpy().ravel().tolist() == [0.0, -4.0, 3.0, 0.0]
    assert result.log.by_kind()["remove-node"] == 1


# -- global scope (LAMP) ----------------------------------------------------------------------


def test_lamp_scores_follow_the_definition_and_share_ties():
    w = np.array([3.0, -1.0, 2.0, -2.0, 0.0])
    # squares 9, 1, 4, 4, 0: score = w² / sum of the w'² with |w'| >= |w|
    assert lamp_scores(w) == pytest.approx([1.0, 1 / 18, 4 / 17, 4 / 17, 0.0])


def test_global_scope_meets_the_total_and_keeps_a_layer_of_small_weights():
    big, small = RNG.standard_normal((32, 16)), 1e-3 * RNG.standard_normal((16, 8))
    model = build([helper.make_node("MatMul", ["x", "wa"], ["h"], name="a"),
                   helper.make_node("MatMul", ["h", "wb"], ["y"], name="b")],
                  [tensor("x", [2, 32])], [tensor("y", [2, 8])], [init("wa", big), init("wb", small)])
    prune(model, sparsity=0.6, scope="global", exempt_first_last=False)
    za, zb = zeros(weight(model, "a")), zeros(weight(model, "b"))
    assert za + zb == math.floor(0.6 * (big.size + small.size) + 0.5)
    assert 0.3 < zb / small.size < 0.9  # a global magnitude threshold would zero all of it
    # within one layer LAMP keeps the order of magnitudes
    for name, w in (("a", big), ("b", small)):
        kept = weight(model, name) != 0
        assert np.abs(w[~kept]).max() <= np.abs(w[kept]).min()


def test_global_scope_counts_exempt_layers_out():
    model = net()
    result = prune(model, sparsity=0.5, scope="global")  # c1 and m1 exempt
    assert zeros(weight(model, "c1")) == 0 and zeros(weight(model, "m1")) == 0
    pruned = [weight(model, n) for n in ("c2", "c3", "g1")]
    assert sum(zeros(w) for w in pruned) == math.floor(0.5 * sum(w.size for w in pruned) + 0.5)
    assert set(details(result.log, "prune")) == {"%w2", "%w3", "%wg"}


# -- exemptions ---------------------------------------------------------------------------------


def test_first_and_last_layers_are_exempt_by_default():
    model = net()
    w1, wm = weight(model, "c1"), weight(model, "m1")
    result = prune(model, sparsity=0.5)
    assert np.array_equal(weight(model, "c1"), w1) and np.array_equal(weight(model, "m1"), wm)
    assert details(result.log, "skip") == {"c1": "first layer", "m1": "last layer",
                                           "%w1": "read by exempt Conv 'c1' (first layer)",
                                           "%wm": "read by exempt MatMul 'm1' (last layer)"}
    assert set(details(result.log, "prune")) == {"%w2", "%w3", "%wg"}


def test_exclude_by_node_name_and_by_op_type():
    model = net()
    result = prune(model, sparsity=0.5, exempt_first_last=False, exclude=("c2", "Gemm"))
    assert zeros(weight(model, "c2")) == 0 and zeros(weight(model, "g1")) == 0
    skips = details(result.log, "skip")
    assert skips["c2"] == "excluded by name" and skips["g1"] == "excluded op type Gemm"
    assert set(details(result.log, "prune")) == {"%w1", "%w3", "%wm"}


def test_an_exclusion_that_names_nothing_is_an_error():
    with pytest.raises(ir.CompileError) as info:
        PruneWeights(sparsity=0.5, exclude=("c9",)).run(net())
    assert str(info.value) == "prune-weights: exclude 'c9' is neither a node name nor an op type of the model"
    PruneWeights(sparsity=0.5, exclude=("ConvTranspose",)).run(net())  # an op type: fine


# -- shared weights ---------------------------------------------------------------------------


def shared(extra_reader: str = "MatMul") -> ir.Model:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="first"),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="second"),
             helper.make_node(extra_reader, ["y", "w"], ["z"], name="third")]
    return build(nodes, [tensor("x", [8, 8])], [tensor("z", [8, 8])], [init("w", RNG.standard_normal((8, 8)))])


def test_a_shared_weight_is_pruned_once():
    model = shared()
    result = prune(model, sparsity=0.5, exempt_first_last=False)
    new = model.graph.initializers["w_pruned"]
    assert sorted(model.graph.initializers) == ["w_pruned"]
    assert [n.inputs[1] for n in model.graph.nodes] == [new, new, new]
    assert zeros(new.const.numpy()) == 32
    assert result.log.by_kind()["add-initializer"] == 1
    assert details(result.log, "prune") == {"%w": "sparsity 0.00 -> 0.50"}


def test_a_shared_weight_with_an_exempt_reader_is_left_whole():
    model = shared()
    result = prune(model, sparsity=0.5)  # "first" and "third" are exempt
    assert sorted(model.graph.initializers) == ["w"] and not result.changed
    assert details(result.log, "skip")["%w"] == "read by exempt MatMul 'first' (first layer)"


def test_a_weight_also_read_by_another_op_is_left_whole():
    model = shared("Add")
    result = prune(model, sparsity=0.5, exempt_first_last=False)
    assert sorted(model.graph.initializers) == ["w"]
    assert details(result.log, "skip")["%w"] == "also read by Add 'third' (input 1)"


# -- 2:4 ------------------------------------------------------------------------------------------


def assert_two_of_four(before: np.ndarray, after: np.ndarray, axis: int) -> None:
    """Along `axis`, every 4 consecutive weights keep their 2 largest |w|, unchanged."""
    b = np.moveaxis(before, axis, -1).reshape(-1, 4)
    a = np.moveaxis(after, axis, -1).reshape(-1, 4)
    assert (np.count_nonzero(a, axis=1) == 2).all()
    top = np.argsort(-np.abs(b), axis=1)[:, :2]
    assert np.array_equal(np.take_along_axis(a, top, 1), np.take_along_axis(b, top, 1))


def test_two_of_four_on_conv_groups_input_channels_per_output_and_kernel_position():
    model = net()
    before = {n: weight(model, n) for n in ("c1", "c2", "c3")}
    result = prune(model, sparsity=0.0, mode="2:4", exempt_first_last=False, exclude=("Gemm", "MatMul"))
    for name, w in before.items():
        assert_two_of_four(w, weight(model, name), axis=1)
    assert details(result.log, "prune")["%w2"] == "sparsity 0.00 -> 0.50"


@pytest.mark.parametrize("trans_b", [0, 1])
def test_two_of_four_on_gemm_follows_trans_b(trans_b):
    w = RNG.standard_normal((12, 8) if trans_b else (8, 12))  # K = 8 either way
    model = build([helper.make_node("Gemm", ["x", "w"], ["y"], name="g", transB=trans_b)],
                  [tensor("x", [3, 8])], [tensor("y", [3, 12])], [init("w", w)])
    prune(model, sparsity=0.0, mode="2:4", exempt_first_last=False)
    assert_two_of_four(w.astype(np.float32), weight(model, "g"), axis=trans_b)


def test_two_of_four_on_matmul_along_k():
    w = RNG.standard_normal((8, 6))  # [K, N]; N is not a multiple of 4 and does not matter
    model = build([helper.make_node("MatMul", ["x", "w"], ["y"], name="m")],
                  [tensor("x", [3, 8])], [tensor("y", [3, 6])], [init("w", w)])
    prune(model, sparsity=0.0, mode="2:4", exempt_first_last=False)
    assert_two_of_four(w.astype(np.float32), weight(model, "m"), axis=0)


def test_two_of_four_skips_a_reduction_axis_not_a_multiple_of_four():
    w = RNG.standard_normal((8, 6, 3, 3))
    model = build([helper.make_node("Conv", ["x", "w"], ["y"], name="c")],
                  [tensor("x", [1, 6, 5, 5])], [tensor("y", [1, 8, 3, 3])], [init("w", w)])
    result = PruneWeights(sparsity=0.0, mode="2:4", exempt_first_last=False).run(model)
    assert not result.changed and np.array_equal(weight(model, "c"), w.astype(np.float32))
    assert details(result.log, "skip") == {"c": "2:4: reduction axis 1 of %w has length 6, not a multiple of 4"}


def test_two_of_four_on_gemm_with_trans_b_checks_k_not_n():
    model = build([helper.make_node("Gemm", ["x", "w"], ["y"], name="g", transB=1)],
                  [tensor("x", [3, 6])], [tensor("y", [3, 8])], [init("w", RNG.standard_normal((8, 6)))])
    result = PruneWeights(sparsity=0.0, mode="2:4", exempt_first_last=False).run(model)
    assert details(result.log, "skip") == {"g": "2:4: reduction axis 1 of %w has length 6, not a multiple of 4"}


def test_two_of_four_on_conv_transpose_counts_channels_per_group():
    def model(group):
        return build([helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="t", group=group)],
                     [tensor("x", [1, 8, 3, 3])], [tensor("y", [1, 2 * group, 5, 5])],
                     [init("w", RNG.standard_normal((8, 2, 3, 3)))])
    ok, bad = model(2), model(4)
    w = weight(ok, "t")
    prune(ok, sparsity=0.0, mode="2:4", exempt_first_last=False)
    assert_two_of_four(w, weight(ok, "t"), axis=0)
    result = PruneWeights(sparsity=0.0, mode="2:4", exempt_first_last=False).run(bad)
    assert details(result.log, "skip") == {
        "t": "2:4: reduction axis 0 of %w has length 2 per group, not a multiple of 4"}


# -- the report -----------------------------------------------------------------------------------


def test_sparsity_report_lists_each_weight_once():
    model = net()
    PruneWeights(sparsity=0.5).run(model)
    rows = sparsity_report(model)
    assert [(r.name, r.op, r.numel, r.zeros) for r in rows] == [
        ("w1", "Conv", 1152, 0), ("w2_pruned", "Conv", 2304, 1152), ("w3_pruned", "Conv", 256, 128),
        ("wg_pruned", "Gemm", 192, 96), ("wm", "MatMul", 96, 0)]
    assert rows[1].sparsity == 0.5
    assert [(r.name, r.op) for r in sparsity_report(shared("Gemm"))] == [("w", "MatMul,Gemm")]


# -- options ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    ({"sparsity": 1.0}, "prune-weights: sparsity must be a number in [0, 1), got 1.0"),
    ({"sparsity": -0.1}, "prune-weights: sparsity must be a number in [0, 1), got -0.1"),
    ({"sparsity": "0.5"}, "prune-weights: sparsity must be a number in [0, 1), got '0.5'"),
    ({"sparsity": float("nan")}, "prune-weights: sparsity must be a number in [0, 1), got nan"),
    ({"sparsity": 0.5, "mode": "4:8"}, "prune-weights: unknown mode '4:8' (expected unstructured or 2:4)"),
    ({"sparsity": 0.5, "scope": "model"}, "prune-weights: unknown scope 'model' (expected layer or global)"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(ir.CompileError) as info:
        PruneWeights(**options)
    assert str(info.value) == message


# -- sparse storage -------------------------------------------------------------------------------


def test_sparse_storage_runs_identically_in_onnxruntime_and_the_file_shrinks(tmp_path):
    model = net()
    PruneWeights(sparsity=0.9, exempt_first_last=False).run(model)
    dense = ir.to_proto(model)
    ir.save(model, tmp_path / "dense.onnx")
    result = StoreSparse().run(model)
    ir.verify(model)
    assert result.changed
    sparse = ir.to_proto(model)
    onnx.checker.check_model(sparse)
    stored = sorted(s.values.name for s in sparse.graph.sparse_initializer)
    assert stored == ["w1_pruned", "w2_pruned", "w3_pruned", "wg_pruned", "wm_pruned"]
    assert sorted(t.name for t in sparse.graph.initializer) == ["b1", "bg"]  # random biases stay dense
    for s in sparse.graph.sparse_initializer:  # 1-D linear indices, ascending
        idx = numpy_helper.to_array(s.indices)
        assert idx.dtype == np.int64 and idx.ndim == 1 and (np.diff(idx) > 0).all()
    x = [RNG.standard_normal((2, 8, 6, 6)).astype(np.float32)]
    assert identical(run_ort(sparse, x), run_ort(dense, x)) is None
    ir.save(model, tmp_path / "sparse.onnx")
    assert (tmp_path / "sparse.onnx").stat().st_size < 0.4 * (tmp_path / "dense.onnx").stat().st_size
    again = ir.load(tmp_path / "sparse.onnx")  # and back into the IR, the same numbers
    assert np.array_equal(again.graph.initializers["w2_pruned"].tensor.numpy(),
                          model.graph.initializers["w2_pruned"].tensor.numpy())
    w1 = weight(model, "c1")
    assert details(result.log, "set-tensor")["%w1_pruned"] == \
        f"sparse: {w1.size * 4} -> {np.count_nonzero(w1) * 12} bytes, {np.count_nonzero(w1)} of {w1.size} nonzero"
    assert not StoreSparse().run(model).changed  # already sparse


def test_sparse_storage_leaves_dense_tensors_and_graph_inputs_alone():
    half = np.where(RNG.random((8, 8)) < 0.5, 0, 1).astype(np.float32)  # 50%: cheaper dense
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "h"], ["a"]), helper.make_node("MatMul", ["a", "z"], ["y"])],
        "g", [tensor("x", [2, 8]), tensor("z", [8, 8])], [tensor("y", [2, 8])],
        [init("h", half), init("z", np.zeros((8, 8)))])  # z is an overridable input
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    proto.ir_version = 10
    model = ir.load(proto)
    result = StoreSparse().run(model)
    assert not result.changed and len(result.log) == 0


def test_sparse_storage_keeps_negative_zeros_and_empty_tensors():
    w = np.zeros((4, 8), np.float32)
    w[0, 0], w[1, 3] = -0.0, 2.5
    model = build([helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("Add", ["a", "b"], ["y"])],
                  [tensor("x", [2, 4])], [tensor("y", [2, 8])], [init("w", w), init("b", np.zeros(8))])
    StoreSparse().run(model)
    back = ir.load(ir.to_proto(model))
    got = back.graph.initializers["w"].tensor.numpy()
    assert np.array_equal(got, w) and np.signbit(got[0, 0])
    assert back.graph.initializers["b"].tensor.numpy().tolist() == [0.0] * 8
    x = [RNG.standard_normal((2, 4)).astype(np.float32)]
    assert identical(run_ort(ir.to_proto(model), x), [x[0] @ w + 0]) is None
