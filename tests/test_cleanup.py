"""Cleanup rules (no-op nodes, cancelling pairs) and common subexpression elimination:
for each rule a positive test (golden text, change-log counts), a negative test (the exact
Reject reason) and an equivalence test in onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest

import ir
from rewrites import cleanup as c
from rewrites.base import Reject, RulePass
from rewrites.cleanup import DeadCodeElimination, remove_identity, remove_noops
from rewrites.cse import CommonSubexpressions
from rewrites.patterns import const
from tests.conformance import identical, run_ort
from tests.textmodels import parse


def model_text(opset: int, graph: str) -> str:
    return f'<ir_version: 10, opset_import: ["" : {opset}]>\n{graph}'


def producing(model: ir.Model, name: str) -> ir.Node:
    return next(n for n in model.graph.nodes if any(o is not None and o.name == name for o in n.outputs))


def feeds_for(model: ir.Model, seed: int = 0) -> list[np.ndarray]:
    """Random float feeds; symbolic dims bound to 4."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal([d if isinstance(d, int) else 4 for d in v.shape]).astype(np.float32)
            for v in model.graph.inputs]


def assert_same_numbers(text: str, passes) -> ir.Model:
    """Run `passes` on the model of `text`; onnxruntime's outputs stay bit-identical."""
    model = parse(text)
    original = ir.to_proto(model)
    for p in passes:
        p.run(model)
        ir.verify(model)
    feeds = feeds_for(model)
    assert identical(run_ort(ir.to_proto(model), feeds), run_ort(original, feeds)) is None
    return model


def golden(*lines: str) -> str:
    return "\n".join(lines) + "\n"


# -- positive cases: model, expected rewrites per rule, golden text -------------------------

