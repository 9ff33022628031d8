"""The optimize pipeline's first passes: shape inference and size-safe constant folding.
Each behaviour has a positive test (golden text, change-log counts), a negative test (the
Reject reason) and an equivalence test (onnxruntime before vs after, same feeds)."""

from __future__ import annotations

import tracemalloc
import weakref

import numpy as np
import onnx
import pytest
from onnx import parser

import ir
from rewrites.base import FixedPoint, Reject
from rewrites.cleanup import DeadCodeElimination
import rewrites.fold
from rewrites.fold import FoldConstants
from rewrites.shapes import SKELETON_THRESHOLD, InferShapes, broadcast
from tests.conformance import DATA_ROOT, matches, run_ort
from tests.textmodels import parse


def optimize(model: ir.Model, **options) -> dict:
    """InferShapes, FoldConstants, DeadCodeElimination; the fold's rewrites by rule."""
    InferShapes().run(model)
    result = FoldConstants(**options).run(model)
    DeadCodeElimination().run(model)
    ir.verify(model)
    return result.log.by_rule()


def assert_same_outputs(before: onnx.ModelProto, after: ir.Model, feeds: list) -> None:
    expected = run_ort(before, feeds)
    got = run_ort(ir.to_proto(after), feeds)
    assert matches(got, expected, rtol=0, atol=0) is None


def node(model: ir.Model, op_type: str) -> ir.Node:
    return next(n for n in model.graph.walk() if n.op_type == op_type)


# -- InferShapes --------------------------------------------------------------------------

RESHAPE_CHAIN = """<ir_version: 10, opset_import: ["" : 21]>
g (float[N, 8192] x) => (float[N, 8192] y) <int64[1] neg = {-1}> {
  s = Shape(x)
  i = Constant<value = int64 {1}>()
  d = Gather(s, i)
  zero = Constant<value = int64[1] {0}>()
  u = Unsqueeze(d, zero)
  t = Concat<axis=0>(neg, u)
  r = Reshape(x, t)
  y = Relu(r)
}"""


def test_infer_shapes_types_every_value_and_settles():
    model = parse(RESHAPE_CHAIN)
    result = InferShapes().run(model)
    ir.verify(model)
    assert result.changed
    assert result.log.by_kind() == {"set-type": 7}
    assert ir.print_graph(model.graph) == (
        'graph "g" (%x: float32[N,8192]) {\n'
        "  init %neg = int64[1] [-1]\n"
        "  %s: int64[2] = Shape(%x)  # Shape__1\n"
        "  %i: int64[] = Constant() {value=int64[] [1]}  # Constant__1\n"
        "  %d: int64[] = Gather(%s, %i)  # Gather__1\n"
        "  %zero: int64[1] = Constant() {value=int64[1] [0]}  # Constant__2\n"
        "  %u: int64[1] = Unsqueeze(%d, %zero)  # Unsqueeze__1\n"
        "  %t: int64[2] = Concat(%neg, %u) {axis=0}  # Concat__1\n"
        "  %r: float32[unk__0,8192] = Reshape(%x, %t)  # Reshape__1\n"
        "  %y: float32[N,8192] = Relu(%r)  # Relu__1\n"
        "  return %y: float32[N,8192]\n"
        "}\n")
    assert not InferShapes().run(model).changed  # types only gain information: a fixed point


def test_infer_shapes_only_adds_information():
    # %r is declared with symbol B: inference's own symbol for that dim does not replace it.
    proto = parser.parse_model(RESHAPE_CHAIN)
    proto.ir_version = 10
    proto.graph.value_info.append(onnx.helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, ["B", 8192]))
    model = ir.load(proto)
    InferShapes().run(model)
    assert node(model, "Reshape").outputs[0].shape == ("B", 8192)
    # With a static batch, a fixed dim beats a symbol; but the model's output keeps its
    # declared symbol: it is the signature.
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    model = ir.load(proto)
    InferShapes().run(model)
    assert node(model, "Reshape").outputs[0].shape == (2, 8192)
    assert model.graph.outputs[0].shape == ("N", 8192)


def test_local_inference_when_onnx_gives_up(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("inference crashed")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", broken)
    model = parse("""<ir_version: 10, opset_import: ["" : 21]>
g (float[N, 1] x, float[1, 8] w, float[M, 8] z) => (float[N, 8] y) {
  a = Add(x, w)
  b = Sigmoid(a)
  c = Cast<to=7>(b)
  e = Equal(a, b)
  d, mask = Dropout(a)
  f = Mul(z, b)
  g = custom.Op(a)
  h = Relu(g)
  y = Identity(b)
}""")
    result = InferShapes().run(model)
    assert result.log.by_kind() == {"set-type": 6}  # y was declared
    assert {c.rule for c in result.log} == {"local-inference"}
    types = {v.name: ir.printer.format_type(v) for n in model.graph.nodes for v in n.outputs}
    assert types == {"a": "float32[N,8]", "b": "float32[N,8]", "c": "int64[N,8]", "e": "bool[N,8]",
                     "d": "float32[N,8]", "mask": "?",
                     "f": "float32[?,8]",  # M against N: either may be 1, so unknown
                     "g": "?", "h": "?",  # a custom op's output stays unknown
                     "y": "float32[N,8]"}


def test_broadcast_dims():
    assert broadcast([(3, 1, "N"), (4, "N")]) == (3, 4, "N")
    assert broadcast([("N", 1), (1, "M")]) == ("N", "M")
    assert broadcast([("N",), ("M",)]) == (None,)
    assert broadcast([(None,), (5,)]) == (5,)
    assert broadcast([(None,), (1,)]) == (None,)
    assert broadcast([(2,), None]) is None


def test_skeleton_holds_no_big_weights():
    proto = parser.parse_model("""<ir_version: 10, opset_import: ["" : 21]>
g (float[B, 512] x) => (float[B, 512] y) <float[2] small = {1.0, 2.0}> {
  m = MatMul(x, w)
  y = Relu(m)
}""")
    proto.ir_version = 10
    w = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)  # 1 MiB
    proto.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))
    model = ir.load(proto)
    light = ir.skeleton_proto(model, threshold=SKELETON_THRESHOLD)
    assert len(light.SerializeToString()) < 1000
    assert [t.name for t in light.graph.initializer] == ["small", "w"]
    small, w = light.graph.initializer
    assert small.data_location == onnx.TensorProto.DEFAULT  # small constants stay
    assert w.data_location == onnx.TensorProto.EXTERNAL and list(w.dims) == [512, 512]  # no data
    InferShapes().run(model)
    assert ir.printer.format_type(node(model, "MatMul").outputs[0]) == "float32[B,512]"
    assert "w" in model.graph.initializers and not model.graph.initializers["w"].is_graph_input


