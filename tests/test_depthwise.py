"""Which depthwise Convs `depthwise="auto"` quantizes (compiler/depthwise.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import compiler
from compiler.depthwise import SLACK_DB, choose_float, pooled_sqnr


def scorer(table: dict[tuple[str, ...], float], calls: list):
    def score(kept: tuple[str, ...]) -> float:
        calls.append(kept)
        return table[kept]
    return score


def test_nothing_kept_float_when_all_integer_reaches_the_floor():
    calls = []
    assert choose_float(["a", "b"], scorer({(): 10.0}, calls), floor=9.0) == ((), [])
    assert calls == [()]


def test_the_best_alone_goes_float_first_until_the_floor():
    table = {(): 5.0, ("a",): 6.0, ("b",): 8.0, ("c",): 7.0, ("b", "c"): 9.5}
    calls = []
    kept, steps = choose_float(["a", "b", "c"], scorer(table, calls), floor=9.0)
    assert kept == ("b", "c") and steps == [("b", 8.0), ("c", 9.5)]
    assert calls == [(), ("a",), ("b",), ("c",), ("b", "c")]


def test_every_candidate_goes_float_when_the_floor_is_never_reached():
    table = {(): 1.0, ("a",): 2.0, ("b",): 3.0, ("b", "a"): 4.0}
    kept, steps = choose_float(["a", "b"], scorer(table, []), floor=9.0)
    assert kept == ("b", "a") and steps == [("b", 3.0), ("a", 4.0)]


def test_pooled_sqnr_sums_energies_over_feeds_and_takes_the_worst_output():
    ref = [{"y": np.array([3.0, 4.0]), "z": np.array([1.0])}, {"y": np.array([0.0, 0.0]), "z": np.array([1.0])}]
    out = [{"y": np.array([3.0, 4.0]), "z": np.array([1.1])}, {"y": np.array([0.5, 0.0]), "z": np.array([1.0])}]
    # y: 25 / 0.25 -> 20 dB; z: 2 / 0.01 -> 23.0 dB
    assert math.isclose(pooled_sqnr(ref, out), 20.0, rel_tol=1e-9)
    assert pooled_sqnr(ref, ref) == math.inf


def tanh_model(outlier: float, size: int = 80):
    """pw1 -> Relu -> depthwise 3x3 -> Tanh -> pw2 -> GlobalAveragePool (6 input channels:
    more than a float stem has). Channel 0 of the
    depthwise weights is scaled by `outlier`: one 8-bit scale for its output then leaves the
    other channels a few levels, while float it goes through Tanh, which has no integer
    kernel, and is quantized only after it saturates."""
    rng = np.random.default_rng(0)
    wd = rng.normal(0, 0.3, (8, 1, 3, 3)).astype(np.float32)
    wd[0] *= outlier
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 6, 1, 1)).astype(np.float32), "w1"),
             numpy_helper.from_array(wd, "wd"),
             numpy_helper.from_array(rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="pw1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "wd"], ["d"], name="dw", group=8, pads=[1, 1, 1, 1]),
             helper.make_node("Tanh", ["d"], ["t"], name="tanh"),
             helper.make_node("Conv", ["t", "w2"], ["c2"], name="pw2"),
             helper.make_node("GlobalAveragePool", ["c2"], ["y"], name="gap")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 1, 1])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def feeds(n: int = 12, size: int = 80):
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((1, 6, size, size)).astype(np.float32)} for _ in range(n)]


def depthwise_changes(result) -> list[str]:
    return [f"{c.target}: {c.detail}" for r in result.report.records for c in (r.log.changes if r.log else [])
            if c.kind == "depthwise"]


def quantized_weights(result) -> set[str]:
    return {t.name for t in result.model.graph.initializer if t.name.endswith("_quantized")}


def test_auto_quantizes_a_big_depthwise_conv_that_does_not_hurt():
    result = compiler.compile(tanh_model(outlier=1.0), quantize="int8", calibration=feeds())
    assert "wd_quantized" in quantized_weights(result)
    assert result.report.notes[-1] == "depthwise Convs: 1 of 1 integer"
    changes = depthwise_changes(result)
    assert len(changes) == 2 and changes[0].startswith("(every big one float): worst output SQNR ")
    assert changes[0].endswith(f"dB; the floor is {SLACK_DB:g} dB below")
    assert changes[1].startswith("(every big one integer): worst output SQNR ")


def test_auto_keeps_float_a_big_depthwise_conv_whose_8_bit_output_hurts():
    calibration = feeds()
    result = compiler.compile(tanh_model(outlier=1000.0), quantize="int8", calibration=calibration)
    assert "wd_quantized" not in quantized_weights(result)
    assert result.report.notes[-1] == "depthwise Convs: 0 of 1 integer; kept float for accuracy: dw"
    assert depthwise_changes(result)[2].startswith("dw: float: worst output SQNR then ")
    integer = compiler.compile(tanh_model(outlier=1000.0), quantize="int8", calibration=calibration,
                               depthwise="integer", min_cosine=-1.0)
    assert "wd_quantized" in quantized_weights(integer)
    assert integer.report.verification.outputs[0].sqnr_db < result.report.verification.outputs[0].sqnr_db - 10


def test_auto_leaves_small_maps_float_without_measuring():
    result = compiler.compile(tanh_model(outlier=1.0, size=16), quantize="int8", calibration=feeds(size=16))
    assert "wd_quantized" not in quantized_weights(result)
    assert depthwise_changes(result) == ["dw: float: a small map, where integer kernels lose"]


def test_a_saved_table_ranges_what_auto_measures():
    first = compiler.compile(tanh_model(outlier=1000.0), quantize="int8", calibration=feeds())
    again = compiler.compile(tanh_model(outlier=1000.0), quantize="int8", calibration_table=first.calibration_table)
    assert again.report.notes[-1] == "depthwise Convs: 0 of 1 integer; kept float for accuracy: dw"
    assert quantized_weights(again) == quantized_weights(first)


def test_a_table_saved_for_float_depthwise_convs_does_not_range_them():
    saved = compiler.compile(tanh_model(outlier=1.0), quantize="int8", calibration=feeds(), depthwise="float")
    with pytest.raises(compiler.CompileError) as info:
        compiler.compile(tanh_model(outlier=1.0), quantize="int8", calibration_table=saved.calibration_table)
    assert str(info.value).endswith(
        "calibration table has no entry for tensor 'd' (1 missing); recalibrate with --calib DIR, or compile "
        "with the options the table was saved with (--depthwise, --exclude)")
    same = compiler.compile(tanh_model(outlier=1.0), quantize="int8", calibration_table=saved.calibration_table,
                            depthwise="float")
    assert "wd_quantized" not in quantized_weights(same)


@pytest.mark.slow
def test_on_the_ocr_recognizer_auto_keeps_the_harmful_layer_float_and_the_accuracy(tmp_path):
    """The PP-OCRv4 recognizer on 64 rendered calibration lines (bench/ocr_data.py): every
    depthwise Conv integer costs about 2.5 points of character accuracy, all from its first
    one; auto keeps that one float and stays within 0.5 points of float. About 30 s."""
    pytest.importorskip("PIL", reason="pillow renders the text lines (the test extra has it)")
    from bench import ocr_data

    try:
        model = ocr_data.model_path("rec")
    except FileNotFoundError:
        pytest.skip("rapidocr-onnxruntime is not installed (CI installs it)")
    samples = ocr_data.rec_samples("test", 150)
    result = compiler.compile(str(model), quantize="int8", calibration=ocr_data.calibration_feeds("rec", 64),
                              min_cosine=0.9)  # CTC outputs: a near tie flips a character's peak
    assert result.report.notes[-1] == "depthwise Convs: 13 of 14 integer; kept float for accuracy: p2o.Conv.1"
    float_accuracy = ocr_data.evaluate("rec", str(model), samples)
    accuracy = ocr_data.evaluate("rec", str(result.save(tmp_path / "rec.onnx")), samples)
    assert float_accuracy - accuracy <= 0.005
