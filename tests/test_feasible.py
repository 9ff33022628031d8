"""Facts that hold for every input a model accepts: an If's output rank from the only branch
a valid run can take (rewrites/feasible.py), and the types a Conv or a recurrent layer's
weights alone give (rewrites/shapes.py local rules). Each has a positive test (golden text,
change-log counts), a negative test (the Reject reason) and an equivalence test in
onnxruntime; every failure the analysis relies on is checked in onnxruntime itself."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import ir
import rewrites.fold
from rewrites import feasible
from rewrites.base import Reject
from rewrites.cleanup import DeadCodeElimination, remove_noops
from rewrites.constants import lift_constants
from rewrites.fold import FoldConstants
from rewrites.patterns import const
from rewrites.shapes import InferShapes
from tests.conformance import matches, run_ort
from tests.real_models import find_model_files, realistic_feeds
from tests.textmodels import parse


def prepare(text: str) -> ir.Model:
    """The model with its Constant nodes lifted and its types inferred, as the pipeline
    has them when folding starts."""
    model = parse(text)
    lift_constants().run(model)
    InferShapes().run(model)
    return model


def optimize(model: ir.Model) -> dict:
    """LiftConstants, InferShapes, FoldConstants, cleanup, DeadCodeElimination; the fold's
    and the cleanup's rewrites by rule."""
    lift_constants().run(model)
    InferShapes().run(model)
    counts = FoldConstants().run(model).log.by_rule()
    counts.update(remove_noops().run(model).log.by_rule())
    DeadCodeElimination().run(model)
    ir.verify(model)
    return dict(counts)


def same_outputs(before: onnx.ModelProto, after: ir.Model, feeds: list) -> None:
    assert matches(run_ort(ir.to_proto(after), feeds), run_ort(before, feeds), rtol=0, atol=0) is None


def both_fail(before: onnx.ModelProto, after: ir.Model, feeds: list) -> None:
    """An input the model rejects is still rejected."""
    for model in (before, ir.to_proto(after)):
        with pytest.raises(Exception):
            run_ort(model, feeds)


def node(model: ir.Model, name: str) -> ir.Node:
    return next(n for n in model.graph.walk() if n.name == name or n.outputs[0].name == name)


# -- InfeasibleBranch ------------------------------------------------------------------------

# silero-vad's decoder, without a single declared type inside: the time axis is squeezed when
# it has length 1, then torch's LSTM wrapper adds a batch axis when the input is unbatched
# (rank 2). With a time axis longer than 1 the LSTM gets a rank-5 input and the model fails.
SILERO_DECODER = """<ir_version: 10, opset_import: ["" : 21]>
g (float[B, 4, T] h, float[1, 16, 4] w, float[1, 16, 4] r) => (y) {
  minus = Constant<value = int64[1] {-1}>()
  s0 = Shape(h)
  t = Gather(s0, minus)
  one = Constant<value = int64[1] {1}>()
  single = Equal(t, one)
  c = Squeeze(single)
  v = If(c) <then_branch = t1 () => (o1) { o1 = Squeeze(h, minus) },
             else_branch = e1 () => (o2) { o2 = Identity(h) }>
  s = Shape(v)
  n = Size(s)
  two = Constant<value = int64 {2}>()
  eq = Equal(n, two)
  batched = Not(eq)
  u = If(batched) <then_branch = t2 () => (o3) { zero = Constant<value = int64[1] {0}>()
                                                o3 = Unsqueeze(v, zero) },
                   else_branch = e2 () => (o4) { o4 = Identity(v) }>
  zero = Constant<value = int64[1] {0}>()
  x = Unsqueeze(u, zero)
  all, y = LSTM<hidden_size = 4>(x, w, r)
}"""


def decoder_feeds(steps: int, batch: int = 3) -> list:
    rng = np.random.default_rng(steps)
    return [rng.standard_normal((batch, 4, steps)).astype(np.float32),
            rng.standard_normal((1, 16, 4)).astype(np.float32), rng.standard_normal((1, 16, 4)).astype(np.float32)]


