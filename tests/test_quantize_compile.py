"""Quantization through the compiler: calibration on the user's data, the table saved and
reused, verification against the float model on held-out feeds, the CLI flags."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import compiler
from calibration import CalibrationTable
from compiler.cli import main

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TINY = FIXTURES / "tiny_cnn.onnx"


@pytest.fixture
def calib(tmp_path) -> Path:
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        np.savez(folder / f"{i:02d}.npz", x=rng.standard_normal((1, 3, 16, 16)).astype(np.float32))
    return folder


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_quantize_calibrates_inserts_qdq_and_verifies(calib):
    result = compiler.compile(str(TINY), quantize="int8", calibration=calib)
    model_ops = ops(result.model)
    assert "QuantizeLinear" in model_ops and "DequantizeLinear" in model_ops
    table = result.calibration_table
    assert len(table) > 0
    calibrate = next(r for r in result.report.records if r.name == "calibrate")
    assert calibrate.log.by_kind() == {"calibrate": len(table)}
    assert result.report.verification.feeds == 2  # held out: 12 feeds // 5
    assert all(o.cosine >= 0.99 for o in result.report.verification.outputs)
    # read back from the graph onnxruntime optimized: both Convs and the Gemm are integer
    kernels = result.report.integer_kernels
    assert (kernels.kernels, kernels.float_ops) == ({"QLinearConv": 2, "QGemm": 1}, {})
    assert ("; 3 of 3 Conv/MatMul/Gemm run as integer kernels in onnxruntime (QGemm 1, QLinearConv 2); "
            "verified on 2 feeds") in result.report.headline()


def test_integer_kernels_are_counted_without_verification_and_float_ones_too(calib):
    result = compiler.compile(str(TINY), quantize="int8", calibration=calib, verify=False, exclude=("Gemm",))
    assert result.report.verification is None
    kernels = result.report.integer_kernels
    assert (kernels.integer, kernels.total, kernels.kernels) == (2, 3, {"QLinearConv": 2})
    assert str(kernels).startswith("2 of 3 Conv/MatMul/Gemm run as integer kernels")


def _conv_bn_model() -> onnx.ModelProto:
    """Conv 'stem' (no bias) -> BatchNormalization -> Relu -> Conv 'head': folding the
    BatchNorm gives the stem a bias slot, so a new Conv takes its place."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(a.astype(np.float32), name) for name, a in [
        ("w0", rng.standard_normal((4, 3, 3, 3))), ("scale", rng.uniform(0.5, 1.5, 4)),
        ("shift", rng.standard_normal(4)), ("mean", rng.standard_normal(4)), ("var", rng.uniform(0.5, 2, 4)),
        ("w1", rng.standard_normal((2, 4, 1, 1))), ("b1", rng.standard_normal(2))]]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c"], name="stem", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["n"], name="bn"),
             helper.make_node("Relu", ["n"], ["r"], name="act"),
             helper.make_node("Conv", ["r", "w1", "b1"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2, 16, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_an_excluded_conv_stays_float_after_its_batchnorm_is_folded(calib):
    plain = compiler.compile(_conv_bn_model(), quantize="int8", calibration=calib)
    assert plain.report.integer_kernels.kernels == {"QLinearConv": 1}  # the stem (the head feeds the output)
    result = compiler.compile(_conv_bn_model(), quantize="int8", calibration=calib, exclude=("stem",))
    by_name = {n.name: n for n in result.model.graph.node}
    weights = {i.name for i in result.model.graph.initializer}
    assert by_name["stem"].op_type == "Conv" and by_name["stem"].input[1] in weights  # float weights
    assert result.report.integer_kernels.kernels == {}


def test_an_exclusion_that_names_nothing_is_an_error(calib, tmp_path, capsys):
    with pytest.raises(compiler.CompileError, match=r"^quantize: exclude 'Stem' is neither a node name nor an "
                                                    r"op type of the model$"):
        compiler.compile(_conv_bn_model(), quantize="int8", calibration=calib, exclude=("Stem",))
    out = tmp_path / "o.onnx"
    assert main(["compile", str(TINY), "-o", str(out), "--quantize", "int8", "--calib", str(calib),
                 "--exclude", "conv"]) == 2
    assert capsys.readouterr().err == ("onnxcc: error: quantize: exclude 'conv' is neither a node name nor an op "
                                       "type of the model\n")
    assert not out.exists()


def test_a_saved_table_reproduces_the_compile_without_data(calib, tmp_path):
    first = compiler.compile(str(TINY), quantize="int8", calibration=calib)
    path = tmp_path / "calib.json"
    first.calibration_table.save(path)
    again = compiler.compile(str(TINY), quantize="int8", calibration_table=path)
    assert again.model.SerializeToString() == first.model.SerializeToString()
    assert CalibrationTable.load(path).dumps() == first.calibration_table.dumps()


def test_a_one_shot_iterator_calibrates_and_sizes_the_placement():
    """A generator is read once: the input shapes that size the placement come from the
    held-out feeds, not from a second pass over it."""
    rng = np.random.default_rng(0)
    feeds = ({"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(12))
    result = compiler.compile(str(TINY), quantize="int8", calibration=feeds)
    assert result.calibration_table.inputs == {"x": (1, 3, 16, 16)}
    assert result.report.verification.feeds == 4  # one-shot: the full HOLDOUT, length unknown


def test_quantizing_without_data_or_table_is_refused():
    with pytest.raises(compiler.CompileError, match=r"^quantization needs calibration data \(--calib DIR\) "
                                                     r"or a calibration table \(--calibration-table FILE\)$"):
        compiler.compile(str(TINY), quantize="int8")


def test_unsupported_mode_is_refused(calib):
    with pytest.raises(compiler.CompileError, match=r"^quantization 'int4' is not supported \(choose from: int8\)$"):
        compiler.compile(str(TINY), quantize="int4", calibration=calib)


def test_cosine_budget_fails_verification(calib):
    with pytest.raises(compiler.VerificationError, match=r"^verification failed: 'logits' .*, cosine 0\.\d+, "
                                                         r"SQNR [\d.]+ dB \(below the cosine budget 1, which "
                                                         r"--min-cosine sets\)$"):
        compiler.compile(str(TINY), quantize="int8", calibration=calib, min_cosine=1.0 + 1e-9)


def test_cli_quantize_saves_the_table_and_dumps_the_ranges(calib, tmp_path, capsys):
    out, table, dump = tmp_path / "int8.onnx", tmp_path / "t.json", tmp_path / "dump"
    assert main(["compile", str(TINY), "-o", str(out), "--quantize", "int8", "--calib", str(calib),
                 "--save-calibration", str(table), "--debug-dump", str(dump)]) == 0
    assert out.exists() and table.exists()
    marker = next(dump.glob("*_calibrate.unchanged")).read_text()
    assert "calibrate: calibrate %" in marker and "scale" in marker and "zero point" in marker
    assert main(["compile", str(TINY), "-o", str(tmp_path / "again.onnx"), "--quantize", "int8",
                 "--calibration-table", str(table)]) == 0
    assert (tmp_path / "again.onnx").read_bytes() == out.read_bytes()


def test_cli_calibration_flags_need_quantize(calib, tmp_path, capsys):
    assert main(["compile", str(TINY), "-o", str(tmp_path / "o.onnx"), "--calib", str(calib)]) == 2
    assert capsys.readouterr().err == ("onnxcc: error: --calib, --calib-preprocess and --image-* need "
                                       "--quantize int8, --prune or --weight-only\n")
    assert main(["compile", str(TINY), "-o", str(tmp_path / "o.onnx"), "--image-scale", "0.5"]) == 2
    assert "need --quantize int8, --prune or --weight-only" in capsys.readouterr().err
    assert main(["compile", str(TINY), "-o", str(tmp_path / "o.onnx"), "--exclude", "Conv"]) == 2
    assert capsys.readouterr().err == ("onnxcc: error: --calibration-table, --save-calibration, --exclude, "
                                       "--sensitivity, --accuracy-budget and --depthwise need --quantize int8\n")


@pytest.fixture
def images(tmp_path) -> Path:
    """Twelve 20x24 RGB images, which the CLI resizes to the fixture's 16x16 input."""
    image_module = pytest.importorskip("PIL.Image", reason="pillow reads calibration images (pip install pillow)")
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(12):
        pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        image_module.fromarray(pixels).save(folder / f"{i:02d}.png")
    return folder


def test_cli_calibrates_on_images_with_declared_preprocessing(images, tmp_path, capsys):
    config = tmp_path / "prep.json"
    config.write_text('{"scale": 0.00392156862745098, "mean": [0.485, 0.456, 0.406], "std": 0.2}')
    out = tmp_path / "int8.onnx"
    assert main(["compile", str(TINY), "-o", str(out), "--quantize", "int8", "--calib", str(images),
                 "--calib-preprocess", str(config), "--image-channels", "BGR", "--image-fit", "crop"]) == 0
    assert "verified on 2 feeds" in capsys.readouterr().out and out.exists()
    # the flags alone declare it too, and give the same model as the same preprocessing via API
    again = tmp_path / "again.onnx"
    assert main(["compile", str(TINY), "-o", str(again), "--quantize", "int8", "--calib", str(images),
                 "--image-size", "16,16", "--image-scale", "0.00392156862745098",
                 "--image-mean", "0.485,0.456,0.406", "--image-std", "0.2", "--image-channels", "BGR",
                 "--image-fit", "crop"]) == 0
    api = compiler.compile(str(TINY), quantize="int8", calibration=images,
                           calibration_preprocess={"scale": 1 / 255, "mean": [0.485, 0.456, 0.406], "std": 0.2,
                                                   "channels": "BGR", "fit": "crop"})
    assert again.read_bytes() == out.read_bytes() == api.model.SerializeToString()


def test_cli_images_without_preprocessing_are_refused(images, tmp_path, capsys):
    assert main(["compile", str(TINY), "-o", str(tmp_path / "o.onnx"), "--quantize", "int8",
                 "--calib", str(images)]) == 2
    assert capsys.readouterr().err == (f"onnxcc: error: calibration data '{images}' holds images: declare how "
                                       "they become inputs (--calib-preprocess FILE or the --image-* options)\n")
    assert main(["compile", str(TINY), "-o", str(tmp_path / "o.onnx"), "--quantize", "int8",
                 "--calib", str(images), "--image-size", "16x16"]) == 2
    assert "argument --image-size: expected H,W in pixels, got '16x16'" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


def test_per_tensor_weights_give_one_scale_per_weight(calib):
    result = compiler.compile(str(TINY), quantize="int8", calibration=calib, per_channel=False)
    inits = {t.name: t for t in result.model.graph.initializer}
    weight_dqs = [n for n in result.model.graph.node
                  if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
                  and inits[n.input[0]].data_type == onnx.TensorProto.INT8]
    assert weight_dqs
    for dq in weight_dqs:
        assert list(inits[dq.input[1]].dims) == []  # a scalar scale
    assert result.report.verification.ok


def test_models_below_opset_13_are_upgraded_for_per_channel_weights(calib):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    w = numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.2).astype(np.float32), "w")
    fc = numpy_helper.from_array((rng.standard_normal((10, 8 * 16 * 16)) * 0.02).astype(np.float32), "fc")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("Flatten", ["r"], ["f"]),
         helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1)],
        "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], [w, fc])
    old = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    old.ir_version = 6
    result = compiler.compile(old, quantize="int8", calibration=calib)
    assert "opset upgraded from 11 to 13 for per-channel weights" in result.report.headline()
    opsets = {o.domain: o.version for o in result.model.opset_import}
    assert opsets[""] == 13
    axes = [a.i for n in result.model.graph.node if n.op_type == "DequantizeLinear"
            for a in n.attribute if a.name == "axis"]
    assert axes  # per-channel weight scales
    assert result.report.verification.ok