def test_infer_shapes_does_not_copy_weights_inside_branches():
    """A 64 MiB Constant in an If branch reaches onnx's inference as an external reference
    to nothing: typed, never copied."""
    big = np.zeros((4096, 4096), np.float32)
    then = onnx.helper.make_graph(
        [onnx.helper.make_node("Constant", [], ["k"], value=onnx.numpy_helper.from_array(big, "k")),
         onnx.helper.make_node("MatMul", ["k", "x"], ["o1"])], "then", [],
        [onnx.helper.make_tensor_value_info("o1", onnx.TensorProto.FLOAT, None)])
    other = onnx.helper.make_graph([onnx.helper.make_node("Neg", ["x"], ["o2"])], "else", [],
                                   [onnx.helper.make_tensor_value_info("o2", onnx.TensorProto.FLOAT, None)])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)], "g",
        [onnx.helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, []),
         onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4096])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    model = ir.load(onnx.helper.make_model(graph, ir_version=10,
                                           opset_imports=[onnx.helper.make_opsetid("", 21)]))
    del big, then, graph
    tracemalloc.start()
    try:
        InferShapes().run(model)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"peak {peak} bytes"
    branch = node(model, "If").attributes["then_branch"].value
    assert [ir.printer.format_type(v) for n in branch.nodes for v in n.outputs] == \
        ["float32[4096,4096]", "float32[4096]"]
    assert ir.printer.format_type(model.graph.outputs[0]) == "float32[4096]"


def test_infer_shapes_never_reads_external_weights(tmp_path, monkeypatch):
    proto = parser.parse_model("""<ir_version: 10, opset_import: ["" : 21]>
g (float[B, 256] x) => (float[B, 256] y) {
  m = MatMul(x, w)
  y = Relu(m)
}""")
    proto.ir_version = 10
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.eye(256, dtype=np.float32), "w"))
    onnx.save_model(proto, str(tmp_path / "m.onnx"), save_as_external_data=True, size_threshold=1024)
    model = ir.load(tmp_path / "m.onnx")
    assert model.graph.initializers["w"].tensor.is_external

    def refuse(*args, **kwargs):
        raise AssertionError("external weight read")

    monkeypatch.setattr(ir.ExternalTensor, "iter_bytes", refuse)
    monkeypatch.setattr(ir.ExternalTensor, "numpy", refuse)
    assert InferShapes().run(model).log.by_kind() == {"set-type": 1}
    assert ir.printer.format_type(node(model, "MatMul").outputs[0]) == "float32[B,256]"


def test_infer_shapes_with_subgraphs_and_functions_keeps_numbers():
    proto = parser.parse_model("""<ir_version: 10, opset_import: ["" : 21, "local" : 1]>
g (bool c, float[3] x) => (float[3] y, float[3] z) {
  y = If(c) <then_branch = t () => (o1) { r = Relu(x)
 o1 = Neg(r) }, else_branch = e () => (o2) { o2 = Abs(x) }>
  z = local.Double(x)
}
<domain: "local", opset_import: ["" : 21]>
Double (a) => (b) { b = Add(a, a) }""")
    proto.ir_version = 10
    model = ir.load(proto)
    InferShapes().run(model)
    ir.verify(model)
    branch = node(model, "If").attributes["then_branch"].value
    assert [ir.printer.format_type(v) for n in branch.nodes for v in n.outputs] == ["float32[3]", "float32[3]"]
    assert ir.printer.format_type(model.graph.outputs[1]) == "float32[3]"
    assert model.functions[0].graph.nodes[0].outputs[0].dtype is None  # bodies stay generic
    x = np.array([-1.0, 0.5, 2.0], np.float32)
    for c in (True, False):
        assert_same_outputs(proto, model, [np.array(c), x])


# -- InferShapes: control flow --------------------------------------------------------------

RANK_CHECK = """<ir_version: 10, opset_import: ["" : 21]>
g (bool c, float[N, 4] x, float[M, 4] z) => (float[N, 4] y) {
  v = If(c) <then_branch = t () => (float[N, 4] o1) { o1 = Relu(x) },
             else_branch = e () => (float[M, 4] o2) { o2 = Neg(z) }>
  s = Shape(v)
  r = Size(s)
  two = Constant<value = int64 {2}>()
  eq = Equal(r, two)
  ne = Not(eq)
  k = If(ne) <then_branch = t2 () => (float[1, N, 4] o3) { zero = Constant<value = int64[1] {0}>()
                                                           o3 = Unsqueeze(v, zero) },
              else_branch = e2 () => (float[N, 4] o4) { o4 = Identity(v) }>
  y = Add(k, x)
}"""


def infer_locally(model: ir.Model, monkeypatch) -> dict:
    """InferShapes with onnx's inference failing: only our own rules type values."""
    with monkeypatch.context() as m:
        m.setattr(onnx.shape_inference, "infer_shapes", _raise)
        result = InferShapes().run(model)
    assert {c.rule for c in result.log} <= {"local-inference"}
    return {v.name: ir.printer.format_type(v) for n in model.graph.nodes for v in n.outputs}