def test_only_branch_a_valid_input_takes_gives_the_rank():
    before = ir.to_proto(parse(SILERO_DECODER))
    model = prepare(SILERO_DECODER)
    m = feasible.match(node(model, "v"))
    assert m["branch"] == "then_branch"
    assert m["why"] == "the else_branch fails: LSTM 'LSTM__1': input X has rank 5, LSTM needs 3"
    model = parse(SILERO_DECODER)
    assert optimize(model) == {"InfeasibleBranch": 1, "FoldShape": 1, "FoldConstants": 2,
                               "InlineConstantIf": 1, "RemoveIdentity": 1}
    assert ir.print_graph(model.graph) == (
        'graph "g" (%h: float32[B,4,T], %w: float32[1,16,4], %r: float32[1,16,4]) {\n'
        "  init %minus = int64[1] [-1]\n"
        "  init %one = int64[1] [1]\n"
        "  init %zero = int64[1] [0]\n"
        "  %s0: int64[3] = Shape(%h)  # Shape__1\n"
        "  %t: int64[1] = Gather(%s0, %minus)  # Gather__1\n"
        "  %single: bool[1] = Equal(%t, %one)  # Equal__1\n"
        "  %c: bool[] = Squeeze(%single)  # Squeeze__1\n"
        "  %v: float32[B,4] = If(%c)  # If__1\n"
        '    else_branch "e1" () {\n'
        "      %o2: float32[B,4,T] = Identity(%h)  # Identity__1\n"
        "      return %o2: float32[B,4,T]\n"
        "    }\n"
        '    then_branch "t1" () {\n'
        "      %o1: float32[B,4] = Squeeze(%h, %minus)  # Squeeze__2\n"
        "      return %o1: float32[B,4]\n"
        "    }\n"
        "  %x: float32[...] = Unsqueeze(%v, %zero)  # Unsqueeze__2\n"
        "  %all: float32[unk__1,1,unk__2,4], %y: float32[1,unk__3,4] = LSTM(%x, %w, %r) {hidden_size=4}  # LSTM__1\n"
        "  return %y: float32[1,unk__3,4]\n"
        "}\n")
    InferShapes().run(model)  # what follows learns the rank too
    assert ir.printer.format_type(node(model, "x").outputs[0]) == "float32[1,B,4]"
    for batch in (1, 3):
        same_outputs(before, model, decoder_feeds(1, batch))
    both_fail(before, model, decoder_feeds(2))  # the LSTM refuses a rank-5 input in both


def test_both_branches_can_succeed():
    # What follows the If accepts both ranks (ReduceMax squeezes the last axis of either):
    # the rank test stays. Silero's own rank test is the same test_fold DIFFERENT_RANKS keeps.
    model = prepare(SILERO_DECODER.replace("all, y = LSTM<hidden_size = 4>(x, w, r)",
                                           "y = ReduceMax<keepdims = 0>(x, minus)"))
    assert feasible.match(node(model, "v")) == Reject("both branches can succeed")
    assert FoldConstants().run(model).log.by_rule() == {}


def test_a_failure_in_a_dead_node_proves_nothing():
    model = prepare(SILERO_DECODER.replace("=> (y)", "=> (u)"))  # the LSTM computes nothing used
    assert feasible.match(node(model, "v")) == Reject("both branches can succeed")


def test_a_failure_behind_an_unknown_condition_proves_nothing():
    # The LSTM runs only when the input `go` says so: a run with a long time axis and
    # go = false is valid.
    model = prepare(SILERO_DECODER.replace("(float[B, 4, T] h,", "(bool go, float[B, 4, T] h,").replace(
        "  all, y = LSTM<hidden_size = 4>(x, w, r)",
        "  y = If(go) <then_branch = t3 () => (o5) { all, o5 = LSTM<hidden_size = 4>(x, w, r) },\n"
        "              else_branch = e3 () => (o6) { o6 = Identity(x) }>"))
    before = ir.to_proto(model)
    assert feasible.match(node(model, "v")) == Reject("both branches can succeed")
    optimize(model)
    same_outputs(before, model, [np.array(False)] + decoder_feeds(2))


def test_the_abstract_run_is_bounded(monkeypatch):
    monkeypatch.setattr(feasible, "MAX_STEPS", 3)  # gives up before reaching the LSTM
    model = prepare(SILERO_DECODER)
    assert feasible.match(node(model, "v")) == Reject("both branches can succeed")