POSITIVE = {
    "dropout": (model_text(21, """g (float[2,3] x) => (float[2,3] y) <bool f = {0}, float r = {0.5}> {
  a = Dropout(x)
  b = Dropout(a, r, f)
  y = Relu(b)
}"""), {"RemoveDropout": 2}, golden(
        'graph "g" (%x: float32[2,3]) {',
        "  init %f = bool[] [False]",
        "  init %r = float32[] [0.5]",
        "  %y: float32[2,3] = Relu(%x)  # Relu__1",
        "  return %y: float32[2,3]",
        "}")),
    "dropout_opset10_unused_mask": (model_text(10, """g (float[2,3] x) => (float[2,3] y) {
  a, mask = Dropout<ratio = 0.3>(x)
  y = Relu(a)
}"""), {"RemoveDropout": 1}, golden(
        'graph "g" (%x: float32[2,3]) {',
        "  %y: float32[2,3] = Relu(%x)  # Relu__1",
        "  return %y: float32[2,3]",
        "}")),
    "cast": (model_text(21, """g (float[2,3] x) => (float[2,3] y) <float[2,3] r> {
  r = Relu(x)
  y = Cast<to = 1>(r)
}"""), {"RemoveCast": 1}, golden(
        'graph "g" (%x: float32[2,3]) {',
        "  %y: float32[2,3] = Relu(%x)  # Relu__1",  # the Relu's output took the output's name
        "  return %y: float32[2,3]",
        "}")),
    "castlike": (model_text(21, """g (float[2,3] x, float[1] like) => (float[2,3] y) {
  c = CastLike(x, like)
  y = Relu(c)
}"""), {"RemoveCastLike": 1}, golden(
        'graph "g" (%x: float32[2,3], %like: float32[1]) {',
        "  %y: float32[2,3] = Relu(%x)  # Relu__1",
        "  return %y: float32[2,3]",
        "}")),
    "reshape_symbolic": (model_text(21, """g (float[N,3,4] x) => (float[N,3,4] y) <int64[3] s = {0, 3, -1}> {
  r = Reshape(x, s)
  y = Relu(r)
}"""), {"RemoveReshape": 1}, golden(
        'graph "g" (%x: float32[N,3,4]) {',
        "  init %s = int64[3] [0, 3, -1]",
        "  %y: float32[N,3,4] = Relu(%x)  # Relu__1",
        "  return %y: float32[N,3,4]",
        "}")),
    "transpose": (model_text(21, """g (float[2,3,4] x) => (float[2,3,4] y) {
  t = Transpose<perm = [0, 1, 2]>(x)
  y = Relu(t)
}"""), {"RemoveTranspose": 1}, golden(
        'graph "g" (%x: float32[2,3,4]) {',
        "  %y: float32[2,3,4] = Relu(%x)  # Relu__1",
        "  return %y: float32[2,3,4]",
        "}")),
    "expand": (model_text(21, """g (float[2,1,3] x) => (float[2,1,3] y) <int64[2] s = {1, 3}> {
  e = Expand(x, s)
  y = Relu(e)
}"""), {"RemoveExpand": 1}, golden(
        'graph "g" (%x: float32[2,1,3]) {',
        "  init %s = int64[2] [1, 3]",
        "  %y: float32[2,1,3] = Relu(%x)  # Relu__1",
        "  return %y: float32[2,1,3]",
        "}")),
    "slice": (model_text(21, """g (float[2,3] x) => (float[2,3] y)
    <int64[2] st = {0, -5}, int64[2] en = {9223372036854775807, 3}, int64[2] ax = {0, -1}> {
  s = Slice(x, st, en, ax)
  y = Relu(s)
}"""), {"RemoveSlice": 1}, golden(
        'graph "g" (%x: float32[2,3]) {',
        "  init %st = int64[2] [0, -5]",
        "  init %en = int64[2] [9223372036854775807, 3]",
        "  init %ax = int64[2] [0, -1]",
        "  %y: float32[2,3] = Relu(%x)  # Relu__1",
        "  return %y: float32[2,3]",
        "}")),
    "slice_opset9_attributes": (model_text(9, """g (float[2,3] x) => (float[2,3] y) {
  s = Slice<starts = [0, 0], ends = [2, 100]>(x)
  y = Relu(s)
}"""), {"RemoveSlice": 1}, golden(
        'graph "g" (%x: float32[2,3]) {',
        "  %y: float32[2,3] = Relu(%x)  # Relu__1",
        "  return %y: float32[2,3]",
        "}")),
    "pad": (model_text(21, """g (float[2,3] x) => (float[2,3] y) <int64[4] p = {0, 0, 0, 0}> {
  a = Pad<mode = "reflect">(x, p)
  y = Relu(a)
}"""), {"RemovePad": 1}, golden(
        'graph "g" (%x: float32[2,3]) {',
        "  init %p = int64[4] [0, 0, 0, 0]",
        "  %y: float32[2,3] = Relu(%x)  # Relu__1",
        "  return %y: float32[2,3]",
        "}")),
    "pad_opset10_attribute": (model_text(10, """g (float[2,3] x) => (float[2,3] y) {
  a = Pad<pads = [0, 0, 0, 0]>(x)
  y = Relu(a)
}"""), {"RemovePad": 1}, golden(
        'graph "g" (%x: float32[2,3]) {',
        "  %y: float32[2,3] = Relu(%x)  # Relu__1",
        "  return %y: float32[2,3]",
        "}")),
    "concat": (model_text(21, """g (float[2,3] x) => (float[2,3] y) {
  c = Concat<axis = 0>(x)
  y = Relu(c)
}"""), {"RemoveConcat": 1}, golden(
        'graph "g" (%x: float32[2,3]) {',
        "  %y: float32[2,3] = Relu(%x)  # Relu__1",
        "  return %y: float32[2,3]",
        "}")),
    "squeeze_nothing": (model_text(21, """g (float[2,3] x) => (float[2,3] y) {
  s = Squeeze(x)
  y = Relu(s)
}"""), {"RemoveSqueeze": 1}, golden(
        'graph "g" (%x: float32[2,3]) {',
        "  %y: float32[2,3] = Relu(%x)  # Relu__1",
        "  return %y: float32[2,3]",
        "}")),
    "unsqueeze_empty_axes": (model_text(21, """g (float[2,3] x) => (float[2,3] y) <int64[0] e = {}> {
  u = Unsqueeze(x, e)
  y = Relu(u)
}"""), {"RemoveUnsqueeze": 1}, golden(
        'graph "g" (%x: float32[2,3]) {',
        "  init %e = int64[0] []",
        "  %y: float32[2,3] = Relu(%x)  # Relu__1",
        "  return %y: float32[2,3]",
        "}")),
    "flatten": (model_text(21, """g (float[N,3] x, float[5,1] z) => (float[N,3] y, float[5,1] w) {
  f = Flatten<axis = 1>(x)
  y = Relu(f)
  g = Flatten<axis = -1>(z)
  w = Relu(g)
}"""), {"RemoveFlatten": 2}, golden(
        'graph "g" (%x: float32[N,3], %z: float32[5,1]) {',
        "  %y: float32[N,3] = Relu(%x)  # Relu__1",
        "  %w: float32[5,1] = Relu(%z)  # Relu__2",
        "  return %y: float32[N,3], %w: float32[5,1]",
        "}")),
    "compose_transposes": (model_text(21, """g (float[2,3,4] x) => (float[3,4,2] y, float[2,3,4] z) {
  a = Transpose<perm = [1, 0, 2]>(x)
  b = Transpose<perm = [0, 2, 1]>(a)
  y = Relu(b)
  c = Transpose<perm = [1, 2, 0]>(x)
  d = Transpose<perm = [2, 0, 1]>(c)
  z = Relu(d)
}"""), {"ComposeTransposes": 2, "RemoveTranspose": 1}, golden(
        'graph "g" (%x: float32[2,3,4]) {',
        "  %b: ? = Transpose(%x) {perm=[1, 2, 0]}  # Transpose__2",
        "  %y: float32[3,4,2] = Relu(%b)  # Relu__1",
        "  %z: float32[2,3,4] = Relu(%x)  # Relu__2",
        "  return %y: float32[3,4,2], %z: float32[2,3,4]",
        "}")),
    "compose_reshapes": (model_text(21, """g (float[2,3,4] x) => (float[4,6] y)
    <int64[2] s1 = {6, 4}, int64[2] s2 = {4, -1}, int64[1] ax = {0}> {
  a = Reshape(x, s1)
  b = Unsqueeze(a, ax)
  c = Reshape(b, s2)
  y = Relu(c)
}"""), {"ComposeReshapes": 2}, golden(
        'graph "g" (%x: float32[2,3,4]) {',
        "  init %s1 = int64[2] [6, 4]",
        "  init %s2 = int64[2] [4, -1]",
        "  init %ax = int64[1] [0]",
        "  %c: ? = Reshape(%x, %s2)  # Reshape__2",
        "  %y: float32[4,6] = Relu(%c)  # Relu__1",
        "  return %y: float32[4,6]",
        "}")),
    "squeeze_of_unsqueeze": (model_text(21, """g (float[2,3] x) => (float[2,3] y) <int64[2] a = {0, -1}> {
  u = Unsqueeze(x, a)
  s = Squeeze(u, a)
  y = Relu(s)
}"""), {"SqueezeOfUnsqueeze": 1}, golden(
        'graph "g" (%x: float32[2,3]) {',
        "  init %a = int64[2] [0, -1]",
        "  %y: float32[2,3] = Relu(%x)  # Relu__1",
        "  return %y: float32[2,3]",
        "}")),
    "squeeze_of_unsqueeze_opset11_attributes": (model_text(11, """g (float[2,3] x) => (float[2,3] y) {
  u = Unsqueeze<axes = [1]>(x)
  s = Squeeze<axes = [-2]>(u)
  y = Relu(s)
}"""), {"SqueezeOfUnsqueeze": 1}, golden(
        'graph "g" (%x: float32[2,3]) {',
        "  %y: float32[2,3] = Relu(%x)  # Relu__1",
        "  return %y: float32[2,3]",
        "}")),
    "unsqueeze_of_squeeze": (model_text(21, """g (float[2,1,3] x) => (float[2,1,3] y) <int64[1] a = {1}> {
  s = Squeeze(x, a)
  u = Unsqueeze(s, a)
  y = Relu(u)
}"""), {"UnsqueezeOfSqueeze": 1}, golden(
        'graph "g" (%x: float32[2,1,3]) {',
        "  init %a = int64[1] [1]",
        "  %y: float32[2,1,3] = Relu(%x)  # Relu__1",
        "  return %y: float32[2,1,3]",
        "}")),
    "unsqueeze_of_squeeze_opset11_attributes": (model_text(11, """g (float[2,1,3] x) => (float[2,1,3] y) {
  s = Squeeze<axes = [-2]>(x)
  u = Unsqueeze<axes = [1]>(s)
  y = Relu(u)
}"""), {"UnsqueezeOfSqueeze": 1}, golden(
        'graph "g" (%x: float32[2,1,3]) {',
        "  %y: float32[2,1,3] = Relu(%x)  # Relu__1",
        "  return %y: float32[2,1,3]",
        "}")),
}


