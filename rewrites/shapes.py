"""Shape inference: learn the dtype and shape of every value we can.

onnx's own inference runs first, on a light copy of the model (`ir.skeleton_proto`: every big
tensor, in any graph or Constant, is dtype and dims only, so a model of many GB costs only its
structure); what it leaves unknown is filled by a few local rules (elementwise, Cast,
broadcasting, Shape/Size, Squeeze/Unsqueeze with constant axes, If/Loop/Scan outputs from
their bodies' outputs, and what the weights alone tell: a Conv's rank and channels, an
LSTM/GRU/RNN's output ranks). Types only
ever gain information: unknown < symbolic < fixed, so running the pass twice changes nothing
the second time.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import onnx
from onnx import TensorProto

import ir
from ir import Graph, Model, Node, Value

from .base import ChangeLog, Pass, PassResult, Rewriter
from .patterns import attr, const, default_opset

# Tensors of this many bytes or more reach onnx's inference as dtype and dims only (small
# ones stay, so data propagation can read shape arithmetic).
SKELETON_THRESHOLD = 1024

# Output 0 has the dtype and shape of input 0.
SAME_AS_INPUT = frozenset("""
    Abs Acos Acosh Asin Asinh Atan Atanh BatchNormalization Celu Ceil Clip Cos Cosh Dropout
    Elu Erf Exp Floor Gelu HardSigmoid HardSwish Hardmax Identity InstanceNormalization LRN
    LayerNormalization LeakyRelu Log LogSoftmax MeanVarianceNormalization Mish Neg Not
    Reciprocal Relu Round Selu Shrink Sigmoid Sign Sin Sinh Softmax Softplus Softsign Sqrt
    Tan Tanh ThresholdedRelu""".split())

# Multidirectional broadcasting; the dtype is that of the first data input (Pow's exponent
# may have another type).
BROADCAST = frozenset("""
    Add Sub Mul Div Pow Max Min Mean Sum Mod PRelu BitShift BitwiseAnd BitwiseOr BitwiseXor
    Where""".split())
COMPARE = frozenset("Equal Less Greater LessOrEqual GreaterOrEqual And Or Xor".split())


@dataclasses.dataclass
class InferShapes(Pass):
    """Fill in value types: onnx's shape inference (with data propagation), then our own
    rules where it gave up. Never fails the compile: if onnx raises, ours run alone."""

    name = "infer-shapes"

    def run(self, model: Model) -> PassResult:
        log = ChangeLog()
        rw = Rewriter(model, log, "onnx-inference")
        changed = False
        inferred = onnx_types(model)
        # The model's outputs are its signature: fill in unknowns, keep declared symbols.
        signature = {id(v) for v in model.graph.outputs}
        for value in _typable(model.graph):
            t = inferred.get(value.name)
            if t is not None:
                changed |= _refine(rw, value, *t, keep_symbols=id(value) in signature)
        rw.rule = "local-inference"
        opset = default_opset(model.opset_imports)
        for node in _bodies_first(model.graph):
            for value, t in zip(node.outputs, _local_types(node, opset)):
                if value is not None and t is not None:
                    changed |= _refine(rw, value, *t, keep_symbols=id(value) in signature)
        return PassResult(changed, log)


# -- onnx's inference -------------------------------------------------------------------


def onnx_types(model: Model, input_shapes: dict[str, tuple[int, ...]] | None = None
               ) -> dict[str, tuple[int | None, tuple | None]]:
    """Name -> (dtype, shape) of every tensor value onnx's inference typed; {} if it raised.
    `input_shapes` binds graph inputs to concrete shapes first (the model is not changed)."""
    try:
        light = ir.skeleton_proto(model, threshold=SKELETON_THRESHOLD)
        if input_shapes:  # types declared for symbolic inputs would conflict with the bound ones
            del light.graph.value_info[:]
            for vi in light.graph.output:
                vi.type.tensor_type.ClearField("shape")
        for vi in light.graph.input:
            if vi.name in (input_shapes or {}):
                vi.type.tensor_type.shape.Clear()
                for n in input_shapes[vi.name]:
                    vi.type.tensor_type.shape.dim.add().dim_value = int(n)
        proto = onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False,
                                                  data_prop=True)
    except Exception:  # noqa: BLE001 - inference is a help, never a reason to fail
        return {}
    found: dict[str, tuple] = {}
    _collect(proto.graph, found)
    return found


def _collect(gp: onnx.GraphProto, found: dict) -> None:
    for vi in list(gp.input) + list(gp.value_info) + list(gp.output):
        if vi.type.WhichOneof("value") == "tensor_type":
            tt = vi.type.tensor_type
            shape = tuple(_dim(d) for d in tt.shape.dim) if tt.HasField("shape") else None
            found[vi.name] = (tt.elem_type or None, shape)
    for node in gp.node:
        for a in node.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                _collect(sub, found)


def _dim(d) -> int | str | None:
    if d.HasField("dim_value"):
        return d.dim_value
    return d.dim_param or None


def _typable(graph: Graph) -> Iterator[Value]:
    """Values whose type inference may set: node outputs and subgraph inputs. The main
    graph's inputs and initializers are the model's own declarations."""
    for node in graph.walk():
        yield from (v for v in node.outputs if v is not None)
        for sub in node.subgraphs():
            yield from sub.inputs


# -- merging ------------------------------------------------------------------------------


def _refine(rw: Rewriter, value: Value, dtype: int | None, shape: tuple | None, *,
            keep_symbols: bool = False) -> bool:
    """Set what inference learnt where it adds information; never overwrite a fixed fact
    (nor, with `keep_symbols`, a symbolic dimension)."""
    if value.type is not None:  # sequences, maps, optionals: kept as the model gave them
        return False
    new_dtype = value.dtype if value.dtype is not None else dtype
    if value.shape is None:
        new_shape = shape
    elif shape is None or len(shape) != len(value.shape):
        new_shape = value.shape
    else:
        new_shape = tuple(a if keep_symbols and a is not None else _better(a, b)
                          for a, b in zip(value.shape, shape))
    if new_dtype == value.dtype and new_shape == value.shape:
        return False
    rw.set_type(value, new_dtype, new_shape)
    return True


def _better(ours, theirs):
    """unknown < symbolic < fixed: keep ours unless theirs says more."""
    if isinstance(ours, int):
        return ours
    if isinstance(theirs, int):
        return theirs
    return ours if ours is not None else theirs


# -- our own rules ----------------------------------------------------------------------------


def _bodies_first(graph: Graph) -> Iterator[Node]:
    """Every node in topological order, a node's bodies before the node: an If's type is
    read from its branches' outputs, so those are typed first."""
    for node in graph.nodes:
        for sub in node.subgraphs():
            yield from _bodies_first(sub)
        yield node


