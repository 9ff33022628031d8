"""Unit tests of the IR itself (DESIGN.md §2): use-def links by construction, identity of
values, constants, subgraph captures, the invariants `ir.verify` checks, the printer, and
lossless lowering/emission of the less common parts of ONNX (functions with attribute
references, sparse initializers, every attribute type, value_info, doc strings, metadata,
ir_version)."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from onnx import AttributeProto as A
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

import ir
from tests.conformance import canonical

FLOAT = TP.FLOAT


# ----------------------------------------------------------------------------- helpers


def make_model(graph: onnx.GraphProto, *, ir_version: int = 10, opsets=None, **kw) -> onnx.ModelProto:
    """onnx's make_model stamps the newest IR version, which onnxruntime refuses: set it."""
    opsets = opsets or {"": 21}
    return helper.make_model(graph, ir_version=ir_version,
                             opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()], **kw)


def parse(text: str) -> onnx.ModelProto:
    return onnx.parser.parse_model(text)


def tvi(name: str, shape, dtype: int = FLOAT, **kw) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape, **kw)


def roundtrip(proto: onnx.ModelProto) -> tuple[ir.Model, onnx.ModelProto]:
    model = ir.load(proto)
    ir.verify(model)
    return model, ir.to_proto(model)


def run(proto: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_same_outputs(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x, y)


def node_named(graph: ir.Graph, name: str) -> ir.Node:
    for node in graph.walk():
        if node.name == name:
            return node
    raise KeyError(name)


def all_value_names(graph: ir.Graph) -> list[str]:
    names = [v.name for v in graph.inputs]
    names += [v.name for v in graph.initializers.values() if not v.is_graph_input]
    for node in graph.nodes:
        for sub in node.subgraphs():
            names += all_value_names(sub)
        names += [v.name for v in node.outputs if v is not None]
    return names


BASE = """
<ir_version: 10, opset_import: ["" : 21]>
base (float[3] x) => (float[3] y) <float[3] w = {1.0, 2.0, 3.0}> {
  [relu] a = Relu(x)
  [add] b = Add(a, w)
  [neg] y = Neg(b)
}
"""


def golden_model() -> onnx.ModelProto:
    """x*0.5 then an If: then adds a 4-element bias (printed inline), else multiplies by a
    12-element weight (printed as a hash). Both branches read outer values only."""
    w = (np.arange(12, dtype=np.float32) * 0.25).reshape(3, 4)
    then_g = helper.make_graph([helper.make_node("Add", ["scaled", "bias"], ["then_out"], name="then_add")],
                               "then_body", [], [tvi("then_out", [3, 4])])
    else_g = helper.make_graph([helper.make_node("Mul", ["scaled", "w"], ["else_out"], name="else_mul")],
                               "else_body", [], [tvi("else_out", [3, 4])])
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["half"], value_float=0.5),  # unnamed on purpose
         helper.make_node("Mul", ["x", "half"], ["scaled"], name="scale"),
         helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)],
        "golden", [tvi("x", [3, 4]), tvi("cond", [], TP.BOOL)], [tvi("y", [3, 4])],
        initializer=[numpy_helper.from_array(np.array([0.5, -1, 2, 0], np.float32), "bias"),
                     numpy_helper.from_array(w, "w")],
        value_info=[tvi("scaled", [3, 4])])
    return make_model(graph)


# ------------------------------------------------------------------ use-def by construction


def test_node_creation_registers_uses_and_producer():
    a, b, c = ir.Value("a", FLOAT, (2,)), ir.Value("b", FLOAT, (2,)), ir.Value("c")
    n = ir.Node("Add", [a, b, a], [c], name="n")  # a is read twice
    assert n.inputs == (a, b, a)
    assert a.uses == ((n, 0), (n, 2))
    assert b.uses == ((n, 1),)
    assert c.producer is n and c.index == 0 and c.uses == ()
    assert a.producer is None


def test_omitted_optional_inputs_are_none_and_have_no_use():
    x, y = ir.Value("x"), ir.Value("y")
    n = ir.Node("Clip", [x, None, None], [y])
    assert n.inputs == (x, None, None)
    assert x.uses == ((n, 0),)
    lowered = ir.load(parse("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[3] x, float hi) => (float[3] y) { [clip] y = Clip(x, , hi) }"""))
    clip = node_named(lowered.graph, "clip")
    assert clip.inputs[1] is None and clip.inputs[2] is lowered.graph.inputs[1]


def test_a_value_gets_one_producer_only():
    v = ir.Value("v")
    ir.Node("Relu", [], [v])
    with pytest.raises(ValueError, match="already has a producer"):
        ir.Node("Neg", [], [v])


