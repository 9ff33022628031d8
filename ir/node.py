"""Nodes and their attributes. `inputs` is read-only; `set_input` keeps both sides of the
use-def link in step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

from onnx import AttributeProto

from .value import Value

if TYPE_CHECKING:
    from .graph import Graph

A = AttributeProto
_BODY_TYPES = (A.GRAPH, A.GRAPHS)


@dataclass
class Attr:
    """An attribute. `value` is a Python value: float, int, bytes, Tensor, Graph, a list of
    those, or the proto itself for sparse tensors and type protos. In a function body an
    attribute may instead refer to one of the function's attributes (`ref_attr_name`)."""

    type: int
    value: Any = None
    ref_attr_name: str = ""
    doc_string: str = ""

    def graphs(self) -> list[Graph]:
        if self.ref_attr_name:
            return []
        if self.type == A.GRAPH:
            return [self.value]
        if self.type == A.GRAPHS:
            return list(self.value)
        return []


class Node:
    __slots__ = ("op_type", "domain", "name", "name_generated", "intended_name", "overload", "attributes",
                 "doc_string", "metadata_props", "_inputs", "_outputs", "graph")

    def __init__(self, op_type: str, inputs: Iterable[Value | None] = (),
                 outputs: Iterable[Value | None] = (), *, domain: str = "", name: str = "",
                 attributes: dict[str, Attr] | None = None, overload: str = ""):
        self.op_type = op_type
        self.domain = domain
        self.name = name
        # Lowering names unnamed nodes (names must be unique); emission leaves them unnamed.
        self.name_generated = False
        # A rewrite named this node after one it replaces, which still held the name: it takes
        # the name when that node is removed (users exclude and read nodes by their names).
        self.intended_name: str | None = None
        self.overload = overload
        self.attributes: dict[str, Attr] = dict(attributes or {})
        self.doc_string = ""
        self.metadata_props: dict[str, str] = {}
        self.graph: Graph | None = None
        self._inputs: list[Value | None] = []
        for v in inputs:
            self._inputs.append(v)
            if v is not None:
                v._uses.append((self, len(self._inputs) - 1))
        self._outputs: list[Value | None] = list(outputs)
        for i, v in enumerate(self._outputs):
            if v is not None:
                if v.producer is not None:
                    raise ValueError(f"{v!r} already has a producer")
                v.producer, v.index = self, i
        for g in self.subgraphs():
            g.owner = self

    @property
    def inputs(self) -> tuple[Value | None, ...]:
        return tuple(self._inputs)

    @property
    def outputs(self) -> tuple[Value | None, ...]:
        return tuple(self._outputs)

    def set_input(self, index: int, value: Value | None) -> None:
        old = self._inputs[index]
        if old is value:
            return
        if old is not None:
            old._uses.remove((self, index))
        self._inputs[index] = value
        if value is not None:
            value._uses.append((self, index))

    def release_output(self, index: int) -> Value:
        """Let output `index` go: the Value lives on without a producer (it becomes an
        initializer or input). Returns it."""
        value = self._outputs[index]
        self._outputs[index] = None
        value.producer, value.index = None, None
        return value

    def detach_inputs(self) -> None:
        """Drop this node's uses of its inputs, and its bodies' uses of outer values
        (when the node leaves the graph)."""
        for i in range(len(self._inputs)):
            self.set_input(i, None)
        for sub in self.subgraphs():
            for inner in sub.walk():
                for i in range(len(inner._inputs)):
                    inner.set_input(i, None)

    def subgraphs(self) -> list[Graph]:
        return [g for a in self.attributes.values() if a.type in _BODY_TYPES for g in a.graphs()]

    def __repr__(self) -> str:
        return f"Node({self.op_type} '{self.name}')"
