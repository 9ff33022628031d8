"""Graph, Function and Model: containers of nodes and values."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .node import Attr, Node
from .value import Value


class Graph:
    """Nodes in topological order plus the graph's inputs, outputs and initializers.

    A subgraph (an If/Loop/Scan body) reads outer values directly: its nodes hold the
    outer `Value` objects as inputs, so those reads are ordinary uses of the outer value.
    """

    def __init__(self, name: str = ""):
        self.name = name
        self.doc_string = ""
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.initializers: dict[str, Value] = {}
        self.nodes: list[Node] = []
        self.metadata_props: dict[str, str] = {}
        self.quantization_annotation: list[Any] = []  # TensorAnnotation protos, kept as-is
        self.owner: Node | None = None  # the node whose attribute this graph is

    def add_input(self, value: Value) -> Value:
        value._is_graph_input = True
        self.inputs.append(value)
        return value

    def remove_input(self, value: Value) -> None:
        """The value stops being a graph input (an initializer default becomes a constant)."""
        self.inputs.remove(value)
        value._is_graph_input = False

    def add_initializer(self, value: Value) -> Value:
        self.initializers[value.name] = value
        return value

    def append(self, node: Node) -> Node:
        node.graph = self
        self.nodes.append(node)
        return node

    def insert(self, index: int, node: Node) -> Node:
        node.graph = self
        self.nodes.insert(index, node)
        return node

    def remove(self, node: Node) -> None:
        """Take a node out; its outputs must be unused."""
        self.remove_many([node])

    def remove_many(self, nodes: list[Node]) -> None:
        """Take nodes out in the order given (readers before the nodes they read), then
        rebuild the node list once: removing k of n nodes costs O(n), not O(k·n)."""
        outputs = {id(o) for o in self.outputs}
        for node in nodes:
            for v in node.outputs:
                if v is not None and (v.uses or id(v) in outputs):
                    raise ValueError(f"cannot remove {node!r}: output {v!r} is still used")
            node.detach_inputs()
        if len(nodes) == 1:  # one node: list.remove scans in C, no new list
            self.nodes.remove(nodes[0])
        else:
            gone = {id(n) for n in nodes}
            self.nodes = [n for n in self.nodes if id(n) not in gone]
        for node in nodes:
            node.graph = None

    def walk(self) -> Iterator[Node]:
        """Every node of this graph and of its subgraphs, outer first."""
        for node in self.nodes:
            yield node
            for sub in node.subgraphs():
                yield from sub.walk()

    def __repr__(self) -> str:
        return f"Graph('{self.name}', {len(self.nodes)} nodes)"


@dataclass
class Function:
    """A model-local function: its body is a Graph whose inputs and outputs are untyped."""

    domain: str
    name: str
    graph: Graph
    attributes: list[str] = field(default_factory=list)
    attribute_defaults: dict[str, Attr] = field(default_factory=dict)
    opset_imports: dict[str, int] = field(default_factory=dict)
    overload: str = ""
    doc_string: str = ""
    metadata_props: dict[str, str] = field(default_factory=dict)


@dataclass
class Model:
    graph: Graph
    ir_version: int
    opset_imports: dict[str, int]
    producer_name: str = ""
    producer_version: str = ""
    domain: str = ""
    model_version: int = 0
    doc_string: str = ""
    metadata_props: dict[str, str] = field(default_factory=dict)
    functions: list[Function] = field(default_factory=list)
    training_info: list[Any] = field(default_factory=list)  # TrainingInfoProto, kept as-is
    configuration: list[Any] = field(default_factory=list)  # DeviceConfigurationProto, kept as-is
    base_dir: Path | None = None  # folder external data was read from

    def graphs(self) -> Iterator[Graph]:
        """The main graph, every function body, and all their subgraphs."""
        for top in [self.graph] + [f.graph for f in self.functions]:
            yield top
            for node in top.walk():
                yield from node.subgraphs()
