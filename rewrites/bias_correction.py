"""Bias correction (Nagel et al. 2019): quantizing a layer's weight W to W_q shifts the mean of
its output by (W_q - W) E[x]; subtracting that from the bias, b' = b - (W_q - W) E[x], gives
back the float output's mean. W_q is computed exactly as InsertQDQ will compute it (the same
`weight_params`/`quantize`/`dequantize`, per channel or per tensor, from the weights as they
stand when this pass runs), for exactly the layers its plan quantizes.

E[x] comes from the caller (compiler/recovery.py): measured on calibration data (the mean
im2col patch of a Conv, padding included), or derived analytically here from BatchNorm
statistics: a folded BatchNorm says the pre-activation h of each channel has mean beta and
standard deviation |gamma| (for the data it was trained on); taking h as Gaussian, E[f(h)] has
a closed form for the piecewise-polynomial activations of CNNs (Relu, LeakyRelu, Clip,
HardSigmoid, HardSwish and x * HardSigmoid(x)), `gaussian_expectation`. Layers whose input is
not such an activation of a BatchNorm-described layer (the first layer, a residual sum, a
gated product) keep their bias and the log says why."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from calibration.scales import dequantize, quantize, weight_params
from ir import CompileError, Model, Node, Value

from .base import Change, ChangeLog, Pass, PassResult, Rewriter
from .equalize import _clip_bounds
from .patterns import attr, const
from .qdq import weight_axis, plan
from .qdq_targets import ORT_CPU, Target

# ---- E[f(h)] for h ~ N(mean, std^2) ----------------------------------------------------------

# f as pieces (lo, hi, (c0, c1, c2)): f(h) = c0 + c1 h + c2 h^2 on lo < h < hi, 0 elsewhere.
Pieces = list[tuple[float, float, tuple[float, float, float]]]
IDENTITY: Pieces = [(-math.inf, math.inf, (0.0, 1.0, 0.0))]
RELU: Pieces = [(0.0, math.inf, (0.0, 1.0, 0.0))]


def clip_pieces(lo: float, hi: float) -> Pieces:
    pieces = [(lo, hi, (0.0, 1.0, 0.0))]
    if math.isfinite(lo):
        pieces.append((-math.inf, lo, (lo, 0.0, 0.0)))
    if math.isfinite(hi):
        pieces.append((hi, math.inf, (hi, 0.0, 0.0)))
    return pieces


def leaky_relu_pieces(alpha: float) -> Pieces:
    return [(-math.inf, 0.0, (0.0, alpha, 0.0)), (0.0, math.inf, (0.0, 1.0, 0.0))]


def hard_sigmoid_pieces(alpha: float, beta: float, times_x: bool = False) -> Pieces:
    """max(0, min(1, alpha h + beta)), or h times it (HardSwish is alpha 1/6, beta 1/2)."""
    if alpha <= 0:
        raise CompileError(f"bias correction: HardSigmoid with alpha {alpha} <= 0 is not supported")
    t0, t1 = -beta / alpha, (1.0 - beta) / alpha
    if times_x:
        return [(t0, t1, (0.0, beta, alpha)), (t1, math.inf, (0.0, 1.0, 0.0))]
    return [(t0, t1, (beta, alpha, 0.0)), (t1, math.inf, (1.0, 0.0, 0.0))]


def gaussian_expectation(pieces: Pieces, mean, std) -> np.ndarray:
    """E[f(h)], h ~ N(mean, std^2) per channel, in closed form: on (a, b) with z = (h - mean)/std,
    E[1] = dPhi, E[h] = mean dPhi + std dphi, E[h^2] = mean^2 dPhi + 2 mean std dphi
    + std^2 (dPhi + a' phi(a') - b' phi(b')), a', b' the standardized bounds."""
    mu, sd = np.broadcast_arrays(np.asarray(mean, np.float64), np.asarray(std, np.float64))
    sd = np.abs(sd)
    out = np.zeros(mu.shape)
    live = sd > 0
    m, s = mu[live], sd[live]
    for lo, hi, (c0, c1, c2) in pieces:
        a, b = (lo - m) / s, (hi - m) / s
        d_cdf = _cdf(b) - _cdf(a)
        d_pdf = _pdf(a) - _pdf(b)
        tails = _times_pdf(a) - _times_pdf(b)
        e1 = d_cdf
        eh = m * d_cdf + s * d_pdf
        eh2 = m * m * d_cdf + 2 * m * s * d_pdf + s * s * (d_cdf + tails)
        out[live] += c0 * e1 + c1 * eh + c2 * eh2
    # A channel with no spread takes the activation's value at its mean.
    point = ~live
    for lo, hi, (c0, c1, c2) in pieces:
        inside = point & (mu > lo) & (mu <= hi)
        out[inside] += c0 + c1 * mu[inside] + c2 * mu[inside] ** 2
    return out


def _cdf(z):
    return 0.5 * (1.0 + np.vectorize(math.erf, otypes=[float])(np.asarray(z) / math.sqrt(2.0)))


def _pdf(z):
    z = np.asarray(z, dtype=np.float64)
    with np.errstate(over="ignore"):
        return np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def _times_pdf(z):
    """z phi(z), 0 at +-inf."""
    z = np.asarray(z, dtype=np.float64)
    return np.where(np.isfinite(z), np.nan_to_num(z) * _pdf(z), 0.0)


# ---- which activation feeds a layer ----------------------------------------------------------


def analytic_means(model: Model, nodes: list[str], preactivation: dict[str, tuple[np.ndarray, np.ndarray]]
                   ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """E[x] per input channel of each named layer, from the (mean, std) of the pre-activation
    output of the layers in `preactivation` (node name -> arrays per output channel); and
    (name -> why not) for the layers it cannot tell."""
    by_name = {n.name: n for n in model.graph.nodes}
    means, reasons = {}, {}
    for name in nodes:
        x = by_name[name].inputs[0]
        found = _expected(x, preactivation)
        if isinstance(found, str):
            reasons[name] = found
        else:
            means[name] = found
    return means, reasons


def _expected(v: Value, pre: dict) -> np.ndarray | str:
    node = v.producer
    if node is None:
        return f"input %{v.name} is a graph input or constant"
    if node.name in pre:
        return np.asarray(pre[node.name][0], np.float64)
    op, inputs = node.op_type, node.inputs
    if op == "GlobalAveragePool":
        return _expected(inputs[0], pre)
    if op in ("Mul", "Div", "Add", "Sub") and len(inputs) == 2:
        found = _affine(node, pre)
        if found is not None:
            return found
    pieces, h = _activation(node)
    if pieces is None:
        return f"%{v.name} comes from {op} '{node.name}', not an activation of a BatchNorm-described layer"
    source = h.producer
    if source is None or source.name not in pre:
        return f"the input of {op} '{node.name}' is not the output of a BatchNorm-described layer"
    mean, std = pre[source.name]
    return gaussian_expectation(pieces, mean, std)


def _affine(node: Node, pre: dict) -> np.ndarray | None:
    """E[x op c] for a scalar constant c (the learnable affine blocks of PP-OCRv4)."""
    a, b = node.inputs
    ca, cb = const(a), const(b)
    if cb is not None and cb.size == 1 and ca is None:
        x, c, x_first = a, float(cb.ravel()[0]), True
    elif ca is not None and ca.size == 1 and cb is None and node.op_type in ("Mul", "Add"):
        x, c, x_first = b, float(ca.ravel()[0]), False
    else:
        return None
    inner = _expected(x, pre)
    if isinstance(inner, str):
        return None
    op = node.op_type
    if op == "Mul":
        return inner * c
    if op == "Add":
        return inner + c
    if op == "Sub":
        return inner - c if x_first else None
    return inner / c if x_first and c != 0 else None


def _activation(node: Node) -> tuple[Pieces | None, Value | None]:
    op, x = node.op_type, node.inputs[0] if node.inputs else None
    if op == "Relu":
        return RELU, x
    if op == "LeakyRelu":
        return leaky_relu_pieces(attr(node, "alpha", 0.01)), x
    if op == "Clip":
        lo, hi = _clip_bounds(node)
        return (clip_pieces(lo, hi), x) if not (math.isnan(lo) or math.isnan(hi)) else (None, None)
    if op == "HardSigmoid":
        return hard_sigmoid_pieces(attr(node, "alpha", 0.2), attr(node, "beta", 0.5)), x
    if op == "HardSwish":
        return hard_sigmoid_pieces(1 / 6, 0.5, times_x=True), x
    if op == "Mul" and len(node.inputs) == 2:
        for h, g in (node.inputs, node.inputs[::-1]):
            p = g.producer if g is not None else None
            if p is not None and p.op_type == "HardSigmoid" and p.inputs[0] is h:
                return hard_sigmoid_pieces(attr(p, "alpha", 0.2), attr(p, "beta", 0.5), times_x=True), h
    return None, None


# ---- the correction --------------------------------------------------------------------------


def weight_error(node: Node, target: Target = ORT_CPU, per_channel: bool = True) -> np.ndarray:
    """W_q - W as [outputs, features] in float64, W_q as InsertQDQ computes it."""
    w_index = target.weighted[node.op_type][0]
    w = const(node.inputs[w_index])
    wp = weight_params(w, weight_axis(node) if per_channel else None, target.weight_dtype)
    return as_matrix(node, dequantize(quantize(w, wp), wp).astype(np.float64) - w.astype(np.float64))


def as_matrix(node: Node, w: np.ndarray) -> np.ndarray:
    """A weight of `node` as [outputs, features]."""
    if node.op_type == "Conv":
        return w.reshape(w.shape[0], -1)
    return w if weight_axis(node) == 0 else w.T


def mean_shift(node: Node, mean: np.ndarray, target: Target = ORT_CPU, per_channel: bool = True) -> np.ndarray:
    """(W_q - W) E[x] per output. `mean` holds one value per input channel, or (a Conv) one
    per im2col feature."""
    return apply_to_mean(node, weight_error(node, target, per_channel), mean)


def apply_to_mean(node: Node, matrix: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """matrix [outputs, features] (a weight-shaped matrix of `node`, as weight_error gives it)
    times the input mean: per input channel (repeated over a Conv's kernel) or per feature."""
    mean = np.asarray(mean, np.float64)
    if node.op_type != "Conv":
        if mean.shape != (matrix.shape[1],):
            raise CompileError(f"bias correction of '{node.name}': {mean.size} input means for "
                               f"{matrix.shape[1]} features")
        return matrix @ mean
    group = attr(node, "group", 1)
    w_shape = const(node.inputs[1]).shape
    channels, kernel = w_shape[1] * group, math.prod(w_shape[2:])
    if mean.shape == (channels,):
        mean = np.repeat(mean, kernel)  # the same mean at every kernel position
    if mean.shape != (channels * kernel,):
        raise CompileError(f"bias correction of '{node.name}': {mean.size} input means for "
                           f"{channels} channels of a {list(w_shape[2:])} kernel")
    per_group = mean.reshape(group, -1)  # group j reads features [j F/g, (j+1) F/g)
    rows = matrix.reshape(group, matrix.shape[0] // group, -1)
    return np.einsum("gof,gf->go", rows, per_group).reshape(-1)


@dataclass
class BiasCorrection(Pass):
    """b' = b - (W_q - W) E[x] for every layer the QDQ plan quantizes that has an entry in
    `means` (node name -> E[x]); the target, exclusions, per-channel choice and shapes must be
    InsertQDQ's. Layers without a bias slot get one; MatMul (no bias) is left alone."""

    name = "bias-correction"
    exact = False
    means: dict[str, np.ndarray] = field(default_factory=dict)
    target: Target = ORT_CPU
    exclude: tuple = ()
    per_channel: bool = True
    input_shapes: dict | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # node name -> why E[x] is unknown
    # output name -> the new name, for layers that had to be rebuilt with a bias: a calibration
    # table keyed by the old name must follow (compiler/recovery.py)
    renamed: dict[str, str] = field(default_factory=dict, init=False)

    def run(self, model: Model) -> PassResult:
        log = ChangeLog()
        rw = Rewriter(model, log, self.name)
        graph = model.graph
        nodes = {n.name: n for n in graph.nodes}
        changed = False
        for name in plan(model, self.target, self.exclude, self.input_shapes).weighted:
            node = nodes[name]
            if name not in self.means:
                log.record(Change(self.name, "skip", name, self.skipped.get(name, "no input mean")))
                continue
            b_index = self.target.weighted[node.op_type][1]
            if b_index is None:
                log.record(Change(self.name, "skip", name, f"{node.op_type} has no bias"))
                continue
            shift = mean_shift(node, self.means[name], self.target, self.per_channel)
            bias = node.inputs[b_index] if b_index < len(node.inputs) else None
            old = np.zeros(shift.shape) if bias is None else const(bias).astype(np.float64)
            new = rw.add_initializer(graph, f"{name}_bias_corrected", (old - shift).astype(np.float32))
            if bias is None:
                old_name = node.outputs[0].name
                self.renamed[old_name] = _add_bias(rw, node, new).name
            else:
                rw.set_input(node, b_index, new)
                if not bias.uses and graph.initializers.get(bias.name) is bias:
                    rw.remove_initializer(graph, bias)
            log.record(Change(self.name, "match", name, f"output mean shift up to {np.max(np.abs(shift)):.3g} "
                                                        f"removed ({shift.size} channels)"))
            changed = True
        return PassResult(changed, log)


def _add_bias(rw: Rewriter, node: Node, bias: Value) -> Value:
    """A Conv or Gemm read without a bias: the same node with one; returns its output."""
    graph = node.graph
    attributes = {k: replace(a) for k, a in node.attributes.items()}
    inputs = list(node.inputs) + [None] * (2 - len(node.inputs)) + [bias]
    new = rw.add_node(graph, node, node.op_type, inputs, domain=node.domain, name=node.name, attributes=attributes)
    old = node.outputs[0]
    rw.set_type(new.outputs[0], old.dtype, old.shape)
    rw.replace_uses(old, new.outputs[0])
    rw.remove_node(node)
    return new.outputs[0]
