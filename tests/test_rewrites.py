"""The rewrite framework (rules, Rewriter, ChangeLog, driver, passes) and the first cleanup
rules: positive (golden text, change-log counts), negative (Reject reason), equivalence."""

from __future__ import annotations

import numpy as np
import pytest

import ir
from rewrites.base import (FixedPoint, Match, Reject, RewriteLoopError, RewriteRule, Rewriter, RulePass,
                           apply_rules, ChangeLog)
from rewrites.cleanup import DeadCodeElimination, RemoveIdentity, remove_identity
from tests.conformance import run_ort
from tests.textmodels import parse


IDENTITIES = """<ir_version: 10, opset_import: ["" : 21]>
g (float[2] x) => (float[2] y) {
  a = Identity(x)
  b = Relu(a)
  c = Identity(b)
  y = Neg(c)
}"""


def test_remove_identity_golden_and_log():
    model = parse(IDENTITIES)
    result = remove_identity().run(model)
    ir.verify(model)
    assert result.changed
    assert result.log.by_rule() == {"RemoveIdentity": 2}
    assert result.log.by_kind() == {"replace-uses": 2, "remove-node": 2}
    assert ir.print_graph(model.graph) == (
        'graph "g" (%x: float32[2]) {\n'
        "  %b: ? = Relu(%x)  # Relu__1\n"
        "  %y: float32[2] = Neg(%b)  # Neg__1\n"
        "  return %y: float32[2]\n"
        "}\n")


def test_remove_identity_keeps_numbers():
    model = parse(IDENTITIES)
    original = ir.to_proto(model)
    remove_identity().run(model)
    x = np.array([-1.0, 2.0], np.float32)
    assert np.array_equal(run_ort(ir.to_proto(model), [x])[0], run_ort(original, [x])[0])


def test_identity_from_input_to_output_is_rejected():
    model = parse("""<ir_version: 10, opset_import: ["" : 21]>
g (float[2] x) => (float[2] y) { y = Identity(x) }""")
    node = model.graph.nodes[0]
    verdict = RemoveIdentity().match(node)
    assert not verdict
    assert verdict == Reject("carries a graph output from an input, initializer, outer value or another output")
    assert not remove_identity().run(model).changed


def test_identity_feeding_a_graph_output_renames_the_source():
    model = parse("""<ir_version: 10, opset_import: ["" : 21]>
g (float[2] x) => (float[2] y) { t = Relu(x)
 y = Identity(t) }""")
    remove_identity().run(model)
    ir.verify(model)
    assert [n.op_type for n in model.graph.nodes] == ["Relu"]
    assert model.graph.outputs[0].name == "y"  # the model's signature keeps its names
    assert model.graph.outputs[0].producer.op_type == "Relu"


def test_rules_reach_inside_subgraphs():
    model = ir.load("fixtures/control_flow.onnx")
    body = next(n for n in model.graph.nodes if n.op_type == "Loop").attributes["body"].value
    assert [n.op_type for n in body.nodes] == ["Add", "Identity"]
    # The Loop body's Identity carries the body input cond_in to an output: rejected.
    assert not remove_identity().run(model).changed
    then_model = parse("""<ir_version: 10, opset_import: ["" : 21]>
g (bool c, float[2] x) => (float[2] y) {
  y = If(c) <then_branch = t () => (float[2] o1) { r = Relu(x)
 i = Identity(r)
 o1 = Neg(i) }, else_branch = e () => (float[2] o2) { o2 = Neg(x) }>
}""")
    log = remove_identity().run(then_model).log
    ir.verify(then_model)
    assert log.by_rule() == {"RemoveIdentity": 1}
    branch = then_model.graph.nodes[0].attributes["then_branch"].value
    assert [n.op_type for n in branch.nodes] == ["Relu", "Neg"]


class ReluToNewRelu(RewriteRule):
    """Always matches and always makes a fresh Relu: a rule that never settles."""

    op_type = "Relu"

    def match(self, node):
        return Match([node])

    def rewrite(self, match, rewriter):
        node = match.nodes[0]
        new = rewriter.add_node(node.graph, node, "Relu", [node.inputs[0]])
        rewriter.replace_uses(node.outputs[0], new.outputs[0])


def test_rules_that_never_settle_raise():
    model = parse(IDENTITIES)
    with pytest.raises(RewriteLoopError, match=r"after 100 sweeps .*: ReluToNewRelu"):
        apply_rules(model, [ReluToNewRelu()], ChangeLog())


class NegNegToInput(RewriteRule):
    """Neg(Neg(x)) -> x: consumes two nodes; the driver erases both once dead."""

    op_type = "Neg"

    def match(self, node):
        inner = node.inputs[0].producer
        if inner is None or inner.op_type != "Neg":
            return Reject("input is not produced by Neg")
        return Match([node, inner], {"x": inner.inputs[0]})

    def rewrite(self, match, rewriter):
        rewriter.replace_uses(match.nodes[0].outputs[0], match["x"])


def test_driver_erases_consumed_nodes_that_became_dead():
    model = parse("""<ir_version: 10, opset_import: ["" : 21]>
g (float[2] x) => (float[2] y, float[2] z) { a = Neg(x)
 b = Neg(a)
 y = Relu(b)
 z = Neg(x) }""")
    log = ChangeLog()
    assert apply_rules(model, [NegNegToInput()], log)
    ir.verify(model)
    assert [n.op_type for n in model.graph.nodes] == ["Relu", "Neg"]
    assert log.by_kind()["remove-node"] == 2
    assert NegNegToInput().match(model.graph.nodes[1]) == Reject("input is not produced by Neg")


