"""The AdaRound pass: snap the float weight of every planned Conv/Gemm/MatMul to the grid
point AdaRound chose (w' = scale * code), given each node's input statistics.

With `weight_bits=8` the grid is InsertQDQ's (calibration.scales.weight_params, symmetric int8,
per output channel or per tensor) and the weight that defines each scale keeps its nearest
code, so the scale is unchanged and InsertQDQ's round-to-nearest of w' gives back exactly the
chosen codes (checked here; a layer where it would not keeps its float weight). With fewer
bits the weights are snapped to that symmetric grid and stay float: a weight-only
fake-quantized model for measuring accuracy (onnxruntime has no int4 Conv kernel).

Layers without a Gram (over MAX_GRAM_FEATURES features, or no statistics) and weights shared
by several nodes keep round-to-nearest, and the log says so."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from calibration.gram import FeatureLayout, InputStats
from calibration.scales import MIN_SCALE, quantize, weight_params
from ir import CompileError, Model, Node

from .adaround import adaround, auto_iterations, dequantized, rounding_loss, rtn_codes
from .base import Change, ChangeLog, Pass, PassResult, Rewriter
from .channel_rules import input_layout
from .patterns import attr, const
from .qdq import weight_axis, plan
from .qdq_targets import ORT_CPU, Target

ROUNDINGS = ("rtn", "adaround")
WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8)


@dataclass(frozen=True)
class WeightLayer:
    """A planned node's weight as AdaRound sees it: rows = output channels, columns in the
    feature order of its input layout."""

    node: Node
    index: int  # the weight's input index
    axis: int  # the output-channel axis of the stored weight
    layout: FeatureLayout | None  # how the input becomes features (None: unknown padding)
    groups: int


def weight_layers(model: Model, target: Target = ORT_CPU, exclude=(), input_shapes=None) -> list[WeightLayer]:
    """The weighted nodes InsertQDQ would quantize, in graph order."""
    nodes = {n.name: n for n in model.graph.nodes}
    out = []
    for name in plan(model, target, exclude, input_shapes).weighted:
        node = nodes[name]
        index = target.weighted[node.op_type][0]
        groups = int(attr(node, "group", 1)) if node.op_type == "Conv" else 1
        out.append(WeightLayer(node, index, weight_axis(node), input_layout(node), groups))
    return out


@dataclass
class AdaRoundWeights(Pass):
    """Snap each planned weight to its AdaRound codes, minimising the layer's output error
    with `stats` (node name -> InputStats of its input on the quantized prefix)."""

    name = "adaround"
    exact = False
    stats: dict[str, InputStats] = field(default_factory=dict)
    target: Target = ORT_CPU
    exclude: tuple = ()
    per_channel: bool = True
    input_shapes: dict | None = None
    weight_bits: int = 8
    rounding: str = "adaround"
    iterations: int | None = None  # soft-rounding steps per layer (None: rewrites/adaround.py's budget)

    def run(self, model: Model) -> PassResult:
        if self.rounding not in ROUNDINGS:
            raise CompileError(f"adaround: unknown rounding '{self.rounding}' (choose from: {', '.join(ROUNDINGS)})")
        if self.weight_bits not in WEIGHT_BITS:
            raise CompileError(f"adaround: weight_bits must be an integer from 2 to 8, got {self.weight_bits!r}")
        log = ChangeLog()
        rw = Rewriter(model, log, self.name)
        changed = False
        for layer in weight_layers(model, self.target, self.exclude, self.input_shapes):
            changed |= self._layer(rw, log, layer)
        return PassResult(changed, log)

    def _note(self, log: ChangeLog, node: Node, detail: str) -> None:
        log.record(Change(self.name, "rounding", node.name, detail))

    def _layer(self, rw: Rewriter, log: ChangeLog, layer: WeightLayer) -> bool:
        node, value = layer.node, layer.node.inputs[layer.index]
        w = const(value).astype(np.float32)
        rows = w.shape[layer.axis]
        w2d = np.moveaxis(w, layer.axis, 0).reshape(rows, -1)  # Conv: (c, k...) per row
        axis = layer.axis if self.per_channel else None
        scale, qmax = self._scale(w, axis)
        scale2d = scale.reshape(rows, 1) if axis is not None else scale
        nearest = rtn_codes(w2d, scale2d, 0, -qmax, qmax)
        # The weight that sets each scale keeps its nearest code, so the scale stays put.
        mags = np.abs(w2d)
        fixed = mags == (mags.max(axis=1, keepdims=True) if axis is not None else mags.max())
        codes, why = nearest, None
        stats = self.stats.get(node.name)
        if self.rounding == "rtn":
            why = "round-to-nearest"
        elif len(value.uses) > 1:
            why = "round-to-nearest: the weight is shared with other nodes"
        elif layer.layout is None:
            why = "round-to-nearest: the input's padding depends on unknown sizes"
        elif stats is None:
            why = "round-to-nearest: no input statistics"
        elif stats.gram is None:
            why = f"round-to-nearest: {stats.features} input features are over the Gram limit"
        if why is None:
            codes, detail = self._adaround(w2d, stats.gram, scale2d, qmax, fixed, layer, nearest)
        snapped = np.moveaxis(dequantized(codes, scale2d, 0).reshape(np.moveaxis(w, layer.axis, 0).shape),
                              0, layer.axis).astype(np.float32)
        if self.weight_bits == 8:
            wp = weight_params(snapped, axis, "int8")
            back = np.moveaxis(quantize(snapped, wp).astype(np.int32), layer.axis, 0).reshape(rows, -1)
            if not np.array_equal(back, codes):  # a safeguard: never seen, InsertQDQ must store the codes
                self._note(log, node, "kept float: the snapped weight does not requantize to its codes")
                return False
            if why is not None:
                self._note(log, node, why)
                return False  # InsertQDQ rounds to nearest itself
        if why is not None:
            self._note(log, node, f"{why} ({self.weight_bits}-bit)")
        else:
            self._note(log, node, detail)
        graph = node.graph
        new = rw.add_initializer(graph, f"{value.name}_{self.rounding}{self.weight_bits}", snapped)
        rw.set_input(node, layer.index, new)
        if not value.uses and graph.initializers.get(value.name) is value:
            rw.remove_initializer(graph, value)
        return True

    def _scale(self, w: np.ndarray, axis: int | None) -> tuple[np.ndarray, int]:
        """Symmetric scales as InsertQDQ computes them for 8 bits (max|w| / qmax, float32)."""
        qmax = 2 ** (self.weight_bits - 1) - 1
        if self.weight_bits == 8:
            return weight_params(w, axis, "int8").scale, qmax
        a = np.abs(w.astype(np.float64))
        a = a.max() if axis is None else np.moveaxis(a, axis, 0).reshape(w.shape[axis], -1).max(axis=1)
        return np.maximum(a / qmax, MIN_SCALE).astype(np.float32), qmax

    def _adaround(self, w2d, gram, scale2d, qmax, fixed, layer: WeightLayer, nearest):
        rows, fg = w2d.shape
        g = layer.groups
        if gram.shape[0] != fg * g:
            raise CompileError(f"adaround: input statistics of '{layer.node.name}' have {gram.shape[0]} "
                               f"features, the weight expects {fg * g}")
        # A grouped conv: group j's rows read only its own channels, block j of the Gram.
        per = rows // g
        w3, fixed3 = w2d.reshape(g, per, fg), fixed.reshape(g, per, fg)
        s3 = scale2d.reshape(g, per, 1) if np.ndim(scale2d) else scale2d
        blocks = np.stack([gram[j * fg:(j + 1) * fg, j * fg:(j + 1) * fg] for j in range(g)])
        iterations = auto_iterations(per, fg) if self.iterations is None else self.iterations
        codes = adaround(w3, blocks, s3, 0, -qmax, qmax, fixed=fixed3, iterations=iterations,
                         where=layer.node.name).reshape(rows, fg)
        moved = int(np.count_nonzero(codes != nearest))
        before = rounding_loss(nearest.reshape(g, per, fg), w3, blocks, s3, 0)
        after = rounding_loss(codes.reshape(g, per, fg), w3, blocks, s3, 0)
        ratio = after / before if before > 0 else 1.0
        return codes, (f"{self.weight_bits}-bit adaround: {moved} of {codes.size} weights rounded away from "
                       f"nearest, output error x{ratio:.3f} of round-to-nearest ({iterations} iterations)")