@pytest.mark.parametrize("case", sorted(POSITIVE))
def test_rule_rewrites(case):
    text, counts, expected = POSITIVE[case]
    model = parse(text)
    result = remove_noops().run(model)
    ir.verify(model)
    assert result.changed
    assert result.log.by_rule() == counts
    assert ir.print_graph(model.graph) == expected
    assert not remove_noops().run(model).changed  # settled


@pytest.mark.parametrize("case", sorted(POSITIVE))
def test_rule_keeps_numbers(case):
    assert_same_numbers(POSITIVE[case][0], [remove_noops(), DeadCodeElimination()])


# -- negative cases: the rule, the model, the node (by output name), the reason ---------------

NEGATIVE = [
    (c.RemoveDropout, 21, """g (float[2] x) => (float[2] y, bool[2] z) { a, m = Dropout(x)
 y = Relu(a)
 z = Not(m) }""", "a", "mask output is used"),
    (c.RemoveDropout, 21, """g (float[2] x) => (float[2] y, bool[2] m) { a, m = Dropout(x)
 y = Relu(a) }""", "a", "mask output is used"),
    (c.RemoveDropout, 21, """g (float[2] x, bool t) => (float[2] y) { a = Dropout(x, , t)
 y = Relu(a) }""", "a", "training_mode is not a constant"),
    (c.RemoveDropout, 21, """g (float[2] x) => (float[2] y) <bool t = {1}> { a = Dropout(x, , t)
 y = Relu(a) }""", "a", "training_mode is true"),
    (c.RemoveDropout, 6, """g (float[2] x) => (float[2] y) { a = Dropout(x)
 y = Relu(a) }""", "a", "is_test is 0: training mode (before opset 7)"),
    (c.RemoveCast, 21, """g (float[2] x) => (float16[2] y) { y = Cast<to = 10>(x) }""", "y",
     "casts float32 to float16"),
    (c.RemoveCast, 21, """g (float[2] x) => (float[2] y) { a = Relu(x)
 y = Cast<to = 1>(a) }""", "y", "input dtype unknown"),
    (c.RemoveCastLike, 21, """g (float[2] x, int32[1] like) => (int32[2] y) { y = CastLike(x, like) }""", "y",
     "casts float32 to int32"),
    (c.RemoveReshape, 21, """g (float[N,3] x) => (float[N,3] y) <int64[2] s = {0, 3}> {
 r = Reshape<allowzero = 1>(x, s)
 y = Relu(r) }""", "r", "dim 0: 0 may differ from input dim 'N'"),
    (c.RemoveReshape, 21, """g (float[N,3] x) => (float[N,3] y) <int64[2] s = {2, 3}> {
 r = Reshape(x, s)
 y = Relu(r) }""", "r", "dim 0: 2 may differ from input dim 'N'"),
    (c.RemoveReshape, 21, """g (float[2,3] x, int64[2] s) => (float[2,3] y) { r = Reshape(x, s)
 y = Relu(r) }""", "r", "shape is not a constant"),
    (c.RemoveReshape, 21, """g (float[2,3] x) => (float[6] y) <int64[1] s = {-1}> { r = Reshape(x, s)
 y = Relu(r) }""", "r", "changes rank 2 to 1"),
    (c.RemoveTranspose, 21, """g (float[2,3] x) => (float[3,2] y) { y = Transpose<perm = [1, 0]>(x) }""", "y",
     "perm [1, 0] is not the identity"),
    (c.RemoveTranspose, 21, """g (float[2,3] x) => (float[3,2] y) { a = Relu(x)
 y = Transpose(a) }""", "y", "no perm and input rank unknown"),
    (c.RemoveExpand, 21, """g (float[N,3] x) => (float[2,3] y) <int64[2] s = {2, 3}> { e = Expand(x, s)
 y = Relu(e) }""", "e", "may broadcast dim 'N' to 2"),
    (c.RemoveSlice, 21, """g (float[4] x) => (float[2] y) <int64[1] z = {0}, int64[1] e = {4}, int64[1] a = {0}, int64[1] st = {2}> {
 s = Slice(x, z, e, a, st)
 y = Relu(s) }""", "s", "step 2 on axis 0"),
    (c.RemoveSlice, 21, """g (float[N] x) => (float[N] y) <int64[1] z = {0}, int64[1] e = {100}> {
 s = Slice(x, z, e)
 y = Relu(s) }""", "s", "ends at 100 on axis 0 (dim 'N')"),
    (c.RemoveSlice, 9, """g (float[2,3] x) => (float[1,3] y) { s = Slice<starts = [1], ends = [2]>(x)
 y = Relu(s) }""", "s", "starts at 1 on axis 0 (dim 2)"),
    (c.RemovePad, 21, """g (float[2,3] x) => (float[2,4] y) <int64[4] p = {0, 1, 0, 0}> { a = Pad(x, p)
 y = Relu(a) }""", "a", "pads [0, 1, 0, 0] are not all zero"),
    (c.RemovePad, 10, """g (float[2,3] x) => (float[2,4] y) { a = Pad<pads = [0, 0, 0, 1]>(x)
 y = Relu(a) }""", "a", "pads [0, 0, 0, 1] are not all zero"),
    (c.RemoveConcat, 21, """g (float[2] x) => (float[4] y) { y = Concat<axis = 0>(x, x) }""", "y", "2 inputs"),
    (c.RemoveSqueeze, 21, """g (float[N,3] x) => (float[N,3] y) { s = Squeeze(x)
 y = Relu(s) }""", "s", "dim 0 ('N') may be 1"),
    (c.RemoveSqueeze, 11, """g (float[1,3] x) => (float[3] y) { s = Squeeze<axes = [0]>(x)
 y = Relu(s) }""", "s", "squeezes axes [0]"),
    (c.RemoveUnsqueeze, 21, """g (float[3] x) => (float[1,3] y) <int64[1] a = {0}> { u = Unsqueeze(x, a)
 y = Relu(u) }""", "u", "inserts axes [0]"),
    (c.RemoveFlatten, 21, """g (float[2,3,4] x) => (float[2,12] y) { f = Flatten(x)
 y = Relu(f) }""", "f", "input has rank 3, the output rank 2"),
    (c.RemoveFlatten, 21, """g (float[2,3] x) => (float[1,6] y) { f = Flatten<axis = 0>(x)
 y = Relu(f) }""", "f", "axis 0 changes shape [2, 3]"),
    (c.ComposeTransposes, 21, """g (float[2,3] x) => (float[3,2] y) { a = Relu(x)
 y = Transpose<perm = [1, 0]>(a) }""", "y", "input is not produced by a Transpose"),
    (c.ComposeReshapes, 21, """g (float[2,3,4] x) => (float[6,4] y) <int64[2] s1 = {6, 4}, int64[2] s2 = {0, -1}> {
 a = Reshape(x, s1)
 b = Reshape(a, s2)
 y = Relu(b) }""", "b", "target shape has 0 entries that copy the intermediate's dims"),
    (c.SqueezeOfUnsqueeze, 21, """g (float[1,3] x) => (float[1,3] y) <int64[1] a = {0}, int64[1] b = {1}> {
 u = Unsqueeze(x, b)
 s = Squeeze(u, a)
 y = Relu(s) }""", "s", "squeezes axes [0], not the inserted [1]"),
    (c.SqueezeOfUnsqueeze, 11, """g (float[1,3] x) => (float[3] y) { u = Unsqueeze<axes = [0]>(x)
 s = Squeeze(u)
 y = Relu(s) }""", "s", "no axes: squeezes every dim of size 1, not just the inserted ones"),
    (c.UnsqueezeOfSqueeze, 21, """g (float[1,3] x) => (float[1,3] y) <int64[1] a = {0}> { s = Squeeze(x)
 u = Unsqueeze(s, a)
 y = Relu(u) }""", "u", "Squeeze without axes: which dims it removed is not known"),
    (c.UnsqueezeOfSqueeze, 11, """g (float[2,1,1] x) => (float[2,1,1] y) { s = Squeeze<axes = [1]>(x)
 u = Unsqueeze<axes = [2]>(s)
 y = Relu(u) }""", "u", "inserts axes [2], not the squeezed [1]"),
    # A graph output keeps its name; a graph input cannot take it.
    (c.RemoveTranspose, 21, """g (float[2,3] x) => (float[2,3] y) { y = Transpose<perm = [0, 1]>(x) }""", "y",
     c.OUTPUT_BLOCKED),
]