def test_consumed_node_still_used_elsewhere_is_kept():
    model = parse("""<ir_version: 10, opset_import: ["" : 21]>
g (float[2] x) => (float[2] y, float[2] w) { a = Neg(x)
 b = Neg(a)
 y = Relu(b)
 w = Abs(a) }""")
    apply_rules(model, [NegNegToInput()], ChangeLog())
    ir.verify(model)
    assert [n.op_type for n in model.graph.nodes] == ["Neg", "Relu", "Abs"]


def test_dead_code_removes_nodes_initializers_and_body_captures():
    model = parse("""<ir_version: 10, opset_import: ["" : 21]>
g (bool c, float[2] x, float[2] unused_input) => (float[2] y) <float[2] w = {1.0, 2.0}, float[2] dead_w = {3.0, 4.0}> {
  s = Mul(x, w)
  dead = If(c) <then_branch = t () => (float[2] o1) { o1 = Neg(s) }, else_branch = e () => (float[2] o2) { o2 = Abs(s) }>
  y = Relu(x)
}""")
    result = DeadCodeElimination().run(model)
    ir.verify(model)
    assert result.log.by_kind() == {"remove-node": 2, "remove-initializer": 2}
    assert [n.op_type for n in model.graph.nodes] == ["Relu"]
    assert [v.name for v in model.graph.inputs] == ["c", "x", "unused_input"]  # the signature stays
    assert model.graph.initializers == {}


def test_fixed_point_repeats_until_nothing_changes():
    model = parse("""<ir_version: 10, opset_import: ["" : 21]>
g (float[2] x) => (float[2] y) { a = Identity(x)
 b = Neg(a)
 c = Neg(b)
 y = Relu(c) }""")
    group = FixedPoint([RulePass([NegNegToInput()], name="negneg"), remove_identity()])
    result = group.run(model)
    ir.verify(model)
    assert result.changed
    assert [n.op_type for n in model.graph.nodes] == ["Relu"]
    assert model.graph.nodes[0].inputs[0] is model.graph.inputs[0]
    assert not group.run(model).changed


def test_rewriter_names_are_fresh_and_logged():
    model = parse(IDENTITIES)
    log = ChangeLog()
    rw = Rewriter(model, log, "Test")
    w = rw.add_initializer(model.graph, "b", np.ones(2, np.float32))  # 'b' is taken
    assert w.name == "b_1"
    node = rw.add_node(model.graph, model.graph.nodes[0], "Abs", [model.graph.inputs[0]])
    ir.verify(model)
    assert [str(c) for c in log] == ["Test: add-initializer %b_1 (float32[2])",
                                     f"Test: add-node {node.name} (Abs)"]
    assert model.graph.nodes[0] is node


def test_a_node_named_after_the_one_it_replaces_takes_its_name_when_that_goes():
    """Users select nodes by name (--exclude): a fused replacement must not leave them a
    `_1` name, even when a later pass, with its own Rewriter, removes the original."""
    model = parse(IDENTITIES)
    relu = model.graph.nodes[1]
    relu.name = "act"
    log = ChangeLog()
    new = Rewriter(model, log, "Fuse").add_node(model.graph, relu, "Relu", [relu.inputs[0]], name="act")
    assert new.name == "act_1" and new.intended_name == "act"
    Rewriter(model, log, "Fuse").replace_uses(relu.outputs[0], new.outputs[0])
    result = DeadCodeElimination().run(model)
    ir.verify(model)
    assert new.name == "act" and new.intended_name is None
    assert [str(c) for c in result.log] == ["dead-code: remove-node act (Relu)",
                                            "dead-code: rename-node act_1 (to act)"]


def test_add_initializer_in_a_function_body_adds_a_constant_node():
    """A FunctionProto holds no initializers: the new constant is a Constant node at the
    start of the body, logged as add-node."""
    model = parse("""<ir_version: 10, opset_import: ["" : 21, "local" : 1]>
g (float[2] x) => (float[2] y) { y = local.F(x) }
<domain: "local", opset_import: ["" : 21]>
F (a) => (b) { b = Relu(a) }""")
    body = model.functions[0].graph
    log = ChangeLog()
    w = Rewriter(model, log, "Test").add_initializer(body, "w", np.ones(2, np.float32))
    assert not body.initializers and body.nodes[0] is w.producer
    assert w.producer.op_type == "Constant" and np.array_equal(w.const.numpy(), np.ones(2))
    assert [c.kind for c in log] == ["add-node"]


def test_one_default_opset_lookup():
    """A model importing no ai.onnx opset: rules, shape inference and folding all assume 21
    (onnxruntime runs such a model at its newest opset)."""
    from rewrites.patterns import default_opset

    model = parse("""<ir_version: 10, opset_import: ["custom" : 1]>
g (float[2] x) => (float[2] y) { y = custom.Op(x) }""")
    rule = RemoveIdentity()
    rule.model = model
    assert rule.opset == default_opset(model.opset_imports) == 21
    assert default_opset({"ai.onnx": 13}) == default_opset({"": 13}) == 13
