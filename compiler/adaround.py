"""AdaRound in the compiler: gather each weighted node's input Gram on the already-quantized
prefix (onnxruntime runs here, not in rewrites/), then let rewrites/adaround_weights.py snap
the weights to the codes that minimise each layer's output error.

The prefix is a quantized copy of the model run once on the calibration feeds: for W8A8 the
copy InsertQDQ would make with the calibration table (so each layer sees the quantized
activations and round-to-nearest weights before it), for fewer weight bits the weights alone
rounded to nearest on that grid."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import ir
from calibration.collect import collect_input_stats
from calibration.gram import InputStats
from ir import Model
from rewrites.adaround_weights import ROUNDINGS, WEIGHT_BITS, AdaRoundWeights, weight_layers
from rewrites.base import Pass, PassResult
from rewrites.cleanup import DeadCodeElimination
from rewrites.qdq import InsertQDQ

from .errors import CompileError


def check_rounding(rounding: str, allowed=ROUNDINGS, mode: str = "quantize='int8'") -> str:
    if rounding not in allowed:
        raise CompileError(f"unknown weight rounding '{rounding}' for {mode} (choose from: {', '.join(allowed)})")
    return rounding


@dataclass
class AdaRound(Pass):
    """Before `insert` (which must have its calibration table by now), or alone with
    `weight_bits` < 8 for weight-only fake quantization: gather Grams on `feeds` through the
    quantized prefix and snap every planned weight to its AdaRound codes."""

    name = "adaround"
    exact = False
    insert: InsertQDQ | None = None
    feeds: Any = None
    weight_bits: int = 8
    iterations: int | None = None
    progress: Callable[[int, int | None], None] | None = None

    def run(self, model: Model) -> PassResult:
        if self.weight_bits not in WEIGHT_BITS:
            raise CompileError(f"adaround: weight_bits must be an integer from 2 to 8, got {self.weight_bits!r}")
        if self.feeds is None:
            raise CompileError("weight rounding 'adaround' needs calibration data (--calib DIR), "
                               "not only a calibration table")
        if self.weight_bits == 8 and (self.insert is None or self.insert.table is None):
            raise CompileError("adaround: 8-bit rounding runs after calibration (it needs the calibration table)")
        insert = self.insert or InsertQDQ()
        options = dict(target=insert.target, exclude=tuple(insert.exclude), per_channel=insert.per_channel,
                       input_shapes=insert.input_shapes, weight_bits=self.weight_bits)
        stats = prefix_stats(model, self._prefix(model, options), options, self.feeds, self.progress)
        snap = AdaRoundWeights(stats=stats, iterations=self.iterations, **options)
        return snap.run(model)

    def _prefix(self, model: Model, options: dict) -> Model:
        """A quantized copy of `model`; `model` itself is untouched."""
        copy = ir.load(ir.to_proto(model))
        if self.weight_bits == 8:
            replace(self.insert).run(copy)
        else:
            AdaRoundWeights(rounding="rtn", **options).run(copy)
        DeadCodeElimination().run(copy)
        return copy


def prefix_stats(model: Model, prefix: Model, options: dict, feeds, progress=None) -> dict[str, InputStats]:
    """Input mean and Gram of every weighted node of `model` (node name -> stats), observed on
    the node of the same name in `prefix`."""
    layers = weight_layers(model, options["target"], options["exclude"], options["input_shapes"])
    nodes = {n.name: n for n in prefix.graph.nodes}
    wanted = {layer.node.name: (nodes[layer.node.name].inputs[0].name, layer.layout) for layer in layers
              if layer.layout is not None and layer.node.name in nodes}
    return collect_input_stats(prefix, wanted, feeds, progress=progress)
