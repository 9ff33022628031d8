"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights before W8A8.

A linear layer y = X W (W [K, N] constant) computes the same with X' = X diag(1/s) and
W' = diag(s) W. When a few input channels j of X are much larger than the rest (as after the
LayerNorms of transformers), per-tensor activation quantization wastes its range on them;
s_j = max|X_j|^alpha / max|W_j|^(1-alpha) (W_j the j-th input row) splits the difficulty
between activation and weight. 1/s is folded into the op that produces X, so nothing is added
to the graph:

- LayerNormalization over the last axis: gamma and beta divided by s;
- MatMul or Gemm with a constant weight: the weight's output columns (and C) divided by s;
- Mul by a constant with one value per channel of the last axis: the constant divided by s
  (a Mul by a scalar is left: the QDQ plan folds it into a free rescale, which a per-channel
  constant would lose);
- Add of a constant after one of these (a bias; a LayerNorm decomposed as ... * gamma + beta):
  the constant and the op before it, whose only reader the Add must be.

Every reader of X must be such a linear layer reading X as its data input (Q/K/V projections
reading one LayerNorm share one s, from the largest weight row of all of them) or a Shape:
any other reader, a graph output or a subgraph capture would see X change, so the group is
refused and the reason logged. The rewrite is exact in float up to rounding; what it buys shows only once
the model is quantized. Main graph only. Float weights are rescaled in float64 and cast back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ir import CompileError, Graph, Model, Node, Value

from .base import Change, ChangeLog, Pass, PassResult, Rewriter
from .patterns import attr, const, is_output

# Floors of max|X_j|, max|W_j| and s: a dead channel must not divide by zero.
EPS = 1e-5
_SHAPE_ONLY = ("Shape", "Size")


@dataclass(frozen=True, eq=False)
class SmoothGroup:
    """An activation `x` whose readers are all linear layers with constant weights
    (`consumers`, reading it as input 0) and whose `producer` can take a per-channel 1/s."""

    x: Value
    producer: Node
    consumers: tuple[Node, ...]
    channels: int  # K: x's last axis, the consumers' weight rows

    def weight_max(self) -> np.ndarray:
        """max |W_j| over every consumer's j-th input row, float64 [K]."""
        return np.max([np.abs(weight_rows(n)).max(axis=1) for n in self.consumers], axis=0)


@dataclass(frozen=True)
class Refusal:
    x: Value
    reason: str


def smoothing_scales(act_max, weight_max, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), both maxima and s floored at EPS; float64."""
    a = np.maximum(np.asarray(act_max, np.float64), EPS)
    w = np.maximum(np.asarray(weight_max, np.float64), EPS)
    return np.maximum(a ** alpha / w ** (1.0 - alpha), EPS)


def weight_rows(node: Node) -> np.ndarray:
    """A consumer's weight as [K, N] float64: input channel j is row j."""
    w = np.asarray(const(node.inputs[1]), np.float64)
    return w.T if node.op_type == "Gemm" and attr(node, "transB", 0) else w


def smooth_groups(model: Model) -> tuple[list[SmoothGroup], list[Refusal]]:
    """Pure analysis of the main graph, in graph order: the groups SmoothQuant can rewrite,
    and the activations read by a linear layer that it cannot, each with the reason."""
    graph = model.graph
    groups, refusals, seen = [], [], set()
    for node in graph.nodes:
        if not _consumer(node):
            continue
        x = node.inputs[0]
        if id(x) in seen:
            continue
        seen.add(id(x))
        found = _group(graph, x)
        (groups if isinstance(found, SmoothGroup) else refusals).append(found)
    return groups, refusals