def test_the_abstract_run_evaluates_small_results_only(monkeypatch):
    # Under the hypothesis the rank is a constant, and a ConstantOfShape of rank x 1e9
    # elements follows: its size is known before evaluating, and it is not evaluated.
    evaluated = []
    real = rewrites.fold.evaluate
    monkeypatch.setattr(rewrites.fold, "evaluate", lambda n, *a, **k: evaluated.append(n.op_type) or real(n, *a, **k))
    model = prepare(SILERO_DECODER.replace("=> (y)", "=> (y, filler)").replace(
        "  zero = Constant<value = int64[1] {0}>()\n  x =",
        "  zero = Constant<value = int64[1] {0}>()\n"
        "  billion = Constant<value = int64[1] {1000000000}>()\n"
        "  size = Mul(n, billion)\n"
        "  filler = ConstantOfShape(size)\n"
        "  x ="))
    assert feasible.match(node(model, "v"))["branch"] == "then_branch"
    assert "Mul" in evaluated and "ConstantOfShape" not in evaluated


def test_neither_branch_can_succeed():
    model = prepare(SILERO_DECODER.replace("all, y = LSTM<hidden_size = 4>(x, w, r)",
                                           "y = Concat<axis = 0>(v, minus)"))
    assert feasible.match(node(model, "v")) == Reject(
        "neither branch can succeed: Concat 'Concat__1': inputs of ranks [1, 2]; "
        "Concat 'Concat__1': inputs of ranks [1, 3]")


def test_only_ifs_with_outputs_of_different_known_ranks_are_judged():
    model = prepare(SILERO_DECODER)
    unjudged = Reject("no output of unknown rank whose branches have known, different ranks")
    assert feasible.match(node(model, "x")) == Reject("not an If")
    assert feasible.match(node(model, "u")) == unjudged  # its branches' ranks follow v's: unknown
    FoldConstants().run(model)
    assert feasible.match(node(model, "v")) == unjudged  # judged once: its rank is known now


# onnxscript's optimizer copies the type an Identity declares inside a branch onto the value
# the Identity reads, outside the If. Here the then branch runs only for rank-2 inputs, and
# so declares rank 2. onnxscript 0.7.2 writes rank 2 onto %x; run to a fixed point
# (num_iterations=3) it then folds the rank test and returns rank-3 inputs unflattened, and
# when %x is the graph input itself it rewrites the signature, so onnxruntime rejects rank-3
# inputs. A branch's declarations hold when it runs, not before the If.
DECLARED_IN_BRANCH = """<ir_version: 10, opset_import: ["" : 21]>
g (float[] raw) => (y) <int64 two = {2}, int64[1] flat = {-1}> {
  x = Relu(raw)
  s = Shape(x)
  n = Size(s)
  c = Equal(n, two)
  y = If(c) <then_branch = t () => (float[a, b] o1) { o1 = Identity(x) },
             else_branch = e () => (float[m] o2) { o2 = Reshape(x, flat) }>
}"""


def test_a_type_declared_in_a_branch_is_not_copied_outside():
    proto = onnx.parser.parse_model(DECLARED_IN_BRANCH)
    proto.graph.input[0].type.tensor_type.ClearField("shape")  # any rank
    proto.ir_version = 10
    model = ir.load(proto)
    assert optimize(model) == {}
    assert ir.printer.format_type(node(model, "x").outputs[0]) == "float32[...]"  # any rank
    assert feasible.match(node(model, "y")) == Reject("both branches can succeed")
    for shape in ((2, 3), (2, 3, 4)):
        same_outputs(proto, model, [np.arange(np.prod(shape), dtype=np.float32).reshape(shape)])


# -- the failures the analysis relies on, checked in onnxruntime -------------------------------