def test_inputs_and_uses_are_read_only():
    a, b = ir.Value("a"), ir.Value("b")
    n = ir.Node("Neg", [a], [b])
    assert isinstance(n.inputs, tuple) and isinstance(a.uses, tuple)
    with pytest.raises(AttributeError):
        n.inputs = (b,)
    with pytest.raises(AttributeError):
        a.uses = ()
    assert a.uses == ((n, 0),)


def test_set_input_moves_the_use():
    a, b, c = ir.Value("a"), ir.Value("b"), ir.Value("c")
    n = ir.Node("Add", [a, b], [c])
    n.set_input(1, a)
    assert n.inputs == (a, a)
    assert b.uses == ()
    assert a.uses == ((n, 0), (n, 1))
    n.set_input(1, a)  # same value: nothing changes, no duplicate entry
    assert a.uses == ((n, 0), (n, 1))
    n.set_input(0, None)
    assert n.inputs == (None, a)
    assert a.uses == ((n, 1),)
    n.set_input(0, b)
    assert b.uses == ((n, 0),)


def test_detach_inputs_drops_every_use():
    a, b, c = ir.Value("a"), ir.Value("b"), ir.Value("c")
    n = ir.Node("Add", [a, b], [c])
    other = ir.Node("Neg", [a], [ir.Value("d")])
    n.detach_inputs()
    assert n.inputs == (None, None)
    assert a.uses == ((other, 0),) and b.uses == ()
    assert c.producer is n  # outputs stay


def test_graph_remove_refuses_a_node_whose_output_is_used():
    model = ir.load(parse(BASE))
    g = model.graph
    relu, add, neg = g.nodes
    x, a = g.inputs[0], relu.outputs[0]
    with pytest.raises(ValueError, match="still used"):
        g.remove(relu)  # 'a' is read by add
    assert g.nodes == [relu, add, neg] and x.uses == ((relu, 0),) and relu.graph is g
    with pytest.raises(ValueError, match="still used"):
        g.remove(neg)  # its output is the graph output
    # Rewire the graph output to 'b'; then neg is dead and can go, taking its use of b along.
    b = add.outputs[0]
    g.outputs[0] = b
    g.remove(neg)
    assert neg.graph is None and neg not in g.nodes
    assert b.uses == () and neg.inputs == (None,)
    ir.verify(model)
    assert a.uses == ((add, 0),)


# ------------------------------------------------------------------ identity and names


def test_values_compare_by_identity_not_by_name():
    v1, v2 = ir.Value("same", FLOAT, (2,)), ir.Value("same", FLOAT, (2,))
    assert v1 is not v2 and v1 != v2 and v1 == v1
    assert len({v1, v2}) == 2
    n = ir.Node("Neg", [v1], [ir.Value("out")])
    assert v1.uses == ((n, 0),) and v2.uses == ()


def test_lowered_inputs_are_the_same_objects_and_renaming_is_a_label_change():
    proto = parse(BASE)
    model = ir.load(proto)
    g = model.graph
    relu, add, neg = g.nodes
    assert relu.inputs[0] is g.inputs[0]
    assert add.inputs[0] is relu.outputs[0] and add.inputs[1] is g.initializers["w"]
    assert g.outputs[0] is neg.outputs[0]
    # A name is a label: renaming one value renames it at its producer and all its readers.
    relu.outputs[0].name = "renamed"
    ir.verify(model)
    emitted = ir.to_proto(model)
    assert list(emitted.graph.node[0].output) == ["renamed"]
    assert list(emitted.graph.node[1].input) == ["renamed", "w"]
    feeds = {"x": np.array([-1.0, 0.5, 2.0], np.float32)}
    assert_same_outputs(run(emitted, feeds), run(proto, feeds))


# ------------------------------------------------------------------ Value.const


def test_const_of_an_initializer_is_its_tensor():
    g = ir.load(parse(BASE)).graph
    w = g.initializers["w"]
    assert not w.is_graph_input
    assert w.const is w.tensor
    assert np.array_equal(w.const.numpy(), np.array([1, 2, 3], np.float32))
    assert w.const.dtype == FLOAT and w.const.shape == (3,)


def test_const_of_a_graph_input_and_of_a_computed_value_is_none():
    g = ir.load(parse(BASE)).graph
    assert g.inputs[0].const is None
    assert all(v.const is None for n in g.nodes for v in n.outputs)


def test_const_of_an_overridable_input_with_a_default_is_none():
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"], name="add")], "g",
                              [tvi("x", [2]), tvi("w", [2])], [tvi("y", [2])],
                              initializer=[numpy_helper.from_array(np.array([1, 2], np.float32), "w")])
    proto = make_model(graph)
    model, emitted = roundtrip(proto)
    w = model.graph.initializers["w"]
    assert w.is_graph_input and w is model.graph.inputs[1]
    assert w.tensor is not None and np.array_equal(w.tensor.numpy(), [1, 2])
    assert w.const is None  # can be overridden at run time: not a constant
    assert "  default %w = float32[2] [1.0, 2.0]" in ir.print_model(model)
    assert canonical(emitted) == canonical(proto)
    x = np.array([10, 20], np.float32)
    assert_same_outputs(run(emitted, {"x": x}), run(proto, {"x": x}))
    override = {"x": x, "w": np.array([-1, -1], np.float32)}
    assert_same_outputs(run(emitted, override), [np.array([9, 19], np.float32)])