def _raise(*args, **kwargs):
    raise RuntimeError("inference crashed")


def test_if_output_merges_its_branches_and_rank_checks_fold(monkeypatch):
    # Silero's LSTM wrapper: If(Not(Equal(Size(Shape(v)), 2))) where v comes out of an If.
    model = parse(RANK_CHECK)
    before = ir.to_proto(model)
    types = infer_locally(model, monkeypatch)
    # Same rank in both branches: the rank is known, N against M is not.
    assert types["v"] == "float32[?,4]" and types["s"] == "int64[2]" and types["r"] == "int64[]"
    # Ranks 3 and 2: only the dtype is known.
    assert types["k"] == "float32[...]"
    fold = FoldConstants().run(model)
    DeadCodeElimination().run(model)
    ir.verify(model)
    assert fold.log.by_rule() == {"FoldShape": 1, "FoldConstants": 2, "InlineConstantIf": 1}
    assert ir.print_graph(model.graph) == (
        'graph "g" (%c: bool[], %x: float32[N,4], %z: float32[M,4]) {\n'
        "  %v: float32[?,4] = If(%c)  # If__1\n"
        '    else_branch "e" () {\n'
        "      %o2: float32[M,4] = Neg(%z)  # Neg__1\n"
        "      return %o2: float32[M,4]\n"
        "    }\n"
        '    then_branch "t" () {\n'
        "      %o1: float32[N,4] = Relu(%x)  # Relu__1\n"
        "      return %o1: float32[N,4]\n"
        "    }\n"
        "  %o4: float32[N,4] = Identity(%v)  # Identity__1\n"
        "  %y: float32[N,4] = Add(%o4, %x)  # Add__1\n"
        "  return %y: float32[N,4]\n"
        "}\n")
    x, z = np.arange(12, dtype=np.float32).reshape(3, 4), -np.ones((3, 4), np.float32)
    for c in (True, False):
        assert_same_outputs(before, model, [np.array(c), x, z])


DIFFERENT_RANKS = """<ir_version: 10, opset_import: ["" : 21]>
g (float[B, 128, T] h) => (float[B, 128] y) {
  minus = Constant<value = int64[1] {-1}>()
  s0 = Shape(h)
  t = Gather(s0, minus)
  one = Constant<value = int64[1] {1}>()
  single = Equal(t, one)
  c = Squeeze(single)
  v = If(c) <then_branch = t1 () => (float[B, 128] o1) { o1 = Squeeze(h, minus) },
             else_branch = e1 () => (float[B, 128, T] o2) { o2 = Identity(h) }>
  s = Shape(v)
  r = Size(s)
  two = Constant<value = int64 {2}>()
  eq = Equal(r, two)
  y = If(eq) <then_branch = t2 () => (float[B, 128] o3) { o3 = Identity(v) },
              else_branch = e2 () => (float[B, 128] o4) { o4 = ReduceMax<keepdims=0>(v, minus) }>
}"""


@pytest.mark.parametrize("local", [False, True], ids=["onnx-inference", "local-rules"])
def test_if_branches_of_different_ranks_keep_the_rank_check(local, monkeypatch):
    # Silero's decoder squeezes a time axis of length 1 in one branch only: the rank of v is
    # not known before running, so the rank check must stay (onnxscript's optimizer assumes
    # rank 2 here, from a type the exporter declared inside the later branch).
    model = parse(DIFFERENT_RANKS)
    before = ir.to_proto(model)
    if local:
        infer_locally(model, monkeypatch)
    assert optimize(model) == {}
    assert ir.printer.format_type(node(model, "If").outputs[0]) == "float32[...]"
    assert FoldConstants().match_shape(node(model, "Size")) == Reject("shape of %s is not static")
    for steps in (1, 3):
        h = np.random.default_rng(steps).standard_normal((2, 128, steps)).astype(np.float32)
        assert_same_outputs(before, model, [h])


LOOPS = """<ir_version: 10, opset_import: ["" : 21]>
g (int64 n, float[2] x, float[5, 3] seq) => (last, grown, steps, total, run) {
  on = Constant<value = bool {1}>()
  last, grown, steps = Loop(n, on, x, x) <body = body (int64 i, bool cin, float[2] acc, float[M] cat)
                                                  => (bool cout, float[2] next, float[K] cat2, float[2] step) {
    cout = Identity(cin)
    next = Add(acc, acc)
    cat2 = Concat<axis=0>(cat, acc)
    step = Relu(acc)
  }>
  zero = Constant<value = float[3] {0.0, 0.0, 0.0}>()
  total, run = Scan(zero, seq) <num_scan_inputs = 1, scan_output_axes = [1],
                                body = sbody (float[3] sum, float[3] row) => (float[3] sum2, float[3] cum) {
    sum2 = Add(sum, row)
    cum = Identity(sum2)
  }>
}"""


@pytest.mark.parametrize("local", [False, True], ids=["onnx-inference", "local-rules"])
def test_loop_and_scan_outputs_are_typed_from_their_bodies(local, monkeypatch):
    model = parse(LOOPS)
    if local:
        types = infer_locally(model, monkeypatch)
    else:
        InferShapes().run(model)
        types = {v.name: ir.printer.format_type(v) for n in model.graph.nodes for v in n.outputs}
    # Loop: carried values are the initial value or the body's output (a length that changes
    # per iteration is unknown); scan outputs stack the body's output on a new axis of
    # unknown length. Scan: states likewise; outputs stacked along scan_output_axes, as long
    # as the scan input.
    assert {k: types[k] for k in ("last", "grown", "total", "run")} == \
        {"last": "float32[2]", "grown": "float32[?]", "total": "float32[3]", "run": "float32[3,5]"}
    assert types["steps"] in ("float32[?,2]", "float32[unk__1,2]")  # onnx names its unknown
    assert_same_outputs(parser.parse_model(LOOPS), model,
                        [np.array(3, np.int64), np.ones(2, np.float32),
                         np.arange(15, dtype=np.float32).reshape(5, 3)])


