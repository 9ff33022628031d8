"""Magnitude pruning of the weights of linear layers (Conv, ConvTranspose, Gemm, MatMul).

Unstructured pruning zeroes the smallest weights: a share per layer, or one share over the
whole model with LAMP scores (w² over the sum of the w'² of the same layer with |w'| ≥ |w|),
which normalise each layer so a layer of small weights is not wiped out. "2:4" keeps the two
largest of every four consecutive weights along the reduction axis (sparse tensor cores).
Magnitudes only mean something after BatchNorm folding: run this after the optimize pipeline.
Zeros give no speed in onnxruntime; `sparse_storage.StoreSparse` turns them into file size.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from ir import CompileError, Model, Node, Value

from .base import Change, ChangeLog, Pass, PassResult, Rewriter
from .patterns import attr, check_exclude

LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # the weight is input 1 of each
FLOATS = (TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.DOUBLE)
MODES = ("unstructured", "2:4")
SCOPES = ("layer", "global")
KEEP, GROUP = 2, 4  # 2:4: keep 2 of every 4


@dataclass(frozen=True)
class TensorSparsity:
    name: str
    op: str  # op types reading it as their weight, e.g. "Conv" or "Gemm,MatMul"
    numel: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


def sparsity_report(model: Model) -> list[TensorSparsity]:
    """Every constant float weight of a linear layer of the main graph, once, in the order
    of its first reader."""
    rows = []
    for value, readers in _weights(_layers(model)).items():
        array = value.const.numpy()
        ops = ",".join(dict.fromkeys(n.op_type for n in readers))
        rows.append(TensorSparsity(value.name, ops, array.size, _zeros(array)))
    return rows


@dataclass
class PruneWeights(Pass):
    """Zero the smallest weights; see the module docstring. `exclude` holds node names or
    op types; a weight shared by several layers is pruned once, and not at all when one of
    its readers is exempt. Never empties a tensor."""

    name = "prune-weights"
    exact = False

    sparsity: float  # share of zeros wanted; ignored by "2:4", which is one half
    mode: str = "unstructured"
    scope: str = "layer"
    exempt_first_last: bool = True
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < 1:
            raise CompileError(f"prune-weights: sparsity must be a number in [0, 1), got {s!r}")
        if self.mode not in MODES:
            raise CompileError(f"prune-weights: unknown mode '{self.mode}' (expected unstructured or 2:4)")
        if self.scope not in SCOPES:
            raise CompileError(f"prune-weights: unknown scope '{self.scope}' (expected layer or global)")
        self.exclude = (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude)

    def run(self, model: Model) -> PassResult:
        log = ChangeLog()
        rw = Rewriter(model, log, self.name)
        layers = _layers(model)
        check_exclude(model, self.exclude, "prune-weights", LAYERS)
        exempt = self._exempt(layers)
        for node, reason in exempt.items():
            _note(rw, "skip", node.name, reason)
        targets = {}  # weight value -> its readers, for the weights that may be pruned
        for value, readers in _weights(layers).items():
            reason = _blocked(value, readers, exempt, rw)
            if reason:
                _note(rw, "skip", f"%{value.name}", reason)
            else:
                targets[value] = readers
        if self.mode == "2:4":
            pruned = {}
            for value, readers in targets.items():
                out = _two_of_four(value, readers)
                if isinstance(out, str):
                    _note(rw, "skip", readers[0].name, out)
                else:
                    pruned[value] = out
        elif self.scope == "global":
            pruned = _global(targets, self.sparsity)
        else:
            pruned = {v: _smallest(v.const.numpy(), _count(self.sparsity, v.const.numel)) for v in targets}
        changed = False
        for value, array in pruned.items():
            changed |= _replace(rw, model, value, array)
        return PassResult(changed, log)

    def _exempt(self, layers: list[Node]) -> dict[Node, str]:
        """The layers left whole, with why."""
        exempt = {}
        if self.exempt_first_last and layers:
            exempt[layers[0]] = "first layer"
            exempt.setdefault(layers[-1], "last layer")
        for node in layers:
            if node in exempt:
                continue
            if node.name in self.exclude:
                exempt[node] = "excluded by name"
            elif node.op_type in self.exclude:
                exempt[node] = f"excluded op type {node.op_type}"
        return exempt


# -- which weights ------------------------------------------------------------------------


def _layers(model: Model) -> list[Node]:
    """Linear layers of the main graph with a constant float weight, in topological order."""
    return [n for n in model.graph.nodes if _weight(n) is not None]


def _weight(node: Node) -> Value | None:
    if node.op_type not in LAYERS or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    w = node.inputs[1]
    tensor = w.const if w is not None else None
    if tensor is None or tensor.dtype not in FLOATS or tensor.numel == 0 or not tensor.shape:
        return None
    return w


def _weights(layers: list[Node]) -> dict[Value, list[Node]]:
    """Each weight with the layers reading it, in order of first reader."""
    out: dict[Value, list[Node]] = {}
    for node in layers:
        out.setdefault(node.inputs[1], []).append(node)
    return out


def _blocked(value: Value, readers: list[Node], exempt: dict[Node, str], rw: Rewriter) -> str:
    """Why this weight must stay as it is ('' if it may be pruned)."""
    for node in readers:
        if node in exempt:
            return f"read by exempt {node.op_type} '{node.name}' ({exempt[node]})"
    for node, index in value.uses:
        if index != 1 or node not in readers:
            return f"also read by {node.op_type} '{node.name}' (input {index})"
    if id(value) in rw.graph_output_ids():
        return "a graph output"
    return ""


# -- choosing the zeros -------------------------------------------------------------------


def _count(sparsity: float, numel: int) -> int:
    """Zeros wanted in `numel` weights: rounded to nearest, and at least one weight kept."""
    return min(math.floor(sparsity * numel + 0.5), numel - 1)


def _zeros(array: np.ndarray) -> int:
    return int(array.size - np.count_nonzero(array))


def _smallest(w: np.ndarray, k: int) -> np.ndarray:
    """`w` with its k smallest |w| set to zero (zeros already there are among them)."""
    out = np.array(w)
    if k > 0:
        flat = out.reshape(-1)
        flat[np.argpartition(np.abs(flat.astype(np.float64)), k - 1)[:k]] = 0
    return out


def lamp_scores(w: np.ndarray) -> np.ndarray:
    """LAMP score of each weight (flattened): w² / Σ w'² over |w'| ≥ |w| in the tensor.
    Tied magnitudes share one denominator; zeros score 0."""
    sq = np.square(w.astype(np.float64).reshape(-1))
    order = np.argsort(sq, kind="stable")
    ranked = sq[order]
    tail = np.cumsum(ranked[::-1])[::-1]  # tail[i] = sum of ranked[i:]
    first = np.searchsorted(ranked, ranked, side="left")  # start of each tie group
    denom = tail[first]
    scores = np.empty_like(sq)
    scores[order] = np.divide(ranked, denom, out=np.zeros_like(ranked), where=denom > 0)
    return scores


def _global(targets: dict[Value, list[Node]], sparsity: float) -> dict[Value, np.ndarray]:
    """One LAMP threshold over every target weight, so the zeros over all of them are the
    target share. Each tensor's largest weight is never a candidate: no tensor is emptied."""
    arrays = [v.const.numpy() for v in targets]
    if not arrays:
        return {}
    scores = []
    for w in arrays:
        s = lamp_scores(w)
        s[np.argmax(np.abs(w.reshape(-1)))] = np.inf
        scores.append(s)
    every = np.concatenate(scores)
    k = min(math.floor(sparsity * every.size + 0.5), every.size - len(arrays))
    chosen = np.zeros(every.size, bool)
    if k > 0:
        chosen[np.argpartition(every, k - 1)[:k]] = True
    out, start = {}, 0
    for value, w in zip(targets, arrays):
        pruned = np.array(w)
        pruned.reshape(-1)[chosen[start:start + w.size]] = 0
        out[value] = pruned
        start += w.size
    return out