@pytest.mark.parametrize("attr, value, expected", [
    ("value", numpy_helper.from_array(np.array([[1, 2], [3, 4]], np.int32), "c"),
     np.array([[1, 2], [3, 4]], np.int32)),
    ("value_float", 0.5, np.array(0.5, np.float32)),
    ("value_floats", [0.5, -2.0], np.array([0.5, -2.0], np.float32)),
    ("value_int", 7, np.array(7, np.int64)),
    ("value_ints", [1, 2, 3], np.array([1, 2, 3], np.int64)),
    ("value_string", b"hi", np.array(b"hi", dtype=object)),
])
def test_const_of_a_constant_node_output(attr, value, expected):
    graph = helper.make_graph([helper.make_node("Constant", [], ["c"], name="k", **{attr: value})], "g", [],
                              [helper.make_value_info("c", onnx.TypeProto())])
    model = ir.load(make_model(graph))
    c = model.graph.nodes[0].outputs[0]
    assert c.tensor is None  # not an initializer: the data comes from the node
    t = c.const
    assert t is not None
    got = t.numpy()
    assert got.shape == expected.shape
    assert t.shape == expected.shape
    if expected.dtype == object:
        assert t.dtype == TP.STRING and got.tolist() == expected.tolist()
    else:
        assert got.dtype == expected.dtype and np.array_equal(got, expected)
        assert t.dtype == helper.np_dtype_to_tensor_dtype(expected.dtype)


# ------------------------------------------------------------------ subgraph captures


def test_subgraph_captures_count_as_uses():
    model = ir.load(golden_model())
    g = model.graph
    branch, scale = node_named(g, "branch"), node_named(g, "scale")
    then_add, else_mul = node_named(g, "then_add"), node_named(g, "else_mul")
    then_body, else_body = branch.attributes["then_branch"].value, branch.attributes["else_branch"].value
    assert isinstance(then_body, ir.Graph) and isinstance(else_body, ir.Graph)
    assert then_body.owner is branch and else_body.owner is branch
    assert then_add.graph is then_body and else_mul.graph is else_body
    scaled = scale.outputs[0]
    # The bodies hold the outer Value objects themselves...
    assert then_add.inputs == (scaled, g.initializers["bias"])
    assert else_mul.inputs == (scaled, g.initializers["w"])
    # ... and each read is a use of the outer value.
    assert set(scaled.uses) == {(then_add, 0), (else_mul, 0)}
    assert g.initializers["bias"].uses == ((then_add, 1),)
    assert g.initializers["w"].uses == ((else_mul, 1),)
    assert [n.name for n in g.walk()] == ["Constant__1", "scale", "branch", "else_mul", "then_add"]
    # So the producer of a value read only inside the bodies is not dead.
    with pytest.raises(ValueError, match="still used"):
        g.remove(scale)
    ir.verify(model)


def test_removing_a_node_with_a_subgraph_releases_its_captures():
    """When an If leaves the graph (e.g. DCE of an unused If), the reads its bodies made of
    outer values must go too: otherwise the outer values stay 'used' forever and the
    use lists no longer mirror the inputs of the nodes in the graph."""
    model = ir.load(golden_model())
    g = model.graph
    branch, scale = node_named(g, "branch"), node_named(g, "scale")
    scaled = scale.outputs[0]
    g.outputs[0] = scaled  # the If's result is no longer needed
    g.remove(branch)
    assert branch not in g.nodes
    assert scaled.uses == (), f"stale uses after removing the If: {scaled.uses}"
    assert g.initializers["bias"].uses == () and g.initializers["w"].uses == ()
    ir.verify(model)


def test_verify_checks_capture_uses():
    model = ir.load(golden_model())
    then_add = node_named(model.graph, "then_add")
    scaled = then_add.inputs[0]
    scaled._uses.remove((then_add, 0))  # deliberate corruption of the use list
    with pytest.raises(ir.InvariantError, match=r"node 'then_add'.*%scaled"):
        ir.verify(model)


# ------------------------------------------------------------------ ir.verify invariants


def base():
    model = ir.load(parse(BASE))
    ir.verify(model)
    relu, add, neg = model.graph.nodes
    return model, model.graph, relu, add, neg


def test_verify_accepts_a_lowered_model():
    model, *_ = base()
    ir.verify(model)