def _consumer(node: Node) -> bool:
    """MatMul/Gemm (default domain) with a constant 2-D float weight, X as input 0 untransposed."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return False
    if node.op_type == "Gemm" and attr(node, "transA", 0):
        return False
    w = const(node.inputs[1])
    return w is not None and w.ndim == 2 and w.dtype.kind == "f" and node.inputs[0] is not None


def _group(graph: Graph, x: Value) -> SmoothGroup | Refusal:
    consumers = []
    for reader, index in x.uses:
        if reader.graph is graph and reader.op_type in _SHAPE_ONLY and reader.domain in ("", "ai.onnx"):
            continue  # reads only the shape, which smoothing keeps
        if reader.graph is not graph or index != 0 or not _consumer(reader):
            return Refusal(x, f"also read by {reader.op_type} '{reader.name}', which would see the change")
        if reader not in consumers:
            consumers.append(reader)
    if is_output(x) or any(o is x for o in graph.outputs):
        return Refusal(x, "a graph output, which would see the change")
    rows = {weight_rows(n).shape[0] for n in consumers}
    if len(rows) != 1:
        return Refusal(x, f"its readers' weights disagree on the input channels: {sorted(rows)}")
    k = rows.pop()
    p = x.producer
    if p is None:
        return Refusal(x, "a graph input or constant: no producer to fold 1/s into")
    why = _producer_refusal(p, x, k)
    if why:
        return Refusal(x, f"produced by {p.op_type} '{p.name}': {why}")
    return SmoothGroup(x, p, tuple(consumers), k)


def _producer_refusal(p: Node, x: Value, k: int) -> str:
    """'' when `p` can take 1/s on its output `x`'s last axis, else why not."""
    if p.domain not in ("", "ai.onnx"):
        return "not a default-domain op"
    op = p.op_type
    if op == "LayerNormalization":
        if p.outputs[0] is not x:
            return "x is not its normalized output"
        rank = None if x.shape is None else len(x.shape)
        if attr(p, "axis", -1) not in (-1, rank - 1 if rank else -1):
            return "it normalizes more than the last axis"
        return _const_refusal(p, 1, k, "gamma", exact_last=True) or _const_refusal(p, 2, k, "beta", optional=True)
    if op in ("MatMul", "Gemm"):
        if not _consumer(p):
            return "its weight is not a constant 2-D float matrix"
        return "" if weight_rows(p).shape[1] == k else f"it does not give the {k} channels"
    if op == "Add":
        operand = _const_operand(p)
        if operand is None:
            return "neither operand is a constant bias"
        m = p.inputs[1 - operand]
        if m.producer is None:
            return "its other operand has no producer to fold 1/s into"
        if len(m.uses) != 1 or is_output(m):
            return "its other operand has other readers"
        why = _producer_refusal(m.producer, m, k)
        if why:
            return f"before it, {m.producer.op_type} '{m.producer.name}': {why}"
        return _const_refusal(p, operand, k, "bias")
    if op == "Mul":
        operand = _const_operand(p)
        if operand is None:
            return "neither operand is a constant"
        c = const(p.inputs[operand])
        if c.ndim == 0 or c.shape[-1] != k:
            return "its constant is not per channel (a scalar Mul stays a free rescale when quantized)"
        return _const_refusal(p, operand, k, "constant")
    return "cannot take a per-channel 1/s"


def _const_operand(node: Node) -> int | None:
    flags = [const(v) is not None for v in node.inputs]
    return flags.index(True) if len(flags) == 2 and flags.count(True) == 1 else None


def _const_refusal(node: Node, index: int, k: int, what: str, *, exact_last: bool = False,
                   optional: bool = False) -> str:
    """'' when input `index` is a float constant that broadcasts along the last axis (K)."""
    v = node.inputs[index] if index < len(node.inputs) else None
    if v is None:
        return "" if optional else f"no {what}"
    c = const(v)
    if c is None or c.dtype.kind != "f":
        return f"its {what} is not a float constant"
    if exact_last and c.shape != (k,):
        return f"its {what} has shape {list(c.shape)}, not [{k}]"
    if c.ndim and c.shape[-1] not in (1, k):
        return f"its {what} has shape {list(c.shape)}, which does not broadcast over {k} channels"
    return ""


