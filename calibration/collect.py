"""Streaming collection: run the model in onnxruntime feed by feed with the tensors to
observe exposed as extra outputs, and update one observer per tensor in place. Nothing of
a feed outlives its run, so memory does not grow with the number of samples (onnxruntime's
own Entropy/Percentile calibrators keep every activation of every batch)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import onnx

import ir
from ir.errors import CompileError, first_line

from .data import Feed
from .gram import FeatureLayout, FeatureStatsObserver, InputStats
from .observers import HistogramObserver, MinMaxObserver

Observer = MinMaxObserver | HistogramObserver
Progress = Callable[[int, int | None], None]  # (feeds done, total or None)


def collect(model: ir.Model, observers: dict[str, Observer], feeds: Iterable[Feed], *,
            progress: Progress | None = None) -> int:
    """Update `observers` (tensor name -> observer) with the values those tensors take on
    `feeds`; returns the number of feeds run. Graph inputs and outputs may be observed too."""
    import onnxruntime as ort

    scratch = Path(tempfile.mkdtemp(prefix="onnxcc-calibrate-"))
    try:
        source = _augmented(model, list(observers), scratch)
        opts = ort.SessionOptions()
        opts.log_severity_level = 4  # failures come back as exceptions
        # Extended optimizations keep every graph output, so they are safe and much faster
        # than running the graph unoptimized as calibrators usually do.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        try:
            sess = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ORT raises its own types
            raise CompileError(f"calibration: onnxruntime cannot load the model: {first_line(e)}") from None
        accepted = {i.name for i in sess.get_inputs()}
        fed = [n for n in observers if n in accepted]  # graph inputs: observed from the feed
        wanted = [n for n in observers if n not in accepted]
        total = getattr(feeds, "length", None) if not isinstance(feeds, (list, tuple)) else len(feeds)
        done = 0
        for feed in feeds:
            try:
                values = sess.run(wanted, {k: v for k, v in feed.items() if k in accepted})
            except Exception as e:  # noqa: BLE001
                raise CompileError(f"calibration: onnxruntime cannot run feed {done}: {first_line(e)}") from None
            for name, value in zip(wanted, values):
                observers[name].update(value)
            for name in fed:
                observers[name].update(feed[name])
            done += 1
            if progress is not None:
                progress(done, total)
        return done
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def collect_input_stats(model: ir.Model, layers: dict[str, tuple[str, FeatureLayout]], feeds: Iterable[Feed], *,
                        progress: Progress | None = None, max_gram_features: int | None = None
                        ) -> dict[str, InputStats]:
    """Mean and Gram matrix of the features each layer reads (calibration/gram.py), in one
    run over `feeds`: `layers` maps a layer name to (the tensor it reads, how that tensor
    becomes feature rows); layers reading one tensor share its exposure. `max_gram_features`
    0 keeps only the means."""
    observers: dict[str, FeatureStatsObserver] = {}
    by_tensor: dict[str, _Fanout] = {}
    for name, (tensor, layout) in layers.items():
        observers[name] = FeatureStatsObserver(layout, name, max_gram_features=max_gram_features)
        by_tensor.setdefault(tensor, _Fanout()).observers.append(observers[name])
    if not by_tensor:
        return {}
    if not collect(model, by_tensor, feeds, progress=progress):
        raise CompileError("calibration data holds no feeds")
    return {name: obs.stats for name, obs in observers.items()}


class _Fanout:
    """One tensor read by several layers, each with its own observer."""

    def __init__(self) -> None:
        self.observers: list[FeatureStatsObserver] = []

    def update(self, x) -> None:
        for observer in self.observers:
            observer.update(x)


def _augmented(model: ir.Model, names: list[str], scratch: Path) -> bytes | str:
    """The model with every observed tensor exposed as a graph output (a file under
    `scratch` when it holds external data, so weights are copied, never loaded)."""
    values = {v.name: v for g in [model.graph] for v in _values(g)}
    missing = [n for n in names if n not in values]  # (graph inputs need no output)
    if missing:
        raise CompileError(f"calibration: no tensor named '{missing[0]}' in the main graph")
    if any(True for _ in _external(model)):
        path = scratch / "model.onnx"
        ir.save(model, path, external=True)
        proto = onnx.load(str(path), load_external_data=False)
        _expose(proto, names, values)
        path.write_bytes(proto.SerializeToString())
        return str(path)
    proto = ir.to_proto(model)
    _expose(proto, names, values)
    return proto.SerializeToString()


def _expose(proto: onnx.ModelProto, names: list[str], values: dict) -> None:
    present = {o.name for o in proto.graph.output}
    inputs = {i.name for i in proto.graph.input}
    for name in names:
        if name in present or name in inputs:
            continue
        out = proto.graph.output.add(name=name)
        if values[name].dtype is not None:  # without it onnxruntime infers the type itself
            out.type.tensor_type.elem_type = values[name].dtype


def _values(graph: ir.Graph):
    yield from graph.inputs
    for node in graph.nodes:
        yield from (v for v in node.outputs if v is not None)


def _external(model: ir.Model):
    for g in model.graphs():
        for v in g.initializers.values():
            if v.tensor.is_external:
                yield v

