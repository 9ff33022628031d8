"""Constant nodes become initializers: rules then see one kind of constant, and the node
count says what the model computes (PP-OCR exports keep every weight in a Constant node)."""

from __future__ import annotations

from dataclasses import dataclass

from ir import Model, Node

from .base import ChangeLog, Match, Pass, PassResult, Reject, Rewriter, RewriteRule, RulePass


class LiftConstant(RewriteRule):
    op_type = "Constant"

    def match(self, node: Node) -> Match | Reject:
        out = node.outputs[0] if node.outputs else None
        if out is None:
            return Reject("Constant without an output")
        if out.const is None:
            return Reject("sparse or attribute-referencing Constant has no dense value")
        if self.model is not None and any(f.graph is node.graph for f in self.model.functions):
            return Reject("function bodies cannot hold initializers")
        if out.name in node.graph.initializers:
            return Reject("an initializer of the same name exists")
        return Match([], {"node": node})

    def rewrite(self, match: Match, rewriter: Rewriter) -> None:
        rewriter.lift_constant(match["node"])


def lift_constants() -> RulePass:
    return RulePass([LiftConstant()], name="lift-constants")


@dataclass
class FreezeInitializerInputs(Pass):
    """Make graph inputs that carry an initializer default into constants. Models of IR
    version 3 had to list every initializer as an input, so their weights look overridable;
    freezing them lets folding see the weights. It changes the model's signature, so it
    runs only when asked."""

    name = "freeze-inputs"

    def run(self, model: Model) -> PassResult:
        log = ChangeLog()
        rw = Rewriter(model, log, self.name)
        graph = model.graph
        frozen = [v for v in graph.inputs if v.tensor is not None]
        for value in frozen:
            rw.freeze_input(graph, value)
        return PassResult(bool(frozen), log)