@dataclass
class SmoothQuant(Pass):
    """Fold s into every SmoothQuant group whose activation has an entry in `act_max`
    (activation tensor name -> max|X_j| [K] over the calibration data). alpha is `alphas`'
    entry for that activation, else `alpha`; an entry of None leaves the group as it is."""

    act_max: dict[str, np.ndarray] = field(default_factory=dict)
    alpha: float = 0.5
    alphas: dict[str, float | None] = field(default_factory=dict)
    name = "smooth-quant"
    exact = True

    def __post_init__(self) -> None:
        for where, a in [("alpha", self.alpha)] + [(f"alpha of '{n}'", a) for n, a in self.alphas.items()]:
            if a is not None and not (isinstance(a, (int, float)) and not isinstance(a, bool) and 0 <= a <= 1):
                raise CompileError(f"smooth-quant: {where} must be a number in [0, 1], got {a!r}")

    def run(self, model: Model) -> PassResult:
        log = ChangeLog()
        rw = Rewriter(model, log, self.name)
        groups, refusals = smooth_groups(model)
        for r in refusals:
            log.record(Change(self.name, "refuse", f"%{r.x.name}", r.reason))
        changed = False
        for g in groups:
            name = g.x.name
            if name not in self.act_max:
                continue
            alpha = self.alphas.get(name, self.alpha)
            if alpha is None:
                log.record(Change(self.name, "keep", f"%{name}", "no alpha beat leaving it"))
                continue
            s = smoothing_scales(_act_max(self.act_max[name], g), g.weight_max(), alpha)
            apply_scales(rw, model.graph, g, s)
            log.record(Change(self.name, "match", f"%{name}",
                              f"alpha {alpha:g}, {len(g.consumers)} reader(s), s in [{s.min():.3g}, {s.max():.3g}]"))
            changed = True
        return PassResult(changed, log)


def _act_max(a, g: SmoothGroup) -> np.ndarray:
    a = np.asarray(a, np.float64)
    if a.shape != (g.channels,):
        raise CompileError(f"smooth-quant: max|X| of '{g.x.name}' has shape {list(a.shape)}, "
                           f"its readers' weights have {g.channels} input channels")
    if not (np.isfinite(a).all() and (a >= 0).all()):
        raise CompileError(f"smooth-quant: max|X| of '{g.x.name}' must be finite and non-negative")
    return a


def apply_scales(rw: Rewriter, graph: Graph, g: SmoothGroup, s: np.ndarray) -> None:
    """X -> X / s in the producer, W_j -> s_j W_j in every consumer (rows of [K, N])."""
    for node in g.consumers:
        trans = node.op_type == "Gemm" and attr(node, "transB", 0)
        _scale_input(rw, graph, node, 1, s[None, :] if trans else s[:, None])
    _fold_into(rw, graph, g.producer, 1.0 / s)


def _fold_into(rw: Rewriter, graph: Graph, p: Node, inv: np.ndarray) -> None:
    """Divide the output channels of a producer that passed _producer_refusal by s."""
    if p.op_type == "LayerNormalization":
        _scale_input(rw, graph, p, 1, inv)
        if len(p.inputs) > 2 and p.inputs[2] is not None:
            _scale_input(rw, graph, p, 2, inv)
    elif p.op_type in ("MatMul", "Gemm"):
        _scale_linear_outputs(rw, graph, p, inv)
    else:  # Add of a constant after a scalable producer, or Mul by a per-channel constant
        operand = _const_operand(p)
        _scale_input(rw, graph, p, operand, inv)
        if p.op_type == "Add":
            _fold_into(rw, graph, p.inputs[1 - operand].producer, inv)


def _scale_linear_outputs(rw: Rewriter, graph: Graph, node: Node, inv: np.ndarray) -> None:
    """Divide a MatMul/Gemm's output channels (and a Gemm's C) by s."""
    trans = node.op_type == "Gemm" and attr(node, "transB", 0)
    _scale_input(rw, graph, node, 1, inv[:, None] if trans else inv[None, :])
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        _scale_input(rw, graph, node, 2, inv)


def _scale_input(rw: Rewriter, graph: Graph, node: Node, index: int, factor: np.ndarray) -> None:
    """Replace a constant input by a new initializer holding it times `factor` (numpy
    broadcasting, right-aligned like ONNX's); the old one goes when nothing reads it."""
    old = node.inputs[index]
    c = const(old)
    new = rw.add_initializer(graph, f"{old.name}_smoothed", (c.astype(np.float64) * factor).astype(c.dtype))
    rw.set_input(node, index, new)
    if not old.uses and graph.initializers.get(old.name) is old:
        rw.remove_initializer(graph, old)
