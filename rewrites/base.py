"""The rewrite framework: rules, the Rewriter every mutation goes through, the change log,
the greedy driver, and passes.

A rule is a small class with a root op type, a pure `match(node)` that returns a `Match`
or a falsy `Reject(reason)`, and `rewrite(match, rewriter)`. Rules never touch the graph
directly: the `Rewriter` does, and records each change, so the debug dump can say which
rule did what to which node.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Iterator

import numpy as np
from onnx import AttributeProto

from ir import ArrayTensor, Attr, Graph, Model, Node, Value

from .patterns import default_opset

# -- match results ---------------------------------------------------------------------


@dataclass
class Match:
    """A successful match: the nodes the rewrite consumes (erased once dead) and captures."""

    nodes: list[Node]
    captures: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.captures[key]

    def __bool__(self) -> bool:
        return True


@dataclass
class Reject:
    """Why a rule did not match. Falsy, so `if m := rule.match(node):` reads naturally."""

    reason: str

    def __bool__(self) -> bool:
        return False


# -- the change log ----------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    rule: str
    kind: str  # add-node, remove-node, replace-uses, set-input, set-attribute, add/remove-initializer
    target: str  # the node or value it applies to
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.rule}: {self.kind} {self.target}" + (f" ({self.detail})" if self.detail else "")


class ChangeLog:
    def __init__(self) -> None:
        self.changes: list[Change] = []

    def record(self, change: Change) -> None:
        self.changes.append(change)

    def by_rule(self) -> Counter:
        """How many rewrites each rule made (one per successful match)."""
        return Counter(c.rule for c in self.changes if c.kind == "match")

    def by_kind(self) -> Counter:
        return Counter(c.kind for c in self.changes if c.kind != "match")

    def __len__(self) -> int:
        return len(self.changes)

    def __iter__(self) -> Iterator[Change]:
        return iter(self.changes)


# -- the rewriter ------------------------------------------------------------------------


class Rewriter:
    """Every mutation of the IR by a rule or pass goes through here and is logged."""

    def __init__(self, model: Model, log: ChangeLog, rule: str = ""):
        self.model = model
        self.log = log
        self.rule = rule
        self._names, self._node_names, self._heirs = set(), set(), {}
        for g in model.graphs():
            self._names.update(v.name for v in _values(g))
            for n in g.nodes:
                self._node_names.add(n.name)
                if n.intended_name:
                    self._heirs[n.intended_name] = n
        self._output_ids: set[int] | None = None
        self._next_suffix: dict[tuple[int, str], int] = {}
        self._function_bodies = {id(f.graph) for f in model.functions}

    def _record(self, kind: str, target: str, detail: str = "") -> None:
        self.log.record(Change(self.rule, kind, target, detail))

    def fresh_name(self, base: str) -> str:
        """A value name not used anywhere in the model: `base`, else `base_1`, `base_2`..."""
        return self._claim(base, self._names)

    def _claim(self, base: str, taken: set[str]) -> str:
        """`base`, else `base_k` for the smallest free k. Names are only ever added while a
        Rewriter lives, so the search resumes where it last stopped for this base: a
        rule that adds thousands of nodes named alike stays linear."""
        key = (id(taken), base)
        k = self._next_suffix.get(key, 0)
        name = base if k == 0 else f"{base}_{k}"
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        self._next_suffix[key] = k
        taken.add(name)
        return name

    def add_node(self, graph: Graph, before: Node | None, op_type: str, inputs: Iterable[Value | None],
                 num_outputs: int = 1, *, domain: str = "", name: str = "",
                 attributes: dict[str, Attr] | None = None) -> Node:
        """Insert a new node before `before` (or at the end) with fresh output values."""
        base = name or op_type
        outputs = [Value(self.fresh_name(f"{base}_out{i}" if num_outputs > 1 else f"{base}_out"))
                   for i in range(num_outputs)]
        node = Node(op_type, inputs, outputs, domain=domain, name=self._claim(base, self._node_names),
                    attributes=attributes)
        if name and node.name != name:  # named after a node it replaces: the name comes later
            node.intended_name = name
            self._heirs.setdefault(name, node)
        if before is None:
            graph.append(node)
        else:
            graph.insert(graph.nodes.index(before), node)
        self._record("add-node", node.name, op_type)
        return node

    def remove_node(self, node: Node) -> None:
        self.remove_nodes(node.graph, [node])

    def remove_nodes(self, graph: Graph, nodes: list[Node]) -> None:
        """Remove nodes of one graph at once, readers before the nodes they read."""
        graph.remove_many(nodes)
        for node in nodes:
            if node.subgraphs():
                self._output_ids = None  # its bodies' outputs are no longer graph outputs
            self._record("remove-node", node.name, node.op_type)
        for node in nodes:
            self._pass_name_on(node)

    def _pass_name_on(self, removed: Node) -> None:
        """A removed node's name goes to the live node that was named after it, if any."""
        name = removed.name
        self._node_names.discard(name)
        heir = self._heirs.pop(name, None)
        if heir is None or heir.graph is None or heir.intended_name != name:
            return
        self._record("rename-node", heir.name, f"to {name}")
        self._node_names.discard(heir.name)
        self._node_names.add(name)
        heir.name, heir.intended_name, heir.name_generated = name, None, removed.name_generated

    def set_input(self, node: Node, index: int, value: Value | None) -> None:
        old = node.inputs[index]
        node.set_input(index, value)
        self._record("set-input", node.name, f"input {index}: {_name(old)} -> {_name(value)}")

    def set_attribute(self, node: Node, name: str, attr: Attr | None) -> None:
        if attr is None:
            node.attributes.pop(name, None)
        else:
            node.attributes[name] = attr
        self._record("set-attribute", node.name, name)

    def replace_uses(self, old: Value, new: Value) -> None:
        """Make every reader of `old` read `new`. A graph output keeps its name: `new`
        takes it when it can, otherwise an Identity carries it."""
        target, detail = f"%{old.name}", f"by %{new.name}"
        for node, index in old.uses:
            node.set_input(index, new)
        if id(old) in self.graph_output_ids():
            for graph in self.model.graphs():
                for i, out in enumerate(graph.outputs):
                    if out is old:
                        graph.outputs[i] = self._as_output(graph, old, new)
            self._output_ids = None
        self._record("replace-uses", target, detail)

    def graph_output_ids(self) -> set[int]:
        """Ids of every graph output (subgraphs included), cached: graph outputs change only
        through `replace_uses` or by removing a node with bodies, which drop the cache."""
        if self._output_ids is None:
            self._output_ids = {id(o) for g in self.model.graphs() for o in g.outputs}
        return self._output_ids

    def _as_output(self, graph: Graph, old: Value, new: Value) -> Value:
        free = new.producer is not None and new.producer.graph is graph and \
            not any(o is new for g in self.model.graphs() for o in g.outputs)
        if free:
            old.name, new.name = self.fresh_name(old.name + "_replaced"), old.name
            new.dtype = new.dtype if new.dtype is not None else old.dtype
            new.shape = new.shape if new.shape is not None else old.shape
            return new
        ident = self.add_node(graph, None, "Identity", [new], name=f"{old.name}_identity")
        out = ident.outputs[0]
        old.name, out.name = self.fresh_name(old.name + "_replaced"), old.name
        out.dtype, out.shape = old.dtype, old.shape
        return out

    def move_node(self, node: Node, graph: Graph, before: Node | None) -> None:
        """Move a node (with its uses and outputs) into `graph` before `before` (or at the
        end): inlining a body into its parent."""
        node.graph.nodes.remove(node)
        if before is None:
            graph.append(node)
        else:
            graph.insert(graph.nodes.index(before), node)
        self._record("move-node", node.name, f"into graph '{graph.name}'")

    def move_initializer(self, value: Value, graph: Graph, source: Graph) -> None:
        del source.initializers[value.name]
        graph.add_initializer(value)
        self._record("move-initializer", f"%{value.name}", f"into graph '{graph.name}'")

    def lift_constant(self, node: Node) -> Value:
        """Turn a Constant node into an initializer of its graph. The output Value stays the
        same object, so every reader keeps reading it."""
        tensor, graph = node.outputs[0].const, node.graph
        value = node.release_output(0)
        graph.remove(node)
        value.tensor = tensor
        value.dtype, value.shape = tensor.dtype, tensor.shape
        graph.add_initializer(value)
        self._record("lift-constant", f"%{value.name}", f"from node {node.name}")
        return value

    def freeze_input(self, graph: Graph, value: Value) -> None:
        """A graph input with an initializer default stops being an input: its default
        becomes a constant (the signature shrinks; only done when asked)."""
        graph.remove_input(value)
        self._record("freeze-input", f"%{value.name}")

    def set_type(self, value: Value, dtype: int | None, shape) -> None:
        """Record a dtype/shape learnt by inference."""
        value.dtype, value.shape = dtype, None if shape is None else tuple(shape)
        self._record("set-type", f"%{value.name}")

    def set_tensor(self, value: Value, tensor, detail: str = "") -> None:
        """Give a constant other storage (e.g. sparse) holding the same value: its name,
        readers and declared type stay."""
        value.tensor = tensor
        self._record("set-tensor", f"%{value.name}", detail)

    def add_initializer(self, graph: Graph, base_name: str, array: np.ndarray) -> Value:
        """A new constant in `graph`: an initializer, or in a function body (a FunctionProto
        holds no initializers) a Constant node at the start of the body."""
        tensor = ArrayTensor(array)
        if id(graph) in self._function_bodies:
            first = graph.nodes[0] if graph.nodes else None
            node = self.add_node(graph, first, "Constant", [], name=base_name,
                                 attributes={"value": Attr(AttributeProto.TENSOR, tensor)})
            return node.outputs[0]
        value = Value(self.fresh_name(base_name), tensor.dtype, tensor.shape, tensor=tensor)
        graph.add_initializer(value)
        self._record("add-initializer", f"%{value.name}", f"{array.dtype}{list(array.shape)}")
        return value

    def remove_initializer(self, graph: Graph, value: Value) -> None:
        if value.uses:
            raise ValueError(f"initializer %{value.name} is still used")
        del graph.initializers[value.name]
        self._record("remove-initializer", f"%{value.name}")

    def is_dead(self, node: Node) -> bool:
        """No output of the node is read by a node or is a graph output."""
        outputs = self.graph_output_ids()
        return all(v is None or (not v.uses and id(v) not in outputs) for v in node.outputs)