def test_cli_depthwise_mode(tmp_path):
    from tests.test_qdq import depthwise_model

    onnx.save(depthwise_model(), tmp_path / "dw.onnx")
    rng = np.random.default_rng(5)
    for i in range(6):
        np.savez(tmp_path / f"{i}.npz", x=rng.standard_normal((1, 3, 16, 16)).astype(np.float32))
    for mode, quantized in (("integer", True), ("float", False)):
        out = tmp_path / f"{mode}.onnx"
        assert main(["compile", str(tmp_path / "dw.onnx"), "-o", str(out), "--quantize", "int8",
                     "--calib", str(tmp_path), "--depthwise", mode]) == 0
        names = {t.name for t in onnx.load(out).graph.initializer}
        assert ("wd_quantized" in names) == quantized, mode


def test_depthwise_modes():
    from tests.test_qdq import depthwise_model

    rng = np.random.default_rng(5)
    feeds = [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(10)]
    weights = lambda result: sorted(t.name for t in result.model.graph.initializer if t.name.startswith("w"))  # noqa: E731
    float_dw = ["w1_quantized", "w1_scale", "w1_zero_point", "w2_quantized", "w2_scale", "w2_zero_point", "wd"]
    for mode in ("float", "auto"):  # auto: an 8x16x16 map is small, where integer kernels lose
        result = compiler.compile(depthwise_model(), quantize="int8", calibration=feeds, depthwise=mode)
        assert weights(result) == float_dw, mode
    assert result.report.notes[-1] == "depthwise Convs: 0 of 1 integer; 1 on small maps float"
    both = compiler.compile(depthwise_model(), quantize="int8", calibration=feeds, depthwise="integer")
    assert "wd_quantized" in weights(both) and "wd" not in weights(both)
    with pytest.raises(compiler.CompileError) as info:
        compiler.compile(depthwise_model(), quantize="int8", calibration=feeds, depthwise="some")
    assert str(info.value) == "depthwise 'some' is not supported (choose from: auto, integer, float)"
