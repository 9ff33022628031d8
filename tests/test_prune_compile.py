"""Pruning through the compiler: the options, the calibration data shared with quantization,
the report (sparsity, channels, file size plain and zipped), the cosine budget and the CLI."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import compiler
from compiler.cli import main
from compiler.errors import CompileError
from compiler.verify import VerificationError


def convnet() -> onnx.ModelProto:
    """Conv(3->64) -> Relu -> Conv(64->64) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(64->10):
    wide enough that 25% of a space is a multiple of 16."""
    rng = np.random.default_rng(1)

    def init(name, *shape, scale=0.3):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "convnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [init("w1", 64, 3, 3, 3), init("b1", 64), init("w2", 64, 64, 3, 3, scale=0.1), init("b2", 64),
         init("w3", 10, 64), init("b3", 10)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def feeds(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 3, 12, 12)).astype(np.float32)} for _ in range(n)]


@pytest.fixture
def model_file(tmp_path) -> Path:
    path = tmp_path / "convnet.onnx"
    onnx.save(convnet(), path)
    return path


@pytest.fixture
def calib(tmp_path) -> Path:
    folder = tmp_path / "calib"
    folder.mkdir()
    for i, feed in enumerate(feeds(20)):
        np.savez(folder / f"{i:02d}.npz", **feed)
    return folder


def weight(result, node_name: str) -> np.ndarray:
    model = result.model
    node = next(n for n in model.graph.node if n.name == node_name)
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == node.input[1]))


def test_unstructured_pruning_reports_sparsity_and_sizes_plain_and_zipped():
    result = compiler.compile(convnet(), prune=0.5, min_cosine=0.0)
    # first and last layers are left whole by default; conv2 is pruned to exactly half
    assert np.count_nonzero(weight(result, "conv1")) == 64 * 27
    assert np.count_nonzero(weight(result, "conv2") == 0) == 64 * 64 * 9 // 2
    report = result.report
    prune = next(r for r in report.records if r.name == "prune-weights")
    assert prune.log.by_kind()["prune"] == 1 and prune.log.by_rule() == {"prune-weights": 1}
    data = result.model.SerializeToString()
    assert report.file_size_after == (len(data), len(zlib.compress(data, 6)))
    assert report.file_size_after[1] < report.file_size_before[1]  # zeros zip well
    assert "; weights 47.0% zero (3 tensors); file " in report.headline()


def test_sparse_storage_makes_the_file_smaller_and_keeps_the_numbers():
    dense = compiler.compile(convnet(), prune=0.9, prune_first_last=True, min_cosine=0.0)
    sparse = compiler.compile(convnet(), prune=0.9, prune_first_last=True, min_cosine=0.0, sparse_storage=True)
    assert len(sparse.model.graph.sparse_initializer) == 3
    store = next(r for r in sparse.report.records if r.name == "store-sparse")
    assert store.log.by_rule() == {"store-sparse": 3}  # the summary table counts them
    assert sparse.report.file_size_after[0] < 0.4 * dense.report.file_size_after[0]
    assert sparse.report.verification.worst() == dense.report.verification.worst()


def test_channel_pruning_refits_on_calibration_data_and_verifies_on_held_out_feeds(calib):
    result = compiler.compile(convnet(), prune=0.25, prune_mode="channel", calibration=calib, min_cosine=0.9)
    assert weight(result, "conv1").shape == (48, 3, 3, 3)
    assert weight(result, "conv2").shape == (48, 48, 3, 3)
    assert weight(result, "fc").shape == (10, 48)
    assert result.report.verification.feeds == 4  # 20 feeds // 5 held out
    assert "; channels 128 -> 96 in 2 spaces; " in result.report.headline()
    no_refit = compiler.compile(convnet(), prune=0.25, prune_mode="channel", calibration=calib,
                                refit="none", min_cosine=0.0)
    assert result.report.verification.outputs[0].cosine > no_refit.report.verification.outputs[0].cosine


def test_channel_pruning_then_quantization_share_the_calibration_data(calib):
    result = compiler.compile(convnet(), prune=0.25, prune_mode="channel", calibration=calib, quantize="int8",
                              min_cosine=0.8)
    names = [r.name for r in result.report.records]
    assert names.index("prune-channels") < names.index("calibrate") < names.index("quantize")
    assert result.report.integer_kernels.integer == 3


def test_pruning_over_the_cosine_budget_fails(calib):
    with pytest.raises(VerificationError, match=r"^verification failed: 'y' .*cosine"):
        compiler.compile(convnet(), prune=0.9, prune_first_last=True)


@pytest.mark.parametrize("options, message", [
    (dict(prune=0.5, prune_mode="4:8"), "unknown pruning mode '4:8' (choose from: unstructured, 2:4, channel)"),
    (dict(prune=0.5, refit="lstsq"),
     "refit, importance and channel multiple apply to channel pruning (--prune-mode channel)"),
    (dict(prune=0.5, prune_multiple=8),
     "refit, importance and channel multiple apply to channel pruning (--prune-mode channel)"),
    (dict(prune=0.5, prune_mode="channel", refit="exact"), "unknown refit 'exact' (choose from: lstsq, bias, none)"),
    (dict(sparse_storage=True), "sparse_storage stores pruned weights: it needs prune"),
    (dict(prune=0.5, prune_mode="channel", prune_first_last=True),
     "prune_first_last applies to weight pruning: channel pruning never touches a graph output's channels, "
     "and prunes the first layer's unless excluded"),
    (dict(prune=1.5), "prune-weights: sparsity must be a number in [0, 1), got 1.5"),
    (dict(prune=0.5, prune_mode="channel", refit="lstsq"),
     "channel pruning with refit or activation importance needs calibration data (--calib DIR); "
     "or use --refit none --prune-importance l1"),
])
def test_bad_pruning_options_are_one_line_errors(options, message):
    with pytest.raises(CompileError) as e:
        compiler.compile(convnet(), min_cosine=0.0, **options)
    assert str(e.value) == message


def test_a_one_shot_iterator_cannot_calibrate_both_pruning_and_quantization():
    with pytest.raises(CompileError, match="one-shot iterator and was already read"):
        compiler.compile(convnet(), prune=0.25, prune_mode="channel", quantize="int8",
                         calibration=iter(feeds(10)), min_cosine=0.0)


def test_cli_prunes_channels_and_prints_what_went(model_file, calib, tmp_path, capsys):
    out = tmp_path / "small.onnx"
    assert main(["compile", str(model_file), "-o", str(out), "--prune", "0.25", "--prune-mode", "channel",
                 "--calib", str(calib), "--min-cosine", "0.9"]) == 0
    printed = capsys.readouterr().out
    assert "channels 128 -> 96 in 2 spaces" in printed and f"wrote {out}" in printed
    assert out.stat().st_size < model_file.stat().st_size * 0.7


def test_cli_pruning_over_budget_exits_1_and_writes_nothing(model_file, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    assert main(["compile", str(model_file), "-o", str(out), "--prune", "0.9", "--prune-first-last"]) == 1
    assert capsys.readouterr().err.startswith("onnxcc: error: verification failed: 'y'")
    assert not out.exists()


def test_cli_pruning_flags_need_prune(model_file, tmp_path, capsys):
    assert main(["compile", str(model_file), "-o", str(tmp_path / "o.onnx"), "--prune-mode", "channel"]) == 2
    assert capsys.readouterr().err == (
        "onnxcc: error: --prune-mode, --prune-scope, --prune-importance, --refit, --prune-multiple, "
        "--prune-exclude, --prune-first-last and --sparse-storage need --prune SHARE\n")
