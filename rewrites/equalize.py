"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization"): before weights are
quantized per tensor, balance the per-channel ranges of consecutive layers.

A producer layer (Conv, Gemm, MatMul with a constant weight) opens a chain: its output channel
i is divided by s_i (weight row and bias), and every consumer layer that reads the channel
multiplies its input channel i by s_i, so the float function is unchanged when everything in
between commutes with a positive per-channel scale: Relu, LeakyRelu, Clip with bounds 0 or
infinite, max/average pooling, a Mul by a tensor outside the chain (the gate of a
squeeze-excitation block, whose own branch is compensated by its first Conv). Consumers are
Conv (grouped and depthwise too: a depthwise Conv is a consumer of one chain and the producer
of the next), Gemm and MatMul. With s_i = sqrt(r1_i / r2_i), r1_i the largest |weight| of the
producer's channel i and r2_i that of every consumer's input channel i, both ranges become
sqrt(r1_i r2_i); chains are swept until the scales settle (a depthwise Conv is pulled by both
its chains).

Non-homogeneous activations (ReLU6 = Clip(0, 6), HardSwish, x * HardSigmoid(x); PP-OCR uses
them everywhere) do not commute with scaling: by default a chain through one is left alone,
so the pass is exact. `through_nonlinear=True` scales through them as if they were Relu; that
changes the float function, so the pass is then lossy (`exact` is False) and the change log
names every activation it scaled through (bench/equalize.py measures what it costs)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
from onnx import TensorProto

from ir import Graph, Model, Node, Value

from .base import Change, ChangeLog, Pass, PassResult, Rewriter
from .patterns import attr, const

POOLS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"})


@dataclass
class Layer:
    """A Conv/Gemm/MatMul with a constant float weight (and bias) read by it alone."""

    node: Node
    weight: Value
    bias: Value | None

    @property
    def out_axis(self) -> int:
        """The weight axis of the output channels."""
        n = self.node
        return 0 if n.op_type == "Conv" or (n.op_type == "Gemm" and attr(n, "transB", 0)) else 1

    @property
    def group(self) -> int:
        return attr(self.node, "group", 1) if self.node.op_type == "Conv" else 1


@dataclass
class Chain:
    producer: Layer
    consumers: list[Layer]
    channels: int
    lossy: list[Node]  # non-homogeneous activations scaled through (through_nonlinear only)


@dataclass
class CrossLayerEqualization(Pass):
    name = "equalize"
    through_nonlinear: bool = False
    max_sweeps: int = 100
    tolerance: float = 1e-4  # stop when every scale of a sweep is within this of 1
    # producer node name -> the s of its output channels over all sweeps (read by analytic
    # bias correction, whose pre-activation statistics are divided by it)
    scales: dict[str, np.ndarray] = field(default_factory=dict, init=False)

    @property
    def exact(self) -> bool:  # type: ignore[override]
        return not self.through_nonlinear

    def run(self, model: Model) -> PassResult:
        log = ChangeLog()
        rw = Rewriter(model, log, self.name)
        graph = model.graph
        chains, reasons = find_chains(model, self.through_nonlinear)
        for node, reason in reasons:
            log.record(Change(self.name, "skip", node.name, reason))
        if not chains:
            return PassResult(False, log)
        arrays = {id(v): const(v).astype(np.float64) for c in chains
                  for layer in [c.producer, *c.consumers] for v in (layer.weight, layer.bias) if v is not None}
        before = [_spread(c, arrays) for c in chains]
        total = {id(c): np.ones(c.channels) for c in chains}
        for _ in range(self.max_sweeps):
            worst = 0.0
            for chain in chains:
                s = _step(chain, arrays)
                total[id(chain)] *= s
                worst = max(worst, float(np.max(np.abs(s - 1.0))))
            if worst < self.tolerance:
                break
        changed = False
        written: dict[int, Value] = {}
        for chain, spread in zip(chains, before):
            s = total[id(chain)]
            producer = chain.producer.node
            self.scales[producer.name] = s
            lossy = "; lossy through " + ", ".join(f"{n.op_type} '{n.name}'" for n in chain.lossy) \
                if chain.lossy else ""
            log.record(Change(self.name, "match", producer.name,
                              f"{chain.channels} channels to {', '.join(c.node.name for c in chain.consumers)}: "
                              f"scales {s.min():.3g}..{s.max():.3g}, worst channel range ratio "
                              f"{spread:.3g} -> {_spread(chain, arrays):.3g}{lossy}"))
            for layer in [chain.producer, *chain.consumers]:
                for v in (layer.weight, layer.bias):
                    if v is not None and id(v) not in written:
                        written[id(v)] = _write(rw, graph, v, arrays[id(v)])
                        changed = True
        return PassResult(changed, log)