@pytest.mark.parametrize("rule, opset, graph, output, reason", NEGATIVE,
                         ids=[f"{r.__name__}-{i}" for i, (r, *_) in enumerate(NEGATIVE)])
def test_rule_rejects(rule, opset, graph, output, reason):
    model = parse(model_text(opset, graph))
    r = rule()
    r.model = model  # rules read the opset from their model
    assert r.match(producing(model, output)) == c.Reject(reason)
    before = ir.print_graph(model.graph)
    assert not RulePass([rule()]).run(model).changed
    assert ir.print_graph(model.graph) == before


def test_graph_output_name_moves_to_the_kept_value():
    model = assert_same_numbers(model_text(21, """g (float[2,3] x) => (float[2,3] y) {
  r = Relu(x)
  y = Transpose<perm = [0, 1]>(r)
}"""), [remove_noops()])
    assert model.graph.outputs[0].name == "y"
    assert model.graph.outputs[0].producer.op_type == "Relu"


def test_function_attribute_references_are_not_guessed():
    text = """<ir_version: 10, opset_import: ["" : 21, "local" : 1]>
g (float[2,3] x) => (float[2,3] y) { y = local.F<perm = [1, 0]>(x) }
<domain: "local", opset_import: ["" : 21]>
F <perm> (x) => (y) {
  t = Transpose<perm: ints = @perm>(x)
  u = Transpose<perm: ints = @perm>(t)
  y = Relu(u)
}"""
    model = parse(text)
    body = model.functions[0].graph
    assert c.RemoveTranspose().match(body.nodes[0]) == c.Reject("an attribute refers to a function attribute")
    assert not remove_noops().run(model).changed
    assert_same_numbers(text, [remove_noops(), CommonSubexpressions(), DeadCodeElimination()])


