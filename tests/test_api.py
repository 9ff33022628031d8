"""The Python API: `compiler.compile(model, ...) -> CompileResult` (DESIGN.md §4, §5, §9).

Every accepted input form gives a verified result, the caller's model is never touched, the
result runs in onnxruntime with the input's outputs, `save` is atomic, and `verify=False`
never starts onnxruntime."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest

import compiler
import ir
from compiler import CompileError, CompileResult, VerificationError
from compiler.pipeline import get_pipeline
from rewrites.base import Pass
from rewrites.cleanup import DeadCodeElimination, remove_identity

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"

# y = Relu(Identity(x) + w): the Identity gives the default pipeline something to remove.
IDENTITY_TEXT = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[N, 3] x) => (float[N, 3] y)
<float[3] w = {0.5, -1.0, 2.0}> {
  t = Identity(x)
  s = Add(t, w)
  y = Relu(s)
}
"""

# Lowers fine, but onnxruntime knows no com.example::Frobnicate kernel.
UNRUNNABLE_TEXT = """
<ir_version: 10, opset_import: ["" : 21, "com.example" : 1]>
g (float[2, 3] x) => (float[2, 3] y) {
  t = Identity(x)
  y = com.example.Frobnicate(t)
}
"""


def identity_model() -> onnx.ModelProto:
    model = onnx.parser.parse_model(IDENTITY_TEXT)
    onnx.checker.check_model(model)
    return model


def ort_outputs(model: onnx.ModelProto | bytes | Path, feed: dict) -> list[np.ndarray]:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else \
        str(model) if isinstance(model, Path) else model
    sess = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def assert_same_outputs(original, compiled: onnx.ModelProto, feed: dict) -> None:
    expected = ort_outputs(original, feed)
    actual = ort_outputs(compiled, feed)
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6)


def assert_verified(result: CompileResult, output_names: list[str]) -> None:
    assert isinstance(result, CompileResult)
    v = result.report.verification
    assert v is not None and v.ok
    assert v.feeds == 2  # the default: two seeded random feeds
    assert [o.name for o in v.outputs] == output_names


# -- accepted inputs -------------------------------------------------------------------------

def test_default_pipeline_records_one_row_per_pass():
    result = compiler.compile(identity_model())
    assert result.report.pipeline == "default"
    expected = [p.name for p in get_pipeline("default")]
    assert [r.name for r in result.report.records] == expected
    assert [r.index for r in result.report.records] == list(range(1, len(expected) + 1))


@pytest.mark.parametrize("form", ["str", "Path", "bytes", "ModelProto", "graphsurgeon"])
def test_every_input_form_compiles_and_verifies(form, tmp_path):
    proto = identity_model()
    path = tmp_path / "model.onnx"
    path.write_bytes(proto.SerializeToString())
    if form == "graphsurgeon":
        gs = pytest.importorskip("onnx_graphsurgeon", reason="onnx-graphsurgeon is not installed")
        source = gs.import_onnx(proto)
    else:
        source = {"str": str(path), "Path": path, "bytes": path.read_bytes(), "ModelProto": proto}[form]

    result = compiler.compile(source)

    assert_verified(result, ["y"])
    assert [n.op_type for n in result.model.graph.node] == ["Add", "Relu"]
    assert_same_outputs(proto, result.model, {"x": np.linspace(-3, 3, 12, dtype=np.float32).reshape(4, 3)})


@pytest.mark.parametrize("fixture, outputs", [("tiny_cnn.onnx", ["logits"]), ("control_flow.onnx", ["y"])])
def test_fixtures_compile_and_verify(fixture, outputs):
    result = compiler.compile(FIXTURES / fixture)
    assert_verified(result, outputs)
    assert [o.name for o in result.model.graph.output] == outputs


def test_unsupported_source_type_is_a_compile_error():
    with pytest.raises(CompileError) as info:
        compiler.compile(12345)
    assert str(info.value) == ("cannot read a model from an object of type int; "
                               "give a path, bytes or onnx.ModelProto")


def test_missing_path_is_a_compile_error(tmp_path):
    missing = tmp_path / "nope.onnx"
    with pytest.raises(CompileError) as info:
        compiler.compile(missing)
    assert str(info.value) == f"{missing}: no such file"


# -- the caller's model is never modified ------------------------------------------------------

