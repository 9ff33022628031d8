"""Channel spaces (rewrites/channels.py): which tensors must lose the same channels.

Each grouping rule on a hand-built graph: the spaces found (size, producers, consumers, why
pinned, named by the output they come from) and, where channels move, the feature map a
consumer sees (`channel_of_feature`). Pruning these graphs is tested in
test_prune_channels.py."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper, parser

import ir
from rewrites.channels import analyze, channel_spaces
from rewrites.shapes import InferShapes

OPSET17 = '<ir_version: 10, opset_import: ["" : 17]>\n'


def model(text: str, seed: int = 0) -> ir.Model:
    """A model from ONNX text whose graph inputs not named x... become random float weights
    (positive ones for names starting with v: variances and scales), shapes inferred."""
    proto = parser.parse_model(text)
    proto.ir_version = 10
    rng = np.random.default_rng(seed)
    graph, keep = proto.graph, []
    for vi in graph.input:
        if vi.name.startswith("x"):
            keep.append(vi)
            continue
        shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        data = rng.uniform(0.5, 1.5, shape) if vi.name.startswith("v") else rng.normal(0, 0.5, shape)
        graph.initializer.append(numpy_helper.from_array(data.astype(np.float32), vi.name))
    del graph.input[:]
    graph.input.extend(keep)
    m = ir.load(proto)
    InferShapes().run(m)
    return m


def summary(spaces) -> dict:
    """key -> (size, producers, consumers, pinned), nodes named by their first output."""
    return {s.key: (s.size, sorted(p.node.outputs[0].name for p in s.producers),
                    sorted(c.node.outputs[0].name for c in s.consumers), s.pinned) for s in spaces}


def space(spaces, key: str):
    return next(s for s in spaces if s.key == key)


def features(space, consumer_output: str) -> list[int]:
    c = next(c for c in space.consumers if c.node.outputs[0].name == consumer_output)
    return c.channel_of_feature.tolist()


CHAIN = OPSET17 + """g (float[1,8,6,6] x, float[16,8,1,1] w1, float[16] b1, float[24,16,3,3] w2)
    => (float[1,24,6,6] y) {
  h = Conv(x, w1, b1)
  r = Relu(h)
  y = Conv<pads=[1,1,1,1]>(r, w2)
}"""


def test_conv_opens_a_space_its_reader_consumes():
    spaces = channel_spaces(model(CHAIN))
    assert summary(spaces) == {
        "x": (8, [], ["h"], "channels come from graph input %x"),
        "h": (16, ["h"], ["y"], None),
        "y": (24, ["y"], [], "graph output %y"),
    }
    h = space(spaces, "h")
    assert h.tensors == ["h", "r"]
    consumer = h.consumers[0]
    assert consumer.layout.kind == "conv" and consumer.layout.kernel == (3, 3)
    assert consumer.layout.pads == (1, 1, 1, 1)
    assert consumer.channel_of_feature.tolist() == np.repeat(np.arange(16), 9).tolist()  # (c, k) order


RESIDUAL = OPSET17 + """g (float[1,8,6,6] x, float[16,8,1,1] w1, float[16,16,3,3] w2, float[16,16,1,1] w3,
     float[8,16,1,1] w4) => (float[1,8,6,6] y) {
  a = Conv(x, w1)
  ra = Relu(a)
  b = Conv<pads=[1,1,1,1]>(ra, w2)
  s = Add(a, b)
  c = Conv(s, w3)
  t = Add(c, s)
  y = Conv(t, w4)
}"""


def test_residual_adds_join_their_inputs_spaces():
    spaces = channel_spaces(model(RESIDUAL))
    assert summary(spaces)["a"] == (16, ["a", "b", "c"], ["b", "c", "y"], None)
    assert space(spaces, "a").tensors == ["a", "ra", "b", "s", "c", "t"]
    assert len(spaces) == 3  # x, the joined space, y


SQUEEZE_EXCITE = OPSET17 + """g (float[1,8,6,6] x, float[32,8,1,1] w1, float[8,32,1,1] wr, float[8] br,
     float[32,8,1,1] we, float[32] be, float[16,32,1,1] w2) => (float[1,16,6,6] y) {
  c = Conv(x, w1)
  h = HardSwish(c)
  p = GlobalAveragePool(h)
  r = Conv(p, wr, br)
  rr = Relu(r)
  e = Conv(rr, we, be)
  gate = HardSigmoid<alpha=0.16666667, beta=0.5>(e)
  g = Mul(h, gate)
  y = Conv(g, w2)
}"""


def test_gating_mul_joins_the_squeeze_excite_branch():
    spaces = channel_spaces(model(SQUEEZE_EXCITE))
    got = summary(spaces)
    assert got["c"] == (32, ["c", "e"], ["r", "y"], None)  # [1,32,1,1] gate: same channels
    assert got["r"] == (8, ["r"], ["e"], None)


CONCAT = OPSET17 + """g (float[1,8,6,6] x, float[16,8,1,1] wa, float[8,8,1,1] wb, float[4,24,1,1] wc)
    => (float[1,4,6,6] y) {
  a = Conv(x, wa)
  b = Conv(x, wb)
  ra = Relu(a)
  cat = Concat<axis=1>(ra, b)
  y = Conv(cat, wc)
}"""


def test_concat_places_each_space_at_its_offset():
    spaces = channel_spaces(model(CONCAT))
    assert summary(spaces)["a"] == (16, ["a"], ["y"], None)
    assert summary(spaces)["b"] == (8, ["b"], ["y"], None)
    assert features(space(spaces, "a"), "y") == list(range(16)) + [-1] * 8
    assert features(space(spaces, "b"), "y") == [-1] * 16 + list(range(8))
    assert "cat" in space(spaces, "a").tensors and "cat" in space(spaces, "b").tensors


DEPTHWISE = OPSET17 + """g (float[1,8,6,6] x, float[16,8,1,1] w1, float[16] b1, float[KC,1,3,3] wd, float[KC] bd,
     float[8,KC,1,1] w3) => (float[1,8,6,6] y) {
  a = Conv(x, w1, b1)
  d = Conv<group=16, pads=[1,1,1,1]>(a, wd, bd)
  r = Relu(d)
  y = Conv(r, w3)
}"""


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_conv_carries_its_input_channels(multiplier):
    m = model(DEPTHWISE.replace("KC", str(16 * multiplier)))
    analysis = analyze(m)
    got = summary(analysis.spaces)
    assert got["a"] == (16, ["a"], ["y"], None)
    assert set(got) == {"x", "a", "y"}  # the depthwise conv opens no space of its own
    assert features(space(analysis.spaces, "a"), "y") == np.repeat(np.arange(16), multiplier).tolist()
    depthwise = m.graph.nodes[1]
    assert analysis.roles[id(depthwise)][1] == "depthwise"


def test_grouped_conv_pins_both_sides():
    m = model(OPSET17 + """g (float[1,8,6,6] x, float[16,8,1,1] w1, float[16,4,1,1] wg, float[8,16,1,1] w3)
        => (float[1,8,6,6] y) {
      a = Conv(x, w1)
      b = Conv<group=4>(a, wg)
      y = Conv(b, w3)
    }""")
    got = summary(channel_spaces(m))
    assert got["a"][3] == got["b"][3] == "grouped Conv 'Conv__2' (group 4)"


FLATTEN = OPSET17 + """g (float[N,8,6,6] x, float[16,8,3,3] w1, float[10,64] wf, float[10] bf) => (float[N,10] y) {
  a = Conv<strides=[3,3]>(x, w1)
  r = Relu(a)
  f = FLATTEN
  y = Gemm<transB=1>(f, wf, bf)
}"""


@pytest.mark.parametrize("flatten", ["Flatten<axis=1>(r)", "Reshape(r, shape)", "Reshape(r, shape0)"])
def test_flatten_into_gemm_widens_each_channel_to_its_positions(flatten):
    text = FLATTEN.replace("FLATTEN", flatten).replace(
        "=> (float[N,10] y) {", "=> (float[N,10] y) <int64[2] shape = {0, -1}, int64[2] shape0 = {-1, 64}> {")
    spaces = channel_spaces(model(text))
    a = space(spaces, "a")
    assert a.pinned is None and a.size == 16
    assert features(a, "y") == np.repeat(np.arange(16), 4).tolist()  # [16, 2, 2] -> 64 rows
    assert a.consumers[0].layout.kind == "rows"


def test_flatten_of_unknown_spatial_size_pins():
    text = FLATTEN.replace("FLATTEN", "Flatten<axis=1>(r)").replace("float[N,8,6,6] x", "float[N,8,H,W] x")
    got = summary(channel_spaces(model(text)))
    assert got["a"][3] == "read by Flatten 'Flatten__1'"


SPLIT = OPSET17 + """g (float[1,8,6,6] x, float[32,8,1,1] w1, float[8,8,1,1] wp, float[8,24,1,1] wq) => (float[1,8,6,6] y)
    <int64[2] sizes = {8, 24}> {
  a = Conv(x, w1)
  p, q = Split<axis=1>(a, sizes)
  cp = Conv(p, wp)
  cq = Conv(q, wq)
  y = Add(cp, cq)
}"""


def test_split_cuts_its_input_into_spaces_of_their_own():
    spaces = channel_spaces(model(SPLIT))
    got = summary(spaces)
    assert got["a[0:8]"] == (8, ["a"], ["cp"], None)
    assert got["a[8:32]"] == (24, ["a"], ["cq"], None)
    assert [p.offset for p in space(spaces, "a[8:32]").producers] == [0 + 8]
    assert got["cp"][1] == ["cp", "cq"]  # the Add joins the two branches' outputs


def test_slice_on_channels_cuts_like_a_split():
    m = model(OPSET17 + """g (float[1,8,6,6] x, float[32,8,1,1] w1, float[8,16,1,1] w2) => (float[1,8,6,6] y)
        <int64[1] s = {8}, int64[1] e = {24}, int64[1] ax = {1}> {
      a = Conv(x, w1)
      m = Slice(a, s, e, ax)
      y = Conv(m, w2)
    }""")
    got = summary(channel_spaces(m))
    assert got["a[8:24]"] == (16, ["a"], ["y"], None)
    assert got["a[0:8]"] == (8, ["a"], [], None)  # computed, never read: still prunable
    assert got["a[24:32]"] == (8, ["a"], [], None)


def test_add_of_differently_laid_out_channels_cuts_the_other_side():
    m = model(OPSET17 + """g (float[1,8,6,6] x, float[16,8,1,1] wa, float[8,8,1,1] wb, float[24,8,1,1] wc,
         float[8,24,1,1] wy) => (float[1,8,6,6] y) {
      a = Conv(x, wa)
      b = Conv(x, wb)
      cat = Concat<axis=1>(a, b)
      c = Conv(x, wc)
      s = Add(cat, c)
      y = Conv(s, wy)
    }""")
    got = summary(channel_spaces(m))
    assert got["a"] == (16, ["a", "c"], ["y"], None)
    assert got["b"] == (8, ["b", "c"], ["y"], None)


PASS_THROUGH = OPSET17 + """g (float[1,8,6,6] x, float[16,8,3,3] w1, float[16] vs, float[16] bb, float[16] mm,
     float[16] vv, float[16,1,1] k, float[16,1,1] slope, float[8,16,1,1] w2) => (float[1,8,3,3] y)
    <float half = {0.5}> {
  a = Conv<pads=[1,1,1,1]>(x, w1)
  n = BatchNormalization(a, vs, bb, mm, vv)
  m = Mul(n, k)
  h = Add(m, half)
  p = PRelu(h, slope)
  q = MaxPool<kernel_shape=[2,2], strides=[2,2]>(p)
  u = ReduceMean<axes=[2, 3], keepdims=1>(q)
  v = Sub(q, u)
  y = Conv(v, w2)
}"""


def test_batchnorm_per_channel_constants_pooling_and_spatial_reductions_pass_channels():
    analysis = analyze(model(PASS_THROUGH))
    got = summary(analysis.spaces)
    assert got["a"] == (16, ["a"], ["y"], None)
    assert space(analysis.spaces, "a").tensors == ["a", "n", "m", "h", "p", "q", "u", "v"]
    roles = {node.outputs[0].name: kind for node, kind, _ in analysis.roles.values()}
    assert roles["n"] == "norm" and roles["m"] == roles["p"] == "elementwise"


MLP = OPSET17 + """g (float[2,5,16] x, float[16,32] w1, float[32] b1, float[32,16] w2) => (float[2,5,16] y) {
  h = MatMul(x, w1)
  hb = Add(h, b1)
  s = Sigmoid(hb)
  g = Mul(hb, s)
  y = MatMul(g, w2)
}"""


def test_matmul_hidden_channels_are_a_space_on_the_last_axis():
    spaces = channel_spaces(model(MLP))
    got = summary(spaces)
    assert got["h"] == (32, ["h"], ["y"], None)
    assert got["x"][3] == "channels come from graph input %x"
    assert space(spaces, "h").consumers[0].layout.kind == "rows"


def test_squeeze_and_transpose_move_the_channel_axis():
    m = model(OPSET17 + """g (float[1,8,1,10] x, float[24,8,1,1] w1, float[24,6] wm) => (float[1,10,6] y)
        <int64[1] ax = {2}> {
      a = Conv(x, w1)
      s = Squeeze(a, ax)
      t = Transpose<perm=[0, 2, 1]>(s)
      y = MatMul(t, wm)
    }""")
    assert summary(channel_spaces(m))["a"] == (24, ["a"], ["y"], None)


PINS = {
    "graph output": ("""r = Relu(a)
      y = Conv(r, w2)""", "r", "graph output %r"),
    "unknown op": ("""r = Relu(a)
      t = Mystery(r)
      y = Conv(t, w2)""", "y", "read by Mystery 'Mystery__1'"),
    "softmax over channels": ("""r = Softmax<axis=1>(a)
      y = Conv(r, w2)""", "y", "read by Softmax 'Softmax__1'"),
    "reduce over channels": ("""r = ReduceMean<axes=[1]>(a)
      z = Mul(a, r)
      y = Conv(z, w2)""", "y", "read by ReduceMean 'ReduceMean__1'"),
    "shape read": ("""s = Shape(a)
      y = Conv(a, w2)""", "y", "read by Shape 'Shape__1'"),
    "read as a weight": ("""y = Conv(a, w2)
      z = MatMul(x, a)""", "y", "read by MatMul 'MatMul__1'"),
}


@pytest.mark.parametrize("case", sorted(PINS))
def test_pins(case):
    body, outputs, reason = PINS[case]
    m = model(OPSET17 + f"""g (float[1,8,6,6] x, float[16,8,1,1] w1, float[8,16,1,1] w2)
        => (float[1,8,6,6] y{", float[1,16,6,6] r" if outputs == "r" else ""}) {{
      a = Conv(x, w1)
      {body}
    }}""")
    got = summary(channel_spaces(m))
    assert got["a"][3] == reason


def test_capture_by_a_subgraph_pins():
    m = model(OPSET17 + """g (float[1,8,6,6] x, bool xc, float[16,8,1,1] w1, float[8,16,1,1] w2) => (float[1,8,6,6] y) {
      a = Conv(x, w1)
      r = Relu(a)
      y = Conv(r, w2)
      z = If(xc) <then_branch = t () => (float[1,16,6,6] o) { o = Relu(r) },
                  else_branch = e () => (float[1,16,6,6] o2) { o2 = Neg(r) }>
    }""".replace("=> (float[1,8,6,6] y)", "=> (float[1,8,6,6] y, float[1,16,6,6] z)"))
    got = summary(channel_spaces(m))
    assert got["a"][3].startswith("read inside the body of 'If")


def test_non_constant_weight_opens_no_space():
    m = model(OPSET17 + """g (float[1,8,6,6] x, float[16,8,1,1] xw, float[8,16,1,1] w2) => (float[1,8,6,6] y) {
      a = Conv(x, xw)
      y = Conv(a, w2)
    }""")
    got = summary(channel_spaces(m))
    assert got["a"] == (16, [], ["y"], "channels come from Conv 'Conv__1'")