def test_size_of_shape_is_the_rank():
    model = parse("""<ir_version: 10, opset_import: ["" : 21]>
g (float[N, M, 4] x) => (int64 r) {
  s = Shape(x)
  r = Size(s)
}""")
    before = ir.to_proto(model)
    # No inference ran: Shape's output is untyped, but Size(Shape(x)) only needs x's rank.
    assert FoldConstants().match_shape(node(model, "Size"))["value"] == 3
    assert FoldConstants().run(model).log.by_rule() == {"FoldShape": 1}
    DeadCodeElimination().run(model)
    assert [n.op_type for n in model.graph.nodes] == ["Identity"]
    assert_same_outputs(before, model, [np.zeros((2, 5, 4), np.float32)])


# -- FoldConstants: chains and shape arithmetic --------------------------------------------

CHAIN = """<ir_version: 10, opset_import: ["" : 21]>
g (float[2, 3] x) => (float[2, 3] y) <float[3] w = {1.0, 2.0, 3.0}> {
  two = Constant<value = float {2.0}>()
  a = Mul(w, two)
  b = Neg(a)
  c = Exp(b)
  y = Add(x, c)
}"""


def test_chain_folds_in_one_run():
    model = parse(CHAIN)
    result = FoldConstants().run(model)
    ir.verify(model)
    assert result.log.by_rule() == {"FoldConstants": 3}  # one per folded node
    # One region: only the value leaving it becomes an initializer; no intermediate churn.
    assert result.log.by_kind() == {"add-initializer": 1, "replace-uses": 1, "remove-node": 4,
                                    "remove-initializer": 1}
    assert ir.print_graph(model.graph) == (
        'graph "g" (%x: float32[2,3]) {\n'
        "  init %c_1 = float32[3] [0.1353352814912796, 0.018315639346837997, 0.002478752052411437]\n"
        "  %y: float32[2,3] = Add(%x, %c_1)  # Add__1\n"
        "  return %y: float32[2,3]\n"
        "}\n")
    assert not FoldConstants().run(model).changed


def test_chain_keeps_numbers():
    model = parse(CHAIN)
    before = ir.to_proto(model)
    optimize(model)
    assert_same_outputs(before, model, [np.arange(6, dtype=np.float32).reshape(2, 3)])


def test_reshape_target_folds_with_symbolic_batch():
    model = parse(RESHAPE_CHAIN)
    before = ir.to_proto(model)
    assert optimize(model) == {"FoldShape": 1, "FoldConstants": 2}
    assert ir.print_graph(model.graph) == (
        'graph "g" (%x: float32[N,8192]) {\n'
        "  init %t_1 = int64[2] [-1, 8192]\n"
        "  %r: float32[unk__0,8192] = Reshape(%x, %t_1)  # Reshape__1\n"
        "  %y: float32[N,8192] = Relu(%r)  # Relu__1\n"
        "  return %y: float32[N,8192]\n"
        "}\n")
    x = np.random.default_rng(0).standard_normal((3, 8192)).astype(np.float32)
    assert_same_outputs(before, model, [x])


SHAPES = """<ir_version: 10, opset_import: ["" : 21]>
g (float[N, 4, 5] x) => (int64[2] tail, int64 n, int64 batch, int64 size) {
  tail = Shape<start=1>(x)
  all = Shape(x)
  zero = Constant<value = int64 {0}>()
  batch = Gather(all, zero)
  minus = Constant<value = int64 {-1}>()
  n = Gather(all, minus)
  size = Size(x)
}"""


def test_shape_arithmetic_folds_static_dims_only():
    model = parse(SHAPES)
    before = ir.to_proto(model)
    assert optimize(model) == {"FoldShape": 2}  # Shape<start=1> and Gather(.., -1)
    assert ir.print_graph(model.graph) == (
        'graph "g" (%x: float32[N,4,5]) {\n'
        "  init %tail_1 = int64[2] [4, 5]\n"
        "  init %n_1 = int64[] [5]\n"
        "  %all: int64[3] = Shape(%x)  # Shape__2\n"
        "  %zero: int64[] = Constant() {value=int64[] [0]}  # Constant__1\n"
        "  %batch: int64[] = Gather(%all, %zero)  # Gather__1\n"
        "  %size: int64[] = Size(%x)  # Size__1\n"
        "  %tail: int64[2] = Identity(%tail_1)  # tail_identity\n"
        "  %n: int64[] = Identity(%n_1)  # n_identity\n"
        "  return %tail: int64[2], %n: int64[], %batch: int64[], %size: int64[]\n"
        "}\n")
    fold = FoldConstants()
    assert fold.match_shape(node(model, "Gather")) == \
        Reject("dimensions of %x read here are not static")
    assert fold.match_shape(node(model, "Size")) == Reject("shape of %x is not static")
    assert not FoldConstants().run(model).changed  # Identity(constant) to an output stays
    assert fold.match(node(model, "Identity")) == Reject("already a constant carried to a graph output")
    assert_same_outputs(before, model, [np.zeros((2, 4, 5), np.float32)])


def test_size_and_shape_of_static_value_fold():
    model = parse("""<ir_version: 10, opset_import: ["" : 21]>
g (float[2, 3] x) => (float[2, 3] y) {
  s = Size(x)
  f = Cast<to=1>(s)
  y = Div(x, f)
}""")
    before = ir.to_proto(model)
    assert optimize(model) == {"FoldShape": 1, "FoldConstants": 1}
    assert [n.op_type for n in model.graph.nodes] == ["Div"]
    assert_same_outputs(before, model, [np.arange(6, dtype=np.float32).reshape(2, 3)])


# -- size safety --------------------------------------------------------------------------