def _local_types(node: Node, opset: int = 21) -> list[tuple[int | None, tuple | None] | None]:
    """(dtype, shape) per output for the simple ops, where the inputs' types tell."""
    if node.domain not in ("", "ai.onnx"):
        return []
    op, ins = node.op_type, node.inputs
    if op == "If":
        return _if_types(node)
    if op == "Loop":
        return _loop_types(node)
    if op == "Scan" and opset >= 9:  # Scan-8 has another layout (batch axis, sequence_lens)
        return _scan_types(node)
    if op == "Constant" and (t := node.outputs[0].const) is not None:
        return [(t.dtype, t.shape)]
    x = ins[0] if ins else None
    if x is None or x.type is not None:
        return []
    if op == "Shape":
        dims = shape_dims(node)
        return [(TensorProto.INT64, None if dims is None else (len(dims),))]
    if op == "Size":
        return [(TensorProto.INT64, ())]
    if op in SAME_AS_INPUT:  # output 0 only (Dropout's mask type depends on the opset)
        return [(x.dtype, x.shape)]
    if op in ("Squeeze", "Unsqueeze"):
        return _squeeze_types(node)
    if op in ("Conv", "ConvTranspose"):
        return _conv_types(node)
    if op in RNNS:
        return _rnn_types(node)
    if op == "Cast":
        return [(attr(node, "to"), x.shape)]
    if op == "CastLike" and len(ins) > 1 and ins[1] is not None:
        return [(ins[1].dtype, x.shape)]
    if op in BROADCAST or op in COMPARE:
        present = [v for v in ins if v is not None]
        data = present[1:] if op == "Where" else present
        dtype = TensorProto.BOOL if op in COMPARE else (data[0].dtype if data else None)
        return [(dtype, broadcast([v.shape for v in present]))]
    return []