def find_chains(model: Model, through_nonlinear: bool = False) -> tuple[list[Chain], list[tuple[Node, str]]]:
    """Every producer whose output channels can be scaled, with the layers that compensate;
    and (producer, why not) for the others."""
    graph = model.graph
    outputs = {id(v) for v in graph.outputs}
    chains, reasons = [], []
    for node in graph.nodes:
        producer = _layer(node)
        if producer is None:
            continue
        found = _chain(graph, producer, outputs, through_nonlinear)
        if isinstance(found, str):
            reasons.append((node, found))
        else:
            chains.append(found)
    return chains, reasons


def _layer(node: Node) -> Layer | None:
    """The node as a Layer, when its weight is a constant float tensor only it reads."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "Gemm", "MatMul") \
            or len(node.inputs) < 2 or node.outputs[0] is None:
        return None
    w = node.inputs[1]
    if w is None or w.const is None or w.const.dtype != TensorProto.FLOAT or len(w.uses) != 1:
        return None
    rank = len(w.const.shape)
    if (node.op_type == "Conv" and rank < 3) or (node.op_type != "Conv" and rank != 2):
        return None
    if node.op_type == "Gemm" and attr(node, "transA", 0):
        return None
    b = node.inputs[2] if len(node.inputs) > 2 else None
    if b is not None:
        channels = w.const.shape[0 if node.op_type == "Conv" or attr(node, "transB", 0) else 1]
        if b.const is None or b.const.dtype != TensorProto.FLOAT or tuple(b.const.shape) != (channels,) \
                or len(b.uses) != 1:
            return None
    return Layer(node, w, b)


def _chain(graph: Graph, producer: Layer, outputs: set[int], through_nonlinear: bool) -> Chain | str:
    """Follow the producer's output through what commutes with per-channel scaling to the
    layers that read it; a reason string when something else reads it."""
    conv = producer.node.op_type == "Conv"
    channels = producer.weight.const.shape[producer.out_axis]
    start = producer.node.outputs[0]
    scaled = {id(start): start}
    queue, consumers, lossy, gated = [start], [], [], []
    while queue:
        v = queue.pop()
        if id(v) in outputs:
            return f"%{v.name} is a graph output"
        for reader, index in v.uses:
            where = f"{reader.op_type} '{reader.name}'"
            if reader.graph is not graph:
                return f"%{v.name} is read inside a subgraph"
            if reader.domain not in ("", "ai.onnx"):
                return f"{where} is not a standard op"
            consumer = _layer(reader) if index == 0 else None
            if consumer is not None and _reads_channels(consumer, conv, channels):
                if all(c.node is not reader for c in consumers):
                    consumers.append(consumer)
                continue
            if reader.op_type in ("Conv", "Gemm", "MatMul") and index == 0:
                return f"{where} cannot compensate (its weight is shared, not constant or laid out otherwise)"
            carried, note = _carrier(reader, index, conv, through_nonlinear)
            if carried is None:
                return f"{where} does not commute with per-channel scaling" + (f" ({note})" if note else "")
            if note == "lossy" and reader not in lossy:
                lossy.append(reader)
            if reader.op_type in ("Mul", "Div"):
                gated.append((reader, reader.inputs[1 - index]))
            if id(carried) not in scaled:
                scaled[id(carried)] = carried
                queue.append(carried)
    if not consumers:
        return "no layer reads its output through ops that commute with scaling"
    for node, other in gated:  # x * g is scaled like x only when g itself is not scaled
        if id(other) in scaled:
            return f"{node.op_type} '{node.name}' multiplies two scaled tensors"
    return Chain(producer, consumers, channels, lossy)


def _reads_channels(layer: Layer, conv: bool, channels: int) -> bool:
    """The layer reads the chain's channels on its input channel axis."""
    w = layer.weight.const.shape
    if layer.node.op_type == "Conv":
        return conv and w[1] * layer.group == channels
    if conv:
        return False
    k = w[1] if layer.node.op_type == "Gemm" and attr(layer.node, "transB", 0) else w[0]
    return k == channels


def _carrier(node: Node, index: int, conv: bool, through_nonlinear: bool) -> tuple[Value | None, str]:
    """(the output that carries the scaled channels, "" or "lossy"), or (None, why)."""
    op, out = node.op_type, node.outputs[0]
    if op in ("Relu", "LeakyRelu") and index == 0:
        return out, ""
    if op == "Clip" and index == 0:
        if all(b in (0.0, math.inf, -math.inf) for b in _clip_bounds(node)):
            return out, ""
        return (out, "lossy") if through_nonlinear else (None, "bounds other than 0 move with the scale")
    if op in POOLS and index == 0:
        if not conv:
            return None, "pooling over a feature axis"
        if any(v is not None and v.uses for v in node.outputs[1:]):
            return None, "pooling indices are read"
        return out, ""
    if op in ("Mul", "Div") and len(node.inputs) == 2 and (op == "Mul" or index == 0):
        other = node.inputs[1 - index]
        x = node.inputs[index]
        if other is None or x.shape is None or other.shape is None or len(other.shape) > len(x.shape):
            return None, "the other operand may change the channel axis"
        return out, ""
    if op == "HardSwish" and index == 0:
        return (out, "lossy") if through_nonlinear else (None, "not homogeneous")
    if op == "HardSigmoid" and index == 0:
        # x * HardSigmoid(x) (HardSwish below opset 14): the Mul reads x too and carries it.
        readers = [r for r, _ in out.uses]
        if len(readers) == 1 and readers[0].op_type == "Mul" and node.inputs[0] in readers[0].inputs:
            return (readers[0].outputs[0], "lossy") if through_nonlinear else (None, "x * HardSigmoid(x) is "
                                                                               "not homogeneous")
        return None, "not homogeneous"
    return None, ""


