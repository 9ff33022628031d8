"""Data-free recovery before quantization, compiler side: cross-layer equalization and bias
correction (rewrites/equalize.py, rewrites/bias_correction.py) from the options, and the
statistics bias correction needs.

- empirical: E[x] of every quantized layer's input (its mean im2col patch), measured in
  onnxruntime on the calibration feeds, on the float model as it stands just before QDQ.
- analytic: BatchNormalization statistics, read before the optimize pipeline folds them. A
  folded BatchNorm is tied to the layer it went into by that layer's weight, which must be
  exactly the original weight scaled per channel by gamma / sqrt(var + eps); a BatchNorm
  that matches no layer, or more than one, is an error rather than a guess."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from calibration.collect import collect_input_stats
from ir import Model, Node
from rewrites.absorb_bias import HighBiasAbsorption
from rewrites.base import Change, ChangeLog, Pass, PassResult
from rewrites.bias_correction import BiasCorrection, analytic_means
from rewrites.channel_rules import input_layout
from rewrites.equalize import CrossLayerEqualization
from rewrites.fuse_affine import scale_weight
from rewrites.patterns import attr, const
from rewrites.qdq import InsertQDQ, plan

from .errors import CompileError

MODES = ("analytic", "empirical")
LINEAR = ("Conv", "Gemm", "MatMul")


@dataclass
class BatchNormRecord:
    """What a BatchNormalization says of the layer before it, read before folding."""

    name: str  # the BatchNorm's
    layer: str  # the layer it follows (its name before the pipeline)
    folded: np.ndarray  # that layer's weight once the BatchNorm is folded into it
    mean: np.ndarray  # of the BatchNorm's output per channel: beta
    std: np.ndarray  # |gamma| sqrt(var / (var + eps))


def read_batchnorms(model: Model) -> list[BatchNormRecord]:
    """The inference BatchNorms that follow a Conv/Gemm/MatMul with a constant weight."""
    records = []
    for node in model.graph.nodes:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        params = [const(v) for v in node.inputs[1:5]]
        layer = node.inputs[0].producer
        if any(p is None for p in params) or len(params) != 4 or layer is None or layer.op_type not in LINEAR:
            continue
        w = const(layer.inputs[1])
        if w is None:
            continue
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        eps = attr(node, "epsilon", 1e-5)
        s = gamma / np.sqrt(var + eps)
        records.append(BatchNormRecord(node.name, layer.name, scale_weight(layer, w, s).astype(w.dtype),
                                       beta, np.abs(gamma) * np.sqrt(var / (var + eps))))
    return records


@dataclass
class TieBatchNorm(Pass):
    """Right after the optimize pipeline: find the layer each BatchNorm was folded into.
    Changes nothing; the log names each tie."""

    name = "tie-batchnorm"
    records: list[BatchNormRecord] = field(default_factory=list)
    ties: list[tuple[Node, BatchNormRecord]] = field(default_factory=list, init=False)

    def run(self, model: Model) -> PassResult:
        log = ChangeLog()
        layers = [n for n in model.graph.nodes if n.op_type in LINEAR and n.domain in ("", "ai.onnx")
                  and len(n.inputs) > 1 and const(n.inputs[1]) is not None]
        self.ties = []
        for record in self.records:
            found = [n for n in layers if _same(const(n.inputs[1]), record.folded)]
            if len(found) != 1:
                what = "no layer" if not found else f"{len(found)} layers ({', '.join(n.name for n in found)})"
                raise CompileError(f"analytic bias correction: BatchNormalization '{record.name}' after "
                                   f"'{record.layer}' matches {what} after optimization; use "
                                   f"--bias-correction empirical")
            self.ties.append((found[0], record))
            log.record(Change(self.name, "tie", found[0].name, f"BatchNormalization '{record.name}'"))
        return PassResult(False, log)

    def preactivation(self, model: Model, scales: dict[str, np.ndarray]) -> dict[str, tuple]:
        """Layer name -> (mean, std) of its output per channel, divided by the equalization's
        scales; the tie must still hold (same node, same channel count)."""
        out = {}
        for node, record in self.ties:
            channels = record.mean.size
            w = const(node.inputs[1]) if node.graph is model.graph else None
            axis = 0 if node.op_type == "Conv" or (node.op_type == "Gemm" and attr(node, "transB", 0)) else 1
            if w is None or w.shape[axis] != channels:
                raise CompileError(f"analytic bias correction: the layer BatchNormalization '{record.name}' was "
                                   f"folded into was replaced or resized after optimization (pruning?); use "
                                   f"--bias-correction empirical")
            s = scales.get(node.name, np.ones(channels))
            out[node.name] = (record.mean / s, record.std / s)
        return out


def _same(w: np.ndarray, folded: np.ndarray) -> bool:
    return w.shape == folded.shape and w.dtype == folded.dtype and np.allclose(w, folded, rtol=1e-6, atol=0)


@dataclass
class AbsorbHighBias(Pass):
    """High-bias absorption (rewrites/absorb_bias.py) from the tied BatchNorm statistics, after
    equalization when that runs too."""

    name = "absorb-bias"
    exact = False
    tie: TieBatchNorm | None = None
    equalize: CrossLayerEqualization | None = None
    absorb: HighBiasAbsorption = field(default_factory=HighBiasAbsorption, init=False)

    def run(self, model: Model) -> PassResult:
        scales = self.equalize.scales if self.equalize is not None else {}
        self.absorb.preactivation = self.tie.preactivation(model, scales)
        return self.absorb.run(model)


@dataclass
class CorrectBias(Pass):
    """Gather E[x] of each layer the QDQ pass will quantize, then correct its bias."""

    name = "bias-correction"
    exact = False
    mode: str = "empirical"
    insert: InsertQDQ | None = None
    feeds: Any = None
    tie: TieBatchNorm | None = None
    equalize: CrossLayerEqualization | None = None
    progress: Callable[[int, int | None], None] | None = None

    def run(self, model: Model) -> PassResult:
        q = self.insert
        layers = plan(model, q.target, q.exclude, q.input_shapes).weighted
        if self.mode == "empirical":
            means, skipped = empirical_means(model, layers, self.feeds, self.progress), {}
        else:
            scales = self.equalize.scales if self.equalize is not None else {}
            means, skipped = analytic_means(model, layers, self.tie.preactivation(model, scales))
        correct = BiasCorrection(means=means, target=q.target, exclude=q.exclude, per_channel=q.per_channel,
                                 input_shapes=q.input_shapes, skipped=skipped)
        result = correct.run(model)
        for old, new in correct.renamed.items():  # a layer rebuilt with a bias keeps its calibrated range
            if q.table is not None and old in q.table:
                q.table[new] = q.table[old]
        return result


def empirical_means(model: Model, layers: list[str], feeds, progress=None) -> dict[str, np.ndarray]:
    """Layer name -> the mean of its input features (im2col patches of a Conv), streamed over
    `feeds` in onnxruntime."""
    nodes = {n.name: n for n in model.graph.nodes}
    wanted = {name: (nodes[name].inputs[0].name, layout) for name in layers
              if (layout := input_layout(nodes[name])) is not None}  # None: auto_pad SAME, dynamic input
    stats = collect_input_stats(model, wanted, feeds, progress=progress, max_gram_features=0)  # means only
    return {name: stat.mean for name, stat in stats.items()}


def recovery_passes(equalize: bool, bias_correction: str | None, quantize: str | None, model: Model,
                    calib, accuracy_budget, absorb: bool = False
                    ) -> tuple[list[Pass], TieBatchNorm | None, Pass | None]:
    """(passes before calibration, the BatchNorm tie to run right after the optimize
    pipeline, the bias correction to run just before QDQ insertion), validated with one-line
    errors; `model` is read for its BatchNorms before anything folds them."""
    if bias_correction is not None and bias_correction not in MODES:
        raise CompileError(f"unknown bias correction '{bias_correction}' (choose from: {', '.join(MODES)})")
    if quantize is None:
        if equalize:
            raise CompileError("equalization prepares weights for quantization: it needs quantize='int8'")
        if bias_correction is not None:
            raise CompileError("bias correction compensates weight quantization: it needs quantize='int8'")
        if absorb:
            raise CompileError("high-bias absorption prepares activations for quantization: it needs "
                               "quantize='int8'")
        return [], None, None
    before: list[Pass] = [CrossLayerEqualization()] if equalize else []
    equalizer = before[0] if before else None
    tie = None
    if absorb:
        if bias_correction == "analytic":
            raise CompileError("high-bias absorption moves biases the BatchNorm statistics describe: use "
                               "--bias-correction empirical with it")
        tie = TieBatchNorm(records=_batchnorms(model, "high-bias absorption"))
        before.append(AbsorbHighBias(tie=tie, equalize=equalizer))
    if bias_correction is None:
        return before, tie, None
    if accuracy_budget is not None:
        raise CompileError("bias correction with an accuracy budget is not supported: layers the budget keeps "
                           "float would keep a corrected bias")
    if bias_correction == "empirical" and calib is None:
        raise CompileError("empirical bias correction needs calibration data (--calib DIR), not only a "
                           "calibration table; or use --bias-correction analytic")
    if bias_correction == "analytic":
        tie = TieBatchNorm(records=_batchnorms(model, "analytic bias correction",
                                               "; use --bias-correction empirical"))
    correct = CorrectBias(mode=bias_correction, feeds=calib, tie=tie, equalize=equalizer)
    return before, tie, correct


def _batchnorms(model: Model, what: str, remedy: str = ""):
    records = read_batchnorms(model)
    if not records:
        raise CompileError(f"{what} reads BatchNormalization statistics and the model has none after a "
                           f"Conv/Gemm/MatMul{remedy}")
    return records