def test_identity_whose_source_a_body_returns_is_left_alone():
    """The source is also a body's output, so it cannot take the graph output's name:
    removing the Identity would only make `replace_uses` add another one, forever."""
    model = parse(model_text(21, """g (bool c, float[2] x) => (float[2] y, float[2] z) {
  t = Relu(x)
  z = If(c) <then_branch = b1 () => (float[2] t) { }, else_branch = b2 () => (float[2] o) { o = Neg(x) }>
  y = Identity(t)
}"""))
    assert c.RemoveIdentity().match(producing(model, "y")) == c.Reject(c.OUTPUT_BLOCKED)
    assert not remove_identity().run(model).changed


def test_rules_reach_into_subgraphs():
    text = model_text(21, """g (bool c, float[2,3] x) => (float[2,3] y) {
  y = If(c) <then_branch = t () => (float[2,3] o1) { a = Transpose<perm = [0, 1]>(x)
 o1 = Relu(a) }, else_branch = e () => (float[2,3] o2) { o2 = Neg(x) }>
}""")
    model = parse(text)
    assert remove_noops().run(model).log.by_rule() == {"RemoveTranspose": 1}
    ir.verify(model)
    branch = model.graph.nodes[0].attributes["then_branch"].value
    assert [n.op_type for n in branch.nodes] == ["Relu"]
    for flag in (True, False):
        feeds = [np.array(flag), feeds_for(model)[1]]
        assert identical(run_ort(ir.to_proto(model), feeds), run_ort(ir.to_proto(parse(text)), feeds)) is None