def test_verify_node_out_of_topological_order():
    model, g, relu, add, neg = base()
    g.nodes[0], g.nodes[1] = add, relu
    with pytest.raises(ir.InvariantError, match=r"node 'add' \(Add\) input 0 %a is not defined before it"):
        ir.verify(model)


def test_verify_use_missing_from_a_use_list():
    model, g, relu, add, neg = base()
    relu.outputs[0]._uses.clear()
    with pytest.raises(ir.InvariantError, match=r"node 'add' \(Add\) input 0 %a is missing from its use list"):
        ir.verify(model)


def test_verify_use_list_entry_that_is_not_an_input():
    model, g, relu, add, neg = base()
    a = relu.outputs[0]
    a._uses.append((neg, 0))  # neg reads b, not a
    with pytest.raises(ir.InvariantError, match=r"%a lists a use by 'neg' input 0"):
        ir.verify(model)


def test_verify_use_by_a_node_that_is_not_in_the_graph():
    model, g, relu, add, neg = base()
    ir.Node("Identity", [relu.outputs[0]], [ir.Value("z")], name="forgotten")  # never appended
    with pytest.raises(ir.InvariantError, match=r"%a lists a use by 'forgotten'"):
        ir.verify(model)


def test_verify_names_the_value_used_by_a_detached_subgraph():
    """A stale use by a node of a body that left the graph: the message must say which
    value (like every other invariant message), not only count entries."""
    model = ir.load(golden_model())
    g = model.graph
    branch = node_named(g, "branch")
    scaled = node_named(g, "scale").outputs[0]
    g.outputs[0] = scaled
    g.nodes.remove(branch)  # taken out by hand, no detach: it and its bodies still list uses
    branch.graph = None
    with pytest.raises(ir.InvariantError, match=r"%\w+ lists a use by '(branch|then_add|else_mul)'"):
        ir.verify(model)


def test_verify_duplicate_value_name():
    model, g, relu, add, neg = base()
    add.outputs[0].name = "a"
    with pytest.raises(ir.InvariantError, match=r"two values are named 'a'"):
        ir.verify(model)


def test_verify_duplicate_value_name_across_a_subgraph():
    model = ir.load(golden_model())
    node_named(model.graph, "then_add").outputs[0].name = "scaled"
    with pytest.raises(ir.InvariantError, match=r"then_body.*two values are named 'scaled'"):
        ir.verify(model)


def test_verify_duplicate_node_name():
    model, g, relu, add, neg = base()
    neg.name = "relu"
    with pytest.raises(ir.InvariantError, match=r"node 'relu' \(Neg\) has an empty or duplicate name"):
        ir.verify(model)


def test_verify_empty_node_name():
    model, g, relu, add, neg = base()
    add.name = ""
    with pytest.raises(ir.InvariantError, match=r"node '' \(Add\) has an empty or duplicate name"):
        ir.verify(model)


def test_verify_graph_output_not_produced():
    model, g, relu, add, neg = base()
    g.outputs.append(ir.Value("ghost", FLOAT, (3,)))
    with pytest.raises(ir.InvariantError, match=r"graph output %ghost is not produced"):
        ir.verify(model)


def test_verify_graph_output_whose_producer_left_the_graph():
    model, g, relu, add, neg = base()
    g.nodes.remove(neg)  # by hand, bypassing Graph.remove's check
    neg.detach_inputs()
    neg.graph = None
    with pytest.raises(ir.InvariantError, match=r"graph output %y is not produced"):
        ir.verify(model)


def test_verify_node_output_that_is_also_an_initializer():
    model, g, relu, add, neg = base()
    b = add.outputs[0]
    b.tensor = ir.ArrayTensor(np.zeros(3, np.float32))
    g.add_initializer(b)
    with pytest.raises(ir.InvariantError, match=r"%b"):
        ir.verify(model)


def test_verify_node_output_that_carries_initializer_data():
    model, g, relu, add, neg = base()
    add.outputs[0].tensor = ir.ArrayTensor(np.zeros(3, np.float32))
    with pytest.raises(ir.InvariantError, match=r"node 'add' \(Add\) output %b is also an input or initializer"):
        ir.verify(model)


def test_verify_node_output_that_is_also_a_graph_input():
    model, g, relu, add, neg = base()
    g.add_input(add.outputs[0])
    with pytest.raises(ir.InvariantError, match=r"%b has a producer"):
        ir.verify(model)


# ------------------------------------------------------------------ printer


GOLDEN = '''\
model ir_version=10 opset_import={"": 21}
graph "golden" (%x: float32[3,4], %cond: bool[]) {
  init %bias = float32[4] [0.5, -1.0, 2.0, 0.0]
  init %w = float32[3,4] <48 B sha:7a3c06cfb2fb>
  %half: ? = Constant() {value_float=0.5}  # Constant__1
  %scaled: float32[3,4] = Mul(%x, %half)  # scale
  %y: float32[3,4] = If(%cond)  # branch
    else_branch "else_body" () {
      %else_out: float32[3,4] = Mul(%scaled, %w)  # else_mul
      return %else_out: float32[3,4]
    }
    then_branch "then_body" () {
      %then_out: float32[3,4] = Add(%scaled, %bias)  # then_add
      return %then_out: float32[3,4]
    }
  return %y: float32[3,4]
}
'''