HUGE = """<ir_version: 10, opset_import: ["" : 21]>
g () => (float[268435456, 268435456] y) {
  s = Constant<value = int64[2] {268435456, 268435456}>()
  y = ConstantOfShape(s)
}"""


def test_huge_constant_of_shape_stays_untouched_with_bounded_memory():
    model = parse(HUGE)
    assert len(ir.to_proto(model).SerializeToString()) < 200  # a tiny model...
    InferShapes().run(model)
    text = ir.print_graph(model.graph)
    tracemalloc.start()
    for allow_growth in (False, True):
        for p in (InferShapes(), FoldConstants(allow_growth=allow_growth), DeadCodeElimination()):
            p.run(model)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20 << 20  # ...whose output would be 256 PiB: nothing was materialized
    assert ir.print_graph(model.graph) == text
    # ir.printer.format_bytes stops at GiB
    assert FoldConstants(allow_growth=True).match(node(model, "ConstantOfShape")) == \
        Reject("output %y would be 268435456.0 GiB, over the size limit of 1.0 MiB")


def test_expand_and_tile_blowups_are_refused_before_evaluation():
    model = parse("""<ir_version: 10, opset_import: ["" : 21]>
g (float[1] x) => (float[1048576, 1024] y, float[1048576] z) <float[1] one = {1.0}, int64[2] shape = {1048576, 1024},
                                                              int64[1] reps = {1048576}> {
  big = Expand(one, shape)
  y = Add(big, x)
  tiled = Tile(one, reps)
  z = Mul(tiled, x)
}""")
    tracemalloc.start()
    assert optimize(model) == {}
    assert tracemalloc.get_traced_memory()[1] < 20 << 20
    tracemalloc.stop()
    fold = FoldConstants()
    assert fold.match(node(model, "Expand")) == \
        Reject("output %big would be 4.0 GiB, over the size limit of 1.0 MiB")
    tile = node(model, "Tile")
    assert fold.match(tile) == Reject("output %tiled would be 4.0 MiB, over the size limit of 1.0 MiB")
    assert FoldConstants(size_limit=8 << 20).match(tile) == \
        Reject("would grow the model: 4.0 MiB of outputs for 8 B of constants freed")
    assert FoldConstants(size_limit=8 << 20, allow_growth=True).match(tile)


SHARED = """<ir_version: 10, opset_import: ["" : 21]>
g (float[2, 64] x) => (float[2, 64] y, float[2, 64] z) {
  y = MatMul(x, w)
  wt = Transpose(w)
  z = MatMul(x, wt)
}"""


def shared_weight_model() -> tuple[ir.Model, onnx.ModelProto]:
    proto = parser.parse_model(SHARED)
    proto.ir_version = 10
    w = np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)  # 16 KiB
    proto.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))
    return ir.load(proto), proto


def test_shared_weight_is_not_duplicated():
    model, proto = shared_weight_model()
    assert optimize(model) == {}
    assert FoldConstants().match(node(model, "Transpose")) == \
        Reject("would grow the model: 16.0 KiB of outputs for 0 B of constants freed")
    assert_same_outputs(proto, model, [np.ones((2, 64), np.float32)])


def test_shared_weight_folds_when_growth_is_allowed():
    model, proto = shared_weight_model()
    assert optimize(model, allow_growth=True) == {"FoldConstants": 1}
    assert [n.op_type for n in model.graph.nodes] == ["MatMul", "MatMul"]
    assert sorted(model.graph.initializers) == ["w", "wt_1"]
    assert_same_outputs(proto, model, [np.ones((2, 64), np.float32)])


def test_transpose_of_unshared_weight_folds():
    proto = parser.parse_model("""<ir_version: 10, opset_import: ["" : 21]>
g (float[2, 64] x) => (float[2, 64] z) {
  wt = Transpose(w)
  z = MatMul(x, wt)
}""")
    proto.ir_version = 10
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.eye(64, dtype=np.float32) * 3, "w"))
    model = ir.load(proto)
    assert optimize(model) == {"FoldConstants": 1}
    assert sorted(model.graph.initializers) == ["wt_1"]  # the original weight is gone
    assert_same_outputs(proto, model, [np.ones((2, 64), np.float32)])


# -- regions: growth is judged over connected constant computation ---------------------------

REORDER = """<ir_version: 10, opset_import: ["" : 21]>
g (float[2, 32] x) => (float[1, 2, 48] y) <int64[1] zero = {0}, int64[1] a = {16}, int64[1] b = {32},
                                             int64[1] e = {48}> {
  s1 = Slice(w, zero, a, zero)
  s2 = Slice(w, b, e, zero)
  s3 = Slice(w, a, b, zero)
  c = Concat<axis=0>(s1, s2, s3)
  u = Unsqueeze(c, zero)
  ut = Transpose<perm=[0, 2, 1]>(u)
  y = MatMul(x, ut)
}"""


def with_weights(text: str, **weights: tuple) -> tuple[ir.Model, onnx.ModelProto]:
    """The model with seeded float32 weights of the given shapes (too big to write inline)."""
    proto = parser.parse_model(text)
    proto.ir_version = 10
    rng = np.random.default_rng(2)
    for name, shape in weights.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(
            rng.standard_normal(shape).astype(np.float32), name))
    return ir.load(proto), proto