# -- common subexpressions -----------------------------------------------------------------

CSE = model_text(21, """g (float[2,3] x) => (float[2,3] y, float[3,2] z) <float[3] w1 = {1.0, 2.0, 3.0}, float[3] w2 = {1.0, 2.0, 3.0}> {
  a = Relu(x)
  b = Relu(x)
  c = Add(a, w1)
  d = Add(b, w2)
  k = Constant<value = float[3] {1.0, 2.0, 3.0}>()
  e = Add(a, k)
  s = Sum(c, d, e)
  y = Neg(s)
  p = Transpose<perm = [1, 0]>(a)
  q = Transpose<perm = [1, 0]>(b)
  z = Sub(p, q)
}""")


def test_cse_merges_nodes_and_constants():
    model = parse(CSE)
    result = CommonSubexpressions().run(model)
    ir.verify(model)
    assert result.changed
    # w2 and the Constant into w1; then b, d, e (reads the merged a and w1) and q.
    assert result.log.by_kind() == {"replace-uses": 6, "remove-initializer": 1, "remove-node": 5}
    assert ir.print_graph(model.graph) == golden(
        'graph "g" (%x: float32[2,3]) {',
        "  init %w1 = float32[3] [1.0, 2.0, 3.0]",
        "  %a: ? = Relu(%x)  # Relu__1",
        "  %c: ? = Add(%a, %w1)  # Add__1",
        "  %s: ? = Sum(%c, %c, %c)  # Sum__1",
        "  %y: float32[2,3] = Neg(%s)  # Neg__1",
        "  %p: ? = Transpose(%a) {perm=[1, 0]}  # Transpose__1",
        "  %z: float32[3,2] = Sub(%p, %p)  # Sub__1",
        "  return %y: float32[2,3], %z: float32[3,2]",
        "}")
    assert not CommonSubexpressions().run(model).changed