RNNS = ("LSTM", "GRU", "RNN")


def _squeeze_types(node: Node) -> list:
    """Squeeze and Unsqueeze with constant axes (an attribute before opset 13, an input
    since): the input's dims without, or with, those axes."""
    x = node.inputs[0]
    a = node.attributes.get("axes")
    if a is not None:
        axes = None if a.ref_attr_name else [int(i) for i in a.value]
    else:
        data = const(node.inputs[1]) if len(node.inputs) > 1 else None
        axes = None if data is None else [int(i) for i in data.ravel()]
    if not axes or x.shape is None:
        return []
    shape = list(x.shape)
    rank = len(shape) + (len(axes) if node.op_type == "Unsqueeze" else 0)
    if any(not -rank <= i < rank for i in axes) or len({i % rank for i in axes}) != len(axes):
        return []  # the node fails
    axes = {i % rank for i in axes}
    if node.op_type == "Squeeze":
        if any(isinstance(shape[i], int) and shape[i] != 1 for i in axes):
            return []  # squeezes a dim that is not 1: the node fails
        return [(x.dtype, tuple(d for i, d in enumerate(shape) if i not in axes))]
    dims = iter(shape)
    return [(x.dtype, tuple(1 if i in axes else next(dims) for i in range(rank)))]


def _conv_types(node: Node) -> list:
    """Conv and ConvTranspose: the output has the weight's rank (the input must have it too)
    and its channels come from the weight (M for Conv, C/group x group for ConvTranspose),
    whatever is known of the input; the batch is the input's."""
    x, w = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
    if w is None or w.type is not None or w.shape is None or len(w.shape) < 3:
        return []
    rank = len(w.shape)
    if node.op_type == "Conv":
        channels = w.shape[0]
    else:
        group = attr(node, "group", 1)
        channels = w.shape[1] * group if isinstance(w.shape[1], int) and isinstance(group, int) else None
    batch = x.shape[0] if x.shape is not None and len(x.shape) == rank else None
    return [(x.dtype if x.dtype is not None else w.dtype, (batch, channels) + (None,) * (rank - 2))]


def _rnn_types(node: Node) -> list:
    """LSTM, GRU, RNN: Y, Y_h (and LSTM's Y_c) have fixed ranks whatever the input is (X
    must be 3-D), with num_directions and hidden_size from the attributes."""
    hidden, layout = attr(node, "hidden_size"), attr(node, "layout", 0)
    if not isinstance(hidden, int) or layout not in (0, 1):
        return []
    dirs = 2 if attr(node, "direction", "forward") == "bidirectional" else 1
    x = node.inputs[0]
    seq = batch = None
    if x.shape is not None and len(x.shape) == 3:
        seq, batch = (x.shape[0], x.shape[1]) if layout == 0 else (x.shape[1], x.shape[0])
    if layout == 0:
        y, state = (seq, dirs, batch, hidden), (dirs, batch, hidden)
    else:
        y, state = (batch, seq, dirs, hidden), (batch, dirs, hidden)
    w = node.inputs[1] if len(node.inputs) > 1 else None
    dtype = x.dtype if x.dtype is not None or w is None else w.dtype
    return [(dtype, y)] + [(dtype, state)] * (len(node.outputs) - 1)


def shape_dims(shape_node: Node) -> list | None:
    """The dims a Shape node returns (its start/end applied), or None for unknown rank."""
    shape = shape_node.inputs[0].shape
    if shape is None:
        return None
    rank = len(shape)
    start, end = attr(shape_node, "start", 0), attr(shape_node, "end", rank)
    start, end = (min(max(k + rank if k < 0 else k, 0), rank) for k in (start, end))
    return list(shape[start:end])


# -- control flow: outputs from the bodies' outputs ---------------------------------------------


