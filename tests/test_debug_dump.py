"""The debug dump: numbered files per pass, the change-log header and diff, the summary, large
weights beside the dump, the FAILED dump, and the folder it refuses to wipe."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import compiler
import ir
from compiler.errors import CompileError
from compiler.feeds import random_feeds
from compiler.pass_manager import PassError
from compiler.report import summary_table
from compiler.verify import run
from rewrites.base import Pass, PassResult
from rewrites.cleanup import DeadCodeElimination, remove_identity

MARKER = ".onnxcc-dump"


def _model(nodes, initializers=(), width=3) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, width])], list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def identity_model(dead: bool = False) -> onnx.ModelProto:
    """x -> Identity -> Relu -> Identity -> Add(., x) -> y; with `dead`, an unread Neg too."""
    nodes = [helper.make_node("Identity", ["x"], ["a"], name="id_a"),
             helper.make_node("Relu", ["a"], ["b"], name="relu"),
             helper.make_node("Identity", ["b"], ["c"], name="id_c"),
             helper.make_node("Add", ["c", "x"], ["y"], name="add")]
    if dead:
        nodes.append(helper.make_node("Neg", ["b"], ["unused"], name="dead_neg"))
    return _model(nodes)


def large_model() -> onnx.ModelProto:
    """An Identity before a MatMul whose 600x600 float weight (1.4 MiB) is over the 1 MiB
    threshold."""
    w = np.random.default_rng(0).standard_normal((600, 600)).astype(np.float32)
    nodes = [helper.make_node("Identity", ["x"], ["a"], name="id_a"),
             helper.make_node("MatMul", ["a", "W"], ["y"], name="matmul")]
    return _model(nodes, [numpy_helper.from_array(w, "W")], width=600)


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def outputs_of(path: Path, feeds) -> list[dict]:
    return run(path, feeds, str(path))


def cleanup() -> list:
    """The passes these tests read the dump of (the default pipeline grows over time)."""
    return [remove_identity(), DeadCodeElimination()]


@dataclass
class BrokenPass(Pass):
    name = "broken"

    def run(self, model) -> PassResult:
        raise RuntimeError("boom: the pass is broken")


# -- the files ---------------------------------------------------------------------------


def test_dump_files_when_dead_code_changes_nothing(tmp_path):
    dump = tmp_path / "dump"
    compiler.compile(save(identity_model(), tmp_path / "m.onnx"), pipeline=cleanup(), debug_dump=dump)
    assert files(dump) == {MARKER, "000_input.onnx", "000_input.txt",
                           "001_identity.onnx", "001_identity.txt", "001_identity.diff",
                           "002_dead-code.unchanged", "summary.txt"}
    assert (dump / "002_dead-code.unchanged").read_text() == "pass 'dead-code' changed nothing\n"


def test_dump_files_when_every_pass_changes_something(tmp_path):
    dump = tmp_path / "dump"
    compiler.compile(save(identity_model(dead=True), tmp_path / "m.onnx"), pipeline=cleanup(), debug_dump=dump)
    assert files(dump) == {MARKER, "000_input.onnx", "000_input.txt",
                           "001_identity.onnx", "001_identity.txt", "001_identity.diff",
                           "002_dead-code.onnx", "002_dead-code.txt", "002_dead-code.diff",
                           "summary.txt"}
    diff = (dump / "002_dead-code.diff").read_text().splitlines()
    assert diff[:3] == ["# pass 002 dead-code: 1 changes, 0 rewrites",
                        "#   dead-code: remove-node dead_neg (Neg)",
                        "--- before"]
    assert [line for line in diff if line.startswith("-") and not line.startswith("---")] == \
        [line for line in diff if "Neg(" in line]
    assert "dead_neg" not in (dump / "002_dead-code.txt").read_text()


def test_dump_text_is_the_printer_form(tmp_path):
    dump = tmp_path / "dump"
    result = compiler.compile(save(identity_model(), tmp_path / "m.onnx"), pipeline=cleanup(), debug_dump=dump)
    assert (dump / "000_input.txt").read_text() == ir.print_model(ir.load(tmp_path / "m.onnx"))
    assert (dump / "001_identity.txt").read_text() == ir.print_model(result.ir_model)


def test_diff_header_names_the_rule_then_a_unified_diff(tmp_path):
    dump = tmp_path / "dump"
    compiler.compile(save(identity_model(), tmp_path / "m.onnx"), pipeline=cleanup(), debug_dump=dump)
    text = (dump / "001_identity.diff").read_text()
    lines = text.splitlines()
    assert lines[:8] == [
        "# pass 001 identity: 4 changes, 2 rewrites",
        "#   RemoveIdentity: 2 rewrites",
        "#   RemoveIdentity: replace-uses %a (by %x)",
        "#   RemoveIdentity: remove-node id_a (Identity)",
        "#   RemoveIdentity: replace-uses %c (by %b)",
        "#   RemoveIdentity: remove-node id_c (Identity)",
        "--- before",
        "+++ after identity",
    ]
    body = [line for line in lines[8:] if not line.startswith("@@")]
    removed = [line[1:] for line in body if line.startswith("-")]
    added = [line[1:] for line in body if line.startswith("+")]
    assert [line for line in removed if "Identity(" in line] == \
        [line for line in removed if line.endswith("# id_a") or line.endswith("# id_c")]
    assert len([line for line in removed if "Identity(" in line]) == 2
    assert not any("Identity" in line for line in added)
    assert any(line.strip().startswith("%b") and "Relu(%x)" in line for line in added)
    assert any("Add(%b, %x)" in line for line in added)
    # The body is exactly the unified diff of the two text dumps.
    before = (dump / "000_input.txt").read_text().splitlines(keepends=True)
    after = (dump / "001_identity.txt").read_text().splitlines(keepends=True)
    expected = "".join(difflib.unified_diff(before, after, fromfile="before", tofile="after identity"))
    assert text == "".join(line + "\n" for line in lines[:6]) + expected


def test_header_of_an_output_identity_names_the_values_before_renaming(tmp_path):
    """Removing the Identity that produces `y` renames its source to `y`; the log names the
    values as they were (%y replaced by %b), not after the rename."""
    model = _model([helper.make_node("Relu", ["x"], ["b"], name="relu"),
                    helper.make_node("Identity", ["b"], ["y"], name="id_y")])
    dump = tmp_path / "dump"
    compiler.compile(model, pipeline=cleanup(), debug_dump=dump)
    lines = (dump / "001_identity.diff").read_text().splitlines()
    assert lines[:4] == ["# pass 001 identity: 2 changes, 1 rewrites",
                         "#   RemoveIdentity: 1 rewrites",
                         "#   RemoveIdentity: replace-uses %y (by %b)",
                         "#   RemoveIdentity: remove-node id_y (Identity)"]


def test_every_dumped_model_runs_with_the_input_outputs(tmp_path):
    dump = tmp_path / "dump"
    path = save(identity_model(dead=True), tmp_path / "m.onnx")
    compiler.compile(path, pipeline=cleanup(), debug_dump=dump)
    feeds = random_feeds(ir.load(path), count=3, seed=7)
    expected = outputs_of(path, feeds)
    dumped = sorted(dump.glob("*.onnx"))
    assert [p.name for p in dumped] == ["000_input.onnx", "001_identity.onnx", "002_dead-code.onnx"]
    for p in dumped:
        got = outputs_of(p, feeds)
        assert [sorted(o) for o in got] == [["y"]] * 3
        for e, g in zip(expected, got):
            np.testing.assert_array_equal(g["y"], e["y"], err_msg=p.name)


def test_summary_has_one_row_per_pass(tmp_path):
    dump = tmp_path / "dump"
    result = compiler.compile(save(identity_model(), tmp_path / "m.onnx"), pipeline=cleanup(), debug_dump=dump)
    lines = (dump / "summary.txt").read_text().splitlines()
    assert lines[0].split() == ["#", "pass", "changed", "rewrites", "nodes", "params", "ms",
                                "error", "vs", "input"]
    assert set(lines[1]) == {"-", " "}
    rows = [[cell.strip() for cell in line.split("  ") if cell.strip()] for line in lines[2:]]
    assert len(rows) == 2
    assert rows[0][:5] == ["001", "identity", "yes", "RemoveIdentity 2", "4 -> 2"]
    assert rows[1][:5] == ["002", "dead-code", "no", "-", "2 -> 2"]
    assert [r[5] for r in rows] == ["0 B -> 0 B", "0 B -> 0 B"]
    assert all(float(r[6]) >= 0 for r in rows)  # milliseconds
    assert [r[7] for r in rows] == ["-", "-"]  # no per-pass verification
    assert (dump / "summary.txt").read_text() == summary_table(result.report.records)


def test_summary_shows_the_error_when_each_pass_is_verified(tmp_path):
    dump = tmp_path / "dump"
    compiler.compile(save(identity_model(), tmp_path / "m.onnx"), pipeline=cleanup(), debug_dump=dump, verify_each_pass=True)
    lines = (dump / "summary.txt").read_text().splitlines()[2:]
    assert lines[0].endswith("'y' max abs 0, max rel 0, cosine 1.000000, SQNR inf dB")
    assert lines[1].endswith("(unchanged)")


def test_large_weights_go_beside_the_dumped_model(tmp_path):
    dump = tmp_path / "dump"
    path = save(large_model(), tmp_path / "big.onnx")
    compiler.compile(path, pipeline=cleanup(), debug_dump=dump)
    # The weight the pass left alone is written once, in 000_input.onnx.data, and the later
    # snapshot points there.
    assert files(dump) == {MARKER, "000_input.onnx", "000_input.onnx.data", "000_input.txt",
                           "001_identity.onnx", "001_identity.txt",
                           "001_identity.diff", "002_dead-code.unchanged", "summary.txt"}
    assert (dump / "001_identity.onnx").stat().st_size < 100_000
    assert (dump / "000_input.onnx.data").stat().st_size >= 600 * 600 * 4
    w = next(t for t in onnx.load(str(dump / "001_identity.onnx"), load_external_data=False).graph.initializer
             if t.name == "W")
    assert {e.key: e.value for e in w.external_data}["location"] == "000_input.onnx.data"
    feeds = random_feeds(ir.load(path), count=1)
    expected = outputs_of(path, feeds)[0]["y"]
    for stem in ("000_input", "001_identity"):
        np.testing.assert_array_equal(outputs_of(dump / f"{stem}.onnx", feeds)[0]["y"], expected)


def test_small_weights_stay_inline(tmp_path):
    dump = tmp_path / "dump"
    w = np.ones((3, 3), np.float32)
    model = _model([helper.make_node("Identity", ["x"], ["a"], name="id_a"),
                    helper.make_node("MatMul", ["a", "W"], ["y"], name="matmul")],
                   [numpy_helper.from_array(w, "W")])
    compiler.compile(model, pipeline=cleanup(), debug_dump=dump)
    assert not [n for n in files(dump) if n.endswith(".data")]
    assert {"000_input.onnx", "001_identity.onnx"} <= files(dump)


# -- failures ----------------------------------------------------------------------------


def test_failed_pass_is_named_and_dumped(tmp_path):
    dump = tmp_path / "dump"
    path = save(identity_model(), tmp_path / "m.onnx")
    with pytest.raises(PassError) as info:
        compiler.compile(path, pipeline=[remove_identity(), BrokenPass(), DeadCodeElimination()],
                         debug_dump=dump)
    assert str(info.value) == ("pass 2 'broken' failed (passes before it: identity): "
                               "RuntimeError: boom: the pass is broken")
    assert info.value.exit_code == 3
    assert isinstance(info.value.__cause__, RuntimeError)
    assert {"002_broken.FAILED.txt", "001_identity.onnx", "001_identity.diff"} <= files(dump)
    assert not [n for n in files(dump) if n.startswith("003_")]
    text = (dump / "002_broken.FAILED.txt").read_text()
    assert text.splitlines()[0] == "pass 2 'broken' FAILED: RuntimeError: boom: the pass is broken"
    assert "Traceback (most recent call last)" in text
    assert 'raise RuntimeError("boom: the pass is broken")' in text
    assert "# pass 002 broken: 0 changes, 0 rewrites" in text
    # The IR at the failure: the model as the identity pass left it.
    assert text.endswith("IR at the failure:\n" + (dump / "001_identity.txt").read_text())


def test_failed_first_pass_says_no_passes_before_it(tmp_path):
    dump = tmp_path / "dump"
    with pytest.raises(PassError, match=r"^pass 1 'broken' failed \(passes before it: none\): "
                                        r"RuntimeError: boom: the pass is broken$"):
        compiler.compile(identity_model(), pipeline=[BrokenPass()], debug_dump=dump)
    text = (dump / "001_broken.FAILED.txt").read_text()
    assert text.endswith("IR at the failure:\n" + (dump / "000_input.txt").read_text())
    assert "= Identity(%x)  # id_a" in text


def test_refuses_to_wipe_a_folder_with_a_foreign_file(tmp_path):
    dump = tmp_path / "dump"
    dump.mkdir()
    (dump / "notes.md").write_text("mine")
    with pytest.raises(CompileError) as info:
        compiler.compile(identity_model(), pipeline=cleanup(), debug_dump=dump)
    assert str(info.value) == (f"debug dump folder '{dump}' holds files onnxcc did not write "
                               "(e.g. 'notes.md'); give an empty or new folder")
    assert info.value.exit_code == 2
    assert files(dump) == {"notes.md"}
    assert (dump / "notes.md").read_text() == "mine"


def test_refuses_a_foreign_file_in_an_old_dump(tmp_path):
    dump = tmp_path / "dump"
    compiler.compile(identity_model(), pipeline=cleanup(), debug_dump=dump)
    before = files(dump)
    (dump / "model.onnx").write_bytes(b"precious")
    with pytest.raises(CompileError, match=r"holds files onnxcc did not write \(e\.g\. 'model\.onnx'\)"):
        compiler.compile(identity_model(), pipeline=cleanup(), debug_dump=dump)
    assert files(dump) == before | {"model.onnx"}
    assert (dump / "model.onnx").read_bytes() == b"precious"


def test_refuses_dump_shaped_files_without_the_marker(tmp_path):
    dump = tmp_path / "dump"
    dump.mkdir()
    (dump / "001_mine.txt").write_text("not from onnxcc")
    with pytest.raises(CompileError) as info:
        compiler.compile(identity_model(), pipeline=cleanup(), debug_dump=dump)
    assert str(info.value) == (f"debug dump folder '{dump}' holds files onnxcc did not write "
                               "(e.g. '001_mine.txt'); give an empty or new folder")
    assert (dump / "001_mine.txt").read_text() == "not from onnxcc"


def test_refuses_a_file_as_dump_folder(tmp_path):
    target = tmp_path / "dump"
    target.write_text("a file")
    with pytest.raises(CompileError) as info:
        compiler.compile(identity_model(), pipeline=cleanup(), debug_dump=target)
    assert str(info.value) == f"debug dump path '{target}' exists and is not a folder"
    assert target.read_text() == "a file"


def test_empty_existing_folder_is_used(tmp_path):
    dump = tmp_path / "dump"
    dump.mkdir()
    compiler.compile(identity_model(), pipeline=cleanup(), debug_dump=dump)
    assert "summary.txt" in files(dump)


def test_rerun_replaces_the_old_dump(tmp_path):
    dump = tmp_path / "dump"
    compiler.compile(large_model(), pipeline=cleanup(), debug_dump=dump)  # two passes, .onnx.data files
    compiler.compile(identity_model(dead=True), pipeline=cleanup(), debug_dump=dump)
    assert {"002_dead-code.onnx", "000_input.onnx.data"} & files(dump) == {"002_dead-code.onnx"}
    compiler.compile(identity_model(), pipeline=[remove_identity()], debug_dump=dump)
    assert files(dump) == {MARKER, "000_input.onnx", "000_input.txt", "001_identity.onnx",
                           "001_identity.txt", "001_identity.diff", "summary.txt"}
    assert len((dump / "summary.txt").read_text().splitlines()) == 3
    assert "Neg" not in (dump / "000_input.txt").read_text()


def test_rerun_after_a_failure_replaces_the_failed_dump(tmp_path):
    dump = tmp_path / "dump"
    with pytest.raises(PassError):
        compiler.compile(identity_model(), pipeline=[BrokenPass()], debug_dump=dump)
    assert "001_broken.FAILED.txt" in files(dump)
    compiler.compile(identity_model(), pipeline=cleanup(), debug_dump=dump)
    assert "001_broken.FAILED.txt" not in files(dump)
    assert "summary.txt" in files(dump)


def test_numbers_broken_by_a_pass_are_dumped_before_the_error(tmp_path):
    """With per-pass verification and a dump, the pass that breaks the numbers still gets
    its files, so the diff shows what it did."""
    from tests.test_verify import swap_add_for_sub

    dump = tmp_path / "dump"
    with pytest.raises(compiler.VerificationError, match=r"^pass 2 'swap-add' broke the numbers: "):
        compiler.compile(identity_model(),
                         pipeline=[remove_identity(), swap_add_for_sub(), DeadCodeElimination()],
                         verify_each_pass=True, debug_dump=dump)
    diff = (dump / "002_swap-add.diff").read_text().splitlines()
    assert diff[:2] == ["# pass 002 swap-add: 3 changes, 1 rewrites", "#   SwapAddForSub: 1 rewrites"]
    assert any(line.startswith("+") and "Sub(" in line for line in diff)
    assert not [n for n in files(dump) if n.startswith("003_")]


def test_summary_is_written_when_a_pass_fails(tmp_path):
    dump = tmp_path / "dump"
    with pytest.raises(PassError):
        compiler.compile(identity_model(), pipeline=[remove_identity(), BrokenPass()], debug_dump=dump)
    rows = (dump / "summary.txt").read_text().splitlines()[2:]
    assert [r.split()[:3] for r in rows] == [["001", "identity", "yes"], ["002", "broken", "no"]]
    assert rows[1].endswith("FAILED: RuntimeError")


def test_refuses_a_subfolder_named_like_a_dump_file(tmp_path):
    dump = tmp_path / "dump"
    (dump / "001_identity.txt").mkdir(parents=True)
    (dump / MARKER).write_text("")
    with pytest.raises(CompileError, match=r"holds files onnxcc did not write \(e.g. '001_identity.txt'\)"):
        compiler.compile(identity_model(), pipeline=cleanup(), debug_dump=dump)
    assert (dump / "001_identity.txt").is_dir()


def test_a_weight_a_pass_rewrites_gets_its_own_data_file(tmp_path):
    """BatchNorm folded into a Conv with a 2.3 MiB weight: the new weight goes to the fuse
    snapshot's own data file, the untouched ones stay in 000_input.onnx.data."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((256, 256, 3, 3)) * 0.02).astype(np.float32), "W")
    bn = [numpy_helper.from_array(rng.uniform(0.5, 1.5, 256).astype(np.float32), n) for n in ("s", "v")]
    bn += [numpy_helper.from_array(rng.standard_normal(256).astype(np.float32), n) for n in ("b", "m")]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256, 4, 4])], [w] + bn)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    path = save(model, tmp_path / "m.onnx")
    dump = tmp_path / "dump"
    compiler.compile(path, debug_dump=dump)
    fused = sorted(p.name for p in dump.glob("*_fuse.onnx.data"))
    assert len(fused) == 1 and (dump / fused[0]).stat().st_size >= 256 * 256 * 9 * 4
    feeds = random_feeds(ir.load(path), count=1)
    expected = outputs_of(path, feeds)[0]["y"]
    for snapshot in dump.glob("*.onnx"):
        np.testing.assert_allclose(outputs_of(snapshot, feeds)[0]["y"], expected, rtol=1e-4, atol=1e-4)
