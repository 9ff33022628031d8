"""Small, pure helpers that rules use to match: constants, attributes, single use."""

from __future__ import annotations

from typing import Any

import numpy as np

from ir import CompileError, Graph, Model, Node, Value

# Two runs of these may give different results: never folded, never merged. Dropout is
# random in training mode (a true `training_mode` input, or is_test=0 before opset 7);
# in inference mode it is an Identity, which the RemoveDropout rule takes out.
NONDETERMINISTIC = frozenset("""RandomNormal RandomNormalLike RandomUniform RandomUniformLike
    Multinomial Bernoulli Dropout""".split())


def default_opset(opset_imports: dict[str, int]) -> int:
    """The default-domain (ai.onnx) opset version. A model that imports none is not valid
    ONNX, but onnxruntime runs it at its newest opset: assume a recent one (21), not opset 1,
    whose ops mean other things (folding would compute other numbers than the model's)."""
    return opset_imports.get("", opset_imports.get("ai.onnx", 21))


def const(v: Value | None) -> np.ndarray | None:
    """The value's constant data as an array, or None (not constant, or omitted)."""
    if v is None:
        return None
    tensor = v.const
    return None if tensor is None else tensor.numpy()


def is_const(v: Value | None) -> bool:
    return v is not None and v.const is not None


def attr(node: Node, name: str, default: Any = None) -> Any:
    """An attribute's Python value (bytes decoded to str), or `default` when absent."""
    a = node.attributes.get(name)
    if a is None or a.ref_attr_name:
        return default
    return a.value.decode() if isinstance(a.value, bytes) else a.value


def producer(v: Value | None, op_type: str | None = None) -> Node | None:
    """The node producing `v` (optionally only if it is an `op_type` of the default domain)."""
    if v is None or v.producer is None:
        return None
    node = v.producer
    if op_type is not None and (node.op_type != op_type or node.domain not in ("", "ai.onnx")):
        return None
    return node


def is_output(v: Value) -> bool:
    """Whether `v` is an output of the graph that defines it or of any body inside it."""
    node = v.producer
    if node is None or node.graph is None:
        return False
    return any(o is v for g in _graph_and_bodies(node.graph) for o in g.outputs)


def output_ids(graph: Graph) -> set[int]:
    """Ids of the outputs of every graph in the tree `graph` belongs to (a body may return an
    outer value). `Rewriter.graph_output_ids` is the same for a whole model, cached."""
    while graph.owner is not None and graph.owner.graph is not None:
        graph = graph.owner.graph
    return {id(o) for g in _graph_and_bodies(graph) for o in g.outputs}


def only_reader(v: Value, node: Node) -> bool:
    """`node` is the single reader of `v` and `v` is not a graph output: a rewrite may
    consume `v`'s producer without anyone else noticing."""
    return len(v.uses) == 1 and v.uses[0][0] is node and not is_output(v)


def static_shape(v: Value | None) -> tuple[int, ...] | None:
    """The value's shape when every dimension is a known integer."""
    if v is None or v.shape is None or not all(isinstance(d, int) for d in v.shape):
        return None
    return tuple(v.shape)


def unpadded(node: Node) -> bool:
    """A Conv-like node that pads nothing: no `pads` (or all zero), auto_pad NOTSET or VALID."""
    return attr(node, "auto_pad", "NOTSET") in ("NOTSET", "VALID") and not any(attr(node, "pads", None) or ())


def is_scalar(v: Value | None, target: float) -> bool:
    """A one-element float constant equal to `target` up to its dtype's rounding (exporters
    often print constants with 7 digits)."""
    c = const(v)
    if c is None or c.size != 1 or c.dtype.kind != "f":
        return False
    rtol = 1e-5 if c.dtype.itemsize >= 4 else 4e-3
    return abs(float(c.ravel()[0]) - target) <= rtol * abs(target)


def sole_producer(v: Value | None, op_type: str, reader: Node) -> Node | None:
    """The `op_type` node producing `v`, when `reader` is the only reader of `v`."""
    node = producer(v, op_type)
    return node if node is not None and only_reader(v, reader) else None


def other_operand(node: Node, target: float) -> Value | None:
    """For a binary node with a constant `target` operand, the other operand."""
    a, b = node.inputs
    return b if is_scalar(a, target) else a if is_scalar(b, target) else None


def check_exclude(model: Model, exclude, where: str, op_types=()) -> None:
    """An exclusion that matches no node name or op type of the main graph (nor one of
    `op_types`) is a typo: the user believes a layer is kept."""
    known = {n.name for n in model.graph.nodes} | {n.op_type for n in model.graph.nodes} | set(op_types)
    for entry in exclude:
        if entry not in known:
            raise CompileError(f"{where}: exclude '{entry}' is neither a node name nor an op type of the model")


def _graph_and_bodies(graph: Graph):
    yield graph
    for node in graph.nodes:
        for sub in node.subgraphs():
            yield from _graph_and_bodies(sub)