def test_callers_model_proto_is_not_mutated():
    proto = identity_model()
    before = proto.SerializeToString()
    result = compiler.compile(proto)
    assert result.report.nodes_before == 3 and result.report.nodes_after == 2  # it did change something
    assert proto.SerializeToString() == before
    # Not even through the result: editing the output leaves the input alone.
    result.model.graph.node[0].name = "edited"
    assert proto.SerializeToString() == before


def test_callers_graphsurgeon_graph_is_not_mutated():
    gs = pytest.importorskip("onnx_graphsurgeon", reason="onnx-graphsurgeon is not installed")
    graph = gs.import_onnx(identity_model())
    before = gs.export_onnx(graph).SerializeToString()
    compiler.compile(graph)
    assert [n.op for n in graph.nodes] == ["Identity", "Add", "Relu"]
    assert gs.export_onnx(graph).SerializeToString() == before


def test_input_file_is_not_modified(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(identity_model().SerializeToString())
    before = path.read_bytes()
    compiler.compile(path).save(tmp_path / "out.onnx")
    assert path.read_bytes() == before


# -- the result -----------------------------------------------------------------------------

def test_result_model_is_a_proto_that_runs_with_the_inputs_outputs():
    proto = onnx.load(FIXTURES / "tiny_cnn.onnx")
    result = compiler.compile(proto)
    assert isinstance(result.model, onnx.ModelProto)
    onnx.checker.check_model(result.model)
    assert result.model.ir_version == proto.ir_version
    feed = {"x": np.random.default_rng(7).standard_normal((3, 3, 16, 16)).astype(np.float32)}
    assert_same_outputs(proto, result.model, feed)


def test_report_has_per_pass_records_and_the_verification():
    result = compiler.compile(identity_model(), pipeline=[remove_identity(), DeadCodeElimination()])
    report = result.report
    assert report.pipeline == "custom"
    assert [(r.index, r.name, r.changed) for r in report.records] == [(1, "identity", True),
                                                                      (2, "dead-code", False)]
    assert report.records[0].log.by_rule() == {"RemoveIdentity": 1}
    assert (report.records[0].nodes_before, report.records[0].nodes_after) == (3, 2)
    assert (report.nodes_before, report.nodes_after) == (3, 2)
    assert report.rewrites_by_rule() == {"RemoveIdentity": 1}
    v = report.verification
    assert [o.name for o in v.outputs] == ["y"]
    assert v.outputs[0].max_abs == 0.0 and v.outputs[0].ok
    text = str(report)
    assert text.startswith("pipeline 'custom': 3 -> 2 nodes, 12 B -> 12 B parameters; "
                           "verified on 2 feeds: 'y' ")
    assert "001  identity" in text and "002  dead-code" in text


# -- save -----------------------------------------------------------------------------------

def test_save_writes_atomically_and_leaves_no_temp_files(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = compiler.compile(identity_model())
    written = result.save(out_dir / "model.onnx")
    assert written == out_dir / "model.onnx"
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.onnx"]
    assert onnx.load(written) == result.model
    # Saving again over an existing file replaces it, still without leftovers.
    result.save(str(out_dir / "model.onnx"))
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.onnx"]
    assert_same_outputs(identity_model(), onnx.load(written), {"x": np.ones((2, 3), np.float32)})


def test_save_refuses_a_missing_folder(tmp_path):
    result = compiler.compile(identity_model())
    target = tmp_path / "missing" / "model.onnx"
    with pytest.raises(CompileError) as info:
        result.save(target)
    assert str(info.value) == f"output folder '{tmp_path / 'missing'}' does not exist"
    assert not (tmp_path / "missing").exists()
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_a_file_as_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"not a folder")
    with pytest.raises(CompileError) as info:
        compiler.compile(identity_model()).save(blocker / "model.onnx")
    assert str(info.value) == f"output folder '{blocker}' is not a folder"


def test_save_reports_a_failed_write_as_a_compile_error(tmp_path, monkeypatch):
    result = compiler.compile(identity_model())

    def denied(model, path, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(ir, "save", denied)
    with pytest.raises(CompileError) as info:
        result.save(tmp_path / "model.onnx")
    assert str(info.value) == f"cannot write '{tmp_path / 'model.onnx'}': Permission denied"


# -- pipelines --------------------------------------------------------------------------------

def test_unknown_pipeline_name_is_an_exact_compile_error():
    with pytest.raises(CompileError) as info:
        compiler.compile(identity_model(), pipeline="turbo")
    assert type(info.value) is CompileError
    assert str(info.value) == f"unknown pipeline 'turbo' (choose from: {', '.join(compiler.PIPELINES)})"
    assert "lossless, default" in str(info.value)


def test_custom_pipeline_list_of_passes():
    result = compiler.compile(identity_model(), pipeline=[remove_identity(), DeadCodeElimination()])
    assert result.report.pipeline == "custom"
    assert [r.name for r in result.report.records] == ["identity", "dead-code"]
    assert [n.op_type for n in result.model.graph.node] == ["Add", "Relu"]
    assert_verified(result, ["y"])


def test_empty_custom_pipeline_round_trips():
    proto = identity_model()
    result = compiler.compile(proto, pipeline=[])
    assert result.report.records == []
    assert [n.op_type for n in result.model.graph.node] == ["Identity", "Add", "Relu"]
    assert_verified(result, ["y"])


@dataclass
class _Scale(Pass):
    """Deliberately wrong: doubles every initializer."""

    name = "scale"

    def run(self, model):
        from rewrites.base import ChangeLog, PassResult, Rewriter

        log = ChangeLog()
        rw = Rewriter(model, log, self.name)
        for value in list(model.graph.initializers.values()):
            doubled = rw.add_initializer(model.graph, value.name + "_x2", value.tensor.numpy() * 2)
            for node, index in list(value.uses):
                rw.set_input(node, index, doubled)
            rw.remove_initializer(model.graph, value)
        return PassResult(True, log)


def test_a_wrong_custom_pass_fails_verification():
    with pytest.raises(VerificationError) as info:
        compiler.compile(identity_model(), pipeline=[_Scale()])
    assert str(info.value).startswith("verification failed: 'y' max abs ")
    assert len(str(info.value).splitlines()) == 1


def test_verify_each_pass_names_the_wrong_pass():
    with pytest.raises(VerificationError) as info:
        compiler.compile(identity_model(), pipeline=[remove_identity(), _Scale()], verify_each_pass=True)
    assert str(info.value).startswith("pass 2 'scale' broke the numbers: 'y' max abs ")


# -- verify=False -------------------------------------------------------------------------------

def test_verify_false_skips_onnxruntime_entirely(monkeypatch):
    def no_ort(*args, **kwargs):
        raise AssertionError("onnxruntime was started although verify=False")

    monkeypatch.setattr(ort, "InferenceSession", no_ort)
    result = compiler.compile(identity_model(), verify=False)
    assert result.report.verification is None
    assert [n.op_type for n in result.model.graph.node] == ["Add", "Relu"]
    assert "verified" not in result.report.headline()


def test_unrunnable_model_compiles_without_verification():
    proto = onnx.parser.parse_model(UNRUNNABLE_TEXT)
    result = compiler.compile(proto, verify=False)
    assert [(n.domain, n.op_type) for n in result.model.graph.node] == [("com.example", "Frobnicate")]
    assert result.report.verification is None


def test_unrunnable_input_is_bad_input_saying_ort_cannot_load_it():
    proto = onnx.parser.parse_model(UNRUNNABLE_TEXT)
    with pytest.raises(compiler.CompileError) as info:
        compiler.compile(proto)
    assert not isinstance(info.value, VerificationError)  # the user's model, not our output
    assert info.value.exit_code == 2
    message = str(info.value)
    assert message.startswith("onnxruntime cannot load the input model: ")
    assert "Frobnicate" in message
    assert len(message.splitlines()) == 1


# -- from torch ----------------------------------------------------------------------------------

def test_torch_export_compiles_and_matches_torch():
    torch = pytest.importorskip("torch", reason="torch is not installed: pip install torch (CPU wheel)")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(8)
            self.relu = torch.nn.ReLU()
            self.fc = torch.nn.Linear(8 * 6 * 6, 5)

        def forward(self, x):
            return self.fc(torch.flatten(self.relu(self.bn(self.conv(x))), 1))

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # BatchNorm with non-trivial statistics
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.weight.uniform_(0.5, 1.5)
        net.bn.bias.uniform_(-0.2, 0.2)
    net.eval()
    x = torch.randn(2, 3, 6, 6)
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter warns that it is legacy
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(net, (x,), buffer, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"])

    result = compiler.compile(buffer.getvalue())

    assert_verified(result, ["y"])
    with torch.no_grad():
        expected = net(x).numpy()
    (actual,) = ort_outputs(result.model, {"x": x.numpy()})
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)