def test_printer_golden_text():
    # The hash in the golden text is the first 12 hex digits of sha256 of w's bytes.
    w = (np.arange(12, dtype=np.float32) * 0.25).reshape(3, 4)
    assert hashlib.sha256(w.astype("<f4").tobytes()).hexdigest()[:12] == "7a3c06cfb2fb"
    assert ir.print_model(ir.load(golden_model())) == GOLDEN


def test_printer_is_deterministic():
    proto = golden_model()
    assert ir.print_model(ir.load(proto)) == ir.print_model(ir.load(proto))
    # Also from bytes, and after an emit/lower round trip.
    again = ir.load(proto.SerializeToString())
    assert ir.print_model(again) == GOLDEN
    assert ir.print_model(ir.load(ir.to_proto(again))) == GOLDEN


# ------------------------------------------------------------------ lowering


def test_lowering_sorts_unsorted_nodes():
    graph = helper.make_graph(
        [helper.make_node("Neg", ["b"], ["y"], name="neg"),
         helper.make_node("Relu", ["x"], ["a"], name="relu"),
         helper.make_node("Add", ["a", "x"], ["b"], name="add")],
        "unsorted", [tvi("x", [3])], [tvi("y", [3])])
    proto = make_model(graph)
    model, emitted = roundtrip(proto)
    assert [n.name for n in model.graph.nodes] == ["relu", "add", "neg"]
    assert [n.name for n in emitted.graph.node] == ["relu", "add", "neg"]
    feeds = {"x": np.array([1, -2, 3], np.float32)}
    assert_same_outputs(run(emitted, feeds), run(proto, feeds))


def test_lowering_keeps_a_sorted_order_as_given():
    # Topological already, though not the only order: kept exactly.
    graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["p"], name="second_branch"),
         helper.make_node("Relu", ["x"], ["q"], name="first_branch"),
         helper.make_node("Add", ["p", "q"], ["y"], name="join")],
        "sorted", [tvi("x", [3])], [tvi("y", [3])])
    model, _ = roundtrip(make_model(graph))
    assert [n.name for n in model.graph.nodes] == ["second_branch", "first_branch", "join"]


def test_unnamed_nodes_get_unique_names():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"]),
         helper.make_node("Relu", ["a"], ["b"]),
         helper.make_node("Neg", ["b"], ["c"], name="dup"),
         helper.make_node("Abs", ["c"], ["d"], name="dup"),
         helper.make_node("Identity", ["d"], ["e"], name="Relu__1"),
         helper.make_node("Neg", ["e"], ["y"], name="last")],
        "names", [tvi("x", [3])], [tvi("y", [3])])
    proto = make_model(graph)
    model, emitted = roundtrip(proto)
    names = [n.name for n in model.graph.nodes]
    assert all(names) and len(set(names)) == len(names), names
    assert names[2] == "dup" and names[5] == "last"  # unique given names are kept
    assert names[3] != "dup"
    assert [n.name for n in ir.load(proto).graph.nodes] == names  # deterministic
    # Emission leaves unnamed nodes unnamed; the renamed duplicate keeps its new name.
    assert [n.name for n in emitted.graph.node] == [names[i] if i == 3 else p.name
                                                    for i, p in enumerate(proto.graph.node)]
    assert canonical(emitted) == canonical(proto)
    # onnxruntime refuses the original (two nodes named 'dup'); the emitted model runs.
    x = np.array([1, -2, 3], np.float32)
    assert_same_outputs(run(emitted, {"x": x}), [-np.maximum(x, 0)])