def test_cse_keeps_numbers():
    assert_same_numbers(CSE, [CommonSubexpressions(), DeadCodeElimination()])


@pytest.mark.parametrize("graph", [
    # different attributes
    """g (float[2,3] x) => (float[3,2] y, float[2,3] z) { y = Transpose<perm = [1, 0]>(x)
 t = Transpose<perm = [1, 0]>(y)
 z = Transpose<perm = [0, 1]>(t) }""",
    # nondeterministic
    """g (float[2,3] x) => (float[2,3] y) { a = RandomNormalLike(x)
 b = RandomNormalLike(x)
 y = Sub(a, b) }""",
    # constants that differ in dtype, or only in the sign of zero
    """g (float[2] x) => (float[2] y, double[2] z) <float[2] a = {0.0, 1.0}, float[2] b = {-0.0, 1.0}, double[2] d = {0.0, 1.0}> {
 s = Add(x, a)
 y = Add(s, b)
 z = Identity(d) }""",
    # a graph input with a default value is not a constant
    """g (float[2] x, float[2] w) => (float[2] y) <float[2] w = {1.0, 2.0}, float[2] v = {1.0, 2.0}> {
 s = Add(x, w)
 y = Add(s, v) }""",
    # nodes that own subgraphs
    """g (bool c, float[2] x) => (float[2] y) {
 a = If(c) <then_branch = t1 () => (float[2] o1) { o1 = Neg(x) }, else_branch = e1 () => (float[2] o2) { o2 = Abs(x) }>
 b = If(c) <then_branch = t2 () => (float[2] o3) { o3 = Neg(x) }, else_branch = e2 () => (float[2] o4) { o4 = Abs(x) }>
 y = Add(a, b) }""",
    # both duplicates are graph outputs: merging would only add an Identity
    """g (float[2] x) => (float[2] y, float[2] z) { y = Relu(x)
 z = Relu(x) }""",
])
def test_cse_leaves_distinct_nodes(graph):
    model = parse(model_text(21, graph))
    before = ir.print_graph(model.graph)
    assert not CommonSubexpressions().run(model).changed
    assert ir.print_graph(model.graph) == before


def test_cse_leaves_custom_domains():
    model = parse("""<ir_version: 10, opset_import: ["" : 21, "custom" : 1]>
g (float[2] x) => (float[2] y) { a = custom.Op(x)
 b = custom.Op(x)
 y = Add(a, b) }""")
    assert not CommonSubexpressions().run(model).changed


def test_cse_duplicate_graph_output_takes_its_name():
    model = assert_same_numbers(model_text(21, """g (float[2] x) => (float[2] y, float[2] z) {
  a = Relu(x)
  y = Neg(a)
  z = Relu(x)
}"""), [CommonSubexpressions()])
    assert ir.print_graph(model.graph) == golden(
        'graph "g" (%x: float32[2]) {',
        "  %z: float32[2] = Relu(%x)  # Relu__1",
        "  %y: float32[2] = Neg(%z)  # Neg__1",
        "  return %y: float32[2], %z: float32[2]",
        "}")