def merge(types: list[tuple]) -> tuple | None:
    """The type of a value that may come from any of `types` ((dtype, shape) pairs): the
    dtype they agree on; if the ranks agree, each dim where all agree, else an unknown dim;
    different or unknown ranks give an unknown shape. None for a non-tensor."""
    if any(t is None for t in types):
        return None
    dtypes = {d for d, _ in types if d is not None}  # ONNX makes them equal: take the known one
    shapes = [s for _, s in types]
    shape = None
    if all(s is not None for s in shapes) and len({len(s) for s in shapes}) == 1:
        shape = tuple(dims[0] if all(d == dims[0] for d in dims) else None for dims in zip(*shapes))
    return (dtypes.pop() if len(dtypes) == 1 else None, shape)


def _type(v: Value | None) -> tuple | None:
    return None if v is None or v.type is not None else (v.dtype, v.shape)


def _if_types(node: Node) -> list:
    then, other = attr(node, "then_branch"), attr(node, "else_branch")
    if not isinstance(then, Graph) or not isinstance(other, Graph) or \
            not len(then.outputs) == len(other.outputs) == len(node.outputs):
        return []
    return [merge([_type(a), _type(b)]) for a, b in zip(then.outputs, other.outputs)]


def _loop_types(node: Node) -> list:
    """Loop-carried values: the initial value or the body's output (zero or more
    iterations); scan outputs: the body's output stacked along a new first axis."""
    body = attr(node, "body")
    carried = len(node.inputs) - 2
    if not isinstance(body, Graph) or carried < 0 or len(body.outputs) != 1 + len(node.outputs):
        return []
    types = [merge([_type(init), _type(out)])
             for init, out in zip(node.inputs[2:], body.outputs[1:1 + carried])]
    return types + [_stacked(_type(out), 0, None) for out in body.outputs[1 + carried:]]


def _scan_types(node: Node) -> list:
    """Scan (opset 9+): state like Loop's carried values; scan outputs stack the body's
    output along their scan axis, as long as the scan inputs."""
    body, scans = attr(node, "body"), attr(node, "num_scan_inputs")
    states = len(node.inputs) - (scans or 0)
    if not isinstance(body, Graph) or not scans or states < 0 or len(body.outputs) != len(node.outputs):
        return []
    types = [merge([_type(init), _type(out)])
             for init, out in zip(node.inputs[:states], body.outputs[:states])]
    first = node.inputs[states]
    length = None
    if first is not None and first.shape:
        axis = (attr(node, "scan_input_axes") or [0])[0]
        if -len(first.shape) <= axis < len(first.shape):
            length = first.shape[axis]
    axes = attr(node, "scan_output_axes") or []
    for k, out in enumerate(body.outputs[states:]):
        types.append(_stacked(_type(out), axes[k] if k < len(axes) else 0, length))
    return types


def _stacked(t: tuple | None, axis: int, length) -> tuple | None:
    """The type of per-iteration values `t` stacked along `axis`."""
    if t is None:
        return None
    dtype, shape = t
    if shape is None:
        return (dtype, None)
    axis = axis + len(shape) + 1 if axis < 0 else axis
    if not 0 <= axis <= len(shape):
        return (dtype, None)
    return (dtype, shape[:axis] + (length,) + shape[axis:])


def broadcast(shapes: list) -> tuple | None:
    """ONNX multidirectional broadcasting of static or symbolic shapes (None if unknown)."""
    if not shapes or any(s is None for s in shapes):
        return None
    rank = max(len(s) for s in shapes)
    padded = [(1,) * (rank - len(s)) + tuple(s) for s in shapes]
    return tuple(_broadcast_dim([s[i] for s in padded]) for i in range(rank))


def _broadcast_dim(dims: list):
    rest = [d for d in dims if d != 1]
    if not rest:
        return 1
    fixed = {d for d in rest if isinstance(d, int)}
    if fixed:  # the others must be 1 or equal to it
        return fixed.pop() if len(fixed) == 1 else None
    # Only symbols and unknowns: the same symbol everywhere, or we cannot tell.
    return rest[0] if all(d == rest[0] for d in rest) and rest[0] is not None else None


def bound_shapes(model: Model, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Name -> fully known shape of the main graph's tensors when the inputs have these shapes."""
    return {name: shape for name, (_, shape) in onnx_types(model, input_shapes).items()
            if shape is not None and all(isinstance(d, int) for d in shape)}
