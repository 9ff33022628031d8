"""`onnxcc compile`: every exit code, in process through `compiler.cli.main` and once each
through `python -m compiler` (DESIGN.md §5, §9).

0 success (OUT written, report printed), 1 verification failed (nothing written), 2 bad input
or usage, 3 internal error. Errors for 1 and 2 are exactly one line on stderr; a crash is one
line too unless --traceback asks for the traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest

import compiler.pipeline
from compiler.cli import build_parser, main
from compiler.pass_manager import PassError
from compiler.pipeline import get_pipeline
from rewrites.base import Match, Pass, Reject, RewriteRule, RulePass
from rewrites.cleanup import DeadCodeElimination, remove_identity

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"

# y = Relu(Identity(x) @ w): the Identity gives the default pipeline something to remove; w
# (2 KiB) is big enough to go to external data when the model is saved that way.
MODEL_TEXT = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[N, 16] x, float[16, 32] w) => (float[N, 32] y) {
  t = Identity(x)
  m = MatMul(t, w)
  y = Relu(m)
}
"""

UNRUNNABLE_TEXT = """
<ir_version: 10, opset_import: ["" : 21, "com.example" : 1]>
g (float[2, 3] x) => (float[2, 3] y) {
  y = com.example.Frobnicate(x)
}
"""


def make_model() -> onnx.ModelProto:
    model = onnx.parser.parse_model(MODEL_TEXT)
    w = np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32)
    model.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))
    onnx.checker.check_model(model)
    return model


def write_model(folder: Path, name: str = "model.onnx", external: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if external:
        onnx.save(make_model(), path, save_as_external_data=True, location=name + ".data", size_threshold=0)
    else:
        path.write_bytes(make_model().SerializeToString())
    return path


FEED = {"x": np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)}


def ort_run(model: Path | onnx.ModelProto) -> list[np.ndarray]:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, FEED)


def assert_same_outputs(expected: list[np.ndarray], out: Path) -> None:
    actual = ort_run(out)
    assert len(actual) == len(expected)
    for e, a in zip(expected, actual):
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6)


def one_line(err: str) -> str:
    assert err.endswith("\n") and err.count("\n") == 1, repr(err)
    return err[:-1]


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- test pipelines, two of them broken on purpose ----------------------------------------

class ReluToSigmoid(RewriteRule):
    """Wrong on purpose: Relu(x) -> Sigmoid(x)."""

    op_type = "Relu"

    def match(self, node):
        return Match([node]) if node.inputs[0] is not None else Reject("no input")

    def rewrite(self, match, rewriter):
        relu = match.nodes[0]
        sigmoid = rewriter.add_node(relu.graph, relu, "Sigmoid", [relu.inputs[0]])
        rewriter.replace_uses(relu.outputs[0], sigmoid.outputs[0])


@dataclass
class Boom(Pass):
    """Crashes like a buggy pass would."""

    name = "boom"

    def run(self, model):
        raise RuntimeError("boom\nand a second line that must not reach the terminal")


# Test pipelines, by name (the subprocess tests register them through sitecustomize): a fixed
# cleanup for exact dumps, and two broken ones.
TEST_PIPELINES = {
    "cleanup": lambda: [remove_identity(), DeadCodeElimination()],
    "broken": lambda: [remove_identity(), RulePass([ReluToSigmoid()], name="relu-to-sigmoid")],
    "crash": lambda: [remove_identity(), Boom()],
}


@pytest.fixture
def broken(monkeypatch):
    for name, factory in TEST_PIPELINES.items():
        monkeypatch.setitem(compiler.pipeline.PIPELINES, name, factory)


@pytest.fixture
def tmpdir_checked(tmp_path, monkeypatch):
    """Route tempfile into a folder of our own and check that nothing is left in it."""
    scratch = tmp_path / "system-tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    yield scratch
    assert names(scratch) == []


