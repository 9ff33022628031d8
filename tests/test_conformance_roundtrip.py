"""Acceptance gate of the foundation: lower -> verify -> emit keeps every case of onnx's
backend suite running in onnxruntime with outputs bit-identical to the original's."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

import ir
from tests.conformance import DATA_ROOT, canonical, identical, load_folder_case, matches, model_folders, run_ort

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the case generators overflow casts on purpose
    from onnx.backend.test.case.node import collect_testcases

    NODE_CASES = {case.name: case for case in collect_testcases()}


def roundtrip(model: onnx.ModelProto) -> onnx.ModelProto:
    lowered = ir.load(model)
    ir.verify(lowered)
    return ir.to_proto(lowered)


def check_case(model: onnx.ModelProto, data_sets, rtol: float, atol: float, transform=None) -> None:
    """Skip unless onnxruntime runs the original and matches onnx's expected outputs; then
    `transform(model, data_sets)` (default: the IR round trip) must still match them,
    bit-identical to the original's outputs."""
    originals = []
    for inputs, expected in data_sets:
        try:
            got = run_ort(model, inputs)
        except Exception as e:  # noqa: BLE001 - any ORT refusal means the case is out of scope
            pytest.skip(f"onnxruntime cannot run the original model: {str(e).splitlines()[0][:160]}")
        if (why := matches(got, expected, rtol, atol)) is not None:
            pytest.skip(f"onnxruntime's result on the original differs from onnx's expected output: {why}")
        originals.append(got)
    emitted = transform(model, data_sets) if transform else roundtrip(model)
    for (inputs, expected), original in zip(data_sets, originals):
        got = run_ort(emitted, inputs)  # an exception here is our failure, never a skip
        assert matches(got, expected, rtol, atol) is None
        assert identical(got, original) is None


@pytest.mark.parametrize("name", sorted(NODE_CASES))
def test_node_case(name):
    case = NODE_CASES[name]
    check_case(case.model, case.data_sets, case.rtol, case.atol)


@pytest.mark.parametrize("name", sorted(NODE_CASES))
def test_node_case_is_structurally_identical(name):
    """Every case, including those onnxruntime cannot run: emit(lower(m)) is m."""
    model = NODE_CASES[name].model
    assert canonical(roundtrip(model)) == canonical(model)


@pytest.mark.parametrize("folder", model_folders(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_model_folder(folder: Path):
    model, data_sets = load_folder_case(folder)
    assert canonical(roundtrip(model)) == canonical(model)
    check_case(model, data_sets, rtol=1e-3, atol=1e-7)


def light_inputs(model: onnx.ModelProto) -> list[np.ndarray]:
    """The inputs onnx's own runner feeds a light model: arange(n) / n in the input's shape."""
    inits = {t.name for t in model.graph.initializer}
    feeds = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim)
        n = int(np.prod(shape))
        feeds.append((np.arange(n).reshape(shape) / n).astype(np.float32))
    return feeds


@pytest.mark.parametrize("path", sorted((DATA_ROOT / "light").glob("*.onnx")), ids=lambda p: p.stem)
def test_light_model(path: Path):
    model = onnx.load(str(path))
    expected = onnx.numpy_helper.to_array(onnx.load_tensor(str(path.with_name(path.stem + "_output_0.pb"))))
    inits = {t.name for t in model.graph.initializer}
    names = [vi.name for vi in model.graph.input if vi.name not in inits]
    feeds = light_inputs(model)
    # Light models list initializers as inputs (IR 3): feed only the real inputs, by name.
    import onnxruntime as ort

    def run(m):
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, dict(zip(names, feeds)))

    original = run(model)
    assert matches(original, [expected], 1e-3, 1e-5) is None, "onnxruntime disagrees with onnx's output"
    emitted = roundtrip(model)
    assert canonical(emitted) == canonical(model)
    assert identical(run(emitted), original) is None
