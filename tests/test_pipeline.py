"""The named pipelines and their options, through the API and the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import compiler
import ir
from compiler.cli import main
from compiler.pipeline import get_pipeline
from rewrites.constants import FreezeInitializerInputs
from tests.conformance import DATA_ROOT, run_ort

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SQUEEZENET = DATA_ROOT / "light" / "light_squeezenet.onnx"


def test_default_pipeline_passes_in_order():
    assert [p.name for p in get_pipeline("default")] == [
        "lift-constants", "infer-shapes", "fold-constants", "cleanup", "fuse", "depth-to-space", "cse",
        "dead-code", "infer-shapes", "fold-constants", "cleanup", "fuse", "dead-code"]
    assert [p.name for p in get_pipeline("default", freeze_inputs=True)][0] == "freeze-inputs"
    assert get_pipeline("lossless") == []


def test_unknown_options_are_refused():
    with pytest.raises(compiler.CompileError, match=r"^pipeline 'lossless' does not take the options allow_growth$"):
        get_pipeline("lossless", allow_growth=True)


def test_default_pipeline_folds_batchnorm_of_the_fixture():
    result = compiler.compile(str(FIXTURES / "tiny_cnn.onnx"))
    ops = [n.op_type for n in result.ir_model.graph.nodes]
    assert ops == ["Conv", "Relu", "MaxPool", "Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm"]
    assert result.report.rewrites_by_rule() == {"FuseBatchNorm": 1}
    assert result.report.verification.ok


def test_freeze_inputs_makes_ir3_weights_constant():
    model = ir.load(str(SQUEEZENET))
    defaults = [v.name for v in model.graph.inputs if v.tensor is not None]
    result = FreezeInitializerInputs().run(model)
    ir.verify(model)
    assert result.log.by_kind() == {"freeze-input": len(defaults)}
    assert [v.name for v in model.graph.inputs] == ["data_0"]
    assert all(model.graph.initializers[name].const is not None for name in defaults)


def test_size_safe_by_default_and_growth_only_when_asked(tmp_path):
    safe, grown = tmp_path / "safe.onnx", tmp_path / "grown.onnx"
    assert main(["compile", str(SQUEEZENET), "-o", str(safe)]) == 0
    assert main(["compile", str(SQUEEZENET), "-o", str(grown), "--freeze-inputs", "--allow-growth",
                 "--fold-size-limit", "1G"]) == 0
    assert safe.stat().st_size <= SQUEEZENET.stat().st_size  # never grows by default
    nodes = {p: len(onnx.load(str(p)).graph.node) for p in (SQUEEZENET, safe, grown)}
    assert nodes[grown] < nodes[safe] <= nodes[SQUEEZENET]
    assert grown.stat().st_size > 100 * SQUEEZENET.stat().st_size  # ConstantOfShape weights made real
    x = (np.arange(3 * 224 * 224).reshape(1, 3, 224, 224) / (3 * 224 * 224)).astype(np.float32)
    want = run_ort(onnx.load(str(SQUEEZENET)), [x])[0]
    for path in (safe, grown):
        assert np.array_equal(run_ort(str(path), [x])[0], want)


def test_pipeline_options_on_lossless_exit_2(tmp_path, capsys):
    assert main(["compile", str(FIXTURES / "tiny_cnn.onnx"), "-o", str(tmp_path / "o.onnx"),
                 "--pipeline", "lossless", "--allow-growth"]) == 2
    assert capsys.readouterr().err == \
        "onnxcc: error: pipeline 'lossless' does not take the options allow_growth\n"


@pytest.mark.parametrize("text, size", [("1048576", 1 << 20), ("512K", 512 << 10), ("1M", 1 << 20),
                                        ("2GiB", 2 << 30), ("1.5k", 1536)])
def test_fold_size_limit_sizes(tmp_path, text, size, monkeypatch):
    seen = {}

    def fake_compile(model, **kwargs):
        seen.update(kwargs["pipeline_options"])
        raise compiler.CompileError("stop here")

    monkeypatch.setattr("compiler.cli.compile_model", fake_compile)
    assert main(["compile", str(FIXTURES / "tiny_cnn.onnx"), "-o", str(tmp_path / "o.onnx"),
                 "--fold-size-limit", text]) == 2
    assert seen == {"fold_size_limit": size}


def test_bad_fold_size_limit_is_a_usage_error(tmp_path, capsys):
    assert main(["compile", str(FIXTURES / "tiny_cnn.onnx"), "-o", str(tmp_path / "o.onnx"),
                 "--fold-size-limit", "lots"]) == 2
    assert "'lots' is not a size (e.g. 1048576, 512K, 1M)" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["inf", "1e400", "-5", "-1M"])
def test_fold_size_limit_out_of_range_is_a_usage_error(tmp_path, capsys, text):
    assert main(["compile", str(FIXTURES / "tiny_cnn.onnx"), "-o", str(tmp_path / "o.onnx"),
                 f"--fold-size-limit={text}"]) == 2
    err = capsys.readouterr().err
    assert f"'{text}' is not a size" in err and "Traceback" not in err
