"""Which depthwise Convs run as integer kernels (`depthwise="auto"`, the default).

On big maps an integer depthwise Conv pays: not by its own kernel, which onnxruntime runs at
about float speed, but because the elementwise ops around it (HardSwish, affine blocks,
residual Adds) then run integer too, without DequantizeLinear/QuantizeLinear and layout
Transposes between them. Some depthwise layers, though, cannot take 8-bit outputs: on the
PP-OCRv4 recognizer the first one alone costs 2 points of character accuracy. A fixed rule
cannot tell them apart, so this pass measures: it quantizes every big depthwise Conv, and
while the outputs' worst SQNR is more than SLACK_DB below what keeping every depthwise Conv
float gives, keeps float the one whose return to float helps most. The SQNR is pooled over
up to FEEDS feeds, the verification ones then calibration ones: a harmful layer shows on a
few lines of text only, which the four held-out lines can miss.

Small maps (under the target's `small_tensor` elements at the calibration shapes) stay
float outright: there integer depthwise kernels lose to float ones.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from itertools import islice
from typing import Callable, Iterable

import numpy as np

from ir import Model
from rewrites.base import Change, ChangeLog, Pass, PassResult
from rewrites.qdq import InsertQDQ, is_depthwise, plan
from rewrites.shapes import bound_shapes

from .sensitivity import quantized_variant
from .verify import run, runnable

DEPTHWISE_MODES = ("auto", "integer", "float")
# More quantized tensors mean a little more noise even where nothing goes wrong: the PP-OCRv4
# detector loses 1.0 dB with every depthwise Conv integer and keeps its F1, while the
# recognizer's harmful layer costs 2.8 dB (and 2 points of character accuracy).
SLACK_DB = 1.5
FEEDS = 16  # feeds the SQNR is pooled over, at most


def depthwise_candidates(model: Model, insert: InsertQDQ) -> tuple[list[str], list[str]]:
    """(big, small): the depthwise Convs `insert` would quantize (its target must allow
    them), split by their output's size at the calibration shapes."""
    shapes = bound_shapes(model, insert.input_shapes) if insert.input_shapes else None
    nodes = {n.name: n for n in model.graph.nodes}
    big, small = [], []
    for name in plan(model, insert.target, insert.exclude, insert.input_shapes).weighted:
        node = nodes[name]
        if is_depthwise(node):
            (small if insert.target.is_small(node.outputs[0], shapes) else big).append(name)
    return big, small


def choose_float(candidates: list[str], score: Callable[[tuple[str, ...]], float], floor: float,
                 progress: Callable | None = None) -> tuple[tuple[str, ...], list[tuple[str, float]]]:
    """The fewest `candidates` to keep float so that `score(kept float)` reaches `floor`:
    greedily, each round the one whose return to float scores best alone. Returns (kept,
    [(node, score after keeping it float)]); all of them if the floor is never reached."""
    kept: tuple[str, ...] = ()
    steps: list[tuple[str, float]] = []
    if score(kept) >= floor:
        return kept, steps
    alone = {}
    for i, name in enumerate(candidates):
        alone[name] = score((name,))
        if progress is not None:
            progress(i + 1, len(candidates), "depthwise")
    for name in sorted(candidates, key=lambda n: -alone[n]):
        kept += (name,)
        value = alone[name] if len(kept) == 1 else score(kept)
        steps.append((name, value))
        if value >= floor:
            break
    return kept, steps


def pooled_sqnr(reference: list[dict], outputs: list[dict]) -> float:
    """The worst output's SQNR in dB, its signal and noise energies summed over all feeds."""
    worst = math.inf
    for name in reference[0] if reference else []:
        signal = sum(float(np.sum(np.square(r[name], dtype=np.float64))) for r in reference)
        noise = sum(float(np.sum(np.square(r[name].astype(np.float64) - o[name])))
                    for r, o in zip(reference, outputs))
        worst = min(worst, math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise))
    return worst


@dataclass
class ChooseDepthwise(Pass):
    """`insert` (whose target quantizes depthwise Convs) with the depthwise Convs that would
    lower the outputs' worst SQNR on `feeds` and the first of `more` (FEEDS in all; against
    the model as it stands before quantization) more than SLACK_DB below the all-float
    placement's kept float."""

    name = "quantize"
    exact = False
    insert: InsertQDQ | None = None
    feeds: list = field(default_factory=list)
    # Calibration feeds to pool with `feeds` up to FEEDS; read only when there is a choice to make.
    more: Iterable | None = None
    progress: Callable | None = None
    kept_float: tuple[str, ...] = field(default=(), init=False)  # the result, for tests and the log
    summary: str = field(default="", init=False)  # one line for the report

    def run(self, model: Model) -> PassResult:
        big, small = depthwise_candidates(model, self.insert)
        log = ChangeLog()
        for name in small:
            log.record(Change(self.name, "depthwise", name, "float: a small map, where integer kernels lose"))
        kept: tuple[str, ...] = ()
        if big:
            scratch = Path(tempfile.mkdtemp(prefix="onnxcc-depthwise-"))
            try:
                kept = self._choose(model, big, tuple(small), scratch, log)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        self.kept_float = tuple(small) + kept
        if big or small:
            self.summary = (f"depthwise Convs: {len(big) - len(kept)} of {len(big) + len(small)} integer"
                            + (f"; {len(small)} on small maps float" if small else "")
                            + (f"; kept float for accuracy: {', '.join(kept)}" if kept else ""))
        result = replace(self.insert, exclude=tuple(self.insert.exclude) + self.kept_float).run(model)
        for change in result.log:
            log.record(change)
        return PassResult(result.changed, log)

    def _choose(self, model: Model, big: list[str], small: tuple[str, ...], scratch: Path,
                log: ChangeLog) -> tuple[str, ...]:
        measured: dict[tuple[str, ...], float] = {}
        feeds = list(self.feeds) + list(islice(self.more or (), max(0, FEEDS - len(self.feeds))))
        reference = run(runnable(model, scratch), feeds, "the model before quantization")

        def sqnr(float_nodes: tuple[str, ...]) -> float:
            if float_nodes not in measured:
                variant = quantized_variant(model, self.insert, small + float_nodes, scratch)
                measured[float_nodes] = pooled_sqnr(reference, run(variant, feeds, "a depthwise variant"))
            return measured[float_nodes]

        floor = sqnr(tuple(big)) - SLACK_DB
        kept, steps = choose_float(big, sqnr, floor, self.progress)
        log.record(Change(self.name, "depthwise", "(every big one float)",
                          f"worst output SQNR {floor + SLACK_DB:.2f} dB; the floor is {SLACK_DB:g} dB below"))
        log.record(Change(self.name, "depthwise", "(every big one integer)", f"worst output SQNR {sqnr(()):.2f} dB"))
        for name, value in steps:
            log.record(Change(self.name, "depthwise", name, f"float: worst output SQNR then {value:.2f} dB"))
        return kept


__all__ = ["DEPTHWISE_MODES", "FEEDS", "SLACK_DB", "ChooseDepthwise", "choose_float", "depthwise_candidates",
           "pooled_sqnr"]
