"""External data: weights stay in their file until used (memory-mapped), emission writes the
large ones to `<output>.data` beside the output, and references that would read outside the
model's folder or past the end of a file are refused with one exact line (DESIGN.md §2, §9)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import ir
from tests.conformance import run_ort

W = (np.arange(4 * 300, dtype=np.float32).reshape(4, 300) - 600) / 100  # 4800 bytes
B = np.linspace(-1, 1, 300, dtype=np.float32)  # 1200 bytes
S = np.array([0.5], dtype=np.float32)  # 4 bytes: below any threshold
DATA = {"W": W, "B": B, "S": S}
X = np.linspace(-2, 2, 4, dtype=np.float32).reshape(1, 4)


# -- helpers ------------------------------------------------------------------------------

def weights_model() -> onnx.ModelProto:
    """y = Relu(x @ W + B) * S at IR 10 / opset 21, every weight an initializer."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"], name="matmul"),
             helper.make_node("Add", ["xw", "B"], ["xwb"], name="add"),
             helper.make_node("Relu", ["xwb"], ["r"], name="relu"),
             helper.make_node("Mul", ["r", "S"], ["y"], name="scale")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 300])],
        [numpy_helper.from_array(a, n) for n, a in DATA.items()])
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21)])


def constant_model() -> onnx.ModelProto:
    """y = x + c where c comes from a Constant node whose `value` holds 2400 bytes."""
    value = numpy_helper.from_array(np.arange(600, dtype=np.float32), "cval")
    nodes = [helper.make_node("Constant", [], ["c"], name="const", value=value),
             helper.make_node("Add", ["x", "c"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [600])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [600])])
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21)])


