"""Common subexpression elimination: equal constants become one, and nodes computing the
same op on the same values with the same attributes become one. One hashed sweep per graph
(subgraphs and function bodies included), so the cost grows with the graph, not its square.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from onnx import TensorProto

from ir import Graph, Model, Node, Tensor, Value

from .base import ChangeLog, Pass, PassResult, Rewriter
from .patterns import NONDETERMINISTIC

# Ops of other domains (custom ops, model-local functions) may have effects we cannot see.
STANDARD_DOMAINS = {"", "ai.onnx", "ai.onnx.ml"}


@dataclass
class CommonSubexpressions(Pass):
    """Merge equal constants (initializers that are not graph inputs, and Constant outputs)
    and equal nodes: the later one's readers read the first one."""

    name = "cse"

    def run(self, model: Model) -> PassResult:
        log = ChangeLog()
        rw = Rewriter(model, log, self.name)
        changed = False
        # Outer graphs first: a body reading an outer duplicate then sees the kept value.
        for graph in list(model.graphs()):
            changed |= _merge_constants(graph, rw)
            changed |= _merge_nodes(graph, rw)
        return PassResult(changed, log)


def _merge_constants(graph: Graph, rw: Rewriter) -> bool:
    # Initializers come first and Constant nodes in order, so the kept value is always
    # defined before every reader of the ones it replaces.
    candidates = [v for v in graph.initializers.values() if not v.is_graph_input]
    candidates += [n.outputs[0] for n in graph.nodes if n.op_type == "Constant"
                   and n.domain in ("", "ai.onnx") and n.outputs and n.outputs[0] is not None]
    kept: dict[tuple, list[Value]] = {}
    changed = False
    for value in candidates:
        tensor = value.const
        if tensor is None:  # a sparse or function-attribute Constant
            continue
        bucket = kept.setdefault((tensor.dtype, tensor.shape, tensor.fingerprint()), [])
        first = next((k for k in bucket if _same_data(k.const, tensor)), None)
        if first is None:
            bucket.append(value)
        elif id(value) not in rw.graph_output_ids():  # a graph output keeps its own value and name
            rw.replace_uses(value, first)
            if value.producer is None:
                rw.remove_initializer(graph, value)
            else:
                rw.remove_node(value.producer)
            changed = True
    return changed


def _same_data(a: Tensor, b: Tensor) -> bool:
    """Bit-equal contents (so -0.0 differs from 0.0 and equal NaNs are equal)."""
    x, y = a.numpy(), b.numpy()
    if a.dtype == TensorProto.STRING:
        return x.tolist() == y.tolist()
    if x.dtype != y.dtype:
        return False
    return np.array_equal(_bytes(x), _bytes(y))


def _bytes(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).reshape(-1).view(np.uint8)


def _merge_nodes(graph: Graph, rw: Rewriter) -> bool:
    first_of: dict[tuple, Node] = {}
    changed = False
    for node in list(graph.nodes):
        key = _key(node)
        if key is None:
            continue
        first = first_of.setdefault(key, node)
        if first is node:
            continue
        outputs = rw.graph_output_ids()
        if any(b is not None and id(b) in outputs and id(a) in outputs
               for a, b in zip(first.outputs, node.outputs)):
            continue  # both are graph outputs: merging would only trade the node for an Identity
        for a, b in zip(first.outputs, node.outputs):
            if b is not None:
                rw.replace_uses(b, a)
        rw.remove_node(node)
        changed = True
    return changed


def _key(node: Node) -> tuple | None:
    """What makes two nodes compute the same thing, or None when they must stay apart.
    Inputs are compared by identity (Values hash by identity); which optional outputs a
    node has is part of the key, so every output of the later node has a counterpart."""
    if node.domain not in STANDARD_DOMAINS or node.op_type in NONDETERMINISTIC:
        return None
    if node.op_type == "Constant":
        return None  # merged by content in _merge_constants
    attrs = []
    for name, a in sorted(node.attributes.items()):
        if a.graphs():
            return None  # bodies are not compared
        attrs.append((name, a.type, a.ref_attr_name, _hashable(a.value)))
    domain = "" if node.domain == "ai.onnx" else node.domain
    return (domain, node.op_type, node.overload, tuple(node.inputs), tuple(attrs),
            tuple(o is None for o in node.outputs))


def _hashable(value: Any) -> Any:
    """An attribute value as a hashable key that is equal only for exactly equal values."""
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, (float, np.floating)):
        return float(value).hex()  # exact, and NaN equals NaN
    if isinstance(value, Tensor):
        # Attribute tensors are small (a Constant's are merged elsewhere): key on the data.
        data = value.numpy()
        if value.dtype == TensorProto.STRING:
            return ("tensor", value.dtype, value.shape, tuple(data.ravel().tolist()))
        return ("tensor", value.dtype, value.shape, _bytes(data).tobytes())
    if hasattr(value, "SerializeToString"):  # sparse tensors and type protos
        return value.SerializeToString(deterministic=True)
    return value