def test_weight_reorder_folds_as_one_region():
    # Silero's LSTM gate reorder (openvino export): each Slice alone would duplicate a third
    # of the 6 KiB weight; the whole region makes one 6 KiB tensor and frees the weight.
    model, proto = with_weights(REORDER, w=(48, 32))
    InferShapes().run(model)
    fold = FoldConstants()
    assert fold.match(node(model, "Slice")) == \
        Reject("would grow the model: 2.0 KiB of outputs for 0 B of constants freed")
    [region] = fold.regions(model.graph)
    assert [n.op_type for n in region.nodes] == ["Slice"] * 3 + ["Concat", "Unsqueeze", "Transpose"]
    assert [v.name for v in region.frontier] == ["ut"]
    assert sorted(v.name for v in region.freed) == ["a", "b", "e", "w", "zero"]
    assert region.verdict
    result = fold.run(model)
    ir.verify(model)
    assert result.log.by_rule() == {"FoldConstants": 6}  # one per folded node
    assert result.log.by_kind() == {"add-initializer": 1, "replace-uses": 1, "remove-node": 6,
                                    "remove-initializer": 5}
    assert ir.print_graph(model.graph) == (
        'graph "g" (%x: float32[2,32]) {\n'
        "  init %ut_1 = float32[1,32,48] <6.0 KiB sha:effac4e15188>\n"
        "  %y: float32[1,2,48] = MatMul(%x, %ut_1)  # MatMul__1\n"
        "  return %y: float32[1,2,48]\n"
        "}\n")
    assert not FoldConstants().run(model).changed
    assert_same_outputs(proto, model, [np.arange(64, dtype=np.float32).reshape(2, 32)])


SHARED_REORDER = REORDER.replace("=> (float[1, 2, 48] y)", "=> (float[1, 2, 48] y, float[2, 48] z)") \
    .replace("  y = MatMul(x, ut)\n", "  y = MatMul(x, ut)\n  z = Gemm<transB=1>(x, w)\n")


def test_reorder_of_a_weight_read_by_a_computation_is_refused():
    # The Gemm keeps w alive: folding the region would add a second copy of it.
    model, proto = with_weights(SHARED_REORDER, w=(48, 32))
    InferShapes().run(model)
    text = ir.print_graph(model.graph)
    [region] = FoldConstants().regions(model.graph)
    assert region.verdict == Reject("would grow the model: 6.0 KiB of outputs for 32 B of constants freed")
    assert optimize(model) == {}
    assert ir.print_graph(model.graph) == text
    feeds = [np.arange(64, dtype=np.float32).reshape(2, 32)]
    assert_same_outputs(proto, model, feeds)
    assert optimize(model, allow_growth=True) == {"FoldConstants": 6}
    assert sorted(model.graph.initializers) == ["ut_1", "w"]
    assert_same_outputs(proto, model, feeds)


def test_slices_of_a_weight_for_different_readers_fold_together():
    # No value links the two Slices, the weight they share does: both fold, w goes.
    model, proto = with_weights("""<ir_version: 10, opset_import: ["" : 21]>
g (float[2, 32] x) => (float[2, 24] y, float[2, 24] z) <int64[1] zero = {0}, int64[1] half = {24},
                                                       int64[1] end = {48}> {
  top = Slice(w, zero, half, zero)
  bottom = Slice(w, half, end, zero)
  y = Gemm<transB=1>(x, top)
  z = Gemm<transB=1>(x, bottom)
}""", w=(48, 32))
    fold = FoldConstants()
    assert fold.match(node(model, "Slice")) == \
        Reject("would grow the model: 3.0 KiB of outputs for 0 B of constants freed")
    assert optimize(model) == {"FoldConstants": 2}
    assert sorted(model.graph.initializers) == ["bottom_1", "top_1"]
    assert_same_outputs(proto, model, [np.arange(64, dtype=np.float32).reshape(2, 32)])


def test_a_small_shared_constant_does_not_tie_regions():
    # Both Unsqueezes read `zero`. Unsqueeze(p) would duplicate p (the MatMul keeps it), but
    # that must not stop Unsqueeze(w), which replaces w.
    model, proto = with_weights("""<ir_version: 10, opset_import: ["" : 21]>
g (float[2, 64] x, float[2, 32] q) => (float[1, 2, 64] y, float[1, 2, 32] z, float[2, 32] t)
  <int64[1] zero = {0}> {
  wu = Unsqueeze(w, zero)
  y = MatMul(x, wu)
  pu = Unsqueeze(p, zero)
  z = MatMul(q, pu)
  t = MatMul(q, p)
}""", w=(64, 64), p=(32, 32))
    InferShapes().run(model)
    regions = FoldConstants().regions(model.graph)
    assert [([n.op_type for n in r.nodes], bool(r.verdict)) for r in regions] == \
        [(["Unsqueeze"], True), (["Unsqueeze"], False)]
    assert optimize(model) == {"FoldConstants": 1}
    assert sorted(model.graph.initializers) == ["p", "wu_1", "zero"]
    assert_same_outputs(proto, model, [np.ones((2, 64), np.float32), np.ones((2, 32), np.float32)])


def test_region_memory_holds_live_values_only(monkeypatch):
    # A chain of 12 Negs over a 64 KiB weight folds as one region; each intermediate is
    # dropped once its reader ran, so at most the current input is alive.
    chain = "\n".join(f"  n{i + 1} = Neg(n{i})" for i in range(12))
    model, proto = with_weights(f"""<ir_version: 10, opset_import: ["" : 21]>
g (float[1, 128] x) => (float[1, 128] y) {{
  n0 = Identity(w)
{chain}
  y = MatMul(x, n12)
}}""", w=(128, 128))
    made, alive = [], []
    real = rewrites.fold.evaluate

    def tracked(*args):
        alive.append(sum(r() is not None for r in made))
        results = real(*args)
        made.extend(weakref.ref(a) for a in results if a is not None)
        return results

    monkeypatch.setattr(rewrites.fold, "evaluate", tracked)
    assert optimize(model) == {"FoldConstants": 13}
    assert len(alive) == 13 and max(alive) == 1
    assert [n.op_type for n in model.graph.nodes] == ["MatMul"]
    assert_same_outputs(proto, model, [np.ones((1, 128), np.float32)])


# -- what never folds ---------------------------------------------------------------------