def test_subgraph_value_shadowing_an_outer_name_is_renamed():
    # The Loop body's input 'acc' shadows the outer 'acc' (legal, onnxruntime runs it).
    body = helper.make_graph(
        [helper.make_node("Add", ["acc", "x"], ["acc_out"], name="body_add"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond")],
        "body", [tvi("i", [], TP.INT64), tvi("cond_in", [], TP.BOOL), tvi("acc", [2])],
        [tvi("cond_out", [], TP.BOOL), tvi("acc_out", [2])])
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "x"], ["acc"], name="square"),
         helper.make_node("Loop", ["n", "", "acc"], ["y"], name="loop", body=body)],
        "shadow", [tvi("x", [2]), tvi("n", [], TP.INT64)], [tvi("y", [2]), tvi("acc", [2])])
    proto = make_model(graph)
    model, emitted = roundtrip(proto)
    g = model.graph
    names = all_value_names(g)
    assert len(set(names)) == len(names), names
    outer_acc = node_named(g, "square").outputs[0]
    loop = node_named(g, "loop")
    body_g = loop.attributes["body"].value
    inner_acc = body_g.inputs[2]
    assert outer_acc.name == "acc"  # the outer name is kept (it is a graph output)
    assert inner_acc is not outer_acc and inner_acc.name != "acc"
    body_add = node_named(g, "body_add")
    assert body_add.inputs[0] is inner_acc  # the body still reads its own input...
    assert body_add.inputs[1] is g.inputs[0]  # ... and captures the outer x
    assert (body_add, 1) in g.inputs[0].uses
    assert loop.inputs[2] is outer_acc
    emitted_body = emitted.graph.node[1].attribute[0].g
    assert emitted_body.input[2].name == inner_acc.name == emitted_body.node[0].input[0]
    feeds = {"x": np.array([1.5, -2], np.float32), "n": np.array(3, np.int64)}
    assert_same_outputs(run(emitted, feeds), run(proto, feeds))


def test_sibling_subgraphs_reusing_a_name_get_unique_names():
    then_g = helper.make_graph([helper.make_node("Mul", ["x", "x"], ["t"], name="m")], "then_g", [], [tvi("t", [2])])
    else_g = helper.make_graph([helper.make_node("Sub", ["x", "x"], ["t"], name="s")], "else_g", [], [tvi("t", [2])])
    graph = helper.make_graph([helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_g, else_branch=else_g)],
                              "siblings", [tvi("x", [2]), tvi("c", [], TP.BOOL)], [tvi("y", [2])])
    proto = make_model(graph)
    model, emitted = roundtrip(proto)
    names = all_value_names(model.graph)
    assert len(set(names)) == len(names) and "t" in names, names
    for c in (True, False):
        feeds = {"x": np.array([1.5, -2], np.float32), "c": np.array(c)}
        assert_same_outputs(run(emitted, feeds), run(proto, feeds))


# ------------------------------------------------------------------ lossless round trips


def scale_shift_function() -> onnx.FunctionProto:
    """ScaleShift<alpha, beta=0.25>(X) = X * alpha + beta, via Constant nodes whose
    value_float refers to the function's attributes."""
    const_a = onnx.NodeProto(op_type="Constant", output=["a"],
                             attribute=[helper.make_attribute_ref("value_float", A.FLOAT)])
    const_a.attribute[0].ref_attr_name = "alpha"
    const_b = onnx.NodeProto(op_type="Constant", output=["b"],
                             attribute=[helper.make_attribute_ref("value_float", A.FLOAT)])
    const_b.attribute[0].ref_attr_name = "beta"
    fn = helper.make_function(
        "my.fns", "ScaleShift", ["X"], ["Y"],
        [const_a, const_b, helper.make_node("Mul", ["X", "a"], ["t"]), helper.make_node("Add", ["t", "b"], ["Y"])],
        [helper.make_opsetid("", 21)], attributes=["alpha"],
        attribute_protos=[helper.make_attribute("beta", 0.25)], doc_string="x * alpha + beta")
    fn.metadata_props.add(key="author", value="tests")
    return fn


def test_model_local_function_with_attribute_references_round_trips():
    graph = helper.make_graph(
        [helper.make_node("ScaleShift", ["x"], ["y1"], domain="my.fns", alpha=3.0, name="call1"),
         helper.make_node("ScaleShift", ["y1"], ["y"], domain="my.fns", alpha=-2.0, beta=1.5, name="call2")],
        "g", [tvi("x", [3])], [tvi("y", [3])])
    proto = make_model(graph, opsets={"": 21, "my.fns": 1}, functions=[scale_shift_function()])
    onnx.checker.check_model(proto)
    model, emitted = roundtrip(proto)
    (fn,) = model.functions
    assert (fn.domain, fn.name, fn.attributes) == ("my.fns", "ScaleShift", ["alpha"])
    assert fn.attribute_defaults["beta"].value == pytest.approx(0.25)
    const_a = fn.graph.nodes[0]
    assert const_a.attributes["value_float"].ref_attr_name == "alpha"
    assert const_a.outputs[0].const is None  # depends on the call: not a constant
    assert "{value_float=@alpha}" in ir.print_model(model)
    assert canonical(emitted) == canonical(proto)
    x = np.array([1, 2, -3], np.float32)
    expected = [((x * 3 + 0.25) * -2 + 1.5).astype(np.float32)]
    assert_same_outputs(run(proto, {"x": x}), expected)
    assert_same_outputs(run(emitted, {"x": x}), expected)