def _one_node(op: str, attrs: dict, inputs: list, shaped: bool) -> onnx.ModelProto:
    """A model of one node; inputs are (name, array) (None: omitted). Integer arrays become
    initializers (axes), float arrays graph inputs: of their shape when `shaped`, else of
    unknown rank (so onnxruntime has to find out at run time)."""
    names, graph_inputs, inits = [], [], []
    for i, (name, a) in enumerate(inputs):
        if a is None:
            names.append("")
        elif a.dtype.kind == "i":
            names.append(name)
            inits.append(onnx.numpy_helper.from_array(a, name))
        else:
            names.append(name)
            graph_inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, a.shape if shaped else None))
    outputs = ["out"] if op not in ("LSTM", "GRU", "RNN") else ["Y", "Y_h"]
    g = helper.make_graph([helper.make_node(op, names, outputs, **attrs)], "g", graph_inputs,
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                          initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _f(*shape):
    return np.ones(shape, np.float32)


def _i(*values):
    return np.array(values, np.int64)


# (op, attributes, valid inputs, the same with the one input that breaks the rule)
FAILURES = {
    "LSTM X rank 2": ("LSTM", {"hidden_size": 4}, [("X", _f(5, 2, 4)), ("W", _f(1, 16, 4)), ("R", _f(1, 16, 4))],
                      {"X": _f(5, 4)}),
    "LSTM X rank 5": ("LSTM", {"hidden_size": 4}, [("X", _f(5, 2, 4)), ("W", _f(1, 16, 4)), ("R", _f(1, 16, 4))],
                      {"X": _f(1, 5, 2, 4, 1)}),
    "LSTM initial_h rank 2": ("LSTM", {"hidden_size": 4},
                              [("X", _f(5, 2, 4)), ("W", _f(1, 16, 4)), ("R", _f(1, 16, 4)), ("B", None),
                               ("L", None), ("H", _f(1, 2, 4))], {"H": _f(2, 4)}),
    "LSTM initial_c rank 4": ("LSTM", {"hidden_size": 4},
                              [("X", _f(5, 2, 4)), ("W", _f(1, 16, 4)), ("R", _f(1, 16, 4)), ("B", None),
                               ("L", None), ("H", None), ("C", _f(1, 2, 4))], {"C": _f(1, 1, 2, 4)}),
    "GRU X rank 4": ("GRU", {"hidden_size": 4}, [("X", _f(5, 2, 4)), ("W", _f(1, 12, 4)), ("R", _f(1, 12, 4))],
                     {"X": _f(1, 5, 2, 4)}),
    "RNN X rank 2": ("RNN", {"hidden_size": 4}, [("X", _f(5, 2, 4)), ("W", _f(1, 4, 4)), ("R", _f(1, 4, 4))],
                     {"X": _f(5, 4)}),
    "Conv X rank 4, W rank 3": ("Conv", {}, [("X", _f(1, 3, 5)), ("W", _f(2, 3, 1))], {"X": _f(1, 3, 5, 1)}),
    "ConvTranspose X rank 3, W rank 4": ("ConvTranspose", {}, [("X", _f(1, 3, 5, 5)), ("W", _f(3, 2, 1, 1))],
                                         {"X": _f(1, 3, 5)}),
    "Gemm A rank 3": ("Gemm", {}, [("A", _f(3, 4)), ("B", _f(4, 5))], {"A": _f(2, 3, 4)}),
    "Gemm B rank 1": ("Gemm", {}, [("A", _f(3, 4)), ("B", _f(4, 5))], {"B": _f(4)}),
    "Concat ranks 1 and 2": ("Concat", {"axis": 0}, [("P", _f(2)), ("Q", _f(3))], {"Q": _f(2, 1)}),
    "Squeeze axis out of range": ("Squeeze", {}, [("X", _f(2, 1)), ("axes", _i(1))], {"axes": _i(2)}),
    "Squeeze axis of size 2": ("Squeeze", {}, [("X", _f(2, 1)), ("axes", _i(1))], {"X": _f(2, 2)}),
    "Unsqueeze axis out of range": ("Unsqueeze", {}, [("X", _f(2)), ("axes", _i(1))], {"axes": _i(2)}),
}


@pytest.mark.parametrize("case", FAILURES)
def test_every_certain_failure_is_one_onnxruntime_reports(case):
    op, attrs, valid, broken = FAILURES[case]
    bad = [(name, broken.get(name, a)) for name, a in valid]
    for inputs, fails in ((valid, False), (bad, True)):
        # Ours: the rule on the node with these input types.
        model = ir.load(_one_node(op, attrs, inputs, shaped=True))
        why = feasible.violation(model.graph.nodes[0], const_of=const)
        assert (why is not None) == fails, (case, why)
        # onnxruntime's: the same inputs, their rank unknown until it runs.
        feeds = [a for _, a in inputs if a is not None and a.dtype.kind == "f"]
        proto = _one_node(op, attrs, inputs, shaped=False)
        if fails:
            with pytest.raises(Exception):
                run_ort(proto, feeds)
        else:
            run_ort(proto, feeds)


# -- types from the weights alone ------------------------------------------------------------

# The tail of silero's decoder: Conv to one channel, Sigmoid, squeeze the channel axis when it
# has length 1. The Conv's input rank is unknown here (a Reshape to a runtime shape).
SQUEEZE_CHANNEL = """<ir_version: 10, opset_import: ["" : 21]>
g (float[N] x, int64[K] target) => (y) <float[1, 2, 1] w = {0.5, -1.0}> {
  a = Reshape(x, target)
  b = Conv(a, w)
  p = Sigmoid(b)
  s = Shape(p)
  one = Constant<value = int64[1] {1}>()
  d = Gather(s, one)
  e = Equal(d, one)
  y = If(e) <then_branch = t () => (o1) { o1 = Squeeze(p, one) },
             else_branch = f () => (o2) { o2 = Identity(p) }>
}"""


@pytest.mark.parametrize("local", [False, True], ids=["onnx-inference", "local-rules"])
def test_conv_channels_come_from_the_weight(local, monkeypatch):
    model = parse(SQUEEZE_CHANNEL)
    before = ir.to_proto(model)
    lift_constants().run(model)
    with monkeypatch.context() as m:
        if local:
            m.setattr(onnx.shape_inference, "infer_shapes", _raise)
        InferShapes().run(model)
    assert ir.printer.format_type(node(model, "b").outputs[0]) == "float32[?,1,?]"
    counts = FoldConstants().run(model).log.by_rule()
    assert counts == {"FoldShape": 1, "FoldConstants": 1, "InlineConstantIf": 1}
    DeadCodeElimination().run(model)
    ir.verify(model)
    # The branch taken: Squeeze (an Identity carries the output's name).
    assert [n.op_type for n in model.graph.nodes] == ["Reshape", "Conv", "Sigmoid", "Squeeze", "Identity"]
    same_outputs(before, model, [np.arange(6, dtype=np.float32), _i(1, 2, 3)])


def test_conv_batch_is_not_known_from_the_weight():
    before = onnx.parser.parse_model(SQUEEZE_CHANNEL.replace("int64[1] {1}", "int64[1] {0}"))
    model = prepare(SQUEEZE_CHANNEL.replace("int64[1] {1}", "int64[1] {0}"))
    assert FoldConstants().match_shape(node(model, "d")) == \
        Reject("dimensions of %p read here are not static")
    assert FoldConstants().run(model).log.by_rule() == {}
    for batch in (1, 2):
        same_outputs(before, model, [np.arange(12, dtype=np.float32), _i(batch, 2, 6 // batch)])


def _raise(*args, **kwargs):
    raise RuntimeError("inference crashed")


RECURRENT = """<ir_version: 10, opset_import: ["" : 21]>
g (float[N] x, int64[K] target, float[2, 12, 3] w, float[2, 12, 4] r) => (y, h, n) {
  a = Reshape(x, target)
  y, h = GRU<hidden_size = 4, direction = "bidirectional", layout = LAYOUT>(a, w, r)
  s = Shape(h)
  n = Size(s)
}"""


@pytest.mark.parametrize("layout, y_type, h_type", [
    (0, "float32[?,2,?,4]", "float32[2,?,4]"), (1, "float32[?,?,2,4]", "float32[?,2,4]")])
def test_recurrent_outputs_have_fixed_ranks(layout, y_type, h_type, monkeypatch):
    model = parse(RECURRENT.replace("LAYOUT", str(layout)))
    before = ir.to_proto(model)
    with monkeypatch.context() as m:
        m.setattr(onnx.shape_inference, "infer_shapes", _raise)
        InferShapes().run(model)
    types = [ir.printer.format_type(v) for v in node(model, "y").outputs]
    assert types == [y_type, h_type]
    assert FoldConstants().run(model).log.by_rule() == {"FoldShape": 1}  # Size(Shape(h)) = 3
    if layout == 0:  # onnxruntime runs no batch-first recurrent layer
        rng = np.random.default_rng(0)
        feeds = [rng.standard_normal(30).astype(np.float32), _i(5, 2, 3),
                 rng.standard_normal((2, 12, 3)).astype(np.float32), rng.standard_normal((2, 12, 4)).astype(np.float32)]
        same_outputs(before, model, feeds)


def test_recurrent_layer_without_hidden_size_is_not_typed(monkeypatch):
    model = parse(RECURRENT.replace('hidden_size = 4, ', "").replace("LAYOUT", "0"))
    with monkeypatch.context() as m:
        m.setattr(onnx.shape_inference, "infer_shapes", _raise)
        InferShapes().run(model)
    assert [ir.printer.format_type(v) for v in node(model, "y").outputs] == ["?", "?"]
    assert FoldConstants().match_shape(node(model, "n")) == Reject("shape of %s is not static")


SQUEEZES = """<ir_version: 10, opset_import: ["" : OPSET]>
g (float[N, 1, 4] x) => (b, n) {
  a = FIRST
  b = SECOND
  s = Shape(b)
  n = Size(s)
}"""


@pytest.mark.parametrize("opset, squeeze, unsqueeze", [
    (21, "Squeeze(x, one)", "Unsqueeze(a, ends)"), (11, "Squeeze<axes = [1]>(x)", "Unsqueeze<axes = [0, -1]>(a)")],
    ids=["axes-input", "axes-attribute"])
def test_squeeze_and_unsqueeze_with_constant_axes(opset, squeeze, unsqueeze, monkeypatch):
    text = SQUEEZES.replace("OPSET", str(opset)).replace("FIRST", squeeze).replace("SECOND", unsqueeze)
    text = text.replace("(float[N, 1, 4] x) => (b, n) {",
                        "(float[N, 1, 4] x) => (b, n) <int64[1] one = {1}, int64[2] ends = {0, -1}> {")
    model = parse(text)
    before = ir.to_proto(model)
    with monkeypatch.context() as m:
        m.setattr(onnx.shape_inference, "infer_shapes", _raise)
        InferShapes().run(model)
    assert [ir.printer.format_type(n.outputs[0]) for n in model.graph.nodes[:2]] == \
        ["float32[N,4]", "float32[1,N,4,1]"]
    assert FoldConstants().run(model).log.by_rule() == {"FoldShape": 1}  # Size(Shape(b)) = 4
    same_outputs(before, model, [np.ones((3, 1, 4), np.float32)])


@pytest.mark.parametrize("squeeze", ["Squeeze(x, two)", "Squeeze(x, five)", "Squeeze(x)"],
                         ids=["dim-of-size-4", "axis-out-of-range", "no-axes"])
def test_squeeze_that_fails_or_has_no_axes_is_not_typed(squeeze, monkeypatch):
    model = parse(SQUEEZES.replace("OPSET", "21").replace("FIRST", squeeze).replace("SECOND", "Relu(a)")
                  .replace("=> (b, n) {", "=> (b, n) <int64[1] two = {2}, int64[1] five = {5}> {"))
    with monkeypatch.context() as m:
        m.setattr(onnx.shape_inference, "infer_shapes", _raise)
        InferShapes().run(model)
    assert ir.printer.format_type(model.graph.nodes[0].outputs[0]) == "?"
    assert FoldConstants().match_shape(node(model, "n")) == Reject("shape of %s is not static")


# -- silero-vad -------------------------------------------------------------------------------

ONNXSCRIPT = {"silero_vad.onnx": 116, "silero_vad_half.onnx": 57, "silero_vad_16k_op15.onnx": 60}
SILERO = [p for p in find_model_files("silero_vad") if p.name in ONNXSCRIPT]


def _count(graph: ir.Graph) -> int:
    return sum(1 + sum(_count(sub) for sub in n.subgraphs()) for n in graph.nodes)


@pytest.mark.slow
@pytest.mark.skipif(not SILERO, reason="silero-vad not installed: pip install --no-deps silero-vad")
@pytest.mark.parametrize("path", SILERO, ids=[p.name for p in SILERO])
def test_silero_optimizes_below_onnxscript_without_trusting_declared_types(path):
    import compiler

    proto = onnx.load(str(path))
    stripped = onnx.ModelProto()
    stripped.CopyFrom(proto)
    _strip_declarations(stripped.graph, top=True)
    counts = []
    for model in (proto, stripped):
        result = compiler.compile(model, verify=False)
        counts.append(_count(result.ir_model.graph))
        assert result.report.rewrites_by_rule()["InfeasibleBranch"] == (2 if path.name == "silero_vad.onnx" else 1)
        for feeds in realistic_feeds(path, seed=0):
            got = run_ort(ir.to_proto(result.ir_model), list(feeds.values()))
            assert matches(got, run_ort(proto, list(feeds.values())), rtol=1e-3, atol=1e-4) is None
    # onnxscript needs the declared types (116, 57, 60 with them; 182, 90, 93 without).
    assert counts[0] == counts[1] < ONNXSCRIPT[path.name]


def _strip_declarations(graph: onnx.GraphProto, top: bool) -> None:
    """No value_info, no shapes on branch outputs: every type inside comes from inference."""
    del graph.value_info[:]
    if not top:
        for o in graph.output:
            o.type.tensor_type.ClearField("shape")
    for n in graph.node:
        for a in n.attribute:
            for sub in [a.g] if a.HasField("g") else list(a.graphs):
                _strip_declarations(sub, top=False)
