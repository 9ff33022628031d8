"""The IR invariants (DESIGN.md §2), checked in one linear walk. A violation raises
`InvariantError` naming the node or value; after lowering it is a bug of the last pass."""

from __future__ import annotations

from .errors import InvariantError
from .graph import Graph, Model
from .value import Value


def verify(model: Model) -> None:
    _Checker().graph(model.graph, [], "graph")
    for f in model.functions:
        _Checker().graph(f.graph, [], f"function '{f.domain}.{f.name}'")


class _Checker:
    def __init__(self):
        self.value_names: dict[str, Value] = {}
        self.node_names: set[str] = set()
        self.nodes_seen: set[int] = set()
        self.uses_seen = 0
        self.uses_listed = 0

    def graph(self, g: Graph, outer: list[set[int]], where: str) -> None:
        defined: set[int] = set()
        scopes = outer + [defined]
        listed: list[Value] = []

        def define(v: Value, role: str) -> None:
            if v is None:
                return
            other = self.value_names.get(v.name)
            if other is not None and other is not v:
                raise InvariantError(f"{where}: two values are named '{v.name}' ({role})")
            self.value_names[v.name] = v
            defined.add(id(v))
            listed.append(v)

        for v in g.inputs:
            if v.producer is not None:
                raise InvariantError(f"{where}: graph input %{v.name} has a producer")
            if not v.is_graph_input:
                raise InvariantError(f"{where}: %{v.name} is a graph input but not marked as one")
            define(v, "graph input")
        for name, v in g.initializers.items():
            if v.name != name:
                raise InvariantError(f"{where}: initializer key '{name}' names value %{v.name}")
            if v.tensor is None or v.producer is not None:
                raise InvariantError(f"{where}: initializer %{v.name} has no data or has a producer")
            if id(v) not in defined:
                define(v, "initializer")
        for node in g.nodes:
            here = f"{where}: node '{node.name}' ({node.op_type})"
            if node.graph is not g:
                raise InvariantError(f"{here} does not belong to this graph")
            if not node.name or node.name in self.node_names:
                raise InvariantError(f"{here} has an empty or duplicate name")
            self.node_names.add(node.name)
            self.nodes_seen.add(id(node))
            for i, v in enumerate(node.inputs):
                if v is None:
                    continue
                if not any(id(v) in s for s in scopes):
                    raise InvariantError(f"{here} input {i} %{v.name} is not defined before it")
                if (node, i) not in v._uses:
                    raise InvariantError(f"{here} input {i} %{v.name} is missing from its use list")
                self.uses_seen += 1
            for sub in node.subgraphs():
                if sub.owner is not node:
                    raise InvariantError(f"{here} owns subgraph '{sub.name}' whose owner is another node")
                self.graph(sub, scopes, f"{here} subgraph '{sub.name}'")
            for j, v in enumerate(node.outputs):
                if v is None:
                    continue
                if v.producer is not node or v.index != j:
                    raise InvariantError(f"{here} output {j} %{v.name} names another producer")
                if v.tensor is not None or v.is_graph_input:
                    raise InvariantError(f"{here} output %{v.name} is also an input or initializer")
                define(v, f"output of node '{node.name}'")
        for v in g.outputs:
            if not any(id(v) in s for s in scopes):
                raise InvariantError(f"{where}: graph output %{v.name} is not produced")
        for v in listed:
            for node, i in v._uses:
                if id(node) not in self.nodes_seen or i >= len(node.inputs) or node.inputs[i] is not v:
                    raise InvariantError(f"{where}: %{v.name} lists a use by '{node.name}' input {i} "
                                         "that does not read it")
            self.uses_listed += len(v._uses)
        if not outer and self.uses_seen != self.uses_listed:
            raise InvariantError(f"{where}: use lists hold {self.uses_listed} entries "
                                 f"but nodes have {self.uses_seen} inputs")