def test_cse_constant_graph_output_keeps_its_name():
    model = parse(model_text(21, """g (float[2] x) => (float[2] y, float[2] k) <float[2] w = {1.0, 2.0}> {
  k = Constant<value = float[2] {1.0, 2.0}>()
  j = Constant<value = float[2] {1.0, 2.0}>()
  s = Add(x, w)
  y = Add(s, j)
}"""))
    result = CommonSubexpressions().run(model)
    ir.verify(model)
    assert result.log.by_kind() == {"replace-uses": 1, "remove-node": 1}  # j merged, k kept
    assert [n.op_type for n in model.graph.nodes] == ["Constant", "Add", "Add"]
    assert model.graph.outputs[1].name == "k"
    assert model.graph.nodes[2].inputs[1].name == "w"


def test_cse_in_subgraphs_and_across_captures():
    text = model_text(21, """g (bool c, float[2] x) => (float[2] y) <float[2] w = {1.0, 2.0}, float[2] v = {1.0, 2.0}> {
  y = If(c) <then_branch = t () => (float[2] o1) { a = Add(x, v)
 b = Add(x, w)
 o1 = Mul(a, b) }, else_branch = e () => (float[2] o2) { o2 = Neg(x) }>
}""")
    model = parse(text)
    result = CommonSubexpressions().run(model)
    ir.verify(model)
    assert result.log.by_kind() == {"replace-uses": 2, "remove-initializer": 1, "remove-node": 1}
    branch = model.graph.nodes[0].attributes["then_branch"].value
    assert [n.op_type for n in branch.nodes] == ["Add", "Mul"]
    assert branch.nodes[1].inputs[0] is branch.nodes[1].inputs[1]
    for flag in (True, False):
        feeds = [np.array(flag), np.array([3.0, -1.0], np.float32)]
        assert identical(run_ort(ir.to_proto(model), feeds), run_ort(ir.to_proto(parse(text)), feeds)) is None


def test_cse_merges_a_long_chain_in_one_sweep():
    n = 2000
    lines = ["  a0 = Relu(x)", "  b0 = Relu(x)"]
    for i in range(1, n):
        lines += [f"  a{i} = Neg(a{i - 1})", f"  b{i} = Neg(b{i - 1})"]
    lines.append(f"  y = Add(a{n - 1}, b{n - 1})")
    model = parse(model_text(21, "g (float[2] x) => (float[2] y) {\n" + "\n".join(lines) + "\n}"))
    result = CommonSubexpressions().run(model)
    ir.verify(model)
    assert result.log.by_kind()["remove-node"] == n
    assert len(model.graph.nodes) == n + 1


# -- ComposeSlices ---------------------------------------------------------------------------

TWO_SLICES = """<ir_version: 10, opset_import: ["" : 21]>
g (float[4, 6, 8] x) => (float[4, 3, 7] y) <int64[1] s1 = {0}, int64[1] e1 = {3}, int64[1] a1 = {1},
  int64[1] s2 = {1}, int64[1] e2 = {9223372036854775807}, int64[1] a2 = {-1}> {
  t = Slice(x, s1, e1, a1)
  y = Slice(t, s2, e2, a2)
}"""


def test_compose_slices_on_different_axes():
    from rewrites.cleanup import ComposeSlices

    model = parse(TWO_SLICES)
    original = ir.to_proto(model)
    result = remove_noops().run(model)
    DeadCodeElimination().run(model)
    ir.verify(model)
    assert result.log.by_rule() == {"ComposeSlices": 1}
    assert [n.op_type for n in model.graph.nodes] == ["Slice"]
    fused = model.graph.nodes[0]
    assert [const(v).tolist() for v in fused.inputs[1:]] == [[0, 1], [3, 9223372036854775807], [1, 2], [1, 1]]
    assert model.graph.outputs[0].name == "y"
    x = np.random.default_rng(0).standard_normal((4, 6, 8)).astype(np.float32)
    assert np.array_equal(run_ort(ir.to_proto(model), [x])[0], run_ort(original, [x])[0])
    assert ComposeSlices().match(fused) == Reject("input is not produced by a Slice")


def test_compose_slices_refuses_the_same_axis():
    from rewrites.cleanup import ComposeSlices

    model = parse(TWO_SLICES.replace("a2 = {-1}", "a2 = {1}").replace("float[4, 3, 7] y", "float[4, 2, 8] y"))
    outer = model.graph.nodes[1]
    rule = ComposeSlices()
    rule.model = model
    assert rule.match(outer) == Reject("both Slices cut the same axis")
