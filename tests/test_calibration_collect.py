"""Streaming collection in onnxruntime: observers see exactly the tensors' values, feed by
feed, and memory does not grow with the number of feeds."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import parser

import ir
from calibration import HistogramObserver, MinMaxObserver, feeds_source
from calibration.collect import collect
from ir.errors import CompileError

MODEL = """<ir_version: 10, opset_import: ["" : 21]>
g (float[N, 4] x) => (float[N, 4] y) <float[4] w = {1.0, -2.0, 0.5, 3.0}> {
  m = Mul(x, w)
  y = Relu(m)
}"""


def model() -> ir.Model:
    proto = parser.parse_model(MODEL)
    return ir.load(proto)


def feeds(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, 4)).astype(np.float32)} for _ in range(n)]


def test_observers_see_the_values_of_every_feed():
    data = feeds(5)
    w = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
    m_all = np.concatenate([f["x"] * w for f in data])
    observers = {"m": MinMaxObserver(), "y": MinMaxObserver(), "x": MinMaxObserver(axis=1)}
    progress = []
    assert collect(model(), observers, data, progress=lambda done, total: progress.append((done, total))) == 5
    assert observers["m"].min == m_all.min() and observers["m"].max == m_all.max()
    assert observers["y"].min == 0.0 and observers["y"].max == m_all.max()
    x_all = np.concatenate([f["x"] for f in data])
    assert np.array_equal(observers["x"].min, x_all.min(axis=0))
    assert progress == [(i, 5) for i in range(1, 6)]


def test_memory_does_not_grow_with_the_number_of_feeds():
    small = {"m": HistogramObserver()}
    large = {"m": HistogramObserver()}
    collect(model(), small, feeds(2))
    collect(model(), large, feeds(200))
    assert large["m"].counts.nbytes == small["m"].counts.nbytes
    assert large["m"].count == 200 * 8


def test_generators_are_consumed_lazily():
    pulled = []

    def gen():
        for i, f in enumerate(feeds(3)):
            pulled.append(i)
            yield f

    observers = {"y": MinMaxObserver()}
    assert collect(model(), observers, feeds_source(gen())) == 3
    assert pulled == [0, 1, 2]


def test_unknown_tensor_is_refused():
    with pytest.raises(CompileError, match=r"^calibration: no tensor named 'nope' in the main graph$"):
        collect(model(), {"nope": MinMaxObserver()}, feeds(1))


def test_a_feed_that_does_not_run_names_it():
    bad = feeds(2) + [{"x": np.zeros((2, 5), np.float32)}]
    with pytest.raises(CompileError, match=r"^calibration: onnxruntime cannot run feed 2: "):
        collect(model(), {"y": MinMaxObserver()}, bad)


def test_external_data_models_are_collected_from_a_copy(tmp_path):
    import onnx

    proto = parser.parse_model(MODEL)
    raw = onnx.numpy_helper.from_array(np.array([1.0, -2.0, 0.5, 3.0], np.float32), "w")
    proto.graph.initializer[0].CopyFrom(raw)  # onnx externalizes raw_data tensors only
    onnx.save(proto, tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    m = ir.load(tmp_path / "m.onnx")
    assert m.graph.initializers["w"].tensor.is_external
    observers = {"y": MinMaxObserver()}
    collect(m, observers, feeds(3))
    direct = {"y": MinMaxObserver()}
    collect(model(), direct, feeds(3))
    assert observers["y"].max == direct["y"].max