def save_external(proto: onnx.ModelProto, folder: Path, name: str = "model.onnx",
                  location: str | None = None) -> Path:
    """Save with onnx itself, every tensor (attributes too) in one external file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location or f"{name}.data", size_threshold=0, convert_attribute=True)
    return path


def stored(path: Path) -> dict[str, TensorProto]:
    """The initializers of a saved model as written (external data not loaded)."""
    proto = onnx.load(str(path), load_external_data=False)
    return {t.name: t for t in proto.graph.initializer}


def where(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def run(path: Path) -> np.ndarray:
    return run_ort(str(path), [X])[0]


def expected() -> np.ndarray:
    return np.maximum(X @ W + B, 0) * S


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def external_path(tmp_path) -> Path:
    return save_external(weights_model(), tmp_path / "in")


# -- loading ------------------------------------------------------------------------------

def test_load_keeps_weights_lazy_and_equal(external_path):
    model = ir.load(external_path)
    ir.verify(model)
    for name, array in DATA.items():
        value = model.graph.initializers[name]
        assert isinstance(value.tensor, ir.ExternalTensor)
        assert value.tensor.is_external
        assert value.const is value.tensor
        data = value.tensor.numpy()
        assert isinstance(data, np.memmap)
        assert data.dtype == array.dtype and data.shape == array.shape
        assert np.array_equal(data, array)
        assert value.tensor.path.parent == external_path.parent.resolve()


def test_load_from_str_path_and_from_bytes_with_base_dir(external_path):
    from_str = ir.load(str(external_path))
    from_bytes = ir.load(external_path.read_bytes(), base_dir=external_path.parent)
    from_proto = ir.load(onnx.load(str(external_path), load_external_data=False), base_dir=str(external_path.parent))
    for model in (from_str, from_bytes, from_proto):
        for name, array in DATA.items():
            tensor = model.graph.initializers[name].tensor
            assert isinstance(tensor, ir.ExternalTensor)
            assert np.array_equal(tensor.numpy(), array)


def test_original_runs_as_expected(external_path):
    """The reference the emitted models are compared with."""
    assert np.allclose(run(external_path), expected(), rtol=1e-6, atol=1e-6)


# -- saving -------------------------------------------------------------------------------

def test_save_writes_data_beside_output(external_path, tmp_path):
    out = tmp_path / "out" / "compiled.onnx"
    out.parent.mkdir()
    ir.save(ir.load(external_path), out)
    assert files(out.parent) == ["compiled.onnx", "compiled.onnx.data"]
    tensors = stored(out)
    size = (out.parent / "compiled.onnx.data").stat().st_size
    for name in ("W", "B"):  # >= 1024 bytes: external
        t = tensors[name]
        assert t.data_location == TensorProto.EXTERNAL and not t.HasField("raw_data")
        info = where(t)
        assert info["location"] == "compiled.onnx.data"
        assert int(info["length"]) == DATA[name].nbytes
        assert int(info["offset"]) + int(info["length"]) <= size
    s = tensors["S"]  # 4 bytes: inline, though it was external in the input
    assert s.data_location == TensorProto.DEFAULT and not s.external_data
    assert np.array_equal(numpy_helper.to_array(s), S)
    assert np.array_equal(run(out), run(external_path))


def test_saved_model_loads_back_equal(external_path, tmp_path):
    out = tmp_path / "compiled.onnx"
    ir.save(ir.load(external_path), out)
    again = ir.load(out)
    ir.verify(again)
    assert isinstance(again.graph.initializers["W"].tensor, ir.ExternalTensor)
    assert not again.graph.initializers["S"].tensor.is_external
    for name, array in DATA.items():
        assert np.array_equal(again.graph.initializers[name].tensor.numpy(), array)
    assert ir.print_model(again) == ir.print_model(ir.load(external_path))


def test_save_threshold(external_path, tmp_path):
    out = tmp_path / "compiled.onnx"
    ir.save(ir.load(external_path), out, threshold=2000)
    tensors = stored(out)
    assert tensors["W"].data_location == TensorProto.EXTERNAL  # 4800 bytes
    assert tensors["B"].data_location == TensorProto.DEFAULT  # 1200 bytes
    assert tensors["S"].data_location == TensorProto.DEFAULT
    assert np.array_equal(run(out), run(external_path))


def test_save_threshold_above_every_tensor_writes_no_data_file(external_path, tmp_path):
    out = tmp_path / "compiled.onnx"
    ir.save(ir.load(external_path), out, threshold=1 << 20)
    assert files(tmp_path) == ["compiled.onnx", "in"]
    assert all(t.data_location == TensorProto.DEFAULT for t in stored(out).values())
    assert np.array_equal(run(out), run(external_path))


def test_save_external_false_gives_a_single_file(external_path, tmp_path):
    out = tmp_path / "single.onnx"
    ir.save(ir.load(external_path), out, external=False)
    assert files(tmp_path) == ["in", "single.onnx"]
    proto = onnx.load(str(out), load_external_data=False)
    onnx.checker.check_model(proto)
    for t in proto.graph.initializer:
        assert t.data_location == TensorProto.DEFAULT and not t.external_data
        assert np.array_equal(numpy_helper.to_array(t), DATA[t.name])
    assert np.array_equal(run(out), run(external_path))
    assert np.array_equal(run_ort(proto, [X])[0], run(external_path))


def test_save_external_false_over_the_input_path(external_path):
    reference = run(external_path)
    model = ir.load(external_path)
    ir.save(model, external_path, external=False)
    assert all(t.data_location == TensorProto.DEFAULT for t in stored(external_path).values())
    for name, array in DATA.items():
        assert np.array_equal(model.graph.initializers[name].tensor.numpy(), array)
    assert np.array_equal(run(external_path), reference)


def test_inline_model_saved_with_external_true(tmp_path):
    out = tmp_path / "compiled.onnx"
    ir.save(ir.load(weights_model()), out, external=True)
    tensors = stored(out)
    assert [n for n, t in tensors.items() if t.data_location == TensorProto.EXTERNAL] == ["W", "B"]
    assert np.allclose(run(out), expected(), rtol=1e-6, atol=1e-6)


def test_inline_model_saved_by_default_stays_one_file(tmp_path):
    out = tmp_path / "compiled.onnx"
    ir.save(ir.load(weights_model()), out)
    assert files(tmp_path) == ["compiled.onnx"]


def test_to_proto_inlines_external_data(external_path):
    proto = ir.to_proto(ir.load(external_path))
    for t in proto.graph.initializer:
        assert t.data_location == TensorProto.DEFAULT
        assert np.array_equal(numpy_helper.to_array(t), DATA[t.name])
    assert np.array_equal(run_ort(proto, [X])[0], run(external_path))


def test_save_over_the_input_path(external_path):
    folder = external_path.parent
    reference = run(external_path)
    model = ir.load(external_path)
    ir.save(model, external_path)
    assert files(folder) == ["model.onnx", "model.onnx.data"]  # no temporary files left
    # The in-memory model still reads the right data, the large weights still lazily.
    w = model.graph.initializers["W"].tensor
    assert isinstance(w, ir.ExternalTensor) and isinstance(w.numpy(), np.memmap)
    for name, array in DATA.items():
        assert np.array_equal(model.graph.initializers[name].tensor.numpy(), array)
    assert np.array_equal(run(external_path), reference)
    reloaded = ir.load(external_path)
    for name, array in DATA.items():
        assert np.array_equal(reloaded.graph.initializers[name].tensor.numpy(), array)
    # And it can be saved again, over itself and elsewhere.
    ir.save(model, external_path)
    ir.save(model, folder / "copy.onnx")
    assert np.array_equal(run(external_path), reference)
    assert np.array_equal(run(folder / "copy.onnx"), reference)


def test_save_over_the_input_path_when_its_data_file_has_another_name(tmp_path):
    path = save_external(weights_model(), tmp_path, location="weights.bin")
    reference = run(path)
    before = (tmp_path / "weights.bin").read_bytes()
    model = ir.load(path)
    ir.save(model, path)
    assert files(tmp_path) == ["model.onnx", "model.onnx.data", "weights.bin"]
    assert (tmp_path / "weights.bin").read_bytes() == before  # the input's data is not touched
    assert {where(t)["location"] for t in stored(path).values() if t.external_data} == {"model.onnx.data"}
    for name, array in DATA.items():
        assert np.array_equal(model.graph.initializers[name].tensor.numpy(), array)
    assert np.array_equal(run(path), reference)


def test_save_over_the_input_path_moving_tensors_inline(tmp_path):
    """Tensors read from the data file being replaced, now written inline, keep their data."""
    path = save_external(weights_model(), tmp_path, name="a.onnx")
    model = ir.load(path)
    ir.save(model, tmp_path / "a.onnx", threshold=2000)  # now B and S go inline
    for name, array in DATA.items():
        assert np.array_equal(model.graph.initializers[name].tensor.numpy(), array)
    ir.save(model, tmp_path / "b.onnx", threshold=0)  # and out again, all external
    assert np.array_equal(run(tmp_path / "b.onnx"), run(tmp_path / "a.onnx"))


# -- a Constant node whose value is external -----------------------------------------------

def test_constant_value_in_external_data(tmp_path):
    path = save_external(constant_model(), tmp_path / "in")
    node = onnx.load(str(path), load_external_data=False).graph.node[0]
    assert node.attribute[0].t.data_location == TensorProto.EXTERNAL  # onnx wrote it so
    x = np.linspace(-1, 1, 600, dtype=np.float32)
    reference = run_ort(str(path), [x])[0]
    assert np.array_equal(reference, x + np.arange(600, dtype=np.float32))

    model = ir.load(path)
    const = model.graph.nodes[0]
    tensor = const.attributes["value"].value
    assert isinstance(tensor, ir.ExternalTensor) and isinstance(tensor.numpy(), np.memmap)
    assert const.outputs[0].const is tensor
    assert np.array_equal(tensor.numpy(), np.arange(600, dtype=np.float32))

    out = tmp_path / "out.onnx"
    ir.save(model, out)  # 2400 bytes and external already: stays external
    t = onnx.load(str(out), load_external_data=False).graph.node[0].attribute[0].t
    assert t.data_location == TensorProto.EXTERNAL and where(t)["location"] == "out.onnx.data"
    assert np.array_equal(run_ort(str(out), [x])[0], reference)

    small = tmp_path / "small.onnx"
    ir.save(model, small, threshold=4096)  # below the threshold: inline
    t = onnx.load(str(small), load_external_data=False).graph.node[0].attribute[0].t
    assert t.data_location == TensorProto.DEFAULT and len(t.raw_data) == 2400
    assert np.array_equal(run_ort(str(small), [x])[0], reference)

    ir.save(model, path)  # over the input
    assert np.array_equal(tensor.numpy(), np.arange(600, dtype=np.float32))
    assert np.array_equal(run_ort(str(path), [x])[0], reference)


def test_inline_constant_is_not_moved_out(tmp_path):
    """A Constant's value that was inline stays inline, however large."""
    out = tmp_path / "out.onnx"
    ir.save(ir.load(constant_model()), out, external=True, threshold=16)
    t = onnx.load(str(out), load_external_data=False).graph.node[0].attribute[0].t
    assert t.data_location == TensorProto.DEFAULT