def test_sparse_initializer_round_trips():
    values = numpy_helper.from_array(np.array([5, -1, 2.5], np.float32), "sp")
    indices = numpy_helper.from_array(np.array([1, 6, 10], np.int64), "sp_indices")
    graph = helper.make_graph([helper.make_node("Add", ["x", "sp"], ["y"], name="add")], "g",
                              [tvi("x", [3, 4])], [tvi("y", [3, 4])],
                              sparse_initializer=[helper.make_sparse_tensor(values, indices, [3, 4])])
    proto = make_model(graph)
    model, emitted = roundtrip(proto)
    sp = model.graph.initializers["sp"]
    assert isinstance(sp.tensor, ir.SparseTensor) and sp.const is sp.tensor
    dense = np.zeros(12, np.float32)
    dense[[1, 6, 10]] = [5, -1, 2.5]
    assert np.array_equal(sp.const.numpy(), dense.reshape(3, 4))
    assert len(emitted.graph.sparse_initializer) == 1 and len(emitted.graph.initializer) == 0
    assert canonical(emitted) == canonical(proto)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert_same_outputs(run(emitted, {"x": x}), run(proto, {"x": x}))
    assert_same_outputs(run(emitted, {"x": x}), [x + dense.reshape(3, 4)])


def test_sparse_initializer_with_coordinate_indices():
    values = numpy_helper.from_array(np.array([5, -1], np.float32), "sp")
    indices = numpy_helper.from_array(np.array([[0, 1], [2, 3]], np.int64), "sp_indices")
    graph = helper.make_graph([helper.make_node("Add", ["x", "sp"], ["y"], name="add")], "g",
                              [tvi("x", [3, 4])], [tvi("y", [3, 4])],
                              sparse_initializer=[helper.make_sparse_tensor(values, indices, [3, 4])])
    proto = make_model(graph)
    model, emitted = roundtrip(proto)
    expected = np.zeros((3, 4), np.float32)
    expected[0, 1], expected[2, 3] = 5, -1
    assert np.array_equal(model.graph.initializers["sp"].const.numpy(), expected)
    assert canonical(emitted) == canonical(proto)


def _neg_body(name: str, x: str) -> onnx.GraphProto:
    return helper.make_graph([helper.make_node("Neg", [x], [name + "_o"], name=name + "_neg")], name,
                             [tvi(x, [2])], [tvi(name + "_o", [2])])


def _sparse(name: str) -> onnx.SparseTensorProto:
    return helper.make_sparse_tensor(numpy_helper.from_array(np.array([1, 2], np.float32), name),
                                     numpy_helper.from_array(np.array([0, 3], np.int64), name + "_i"), [4])


def test_every_attribute_type_round_trips():
    tensor_type = helper.make_tensor_type_proto(FLOAT, [2, "N"])
    seq_type = helper.make_sequence_type_proto(helper.make_tensor_type_proto(TP.INT64, None))
    attrs = [
        helper.make_attribute("f", 1.25),
        helper.make_attribute("i", -7),
        helper.make_attribute("s", b"bytes\xff"),
        helper.make_attribute("t", numpy_helper.from_array(np.array([[1, 2], [3, 4]], np.int32), "tname")),
        helper.make_attribute("g", _neg_body("gb", "gin")),
        helper.make_attribute("floats", [0.5, -1.0]),
        helper.make_attribute("ints", [1, 2, 3]),
        helper.make_attribute("strings", [b"a", b"bc"]),
        helper.make_attribute("tensors", [numpy_helper.from_array(np.array([1.5], np.float64), "t0"),
                                          numpy_helper.from_array(np.array([True, False]), "")]),
        helper.make_attribute("graphs", [_neg_body("g0", "in0"), _neg_body("g1", "in1")]),
        helper.make_attribute("sparse", _sparse("sv")),
        helper.make_attribute("sparses", [_sparse("sv0"), _sparse("sv1")]),
        helper.make_attribute("tp", tensor_type),
        helper.make_attribute("tps", [tensor_type, seq_type]),
        helper.make_attribute("empty_ints", [], attr_type=A.INTS),
    ]
    attrs[1].doc_string = "an attribute with a doc string"
    covered = {a.type for a in attrs}
    assert covered == set(A.AttributeType.values()) - {A.UNDEFINED}
    node = helper.make_node("Everything", ["x"], ["y"], domain="custom.dom", name="everything")
    node.attribute.extend(attrs)
    graph = helper.make_graph([node], "g", [tvi("x", [2])], [tvi("y", [2])])
    proto = make_model(graph, opsets={"": 21, "custom.dom": 1})
    model, emitted = roundtrip(proto)
    lowered = model.graph.nodes[0].attributes
    assert {k: a.type for k, a in lowered.items()} == {a.name: a.type for a in attrs}
    assert isinstance(lowered["g"].value, ir.Graph) and lowered["g"].value.owner is model.graph.nodes[0]
    assert all(isinstance(x, ir.Graph) for x in lowered["graphs"].value)
    assert lowered["f"].value == 1.25 and lowered["i"].value == -7 and lowered["s"].value == b"bytes\xff"
    assert lowered["ints"].value == [1, 2, 3] and lowered["strings"].value == [b"a", b"bc"]
    assert canonical(emitted) == canonical(proto)
    assert [a.name for a in emitted.graph.node[0].attribute] == [a.name for a in attrs]  # order kept


