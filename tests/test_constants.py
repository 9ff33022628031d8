"""Constant nodes lifted into initializers: golden text, log, rejection, equivalence."""

from __future__ import annotations

import numpy as np
from onnx import parser

import ir
from rewrites.constants import LiftConstant, lift_constants
from tests.conformance import run_ort
from tests.textmodels import parse


MODEL = """<ir_version: 10, opset_import: ["" : 21]>
g (float[2] x, bool c) => (float[2] y, float[2] z) {
  w = Constant <value_floats = [1.5, -2.0]> ()
  s = Constant <value_float = 3.0> ()
  a = Mul(x, w)
  y = Add(a, s)
  z = If(c) <then_branch = t () => (float[2] o1) { k = Constant <value = float[2] {4.0, 5.0}> ()
 o1 = Add(x, k) }, else_branch = e () => (float[2] o2) { o2 = Neg(x) }>
}"""


def test_constants_become_initializers_in_every_graph():
    model = parse(MODEL)
    original = ir.to_proto(model)
    result = lift_constants().run(model)
    ir.verify(model)
    assert result.log.by_rule() == {"LiftConstant": 3}
    assert result.log.by_kind() == {"lift-constant": 3}
    assert ir.print_graph(model.graph) == (
        'graph "g" (%x: float32[2], %c: bool[]) {\n'
        "  init %w = float32[2] [1.5, -2.0]\n"
        "  init %s = float32[] [3.0]\n"
        "  %a: ? = Mul(%x, %w)  # Mul__1\n"
        "  %y: float32[2] = Add(%a, %s)  # Add__1\n"
        "  %z: float32[2] = If(%c)  # If__1\n"
        '    else_branch "e" () {\n'
        "      %o2: float32[2] = Neg(%x)  # Neg__1\n"
        "      return %o2: float32[2]\n"
        "    }\n"
        '    then_branch "t" () {\n'
        "      init %k = float32[2] [4.0, 5.0]\n"
        "      %o1: float32[2] = Add(%x, %k)  # Add__2\n"
        "      return %o1: float32[2]\n"
        "    }\n"
        "  return %y: float32[2], %z: float32[2]\n"
        "}\n")
    feeds = [np.array([1.0, -3.0], np.float32), np.array(True)]
    for got, want in zip(run_ort(ir.to_proto(model), feeds), run_ort(original, feeds)):
        assert np.array_equal(got, want)


def test_sparse_constant_is_rejected():
    model = parse("""<ir_version: 10, opset_import: ["" : 21]>
g (float[3] x) => (float[3] y) { k = Constant <value_ints = [1, 2, 3]> ()
 f = Cast <to = 1> (k)
 y = Add(x, f) }""")
    node = model.graph.nodes[0]
    node.attributes = {"sparse_value": node.attributes.pop("value_ints")}
    verdict = LiftConstant().match(node)
    assert not verdict and verdict.reason == "sparse or attribute-referencing Constant has no dense value"


FUNCTION_MODEL = """<ir_version: 10, opset_import: ["" : 21, "local" : 1]>
g (float[1,2,4,6] x) => (float[1,2,2,3] y) { y = local.F(x) }
<domain: "local", opset_import: ["" : 21]>
F (x) => (y) {
  w = Constant <value = float[2,1,1,1] {2.0, -1.0}> ()
  c = Conv <group = 2> (x, w)
  s = Constant <value = float[1,2,1,1] {0.5, 3.0}> ()
  m = Mul(c, s)
  st = Constant <value = int64[1] {1}> ()
  en = Constant <value = int64[1] {3}> ()
  ax2 = Constant <value = int64[1] {2}> ()
  ax3 = Constant <value = int64[1] {3}> ()
  en3 = Constant <value = int64[1] {4}> ()
  a = Slice(m, st, en, ax2)
  y = Slice(a, st, en3, ax3)
}"""


def test_lift_constant_rejects_function_bodies():
    model = parse(FUNCTION_MODEL)
    rule = LiftConstant()
    rule.model = model
    verdict = rule.match(model.functions[0].graph.nodes[0])
    assert not verdict and verdict.reason == "function bodies cannot hold initializers"
    assert not lift_constants().run(model).changed


def test_function_body_constants_survive_compile():
    """Fusions (Conv + Mul) and ComposeSlices make new constants inside the body: they become
    Constant nodes there, so the compiled model still loads and computes the same."""
    import compiler

    proto = parser.parse_model(FUNCTION_MODEL)
    proto.ir_version = 10
    result = compiler.compile(proto)
    body = result.ir_model.functions[0].graph
    assert not body.initializers
    assert [n.op_type for n in body.nodes].count("Slice") == 1
    assert "Mul" not in [n.op_type for n in body.nodes]
    x = np.random.default_rng(0).standard_normal((1, 2, 4, 6)).astype(np.float32)
    got, = run_ort(result.model, [x])
    want, = run_ort(proto, [x])
    assert np.array_equal(got, want)
