"""Cleanup passes: dead code and Identity removal."""

from __future__ import annotations

from dataclasses import dataclass

from ir import Graph, Model, Node

from .base import ChangeLog, Match, Pass, PassResult, Reject, RewriteRule, Rewriter, RulePass


@dataclass
class DeadCodeElimination(Pass):
    """Remove nodes no output depends on and initializers nothing reads, in every graph.
    Graph inputs are the model's signature and stay."""

    name = "dead-code"

    def run(self, model: Model) -> PassResult:
        log = ChangeLog()
        rw = Rewriter(model, log, self.name)
        changed = False
        for graph in _innermost_first(model):
            for node in reversed(list(graph.nodes)):
                if rw.is_dead(node):
                    rw.remove_node(node)
                    changed = True
            for value in list(graph.initializers.values()):
                if not value.uses and not value.is_graph_input and id(value) not in rw._graph_outputs():
                    rw.remove_initializer(graph, value)
                    changed = True
        return PassResult(changed, log)


def _innermost_first(model: Model) -> list[Graph]:
    """Subgraphs before the graphs that own them, so a body's dead reads of outer values
    are gone before the outer graph is swept."""
    return list(reversed(list(model.graphs())))


class RemoveIdentity(RewriteRule):
    """Identity(x) -> x for every reader of its output."""

    op_type = "Identity"

    def match(self, node: Node) -> Match | Reject:
        source, out = node.inputs[0], node.outputs[0]
        if source is None or out is None:
            return Reject("Identity without input or output")
        graph = node.graph
        if any(o is out for o in graph.outputs):
            owned = source.producer is not None and source.producer.graph is graph
            if not owned or any(o is source for o in graph.outputs):
                return Reject("carries a graph output from an input, initializer, outer value "
                              "or another output")
        return Match([node], {"source": source, "out": out})

    def rewrite(self, match: Match, rewriter: Rewriter) -> None:
        rewriter.replace_uses(match["out"], match["source"])


def remove_identity() -> RulePass:
    return RulePass([RemoveIdentity()], name="identity")