def _clip_bounds(node: Node) -> list[float]:
    """Clip's bounds (attributes before opset 11, inputs after); missing ones are infinite, one
    computed at run time is NaN."""
    if "min" in node.attributes or "max" in node.attributes:
        return [float(attr(node, "min", -math.inf)), float(attr(node, "max", math.inf))]
    bounds = []
    for i, missing in ((1, -math.inf), (2, math.inf)):
        v = node.inputs[i] if i < len(node.inputs) else None
        c = const(v)
        bounds.append(missing if v is None else math.nan if c is None or c.size != 1 else float(c.ravel()[0]))
    return bounds


# ---- the arithmetic -------------------------------------------------------------------------


def _out_ranges(layer: Layer, w: np.ndarray) -> np.ndarray:
    """max |w| of each output channel."""
    return np.max(np.abs(np.moveaxis(w, layer.out_axis, 0).reshape(w.shape[layer.out_axis], -1)), axis=1)


def _grouped(layer: Layer, w: np.ndarray) -> np.ndarray:
    """A Conv weight [M, C/g, k...] viewed as [g, M/g, C/g, K]: input channel j*(C/g)+c of
    group j is [j, :, c, :]."""
    g = layer.group
    return w.reshape(g, w.shape[0] // g, w.shape[1], -1)


def _in_ranges(layer: Layer, w: np.ndarray) -> np.ndarray:
    """max |w| over everything that multiplies each input channel."""
    if layer.node.op_type == "Conv":
        return np.max(np.abs(_grouped(layer, w)), axis=(1, 3)).reshape(-1)
    return np.max(np.abs(w), axis=1 if layer.out_axis == 1 else 0)  # [K, N] or [N, K]


def _scale_out(layer: Layer, w: np.ndarray, d: np.ndarray) -> np.ndarray:
    shape = [1] * w.ndim
    shape[layer.out_axis] = -1
    return w * d.reshape(shape)


def _scale_in(layer: Layer, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    if layer.node.op_type == "Conv":
        g = layer.group
        return (_grouped(layer, w) * s.reshape(g, 1, -1, 1)).reshape(w.shape)
    return w * (s[:, None] if layer.out_axis == 1 else s[None, :])


def _step(chain: Chain, arrays: dict[int, np.ndarray]) -> np.ndarray:
    """One equalization of the chain in place; returns the s it applied."""
    p = chain.producer
    r1 = _out_ranges(p, arrays[id(p.weight)])
    r2 = np.max([_in_ranges(c, arrays[id(c.weight)]) for c in chain.consumers], axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.sqrt(r1 / r2)
    s = np.where(np.isfinite(s) & (s > 0), s, 1.0)  # a dead channel on either side stays
    arrays[id(p.weight)] = _scale_out(p, arrays[id(p.weight)], 1.0 / s)
    if p.bias is not None:
        arrays[id(p.bias)] = arrays[id(p.bias)] / s
    for c in chain.consumers:
        arrays[id(c.weight)] = _scale_in(c, arrays[id(c.weight)], s)
    return s


def _spread(chain: Chain, arrays: dict[int, np.ndarray]) -> float:
    """The worst ratio between a channel's range in the producer and in the consumers."""
    r1 = _out_ranges(chain.producer, arrays[id(chain.producer.weight)])
    r2 = np.max([_in_ranges(c, arrays[id(c.weight)]) for c in chain.consumers], axis=0)
    live = (r1 > 0) & (r2 > 0)
    if not live.any():
        return 1.0
    ratio = r1[live] / r2[live]
    return float(np.max(np.maximum(ratio, 1.0 / ratio)))


def _write(rw: Rewriter, graph: Graph, value: Value, array: np.ndarray) -> Value:
    """Its reader reads the equalized copy; the old constant goes once unread."""
    base = re.sub(r"_equalized(_\d+)?$", "", value.name) + "_equalized"
    new = rw.add_initializer(graph, base, array.astype(np.float32))
    for node, index in list(value.uses):
        rw.set_input(node, index, new)
    if graph.initializers.get(value.name) is value and not value.uses:
        rw.remove_initializer(graph, value)
    return new
