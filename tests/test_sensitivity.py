"""Quantization sensitivity (compiler/sensitivity.py): each quantized node's cost alone and
all-but-it, ranked, measured without changing the compiled model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import compiler
from compiler.cli import main
from compiler.errors import CompileError

TINY = Path(__file__).resolve().parent.parent / "fixtures" / "tiny_cnn.onnx"


def feeds(n: int = 12) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(n)]


def two_branches() -> onnx.ModelProto:
    """y1 = MatMul(a, W1) where a's feature 0 is huge but W1 ignores it: quantizing `a` to
    uint8 drowns the features that matter. y2 = MatMul(b, W2) on plain data."""
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((16, 8)).astype(np.float32)
    w1[0] = 0
    w2 = rng.standard_normal((16, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w1"], ["y1"], name="outlier_mm"),
         helper.make_node("MatMul", ["b", "w2"], ["y2"], name="plain_mm")],
        "two", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [4, 16]),
                helper.make_tensor_value_info("b", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y1", TensorProto.FLOAT, [4, 8]),
         helper.make_tensor_value_info("y2", TensorProto.FLOAT, [4, 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def outlier_feeds(n: int = 12) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(4)
    out = []
    for _ in range(n):
        a = rng.standard_normal((4, 16)).astype(np.float32)
        a[:, 0] *= 1000
        out.append({"a": a, "b": rng.standard_normal((4, 16)).astype(np.float32)})
    return out


def test_the_node_that_ruins_accuracy_ranks_first():
    result = compiler.compile(two_branches(), quantize="int8", calibration=outlier_feeds(), sensitivity=True,
                              min_cosine=0.0)
    ranked = result.report.sensitivity
    assert [(r.node, r.op) for r in ranked] == [("outlier_mm", "MatMul"), ("plain_mm", "MatMul")]
    assert ranked[0].alone.cosine < 0.95 < 0.999 < ranked[1].alone.cosine
    # all but the harmful node quantized: only the harmless one left, so the outputs stay close
    assert ranked[0].without.cosine > 0.999 and ranked[1].without.cosine < 0.95
    text = str(result.report)
    assert "quantization sensitivity (worst output vs the float model; most harmful alone first):" in text
    assert text.index("outlier_mm") < text.index("plain_mm", text.index("quantization sensitivity"))


def test_the_analysis_leaves_the_compiled_model_as_it_was():
    plain = compiler.compile(str(TINY), quantize="int8", calibration=feeds())
    calls = []
    analysed = compiler.compile(str(TINY), quantize="int8", calibration=feeds(), sensitivity=True,
                                progress=lambda *args: calls.append(args))
    assert analysed.model.SerializeToString() == plain.model.SerializeToString()
    assert [c for c in calls if c[2:] == ("sensitivity",)] == [(i, 8, "sensitivity") for i in range(1, 9)]
    rows = analysed.report.sensitivity
    assert sorted(r.node for r in rows) == ["conv1", "conv2", "fc", "flatten", "gap", "pool1", "relu1", "relu2"]
    assert [r.alone.cosine for r in rows] == sorted(r.alone.cosine for r in rows)
    assert plain.report.sensitivity is None


def test_sensitivity_needs_quantization_and_calibration_data(tmp_path):
    with pytest.raises(CompileError, match=r"^sensitivity analysis is of quantization: it needs quantize='int8'$"):
        compiler.compile(str(TINY), sensitivity=True)
    table = tmp_path / "t.json"
    compiler.compile(str(TINY), quantize="int8", calibration=feeds()).calibration_table.save(table)
    with pytest.raises(CompileError, match=r"^sensitivity analysis and accuracy budgets need calibration data"):
        compiler.compile(str(TINY), quantize="int8", calibration_table=table, sensitivity=True)


def test_cli_prints_the_ranked_table(tmp_path, capsys):
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, feed in enumerate(feeds()):
        np.savez(calib / f"{i:02d}.npz", **feed)
    assert main(["compile", str(TINY), "-o", str(tmp_path / "q.onnx"), "--quantize", "int8", "--calib", str(calib),
                 "--sensitivity"]) == 0
    printed = capsys.readouterr().out
    assert "node     op                 cosine alone  SQNR alone  cosine without  SQNR without" in printed
    assert main(["compile", str(TINY), "-o", str(tmp_path / "o.onnx"), "--sensitivity"]) == 2
    assert capsys.readouterr().err == ("onnxcc: error: --calibration-table, --save-calibration, --exclude, "
                                       "--sensitivity, --accuracy-budget and --depthwise need --quantize int8\n")


# -- budgeted float fallback ------------------------------------------------------------------


def input_of(model: onnx.ModelProto, node: str) -> str:
    """The op that produces the first input of `node` ('graph input' for none)."""
    n = next(n for n in model.graph.node if n.name == node)
    producer = next((p for p in model.graph.node if n.input[0] in p.output), None)
    return producer.op_type if producer is not None else "graph input"


def test_the_budget_keeps_the_harmful_node_float_and_records_each_step():
    result = compiler.compile(two_branches(), quantize="int8", calibration=outlier_feeds(), accuracy_budget=0.01)
    steps = result.report.fallback.steps
    assert [s.float_nodes for s in steps] == [(), ("outlier_mm",)]
    assert steps[0].metric < 0.95 and steps[1].metric > 0.99
    assert all(s.latency_ratio > 0 for s in steps)
    assert input_of(result.model, "outlier_mm") == "graph input"  # float: no DequantizeLinear before it
    assert input_of(result.model, "plain_mm") == "DequantizeLinear"
    assert result.report.verification.ok  # held to the budget's cosine, 0.99
    text = str(result.report)
    assert "float fallback (nodes kept float, the metric, one-thread latency vs float):" in text
    assert "+ outlier_mm" in text


def test_a_loose_budget_keeps_everything_quantized():
    result = compiler.compile(two_branches(), quantize="int8", calibration=outlier_feeds(), accuracy_budget=1.0,
                              min_cosine=0.0)
    assert [s.float_nodes for s in result.report.fallback.steps] == [()]
    assert input_of(result.model, "outlier_mm") == "DequantizeLinear"


def test_the_budget_can_hold_a_metric_of_the_users_own():
    import onnxruntime as ort

    data = outlier_feeds(3)
    float_y2 = [ort.InferenceSession(two_branches().SerializeToString()).run(["y2"], f)[0] for f in data]
    seen = []

    def y2_error(model) -> float:  # the user only cares about y2
        seen.append(type(model).__name__)
        sess = ort.InferenceSession(str(model) if isinstance(model, Path) else model)
        return -max(float(np.abs(sess.run(["y2"], f)[0] - ref).max()) for f, ref in zip(data, float_y2))

    result = compiler.compile(two_branches(), quantize="int8", calibration=outlier_feeds(), accuracy_budget=0.5,
                              accuracy_metric=y2_error, min_cosine=0.0)
    assert [s.float_nodes for s in result.report.fallback.steps] == [()]  # y1's ruin does not count here
    assert seen and -0.5 <= result.report.fallback.steps[0].metric < 0


def test_an_accuracy_budget_needs_quantization():
    with pytest.raises(CompileError, match=r"^an accuracy budget is for quantization: it needs quantize='int8'$"):
        compiler.compile(str(TINY), accuracy_budget=0.01)


# -- figures and tables in the debug dump ---------------------------------------------------------


def test_the_debug_dump_holds_the_sensitivity_and_fallback_tables_and_figures(tmp_path):
    dump = tmp_path / "dump"
    result = compiler.compile(two_branches(), quantize="int8", calibration=outlier_feeds(), sensitivity=True,
                              accuracy_budget=0.01, debug_dump=dump)
    table = (dump / "sensitivity.txt").read_text().splitlines()
    assert table[0].split() == ["node", "op", "cosine", "alone", "SQNR", "alone", "cosine", "without", "SQNR",
                                "without"]
    assert [row.split()[0] for row in table[2:]] == ["outlier_mm", "plain_mm"]
    fallback = (dump / "fallback.txt").read_text().splitlines()
    assert fallback[0] == "float model: metric 1; budget: a drop of at most 0.01"
    assert "(all quantized)" in fallback[1] and fallback[2].endswith("+ outlier_mm")
    assert result.report.fallback.float_metric == pytest.approx(1.0) and result.report.fallback.budget == 0.01
    for name in ("sensitivity.png", "fallback.png"):
        assert (dump / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second compile into the same folder recognises the figures as its own
    compiler.compile(two_branches(), quantize="int8", calibration=outlier_feeds(), sensitivity=True,
                     debug_dump=dump, min_cosine=0.0)
    assert not (dump / "fallback.txt").exists() and (dump / "sensitivity.png").exists()


def test_without_matplotlib_the_tables_are_written_and_the_report_says_why_figures_are_not(tmp_path,
                                                                                          monkeypatch):
    import compiler.instruments

    monkeypatch.setattr(compiler.instruments, "plotting_available", lambda: False)
    dump = tmp_path / "dump"
    result = compiler.compile(two_branches(), quantize="int8", calibration=outlier_feeds(), sensitivity=True,
                              debug_dump=dump, min_cosine=0.0)
    assert (dump / "sensitivity.txt").exists() and not (dump / "sensitivity.png").exists()
    assert result.report.notes[-1] == ("figures not drawn in the debug dump: matplotlib is not installed "
                                       "(pip install 'onnxcc[plots]')")


def test_verify_each_pass_holds_the_exact_passes_after_quantize_to_its_budget():
    # quantize leaves the Mul by 0.5 unread (its factor goes into a DequantizeLinear scale) and
    # dead-code removes it: that model differs from the input by the quantization error, so
    # it is judged by the cosine budget, not bit for bit (8 input channels: no float stem)
    rng = np.random.default_rng(5)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
         helper.make_node("Mul", ["c1", "half"], ["h"], name="mul_half"),
         helper.make_node("Conv", ["h", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
         helper.make_node("GlobalAveragePool", ["r2"], ["y"], name="gap")],
        "rescaled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 64, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 1, 1])],
        [numpy_helper.from_array(rng.normal(0, 0.3, (16, 8, 3, 3)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.normal(0, 0.2, (4, 16, 3, 3)).astype(np.float32), "w2"),
         numpy_helper.from_array(np.array(0.5, np.float32), "half")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    data = [{"x": rng.standard_normal((1, 8, 64, 64)).astype(np.float32)} for _ in range(10)]
    result = compiler.compile(proto, pipeline="lossless", quantize="int8", calibration=data, verify_each_pass=True)
    records = {r.name: r for r in result.report.records}
    assert not records["quantize"].exact and records["dead-code"].exact and records["dead-code"].changed
    assert "cosine" in records["dead-code"].error