def _name(v: Value | None) -> str:
    return "_" if v is None else f"%{v.name}"


def _values(g: Graph) -> Iterator[Value]:
    yield from g.inputs
    yield from g.initializers.values()
    for node in g.nodes:
        yield from (v for v in node.outputs if v is not None)


# -- rules and passes ----------------------------------------------------------------------


class RewriteRule:
    """Subclass with `op_type` (one op type, or a tuple of the op types the root may have; and
    `domain`), `match` and `rewrite`."""

    op_type: ClassVar[str | tuple[str, ...]]
    domain: ClassVar[str] = ""
    model: Model | None = None  # set by the driver before a sweep: rules may read opsets

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def opset(self) -> int:
        """The model's default-domain (ai.onnx) opset version."""
        return default_opset(self.model.opset_imports if self.model is not None else {})

    def match(self, node: Node) -> Match | Reject:
        raise NotImplementedError

    def rewrite(self, match: Match, rewriter: Rewriter) -> None:
        raise NotImplementedError


@dataclass
class PassResult:
    changed: bool
    log: ChangeLog


class Pass:
    """A pass is a dataclass with a `name`, its options as fields, and `run(model)`.
    `exact` passes keep the model's numbers; lossy ones are held to a budget."""

    name: ClassVar[str] = "pass"
    exact: ClassVar[bool] = True

    def run(self, model: Model) -> PassResult:
        raise NotImplementedError