# -- refusals -----------------------------------------------------------------------------

def hand_written(folder: Path, *, dims=(4, 300), dtype=TensorProto.FLOAT, **info) -> Path:
    """model.onnx whose initializer W points wherever `info` says (written as given)."""
    folder.mkdir(parents=True, exist_ok=True)
    proto = weights_model()
    w = next(t for t in proto.graph.initializer if t.name == "W")
    w.Clear()
    w.name, w.data_type, w.data_location = "W", dtype, TensorProto.EXTERNAL
    w.dims.extend(dims)
    for key, value in info.items():
        w.external_data.add(key=key, value=str(value))
    path = folder / "model.onnx"
    path.write_bytes(proto.SerializeToString())
    return path


def refused(source, cls: type, message: str, **kwargs) -> None:
    with pytest.raises(ir.CompileError) as info:
        ir.load(source, **kwargs)
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"
    assert str(info.value) == message
    assert len(str(info.value).splitlines()) == 1


@pytest.fixture
def folder(tmp_path) -> Path:
    """tmp/model/ holding w.bin (W's 4800 bytes); tmp/outside.bin lies beside the folder."""
    inside = tmp_path / "model"
    inside.mkdir()
    (inside / "w.bin").write_bytes(W.tobytes())
    (tmp_path / "outside.bin").write_bytes(W.tobytes())
    return inside


