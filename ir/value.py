"""A value: an edge of the graph. Values compare by identity; the name is a label."""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnx import TypeProto

from .tensors import Tensor, constant_tensor

if TYPE_CHECKING:
    from .node import Node

Dim = int | str | None  # fixed size, symbolic name, or unknown
Shape = tuple[Dim, ...]


class Value:
    """One SSA value. `uses` is kept by `Node`, so it is right by construction.

    Type: `dtype`/`shape` for tensors (shape None = unknown rank); `type` keeps a
    non-tensor type (sequence, map, optional, sparse) exactly as the model gave it.
    `tensor` holds initializer data; `const` says whether the value is a constant.
    """

    __slots__ = ("name", "dtype", "shape", "type", "tensor", "doc_string",
                 "metadata_props", "value_info", "declared", "producer", "index", "_uses",
                 "_is_graph_input")

    def __init__(self, name: str, dtype: int | None = None, shape: Shape | None = None, *,
                 tensor: Tensor | None = None, type: TypeProto | None = None):
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.type = type
        self.tensor = tensor
        self.doc_string = ""
        self.metadata_props: dict[str, str] = {}
        # A value_info entry the model gave for a graph input or initializer (exporters put
        # provenance there); kept as given and emitted again under the value's name.
        self.value_info = None
        # The model declared this node output's type in value_info. Only declared types are
        # written back: types that passes infer are working knowledge, not file content.
        self.declared = False
        self.producer: Node | None = None
        self.index: int | None = None
        self._uses: list[tuple[Node, int]] = []
        self._is_graph_input = False

    @property
    def uses(self) -> tuple[tuple[Node, int], ...]:
        """(node, input index) pairs reading this value, subgraph captures included."""
        return tuple(self._uses)

    @property
    def is_graph_input(self) -> bool:
        return self._is_graph_input

    @property
    def const(self) -> Tensor | None:
        """The constant data of this value, or None. An initializer that is also a graph
        input can be overridden at run time, so it is not a constant."""
        if self.tensor is not None:
            return None if self._is_graph_input else self.tensor
        node = self.producer
        if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for name, attr in node.attributes.items():
                if not attr.ref_attr_name:
                    return constant_tensor(name, attr.value)
        return None

    def __repr__(self) -> str:
        return f"Value(%{self.name})"