class RewriteLoopError(RuntimeError):
    """Rules keep changing the graph: some of them undo each other."""


MAX_SWEEPS = 100


def apply_rules(model: Model, rules: list[RewriteRule], log: ChangeLog) -> bool:
    """The greedy driver: sweep every graph's nodes in order, try the rules registered for
    each op type in list order, erase matched nodes that became dead, and repeat until a
    sweep changes nothing."""
    by_op: dict[tuple[str, str], list[RewriteRule]] = {}
    for rule in rules:
        rule.model = model
        for op_type in (rule.op_type,) if isinstance(rule.op_type, str) else rule.op_type:
            by_op.setdefault((rule.domain, op_type), []).append(rule)
    rewriter = Rewriter(model, log)
    changed_any = False
    for sweep in range(MAX_SWEEPS):
        changed = False
        for graph in list(model.graphs()):
            for node in list(graph.nodes):
                if node.graph is not graph:
                    continue  # erased earlier in this sweep
                for rule in by_op.get((_domain(node.domain), node.op_type), ()):
                    match = rule.match(node)
                    if not match:
                        continue
                    rewriter.rule = rule.name
                    rewriter._record("match", node.name, node.op_type)
                    rule.rewrite(match, rewriter)
                    for consumed in match.nodes:
                        if consumed.graph is not None and rewriter.is_dead(consumed):
                            rewriter.remove_node(consumed)
                    changed = True
                    break
        if not changed:
            return changed_any
        changed_any = True
    recent = Counter(c.rule for c in log.changes[-50:] if c.kind == "match")
    raise RewriteLoopError(f"rules still changing the graph after {MAX_SWEEPS} sweeps "
                           f"(they may undo each other): {', '.join(sorted(recent))}")


def _domain(domain: str) -> str:
    return "" if domain == "ai.onnx" else domain


@dataclass
class RulePass(Pass):
    """A pass made of rules, run by the greedy driver."""

    rules: list[RewriteRule] = field(default_factory=list)
    name: str = "rules"

    def run(self, model: Model) -> PassResult:
        log = ChangeLog()
        return PassResult(apply_rules(model, self.rules, log), log)


@dataclass
class FixedPoint(Pass):
    """Repeat a group of passes until none of them changes anything."""

    passes: list[Pass] = field(default_factory=list)
    max_rounds: int = 20
    name: str = "fixed-point"

    def __post_init__(self) -> None:
        self.exact = all(p.exact for p in self.passes)

    def run(self, model: Model) -> PassResult:
        log = ChangeLog()
        changed_any = False
        for _ in range(self.max_rounds):
            changed = False
            for p in self.passes:
                result = p.run(model)
                log.changes.extend(result.log.changes)
                changed = changed or result.changed
            if not changed:
                return PassResult(changed_any, log)
            changed_any = True
        raise RewriteLoopError(f"fixed point of {', '.join(p.name for p in self.passes)} "
                               f"not reached after {self.max_rounds} rounds")