def onnxcc(tmp_path: Path, *args: str, plugin: bool = False) -> subprocess.CompletedProcess:
    """`python -m compiler compile ARGS`; with `plugin`, the test pipelines are registered by a
    sitecustomize before the CLI starts."""
    env = dict(os.environ)
    scratch = tmp_path / "subprocess-tmp"
    scratch.mkdir(exist_ok=True)
    env["TMPDIR"] = str(scratch)
    if plugin:
        site = tmp_path / "site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(textwrap.dedent(f"""\
            import sys
            sys.path.insert(0, {str(ROOT)!r})
            import compiler.pipeline
            from tests.test_cli_compile import TEST_PIPELINES
            compiler.pipeline.PIPELINES.update(TEST_PIPELINES)
            """))
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-m", "compiler", "compile", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    # onnxruntime itself drops a '.ses' file into TMPDIR when imported; anything else is ours.
    assert [n for n in names(scratch) if n != ".ses"] == [], "temporary files left behind"
    return run


# -- exit 0 ---------------------------------------------------------------------------------------

def test_compile_writes_the_output_and_prints_the_report(tmp_path, tmpdir_checked, capsys):
    model = write_model(tmp_path / "in")
    out = tmp_path / "out" / "compiled.onnx"
    out.parent.mkdir()
    assert main(["compile", str(model), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.splitlines()
    assert lines[0].startswith("pipeline 'default': 3 -> 2 nodes, 2.0 KiB -> 2.0 KiB parameters; "
                               "verified on 2 feeds: 'y' max abs 0,")
    assert lines[1].split() == ["#", "pass", "changed", "rewrites", "nodes", "params", "ms",
                                "error", "vs", "input"]
    passes = [p.name for p in get_pipeline("default")]
    rows = [line.split()[:2] for line in lines[3:3 + len(passes)]]
    assert rows == [[f"{i:03d}", name] for i, name in enumerate(passes, start=1)]
    assert "RemoveIdentity 1" in captured.out
    assert lines[-1] == f"wrote {out}"
    assert names(out.parent) == ["compiled.onnx"]
    assert [n.op_type for n in onnx.load(out).graph.node] == ["MatMul", "Relu"]
    assert_same_outputs(ort_run(model), out)


def test_compile_fixture(tmp_path, capsys):
    out = tmp_path / "tiny.onnx"
    assert main(["compile", str(FIXTURES / "tiny_cnn.onnx"), "-o", str(out), "--pipeline", "lossless"]) == 0
    assert capsys.readouterr().out.startswith("pipeline 'lossless': 9 -> 9 nodes")
    x = np.random.default_rng(2).standard_normal((2, 3, 16, 16)).astype(np.float32)
    (expected,) = ort.InferenceSession(str(FIXTURES / "tiny_cnn.onnx"),
                                       providers=["CPUExecutionProvider"]).run(None, {"x": x})
    (actual,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(actual, expected)


def test_external_data_goes_beside_the_output(tmp_path, tmpdir_checked, capsys):
    model = write_model(tmp_path / "in", external=True)
    out = tmp_path / "out.onnx"
    assert main(["compile", str(model), "-o", str(out)]) == 0
    assert names(tmp_path) == ["in", "out.onnx", "out.onnx.data", "system-tmp"]
    assert_same_outputs(ort_run(model), out)


def test_output_over_the_input_overwrites_it_on_purpose(tmp_path, tmpdir_checked, capsys):
    model = write_model(tmp_path / "in")
    expected = ort_run(model)
    before = model.read_bytes()
    assert main(["compile", str(model), "-o", str(model)]) == 0
    assert model.read_bytes() != before
    assert [n.op_type for n in onnx.load(model).graph.node] == ["MatMul", "Relu"]
    assert names(model.parent) == ["model.onnx"]
    assert_same_outputs(expected, model)


def test_output_over_the_input_with_external_data(tmp_path, tmpdir_checked, capsys):
    model = write_model(tmp_path / "in", external=True)
    expected = ort_run(model)
    assert main(["compile", str(model), "-o", str(model)]) == 0
    assert names(model.parent) == ["model.onnx", "model.onnx.data"]
    assert_same_outputs(expected, model)


def test_input_shape_binds_symbolic_dimensions(tmp_path, capsys):
    model = write_model(tmp_path)
    assert main(["compile", str(model), "-o", str(tmp_path / "out.onnx"), "--input-shape", "x=5,16"]) == 0
    assert (tmp_path / "out.onnx").exists()


def test_no_verify_never_starts_onnxruntime(tmp_path, capsys, monkeypatch):
    model = tmp_path / "custom.onnx"
    model.write_bytes(onnx.parser.parse_model(UNRUNNABLE_TEXT).SerializeToString())
    out = tmp_path / "out.onnx"

    assert main(["compile", str(model), "-o", str(out)]) == 2  # the input itself does not run
    err = one_line(capsys.readouterr().err)
    assert err.startswith("onnxcc: error: onnxruntime cannot load the input model: ")
    assert not out.exists()

    def no_ort(*args, **kwargs):
        raise AssertionError("onnxruntime was started despite --no-verify")

    monkeypatch.setattr(ort, "InferenceSession", no_ort)
    assert main(["compile", str(model), "-o", str(out), "--no-verify"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.startswith("pipeline 'default': 1 -> 1 nodes, 0 B -> 0 B parameters\n")
    assert onnx.load(out).graph.node[0].op_type == "Frobnicate"


def test_debug_dump_creates_the_dump(tmp_path, broken, capsys):
    model = write_model(tmp_path / "in")
    dump = tmp_path / "dump"
    out = tmp_path / "out.onnx"
    args = ["compile", str(model), "-o", str(out), "--debug-dump", str(dump)]
    assert main(args + ["--pipeline", "cleanup"]) == 0
    assert names(dump) == [".onnxcc-dump", "000_input.onnx", "000_input.txt", "001_identity.diff",
                           "001_identity.onnx", "001_identity.txt", "002_dead-code.unchanged", "summary.txt"]
    diff = (dump / "001_identity.diff").read_text()
    assert diff.startswith("# pass 001 identity: ")
    assert "RemoveIdentity" in diff
    assert "001  identity" in (dump / "summary.txt").read_text()
    assert_same_outputs(ort_run(model), dump / "001_identity.onnx")
    # Its own dump can be overwritten by the next run.
    assert main(args) == 0
    assert "000_input.onnx" in names(dump) and "summary.txt" in names(dump)


def test_compile_help_lists_every_flag_and_the_examples(capsys):
    assert main(["compile", "--help"]) == 0
    text = capsys.readouterr().out
    flags = ["-h", "--help", "-o", "--output", "--pipeline", "--fold-size-limit", "--allow-growth",
             "--freeze-inputs", "--quantize", "--calib", "--calib-preprocess", "--image-size", "--image-layout",
             "--image-channels", "--image-scale", "--image-mean", "--image-std", "--image-fit",
             "--calib-method", "--calib-samples", "--exclude",
             "--save-calibration", "--calibration-table", "--depthwise", "--per-tensor-weights",
             "--weight-rounding", "--equalize", "--bias-correction", "--absorb-high-bias", "--sensitivity", "--accuracy-budget",
             "--smooth-quant", "--min-cosine", "--prune", "--prune-mode", "--prune-scope", "--prune-importance",
             "--refit", "--prune-multiple", "--prune-exclude", "--prune-first-last", "--sparse-storage", "--weight-only", "--block-size", "--weight-format",
             "--quantize-embeddings", "--debug-dump", "--no-verify",
             "--verify-each-pass", "--verify-data", "--input-shape", "--traceback"]
    compile_parser = build_parser()._subparsers._group_actions[0].choices["compile"]
    declared = [s for a in compile_parser._actions for s in a.option_strings]
    assert sorted(declared) == sorted(flags)
    for flag in flags:
        assert flag in text, flag
    assert "examples:" in text
    assert "onnxcc compile model.onnx -o out.onnx --debug-dump dump/" in text
    assert "exit codes: 0 success, 1 verification failed, 2 bad input or usage, 3 internal error" in text


# -- exit 1 ---------------------------------------------------------------------------------------

def test_verification_failure_writes_nothing(tmp_path, tmpdir_checked, broken, capsys):
    model = write_model(tmp_path / "in", external=True)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "out.onnx"
    assert main(["compile", str(model), "-o", str(out), "--pipeline", "broken"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert one_line(captured.err).startswith("onnxcc: error: verification failed: 'y' max abs ")
    assert names(out_dir) == []  # neither OUT nor OUT.data nor a temporary file


def test_verification_failure_keeps_an_existing_output(tmp_path, tmpdir_checked, broken, capsys):
    model = write_model(tmp_path)
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous build")
    assert main(["compile", str(model), "-o", str(out), "--pipeline", "broken"]) == 1
    assert out.read_bytes() == b"previous build"
    assert names(tmp_path) == ["model.onnx", "out.onnx", "system-tmp"]


def test_verification_failure_over_the_input_leaves_the_input(tmp_path, broken, capsys):
    model = write_model(tmp_path)
    before = model.read_bytes()
    assert main(["compile", str(model), "-o", str(model), "--pipeline", "broken"]) == 1
    assert model.read_bytes() == before


def test_verify_each_pass_names_the_pass(tmp_path, tmpdir_checked, broken, capsys):
    model = write_model(tmp_path)
    out = tmp_path / "out.onnx"
    assert main(["compile", str(model), "-o", str(out), "--pipeline", "broken", "--verify-each-pass"]) == 1
    err = one_line(capsys.readouterr().err)
    assert err.startswith("onnxcc: error: pass 2 'relu-to-sigmoid' broke the numbers: 'y' max abs ")
    assert not out.exists()


# -- exit 2 ---------------------------------------------------------------------------------------

def _exit_2(args: list[str], capsys) -> str:
    assert main(["compile", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return one_line(captured.err)


def test_missing_model(tmp_path, capsys):
    missing = tmp_path / "missing.onnx"
    err = _exit_2([str(missing), "-o", str(tmp_path / "out.onnx")], capsys)
    assert err == f"onnxcc: error: {missing}: no such file"
    assert names(tmp_path) == []


def test_not_a_model(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\xff\xff not protobuf")
    err = _exit_2([str(bad), "-o", str(tmp_path / "out.onnx")], capsys)
    assert err.startswith(f"onnxcc: error: {bad}: not a valid ONNX model (")
    assert names(tmp_path) == ["bad.onnx"]


@pytest.mark.parametrize("spec, message", [
    ("x=1,sixteen", "--input-shape 'x=1,sixteen': expected NAME=D1,D2,... (for example x=1,3,224,224)"),
    ("x", "--input-shape 'x': expected NAME=D1,D2,... (for example x=1,3,224,224)"),
    ("z=1,16", "--input-shape names 'z', which is not an input of the model (inputs: x)"),
    ("x=1,16,1", "--input-shape x: 3 dimensions given, the input has 2"),
    ("x=1,8", "--input-shape x=1,8 contradicts its fixed shape ['N', 16]"),
])
def test_bad_input_shape(tmp_path, capsys, spec, message):
    model = write_model(tmp_path)
    err = _exit_2([str(model), "-o", str(tmp_path / "out.onnx"), "--input-shape", spec], capsys)
    assert err == f"onnxcc: error: {message}"
    assert names(tmp_path) == ["model.onnx"]


def test_unknown_pipeline(tmp_path, capsys):
    model = write_model(tmp_path)
    err = _exit_2([str(model), "-o", str(tmp_path / "out.onnx"), "--pipeline", "turbo"], capsys)
    assert err.startswith("onnxcc compile: error: argument --pipeline: invalid choice: 'turbo'")
    assert "default" in err and "lossless" in err
    assert names(tmp_path) == ["model.onnx"]


def test_missing_output_option(tmp_path, capsys):
    model = write_model(tmp_path)
    err = _exit_2([str(model)], capsys)
    assert err.startswith("onnxcc compile: error: the following arguments are required: -o/--output")


def test_unknown_flag(tmp_path, capsys):
    model = write_model(tmp_path)
    err = _exit_2([str(model), "-o", str(tmp_path / "out.onnx"), "--fast"], capsys)
    assert err.startswith("onnxcc: error: unrecognized arguments: --fast")


def test_output_folder_missing(tmp_path, capsys):
    model = write_model(tmp_path)
    err = _exit_2([str(model), "-o", str(tmp_path / "nope" / "out.onnx")], capsys)
    assert err == f"onnxcc: error: output folder '{tmp_path / 'nope'}' does not exist"
    assert names(tmp_path) == ["model.onnx"]


def test_output_is_a_folder(tmp_path, capsys):
    model = write_model(tmp_path)
    err = _exit_2([str(model), "-o", str(tmp_path)], capsys)
    assert err == f"onnxcc: error: output '{tmp_path}' is a folder; give a file name"


def test_output_folder_is_a_file(tmp_path, capsys):
    model = write_model(tmp_path)
    err = _exit_2([str(model), "-o", str(model / "out.onnx")], capsys)
    assert err == f"onnxcc: error: output folder '{model}' is not a folder"
    assert names(tmp_path) == ["model.onnx"]


def test_debug_dump_under_a_file(tmp_path, capsys):
    model = write_model(tmp_path)
    out = tmp_path / "out.onnx"
    err = _exit_2([str(model), "-o", str(out), "--debug-dump", str(model / "dump")], capsys)
    assert err == f"onnxcc: error: cannot create debug dump folder '{model / 'dump'}': Not a directory"
    assert not out.exists()


def test_debug_dump_folder_with_foreign_files(tmp_path, capsys):
    model = write_model(tmp_path / "in")
    dump = tmp_path / "dump"
    dump.mkdir()
    (dump / "notes.txt").write_text("mine")
    out = tmp_path / "out.onnx"
    err = _exit_2([str(model), "-o", str(out), "--debug-dump", str(dump)], capsys)
    assert err == (f"onnxcc: error: debug dump folder '{dump}' holds files onnxcc did not write "
                   "(e.g. 'notes.txt'); give an empty or new folder")
    assert names(dump) == ["notes.txt"] and (dump / "notes.txt").read_text() == "mine"
    assert not out.exists()


# -- exit 3 ---------------------------------------------------------------------------------------

def test_crashing_pass_is_one_line_internal_error(tmp_path, tmpdir_checked, broken, capsys):
    model = write_model(tmp_path)
    out = tmp_path / "out.onnx"
    assert main(["compile", str(model), "-o", str(out), "--pipeline", "crash"]) == 3
    captured = capsys.readouterr()
    assert captured.out == ""
    assert one_line(captured.err) == ("onnxcc: internal error: pass 2 'boom' failed (passes before it: "
                                      "identity): RuntimeError: boom (rerun with --traceback and report it)")
    assert "Traceback" not in captured.err
    assert not out.exists()


def test_crashing_pass_with_traceback_raises(tmp_path, broken, capsys):
    model = write_model(tmp_path)
    with pytest.raises(PassError) as info:
        main(["compile", str(model), "-o", str(tmp_path / "out.onnx"), "--pipeline", "crash", "--traceback"])
    assert isinstance(info.value.__cause__, RuntimeError)
    assert not (tmp_path / "out.onnx").exists()


# -- the same, once each through `python -m compiler` ------------------------------------------------

def test_subprocess_exit_0(tmp_path):
    model = write_model(tmp_path / "in")
    out = tmp_path / "out.onnx"
    run = onnxcc(tmp_path, str(model), "-o", str(out))
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    assert run.stdout.startswith("pipeline 'default': 3 -> 2 nodes")
    assert run.stdout.endswith(f"wrote {out}\n")
    assert_same_outputs(ort_run(model), out)


def test_subprocess_exit_1(tmp_path):
    model = write_model(tmp_path / "in", external=True)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    run = onnxcc(tmp_path, str(model), "-o", str(out_dir / "out.onnx"), "--pipeline", "broken", plugin=True)
    assert run.returncode == 1, run.stderr
    assert one_line(run.stderr).startswith("onnxcc: error: verification failed: 'y' max abs ")
    assert run.stdout == ""
    assert names(out_dir) == []


def test_subprocess_exit_2(tmp_path):
    missing = tmp_path / "missing.onnx"
    run = onnxcc(tmp_path, str(missing), "-o", str(tmp_path / "out.onnx"))
    assert run.returncode == 2
    assert run.stderr == f"onnxcc: error: {missing}: no such file\n"
    run = onnxcc(tmp_path, str(missing))
    assert run.returncode == 2
    assert one_line(run.stderr).startswith("onnxcc compile: error: the following arguments are required")


def test_subprocess_exit_3_and_traceback(tmp_path):
    model = write_model(tmp_path / "in")
    out = tmp_path / "out.onnx"
    run = onnxcc(tmp_path, str(model), "-o", str(out), "--pipeline", "crash", plugin=True)
    assert run.returncode == 3
    assert one_line(run.stderr).startswith("onnxcc: internal error: pass 2 'boom' failed")
    assert "Traceback" not in run.stderr

    run = onnxcc(tmp_path, str(model), "-o", str(out), "--pipeline", "crash", "--traceback", plugin=True)
    assert run.returncode == 1  # the exception escapes, as asked
    assert "Traceback (most recent call last)" in run.stderr
    assert "RuntimeError: boom" in run.stderr
    assert "PassError: pass 2 'boom' failed" in run.stderr
    assert not out.exists()
