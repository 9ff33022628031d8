"""Budgeted float fallback: quantize, and while the accuracy drop is over budget keep the
next most sensitive node in float. Each step's accuracy and one-thread latency is recorded,
so the report shows the trade-off curve, not only where it stopped."""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from ir import Model
from rewrites.base import Change, ChangeLog, Pass, PassResult
from rewrites.qdq import InsertQDQ

from .errors import CompileError
from .sensitivity import measure_nodes, quantized_variant, worst_error
from .verify import run, runnable

Metric = Callable[[bytes | Path], float]  # a model as onnxruntime loads it -> higher is better


@dataclass(frozen=True)
class FallbackStep:
    float_nodes: tuple[str, ...]  # kept in float at this step
    metric: float
    latency_ratio: float  # one-thread latency against the float model


@dataclass(frozen=True)
class FallbackCurve:
    """What the fallback tried: the float model's metric, the budget, and every step up to
    the first within budget."""

    float_metric: float
    budget: float
    steps: tuple[FallbackStep, ...]


@dataclass
class BudgetedQuantize(Pass):
    """`insert`, with the fewest most-sensitive nodes kept float such that the metric drops
    at most `budget` from the float model's: the outputs' worst cosine with the float model
    on `feeds` by default (the float model scores 1), or `metric`, the user's evaluation."""

    name = "quantize"
    exact = False
    insert: InsertQDQ | None = None
    budget: float = 0.01
    feeds: list = field(default_factory=list)
    reference: list = field(default_factory=list)  # the float model's outputs on feeds
    metric: Metric | None = None
    progress: Callable | None = None
    curve: FallbackCurve | None = field(default=None, init=False)  # the result, for the report

    def run(self, model: Model) -> PassResult:
        if not self.budget >= 0:
            raise CompileError(f"accuracy budget must be a drop >= 0, got {self.budget}")
        scratch = Path(tempfile.mkdtemp(prefix="onnxcc-fallback-"))
        steps: list[FallbackStep] = []
        try:
            float_model = runnable(model, scratch)
            float_value = self._score(float_model)
            float_ms = _latency(float_model, self.feeds[0])
            ranked = self._ranked(model, scratch)
            kept: list[str] = []
            for k in range(len(ranked) + 1):
                kept = ranked[:k]
                variant = quantized_variant(model, self.insert, tuple(kept), scratch)
                value = self._score(variant)
                steps.append(FallbackStep(tuple(kept), value, _latency(variant, self.feeds[0]) / float_ms))
                if self.progress is not None:
                    self.progress(k + 1, len(ranked) + 1, "fallback")
                if float_value - value <= self.budget:
                    break
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        self.curve = FallbackCurve(float_value, self.budget, tuple(steps))
        if float_value - steps[-1].metric > self.budget:
            raise CompileError(f"accuracy budget {self.budget:g} not reached even with every quantized node "
                               f"in float (drop {float_value - steps[-1].metric:.4g})")
        result = replace(self.insert, exclude=tuple(self.insert.exclude) + tuple(kept)).run(model)
        log = ChangeLog()
        for step in steps:
            log.record(Change(self.name, "fallback-step", ", ".join(step.float_nodes) or "(none)",
                              f"metric {step.metric:.6g}, latency {step.latency_ratio:.2f}x float"))
        for change in result.log:
            log.record(change)
        return PassResult(result.changed, log)

    def _ranked(self, model: Model, scratch: Path) -> list[str]:
        """Planned nodes, most harmful alone first (by the default cosine metric)."""
        ranked = measure_nodes(model, self.insert, self.feeds, self.reference, scratch, without=False,
                               progress=self.progress)
        return [r.node for r in ranked]

    def _score(self, model) -> float:
        if self.metric is not None:
            return float(self.metric(model))
        return worst_error(self.reference, run(model, self.feeds, "a fallback model")).cosine


def fallback_table(curve: FallbackCurve) -> str:
    """One row per step: nodes kept float so far, the metric and the latency against float."""
    lines = [f"float model: metric {curve.float_metric:.6g}; budget: a drop of at most {curve.budget:g}"]
    for i, step in enumerate(curve.steps):
        added = f"+ {step.float_nodes[-1]}" if step.float_nodes else "(all quantized)"
        lines.append(f"{i:3d}  metric {step.metric:.6g}  latency {step.latency_ratio:.2f}x  {added}")
    return "\n".join(lines) + "\n"


def _latency(model, feed: dict, seconds: float = 0.5) -> float:
    """Median one-thread run time in ms, over about `seconds` of runs (at least 5)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.log_severity_level = 4
    sess = ort.InferenceSession(str(model) if isinstance(model, Path) else model, opts,
                                providers=["CPUExecutionProvider"])
    sess.run(None, feed)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000.0


__all__ = ["BudgetedQuantize", "FallbackCurve", "FallbackStep", "fallback_table"]