def reduction_axis(node: Node, shape: tuple[int, ...]) -> tuple[int, int]:
    """(axis of the weight the layer sums over, its length within one group)."""
    op = node.op_type
    if op == "Conv":  # [O, C/group, k...]: axis 1 is already one group's channels
        return 1, shape[1]
    if op == "ConvTranspose":  # [C, O/group, k...]: group g reads channels g*C/group...
        return 0, shape[0] // max(attr(node, "group", 1), 1)
    if op == "Gemm":  # B is [K, N], or [N, K] with transB
        axis = 1 if attr(node, "transB", 0) else 0
        return axis, shape[axis]
    axis = max(len(shape) - 2, 0)  # MatMul: [..., K, N]
    return axis, shape[axis]


def _two_of_four(value: Value, readers: list[Node]) -> np.ndarray | str:
    """The weight with 2 of every 4 consecutive weights along the reduction axis zeroed,
    or why it cannot be."""
    w = value.const.numpy()
    if any(n.op_type == "Gemm" for n in readers) and w.ndim != 2:
        return f"2:4: Gemm weight %{value.name} is not 2-D"
    axes = {reduction_axis(n, w.shape) for n in readers}
    if len(axes) > 1:
        return f"2:4: %{value.name} is reduced along different axes by its readers"
    axis, length = axes.pop()
    if length % GROUP:
        return (f"2:4: reduction axis {axis} of %{value.name} has length {length}"
                f"{' per group' if length != w.shape[axis] else ''}, not a multiple of {GROUP}")
    moved = np.moveaxis(w, axis, -1)
    blocks = moved.reshape(-1, GROUP)  # consecutive along the reduction axis
    order = np.argsort(np.abs(blocks.astype(np.float64)), axis=1, kind="stable")
    out = np.array(blocks)
    np.put_along_axis(out, order[:, :GROUP - KEEP], 0, axis=1)
    return np.moveaxis(out.reshape(moved.shape), -1, axis)