def test_hand_written_reference_loads(folder):
    model = ir.load(hand_written(folder, location="w.bin", offset=0, length=4800))
    assert np.array_equal(model.graph.initializers["W"].tensor.numpy(), W)


def test_location_with_dotdot(folder):
    refused(hand_written(folder, location="../outside.bin"), ir.ExternalDataError,
            "graph 'g': initializer 'W': external data location '../outside.bin' leaves the model's folder")


def test_location_with_dotdot_that_comes_back_inside(folder):
    (folder / "sub").mkdir()
    refused(hand_written(folder, location="sub/../w.bin"), ir.ExternalDataError,
            "graph 'g': initializer 'W': external data location 'sub/../w.bin' leaves the model's folder")


def test_location_with_backslash_dotdot(folder):
    refused(hand_written(folder, location="..\\outside.bin"), ir.ExternalDataError,
            "graph 'g': initializer 'W': external data location '..\\outside.bin' leaves the model's folder")


def test_absolute_location(folder):
    outside = folder.parent / "outside.bin"
    refused(hand_written(folder, location=str(outside)), ir.ExternalDataError,
            f"graph 'g': initializer 'W': external data location '{outside}' is an absolute path")


def test_absolute_location_even_inside_the_folder(folder):
    inside = folder / "w.bin"
    refused(hand_written(folder, location=str(inside)), ir.ExternalDataError,
            f"graph 'g': initializer 'W': external data location '{inside}' is an absolute path")


def test_symlink_pointing_outside(folder):
    os.symlink(folder.parent / "outside.bin", folder / "link.bin")
    refused(hand_written(folder, location="link.bin"), ir.ExternalDataError,
            "graph 'g': initializer 'W': external data location 'link.bin' points outside the model's folder")


def test_symlinked_directory_pointing_outside(folder):
    os.symlink(folder.parent, folder / "up")
    refused(hand_written(folder, location="up/outside.bin"), ir.ExternalDataError,
            "graph 'g': initializer 'W': external data location 'up/outside.bin' points outside the model's folder")


