"""High-bias absorption (Nagel et al. 2019): when a layer's pre-activation h has a channel
that is almost always above c = max(0, mean - 3 std) (the statistics of the BatchNorm folded
into it), relu(h) = relu(h - c) + c there, so c can leave the producer's bias and enter the
next layers' biases as W2 c. The activation then has a smaller range to quantize. Exact only
when h >= c, an assumption about the data, so the pass is lossy.

Only chains that carry a per-channel shift unchanged are touched: the producer's output read
by Relu alone (or Clip(0, inf)), then max or global average pooling or Relu, into Conv layers
without padding (a zero-padded border would not see the shift) and Gemms, each with a bias."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ir import Model, Node, Value

from .base import Change, ChangeLog, Pass, PassResult, Rewriter
from .bias_correction import apply_to_mean, as_matrix
from .equalize import Chain, _clip_bounds, _write, find_chains
from .patterns import const, unpadded

SHIFT_CARRIERS = frozenset({"Relu", "MaxPool", "GlobalMaxPool", "GlobalAveragePool"})


@dataclass
class HighBiasAbsorption(Pass):
    name = "absorb-bias"
    exact = False
    # producer node name -> (mean, std) of its output per channel
    preactivation: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    sigmas: float = 3.0
    absorbed: dict[str, np.ndarray] = field(default_factory=dict, init=False)  # producer -> c

    def run(self, model: Model) -> PassResult:
        log = ChangeLog()
        rw = Rewriter(model, log, self.name)
        chains, _ = find_chains(model)
        changed = False
        for chain in chains:
            producer = chain.producer.node
            if producer.name not in self.preactivation:
                continue
            why = _unsafe(chain)
            if why:
                log.record(Change(self.name, "skip", producer.name, why))
                continue
            mean, std = (np.asarray(a, np.float64) for a in self.preactivation[producer.name])
            c = np.maximum(0.0, mean - self.sigmas * np.abs(std))
            if not np.any(c > 0):
                continue
            graph = model.graph
            _write(rw, graph, chain.producer.bias, const(chain.producer.bias).astype(np.float64) - c)
            for consumer in chain.consumers:
                node = consumer.node
                w = as_matrix(node, const(consumer.weight).astype(np.float64))
                _write(rw, graph, consumer.bias, const(consumer.bias).astype(np.float64) + apply_to_mean(node, w, c))
            self.absorbed[producer.name] = c
            log.record(Change(self.name, "match", producer.name,
                              f"{int(np.count_nonzero(c))} of {c.size} channels, up to {c.max():.3g}, absorbed into "
                              f"{', '.join(x.node.name for x in chain.consumers)}"))
            changed = True
        return PassResult(changed, log)


def _unsafe(chain: Chain) -> str:
    """Why a constant per-channel shift would not pass the chain unchanged ('' if it does)."""
    if chain.producer.bias is None or any(c.bias is None for c in chain.consumers):
        return "a layer of the chain has no bias"
    for c in chain.consumers:
        n = c.node
        if n.op_type == "Conv" and not unpadded(n):
            return f"Conv '{n.name}' pads its input with zeros, which the shift does not reach"
        if n.op_type == "MatMul":
            return f"MatMul '{n.name}' has no bias"
    consumers = {id(c.node) for c in chain.consumers}
    out = chain.producer.node.outputs[0]
    for reader, _ in out.uses:  # the first op must be the Relu that makes relu(h) = relu(h - c) + c
        if not _is_relu(reader):
            return f"{reader.op_type} '{reader.name}' reads the pre-activation"
    queue: list[Value] = [r.outputs[0] for r, _ in out.uses]
    while queue:
        v = queue.pop()
        for reader, _ in v.uses:
            if id(reader) in consumers:
                continue
            if reader.op_type not in SHIFT_CARRIERS and not _is_relu(reader):
                return f"{reader.op_type} '{reader.name}' does not carry a shift"
            queue.append(reader.outputs[0])
    return ""


def _is_relu(node: Node) -> bool:
    return node.op_type == "Relu" or (node.op_type == "Clip" and _clip_bounds(node) == [0.0, math.inf])