NEVER = """<ir_version: 10, opset_import: ["" : 21, "custom" : 1]>
g (float[4] x) => (float[4] a, int8[4] b, float[4] c, float[4] d, float[4] e) <int8[4] wq = {1, -2, 3, -4},
                                                                float s = {0.5}, int8 zp = {0}, float[4] wf = {1.0, 2.0, 3.0, 4.0}> {
  deq = DequantizeLinear(wq, s, zp)
  a = Mul(x, deq)
  b = QuantizeLinear(wf, s, zp)
  r = RandomUniformLike(wf)
  c = Add(x, r)
  u = custom.Scale(wf)
  d = Add(x, u)
  e = Constant<value = float[4] {1.0, 1.0, 1.0, 1.0}>()
}"""


@pytest.mark.parametrize("op, reason", [
    ("DequantizeLinear", "quantized weights stay quantized"),
    ("QuantizeLinear", "quantized weights stay quantized"),
    ("RandomUniformLike", "RandomUniformLike is not deterministic"),
    ("Scale", "custom domain 'custom'"),
    ("Constant", "already a constant"),
    ("Mul", "input %x is not constant"),
])
def test_never_folds(op, reason):
    model = parse(NEVER)
    text = ir.print_graph(model.graph)
    assert FoldConstants().match(node(model, op)) == Reject(reason)
    FoldConstants(allow_growth=True).run(model)
    assert ir.print_graph(model.graph) == text


def test_training_dropout_of_a_constant_is_not_folded():
    """Dropout in training mode is random: folding it would freeze one draw of the mask
    (the same set keeps CSE from merging two Dropouts)."""
    model = parse("""<ir_version: 10, opset_import: ["" : 21]>
g (float[64] x) => (float[64] y) <float[64] w = {%s}, float r = {0.5}, bool t = {1}> {
  d = Dropout(w, r, t)
  y = Add(x, d)
}""" % ", ".join(["1.0"] * 64))
    InferShapes().run(model)
    assert FoldConstants().match(node(model, "Dropout")) == Reject("Dropout is not deterministic")
    assert not FoldConstants().run(model).changed


def test_quantized_weight_keeps_numbers():
    text = NEVER.replace("custom.Scale(wf)", "Abs(wf)")  # onnxruntime cannot run the custom op
    model = parse(text)
    before = ir.to_proto(model)
    assert optimize(model) == {"FoldConstants": 1}  # the Abs only
    assert node(model, "DequantizeLinear").inputs[0].const.dtype == onnx.TensorProto.INT8
    assert node(model, "QuantizeLinear").inputs[0].const.dtype == onnx.TensorProto.FLOAT
    x = np.arange(4, dtype=np.float32)
    expected, got = run_ort(before, [x]), run_ort(ir.to_proto(model), [x])
    for i in (0, 1, 3, 4):  # output 2 is random
        assert np.array_equal(expected[i], got[i])


NEWER_OPSET = """<ir_version: 10, opset_import: ["" : 40]>
g (float[2] x) => (float[2] y) {
  a = Constant <value = float[2] {1.0, 2.0}> ()
  b = Neg(a)
  y = Add(x, b)
}"""


@pytest.mark.parametrize("infer", [True, False], ids=["typed", "untyped"])
def test_opset_newer_than_onnx_does_not_fold(infer):
    """onnx knows no IR version for opset 40: the one-node model cannot be built, so
    nothing is evaluated and nothing folds (no internal error)."""
    model = parse(NEWER_OPSET)
    if infer:
        InferShapes().run(model)
    text = ir.print_graph(model.graph)
    result = FoldConstants().run(model)
    assert not result.changed and not result.log.by_rule()
    assert ir.print_graph(model.graph) == text


# -- subgraphs ----------------------------------------------------------------------------

CONSTANT_IF = """<ir_version: 10, opset_import: ["" : 21]>
g (float[2] x) => (float[2] y) <float[2] w = {1.0, 2.0}> {
  c = Constant<value = bool {1}>()
  v = If(c) <then_branch = t () => (float[2] o1) <float[2] b = {10.0, 20.0}> {
    s = Add(x, w)
    o1 = Mul(s, b)
  }, else_branch = e () => (float[2] o2) { o2 = Neg(x) }>
  y = Relu(v)
}"""


def test_constant_if_is_inlined_with_outer_captures():
    model = parse(CONSTANT_IF)
    before = ir.to_proto(model)
    result = FoldConstants().run(model)
    DeadCodeElimination().run(model)
    ir.verify(model)
    assert result.log.by_rule() == {"InlineConstantIf": 1}
    assert result.log.by_kind() == {"move-initializer": 1, "move-node": 2, "replace-uses": 1,
                                    "remove-node": 2}
    assert ir.print_graph(model.graph) == (
        'graph "g" (%x: float32[2]) {\n'
        "  init %w = float32[2] [1.0, 2.0]\n"
        "  init %b = float32[2] [10.0, 20.0]\n"
        "  %s: ? = Add(%x, %w)  # Add__1\n"
        "  %o1: float32[2] = Mul(%s, %b)  # Mul__1\n"  # typed in the branch
        "  %y: float32[2] = Relu(%o1)  # Relu__1\n"
        "  return %y: float32[2]\n"
        "}\n")
    assert_same_outputs(before, model, [np.array([-3.0, 4.0], np.float32)])


def test_if_with_input_condition_is_kept_and_its_branches_fold():
    model = parse("""<ir_version: 10, opset_import: ["" : 21]>
g (bool c, float[2] x) => (float[2] y) <float[2] w = {1.0, 2.0}> {
  y = If(c) <then_branch = t () => (float[2] o1) { k = Constant<value = float {3.0}>()
    w3 = Mul(w, k)
    o1 = Add(x, w3) }, else_branch = e () => (float[2] o2) { o2 = Neg(x) }>
}""")
    before = ir.to_proto(model)
    assert optimize(model) == {"FoldConstants": 1}
    branch = node(model, "If").attributes["then_branch"].value
    assert ir.print_graph(branch) == (
        'graph "t" () {\n'
        "  init %w3_1 = float32[2] [3.0, 6.0]\n"
        "  %o1: float32[2] = Add(%x, %w3_1)  # Add__1\n"
        "  return %o1: float32[2]\n"
        "}\n")
    assert model.graph.initializers == {}  # the outer weight only the branch read is gone
    assert FoldConstants().match(node(model, "If")) == Reject("has a subgraph")
    for c in (True, False):
        assert_same_outputs(before, model, [np.array(c), np.array([1.0, -1.0], np.float32)])