def test_symlink_staying_inside_is_fine(folder):
    (folder / "sub").mkdir()
    os.symlink(folder / "w.bin", folder / "sub" / "link.bin")
    model = ir.load(hand_written(folder, location="sub/link.bin"))
    assert np.array_equal(model.graph.initializers["W"].tensor.numpy(), W)


def test_offset_and_length_past_the_end(folder):
    refused(hand_written(folder, location="w.bin", offset=64, length=4800), ir.ExternalDataError,
            "graph 'g': initializer 'W': external data [64, 4864) does not fit in 'w.bin' (4800 bytes)")


def test_file_shorter_than_the_shape(folder):
    (folder / "short.bin").write_bytes(W.tobytes()[:4000])
    refused(hand_written(folder, location="short.bin"), ir.ExternalDataError,
            "graph 'g': initializer 'W': external data [0, 4800) does not fit in 'short.bin' (4000 bytes)")


def test_length_not_matching_the_shape(folder):
    refused(hand_written(folder, location="w.bin", length=2400), ir.ExternalDataError,
            "graph 'g': initializer 'W': external data length 2400 does not match shape [4, 300] "
            "of float32 (4800 bytes)")


def test_negative_offset(folder):
    refused(hand_written(folder, location="w.bin", offset=-64), ir.ExternalDataError,
            "graph 'g': initializer 'W': external data offset -64 is negative")


def test_offset_not_an_integer(folder):
    refused(hand_written(folder, location="w.bin", offset="sixty"), ir.ExternalDataError,
            "graph 'g': initializer 'W': external data offset/length is not an integer")


def test_no_location(folder):
    refused(hand_written(folder, offset=0), ir.ExternalDataError,
            "graph 'g': initializer 'W': external data without a location")


def test_missing_data_file(folder):
    refused(hand_written(folder, location="gone.bin"), ir.ExternalDataError,
            f"graph 'g': initializer 'W': external data file 'gone.bin' not found in {folder}")


def test_location_is_a_directory(folder):
    (folder / "sub").mkdir()
    refused(hand_written(folder, location="sub"), ir.ExternalDataError,
            "graph 'g': initializer 'W': external data location 'sub' is not a file")


def test_external_tensor_with_unknown_data_type(folder):
    refused(hand_written(folder, location="w.bin", dtype=99), ir.MalformedModelError,
            "graph 'g': initializer 'W': unknown data type 99")


def test_external_tensor_with_negative_dimension(folder):
    refused(hand_written(folder, location="w.bin", dims=(-4, 300)), ir.MalformedModelError,
            "graph 'g': initializer 'W': negative dimension in shape [-4, 300]")


def test_external_string_tensor(folder):
    refused(hand_written(folder, location="w.bin", dtype=TensorProto.STRING, dims=(2,)), ir.ExternalDataError,
            "graph 'g': initializer 'W': string tensors cannot be stored as external data")


NO_BASE = ("graph 'g': initializer 'W': data is in external file 'model.onnx.data' but the model "
           "was not loaded from a path; load it from its file or pass base_dir")


def test_model_proto_with_external_refs_and_no_base_dir(external_path):
    refused(onnx.load(str(external_path), load_external_data=False), ir.ExternalDataError, NO_BASE)


def test_model_bytes_with_external_refs_and_no_base_dir(external_path):
    refused(external_path.read_bytes(), ir.ExternalDataError, NO_BASE)


def test_constant_with_external_value_and_no_base_dir(tmp_path):
    path = save_external(constant_model(), tmp_path)
    refused(path.read_bytes(), ir.ExternalDataError,
            "graph 'g': node 'const' (Constant) attribute 'value': data is in external file "
            "'model.onnx.data' but the model was not loaded from a path; load it from its file or pass base_dir")


def test_wrong_base_dir(external_path, tmp_path):
    refused(external_path.read_bytes(), ir.ExternalDataError,
            f"graph 'g': initializer 'W': external data file 'model.onnx.data' not found in {tmp_path}",
            base_dir=tmp_path)