def test_value_info_doc_strings_and_metadata_kept():
    def props(target, **kv):
        for k, v in kv.items():
            target.metadata_props.add(key=k, value=v)

    mul = helper.make_node("Mul", ["x", "w"], ["t"], name="mul", doc_string="scales x")
    props(mul, origin="layer1")
    inner = helper.make_node("Relu", ["t"], ["r"], name="inner_relu", doc_string="inside the branch")
    then_g = helper.make_graph([inner], "then_g", [], [tvi("r", [2, "N"], doc_string="branch output")],
                               doc_string="then branch")
    else_g = helper.make_graph([helper.make_node("Neg", ["t"], ["n"], name="inner_neg")], "else_g", [],
                               [tvi("n", [2, "N"])], value_info=[])
    vi_t = tvi("t", [2, "N"], doc_string="the product")
    props(vi_t, role="hidden")
    graph = helper.make_graph(
        [mul, helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_g, else_branch=else_g)],
        "g", [tvi("x", [2, "N"], doc_string="input x"), tvi("c", [], TP.BOOL)],
        [tvi("y", [2, "N"], doc_string="output y")],
        initializer=[numpy_helper.from_array(np.array([[2.0], [3.0]], np.float32), "w")],
        value_info=[vi_t], doc_string="graph doc")
    props(graph, gkey="gval")
    proto = make_model(graph, doc_string="model doc", producer_name="tests", producer_version="1.0",
                       domain="ai.example", model_version=3)
    props(proto, author="me", multi="line1\nline2", empty="")
    model, emitted = roundtrip(proto)
    assert model.metadata_props == {"author": "me", "multi": "line1\nline2", "empty": ""}
    t = node_named(model.graph, "mul").outputs[0]
    assert (t.dtype, t.shape, t.doc_string, t.metadata_props) == (FLOAT, (2, "N"), "the product", {"role": "hidden"})
    assert node_named(model.graph, "mul").metadata_props == {"origin": "layer1"}
    assert canonical(emitted) == canonical(proto)
    assert [(p.key, p.value) for p in emitted.metadata_props] == [(p.key, p.value) for p in proto.metadata_props]
    assert emitted.graph.value_info == proto.graph.value_info
    assert (emitted.doc_string, emitted.graph.doc_string) == ("model doc", "graph doc")
    x = np.array([[1, -2], [3, -4]], np.float32)
    for c in (True, False):
        feeds = {"x": x, "c": np.array(c)}
        assert_same_outputs(run(emitted, feeds), run(proto, feeds))


def test_value_info_of_initializers_and_inputs_kept():
    """torch.export writes value_info entries for parameters (initializers), carrying the
    parameter's provenance in metadata_props; they must survive like any other entry."""
    vi_w = tvi("w", [2, 1], doc_string="weight")
    vi_w.metadata_props.add(key="pkg.torch.onnx.original_node_name", value="p_weight")
    vi_x = tvi("x", [2, "N"])
    vi_x.metadata_props.add(key="kind", value="USER_INPUT")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["y"], name="mul")], "g", [tvi("x", [2, "N"])], [tvi("y", [2, "N"])],
        initializer=[numpy_helper.from_array(np.array([[2.0], [3.0]], np.float32), "w")],
        value_info=[vi_w, vi_x])
    proto = make_model(graph)
    _, emitted = roundtrip(proto)
    kept = {vi.name: vi for vi in emitted.graph.value_info}
    assert set(kept) == {"w", "x"}, f"value_info entries kept: {sorted(kept)}"
    assert kept["w"] == vi_w and kept["x"] == vi_x
    assert canonical(emitted) == canonical(proto)


@pytest.mark.parametrize("ir_version, opset", [(7, 13), (8, 15), (4, 9)])
def test_ir_version_is_never_raised(ir_version, opset, tmp_path):
    proto = parse(f"""
        <ir_version: {ir_version}, opset_import: ["" : {opset}]>
        g (float[3] x) => (float[3] y) {{ [relu] a = Relu(x)
                                         [neg] y = Neg(a) }}""")
    model, emitted = roundtrip(proto)
    assert model.ir_version == ir_version and emitted.ir_version == ir_version
    assert model.opset_imports == {"": opset}
    assert ir.print_model(model).startswith(f"model ir_version={ir_version} ")
    ir.save(model, tmp_path / "m.onnx")
    assert onnx.load(str(tmp_path / "m.onnx")).ir_version == ir_version
    feeds = {"x": np.array([1, -2, 3], np.float32)}
    assert_same_outputs(run(emitted, feeds), run(proto, feeds))