LOOP = """<ir_version: 10, opset_import: ["" : 21]>
g (int64 n, float[2] x) => (float[2] y) <float[2] w = {0.5, 0.25}> {
  on = Constant<value = bool {1}>()
  y = Loop(n, on, x) <body = body (int64 i, bool cin, float[2] acc) => (bool cout, float[2] next) {
    cout = Identity(cin)
    half = Constant<value = float {0.5}>()
    flag = Not(on)
    next = If(flag) <then_branch = t () => (float[2] o1) { o1 = Sub(acc, w) },
                     else_branch = e () => (float[2] o2) { ws = Mul(w, half)
                                                         o2 = Add(acc, ws) }>
  }>
}"""


def test_if_nested_in_a_loop_body_is_folded():
    model = parse(LOOP)
    before = ir.to_proto(model)
    assert optimize(model) == {"FoldConstants": 2, "InlineConstantIf": 1}
    body = node(model, "Loop").attributes["body"].value
    assert ir.print_graph(body) == (
        'graph "body" (%i: int64[], %cin: bool[], %acc: float32[2]) {\n'
        "  init %ws_1 = float32[2] [0.25, 0.125]\n"
        "  %cout: bool[] = Identity(%cin)  # Identity__1\n"
        "  %o2: float32[2] = Add(%acc, %ws_1)  # Add__1\n"
        "  %next: float32[2] = Identity(%o2)  # next_identity\n"
        "  return %cout: bool[], %next: float32[2]\n"
        "}\n")
    assert_same_outputs(before, model, [np.array(3, np.int64), np.array([1.0, 2.0], np.float32)])


def test_fixed_point_of_the_pipeline_settles():
    model = parse(LOOP)
    group = FixedPoint([InferShapes(), FoldConstants(), DeadCodeElimination()])
    assert group.run(model).changed
    assert not group.run(model).changed


# -- a real model -------------------------------------------------------------------------

VGG19 = DATA_ROOT / "light" / "light_vgg19.onnx"


def vgg19(as_constants: bool) -> onnx.ModelProto:
    """onnx's light VGG19: 9 KB whose weights are ConstantOfShape of shape initializers
    (548 MB once made). As shipped (IR 3) those initializers are also graph inputs, so they
    may be overridden and are not constants; `as_constants` drops them from the inputs."""
    proto = onnx.load(str(VGG19))
    if as_constants:
        inits = {t.name for t in proto.graph.initializer}
        keep = [i for i in proto.graph.input if i.name not in inits]
        del proto.graph.input[:]
        proto.graph.input.extend(keep)
        proto.ir_version = 10
    return proto


@pytest.mark.slow
@pytest.mark.parametrize("as_constants", [False, True], ids=["as-shipped", "shapes-as-constants"])
def test_light_vgg19_does_not_blow_up(as_constants):
    proto = vgg19(as_constants)
    model = ir.load(proto)
    tracemalloc.start()
    folds = optimize(model)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20 << 20
    assert len(ir.to_proto(model).SerializeToString()) < 100_000
    assert folds == ({"FoldConstants": 6} if as_constants else {})  # biases up to 1 KiB
    assert sum(n.op_type == "ConstantOfShape" for n in model.graph.nodes) == (30 if as_constants else 36)
    if as_constants:
        fc6 = next(n for n in model.graph.nodes if n.outputs[0].name == "fc6_w_0")
        assert FoldConstants().match(fc6) == \
            Reject("output %fc6_w_0 would be 392.0 MiB, over the size limit of 1.0 MiB")
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    import onnxruntime as ort

    def run(m: onnx.ModelProto):
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"data_0": x})

    assert matches(run(ir.to_proto(model)), run(proto), rtol=0, atol=0) is None


@pytest.mark.parametrize("shape,allowzero", [([0, -1], 0), ([4, 0, 2], 0), ([-1], 0), ([3, 0, 4], 1), ([5, -1], 0)])
def test_reshape_of_a_constant_folds_in_numpy_as_onnxruntime_computes_it(shape, allowzero):
    """Reshape folds without an onnxruntime session; what it gives is what onnxruntime gives
    (0 copies the input's dimension unless allowzero), and what neither can do stays."""
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4) if shape != [3, 0, 4] else np.zeros((3, 0, 4), np.float32)
    model = parse(f"""<ir_version: 10, opset_import: ["" : 21]>
g (float[1] x) => (float[1] y) {{
  d = Constant <value = float[{",".join(map(str, data.shape))}] {{{",".join(map(str, data.ravel().tolist()))}}}> ()
  s = Constant <value = int64[{len(shape)}] {{{",".join(map(str, shape))}}}> ()
  r = Reshape <allowzero = {allowzero}> (d, s)
  y = Identity(x)
}}""")
    node = next(n for n in model.graph.nodes if n.op_type == "Reshape")
    expected = run_ort(ir.to_proto(_expose(model, node)), [np.zeros(1, np.float32)])[1] if shape != [5, -1] else None
    got = rewrites.fold._reshape(node, [v.const for v in node.inputs])
    if expected is None:
        assert got is None  # 24 values do not fill [5, -1]
    else:
        assert got.shape == expected.shape and np.array_equal(got, expected)


def _expose(model: ir.Model, node) -> ir.Model:
    model.graph.outputs = list(model.graph.outputs) + [node.outputs[0]]
    return model
