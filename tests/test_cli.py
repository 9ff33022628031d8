"""The command line: output of `inspect`, exit codes, one-line errors, --traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from compiler.cli import main
from tests.real_models import find_model_files

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


def test_inspect_fixture(capsys):
    assert main(["inspect", str(FIXTURES / "tiny_cnn.onnx")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1:] == [
        "ir_version 10, producer onnxcc-fixtures 1, opsets: ai.onnx 21",
        "inputs:",
        "  x  float32[N,3,16,16]",
        "outputs:",
        "  logits  float32[N,10]",
        "nodes: 9",
        "  Conv                     2",
        "  Relu                     2",
        "  BatchNormalization       1",
        "  Flatten                  1",
        "  Gemm                     1",
        "  GlobalAveragePool        1",
        "  MaxPool                  1",
        "parameters: 1,594 in 10 tensors, 6.2 KiB",
        "  float32             1,594  6.2 KiB",
        "metadata keys:",
        "  labels  (49 chars)",
    ]


def test_inspect_lists_subgraphs(capsys):
    assert main(["inspect", str(FIXTURES / "control_flow.onnx")]) == 0
    out = capsys.readouterr().out
    assert "nodes: 8 (4 in subgraphs)" in out
    assert "  If 'pick'.then_branch: 1 nodes" in out
    assert "  Loop 'accumulate'.body: 2 nodes" in out


@pytest.mark.slow
def test_inspect_real_model_with_metadata(capsys):
    rec = [p for p in find_model_files("rapidocr_onnxruntime") if "rec" in p.name]
    if not rec:
        pytest.skip("rapidocr-onnxruntime not installed: pip install --no-deps rapidocr-onnxruntime")
    assert main(["inspect", str(rec[0])]) == 0
    lines = capsys.readouterr().out.splitlines()
    for expected in ("  x  float32[p2o.DynamicDimension.0,3,?,p2o.DynamicDimension.1]",
                     "nodes: 860", "  Constant                 420",
                     "parameters: 2,690,407 in 420 tensors, 10.3 MiB",
                     "metadata keys:", "  character  (13245 chars)"):
        assert expected in lines


def test_missing_file_exits_2_with_one_line(capsys):
    assert main(["inspect", "/no/such/model.onnx"]) == 2
    err = capsys.readouterr().err
    assert err == "onnxcc: error: /no/such/model.onnx: no such file\n"


def test_not_a_model_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\xff\xff not protobuf")
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"onnxcc: error: {bad}: not a valid ONNX model (")
    assert err.count("\n") == 1


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["inspect"]) == 2


def test_help_exits_0_and_shows_examples(capsys):
    assert main(["--help"]) == 0
    assert "examples:" in capsys.readouterr().out


def test_traceback_flag_shows_the_traceback(tmp_path):
    missing = tmp_path / "missing.onnx"
    run = subprocess.run([sys.executable, "-m", "compiler", "inspect", str(missing), "--traceback"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 1  # the exception escapes, as asked
    assert "Traceback (most recent call last)" in run.stderr
    assert "ModelLoadError" in run.stderr


def test_module_entry_point_matches_console_script():
    run = subprocess.run([sys.executable, "-m", "compiler", "inspect", str(FIXTURES / "control_flow.onnx")],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0
    assert run.stdout.startswith("model: ")
    assert run.stderr == ""