# -- rewriting ----------------------------------------------------------------------------


def _replace(rw: Rewriter, model: Model, value: Value, array: np.ndarray) -> bool:
    """Readers of `value` read the pruned copy; the old weight goes once unread."""
    old = value.const.numpy()
    before, after = _zeros(old), _zeros(array)
    if after <= before:
        return False
    graph = model.graph
    _note(rw, "match", f"%{value.name}", "")  # one rewrite per pruned tensor, as rules count them
    new = rw.add_initializer(graph, _pruned_name(value.name), array.astype(old.dtype, copy=False))
    for node, index in value.uses:
        rw.set_input(node, index, new)
    _note(rw, "prune", f"%{value.name}",
          f"sparsity {before / old.size:.2f} -> {after / old.size:.2f}")
    if graph.initializers.get(value.name) is value:
        rw.remove_initializer(graph, value)
    elif value.producer is not None and value.producer.op_type == "Constant":
        rw.remove_node(value.producer)
    return True


def _pruned_name(name: str) -> str:
    """`w` -> `w_pruned`, and again `w_pruned` (or `w_pruned_2`) -> `w_pruned`."""
    return re.sub(r"_pruned(_\d+)?$", "", name) + "_pruned"


def _note(rw: Rewriter, kind: str, target: str, detail: str) -> None:
    """A log entry with no mutation behind it: why a layer was skipped, what a tensor became."""
    rw.log.record(Change(rw.rule, kind, target, detail))


__all__ = ["PruneWeights", "TensorSparsity", "sparsity_report", "lamp_scores", "reduction_axis"]
