"""Verification: per-pass and final checks in onnxruntime, the comparison metrics, and the
feeds they run on (random, --input-shape, .npz folders, ONNX test-data folders)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import TensorProto, helper, numpy_helper

import compiler
import ir
from compiler.errors import CompileError
from compiler.feeds import load_feeds, parse_input_shapes, random_feeds, signature
from compiler.verify import EXACT, Tolerance, compare
from rewrites.base import Match, Reject, RewriteRule, RulePass
from rewrites.cleanup import DeadCodeElimination, remove_identity
from tests.payloads import PicklePayload

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


# -- a deliberately wrong pass -------------------------------------------------------------


class SwapAddForSub(RewriteRule):
    """Wrong on purpose: Add(a, b) -> Sub(a, b), through the Rewriter."""

    op_type = "Add"

    def match(self, node):
        if len(node.inputs) != 2:
            return Reject("not binary")
        return Match([node], {"add": node})

    def rewrite(self, match, rewriter):
        add = match["add"]
        sub = rewriter.add_node(add.graph, add, "Sub", list(add.inputs), name="swapped")
        rewriter.replace_uses(add.outputs[0], sub.outputs[0])


def swap_add_for_sub() -> RulePass:
    return RulePass([SwapAddForSub()], name="swap-add")


def add_model() -> onnx.ModelProto:
    """y = Relu(Identity(x)) + x."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["a"], name="id_a"),
         helper.make_node("Relu", ["a"], ["b"], name="relu"),
         helper.make_node("Add", ["b", "x"], ["y"], name="add")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def broken_pipeline():
    return [remove_identity(), swap_add_for_sub(), DeadCodeElimination()]


def expected_figures() -> str:
    """What Add -> Sub does to y on compile's default feeds (two, seed 0): the error is 2|x|."""
    feeds = random_feeds(ir.load(add_model()))
    max_abs = max(float(np.max(2 * np.abs(f["x"].astype(np.float64)))) for f in feeds)
    return f"'y' max abs {max_abs:.3g}, max rel "


def test_swap_pass_really_swaps():
    model = ir.load(add_model())
    assert swap_add_for_sub().run(model).changed
    assert [n.op_type for n in model.graph.nodes] == ["Identity", "Relu", "Sub"]
    assert model.graph.outputs[0].name == "y"


def test_per_pass_verification_names_the_breaking_pass():
    with pytest.raises(compiler.VerificationError) as info:
        compiler.compile(add_model(), pipeline=broken_pipeline(), verify_each_pass=True)
    message = str(info.value)
    assert message.startswith("pass 2 'swap-add' broke the numbers: " + expected_figures())
    assert re.fullmatch(r"pass 2 'swap-add' broke the numbers: 'y' max abs \S+, max rel \S+, "
                        r"cosine -?\d\.\d{6}, SQNR -?\d+\.\d dB", message)
    assert info.value.exit_code == 1


def test_final_verification_catches_it_without_per_pass_verification():
    with pytest.raises(compiler.VerificationError) as info:
        compiler.compile(add_model(), pipeline=broken_pipeline())
    message = str(info.value)
    assert message.startswith("verification failed: " + expected_figures())
    assert "pass" not in message
    assert info.value.exit_code == 1


def test_verification_off_lets_the_broken_pipeline_through():
    result = compiler.compile(add_model(), pipeline=broken_pipeline(), verify=False)
    assert result.report.verification is None
    assert [n.op_type for n in result.ir_model.graph.nodes] == ["Relu", "Sub"]


def test_per_pass_verification_records_the_error_of_each_pass():
    result = compiler.compile(add_model(), pipeline=[remove_identity(), DeadCodeElimination()],
                              verify_each_pass=True)
    assert [(r.name, r.error) for r in result.report.records] == [
        ("identity", "'y' max abs 0, max rel 0, cosine 1.000000, SQNR inf dB"),
        ("dead-code", "(unchanged)"),
    ]
    assert result.report.verification.ok
    assert result.report.verification.feeds == 2


def test_cli_exit_code_for_a_verification_failure(tmp_path, capsys, monkeypatch):
    from compiler import cli, pipeline

    monkeypatch.setitem(pipeline.PIPELINES, "default", broken_pipeline)
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(add_model(), src)
    assert cli.main(["compile", str(src), "-o", str(out), "--verify-each-pass"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("onnxcc: error: pass 2 'swap-add' broke the numbers: 'y' max abs ")
    assert not out.exists()


# -- compare() ---------------------------------------------------------------------------


def one(name, ref, act, tol=EXACT):
    result = compare([{name: np.asarray(ref)}], [{name: np.asarray(act)}], tol)
    assert len(result.outputs) == 1
    return result.outputs[0]


def test_compare_metrics_on_known_arrays():
    d = one("y", np.array([[1, 2, 3, 4]], np.float32), np.array([[1, 2, 3, 5]], np.float32))
    assert d.max_abs == 1.0
    assert d.max_rel == 0.25
    assert d.cosine == pytest.approx(34 / math.sqrt(30 * 39), abs=1e-12)
    assert d.sqnr_db == pytest.approx(10 * math.log10(30), abs=1e-12)
    assert not d.ok
    assert str(d) == "'y' max abs 1, max rel 0.25, cosine 0.993999, SQNR 14.8 dB"


def test_compare_identical_is_exact():
    x = np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4)
    d = one("y", x, x.copy())
    assert (d.max_abs, d.max_rel, d.cosine, d.sqnr_db, d.ok) == (0.0, 0.0, 1.0, math.inf, True)
    assert str(d) == "'y' max abs 0, max rel 0, cosine 1.000000, SQNR inf dB"


def test_compare_tolerance_is_atol_plus_rtol():
    ref = np.array([1.0, 100.0], np.float32)
    assert one("y", ref, ref + np.array([0, 5e-3], np.float32)).ok  # 5e-3 <= 1e-5 + 1e-4 * 100
    assert not one("y", ref, ref + np.array([0, 2e-2], np.float32)).ok
    assert not one("y", ref, ref + np.array([2e-4, 0], np.float32)).ok  # 2e-4 > 1e-5 + 1e-4 * 1
    loose = Tolerance(rtol=0.5, atol=0.5)
    assert one("y", ref, ref + 0.4, loose).ok


def test_compare_min_cosine():
    ref = np.array([1.0, 0.0], np.float32)
    act = np.array([1.0, 1.0], np.float32)
    assert one("y", ref, act, Tolerance(rtol=0, atol=2)).ok
    d = one("y", ref, act, Tolerance(rtol=0, atol=2, min_cosine=0.9))
    assert d.cosine == pytest.approx(1 / math.sqrt(2))
    assert not d.ok


def test_compare_takes_the_worst_feed():
    ref = [{"y": np.array([1.0, 2.0])}, {"y": np.array([1.0, 2.0])}]
    act = [{"y": np.array([1.0, 2.5])}, {"y": np.array([1.0, 4.0])}]
    result = compare(ref, act)
    assert result.feeds == 2
    assert result.outputs[0].max_abs == 2.0
    assert result.worst() == "'y' max abs 2, max rel 1, cosine 0.976187, SQNR 1.0 dB"  # 10 log10(5 / 4)


def test_worst_lists_only_the_failing_outputs():
    ref = [{"a": np.ones(3, np.float32), "b": np.ones(3, np.float32), "c": np.ones(3, np.float32)}]
    act = [{"a": np.ones(3, np.float32), "b": np.full(3, 3, np.float32), "c": np.zeros(3, np.float32)}]
    result = compare(ref, act)
    assert not result.ok
    assert [o.name for o in result.outputs if not o.ok] == ["b", "c"]
    assert result.worst() == ("'b' max abs 2, max rel 2, cosine 1.000000, SQNR -6.0 dB; "
                              "'c' max abs 1, max rel 1, cosine 0.000000, SQNR 0.0 dB")


def test_worst_names_the_largest_error_when_all_pass():
    ref = [{"a": np.ones(2), "b": np.ones(2)}]
    act = [{"a": np.ones(2) + 1e-7, "b": np.ones(2) + 1e-6}]
    result = compare(ref, act)
    assert result.ok
    assert result.worst().startswith("'b' max abs 1e-06, ")


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.bool_])
def test_integer_and_bool_outputs_must_be_exact(dtype):
    ref = np.array([1, 0, 1], dtype)
    act = np.array([1, 1, 1], dtype)
    huge = Tolerance(rtol=10, atol=10)
    d = one("i", ref, act, huge)
    assert not d.ok
    assert str(d) == "'i' differs (exact values expected)"
    assert d.max_abs == math.inf
    same = one("i", ref, ref.copy())
    assert same.ok and same.max_abs == 0.0


def test_nan_positions_must_match():
    ref = np.array([1.0, np.nan, 3.0], np.float32)
    same = one("y", ref, np.array([1.0, np.nan, 3.0], np.float32))
    assert same.ok and same.max_abs == 0.0 and same.note == ""
    moved = one("y", ref, np.array([np.nan, 2.0, 3.0], np.float32))
    assert not moved.ok
    assert str(moved) == "'y' NaN/Inf positions differ"
    gone = one("y", ref, np.array([1.0, 2.0, 3.0], np.float32))
    assert not gone.ok and gone.note == "NaN/Inf positions differ"


def test_infinities_must_match_in_sign():
    ref = np.array([np.inf, 1.0], np.float32)
    assert one("y", ref, np.array([np.inf, 1.0], np.float32)).ok
    assert not one("y", ref, np.array([-np.inf, 1.0], np.float32)).ok
    assert not one("y", ref, np.array([np.nan, 1.0], np.float32)).ok


def test_shape_mismatch_is_a_note():
    d = one("y", np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32))
    assert not d.ok
    assert str(d) == "'y' has shape [3, 2], expected [2, 3]"
    assert d.max_abs == math.inf


def test_missing_output():
    result = compare([{"y": np.zeros(2)}], [{"z": np.zeros(2)}])
    assert not result.ok
    assert result.worst() == "'y' is missing from the output"


# -- feeds: --input-shape ------------------------------------------------------------------


def test_parse_input_shapes():
    assert parse_input_shapes(["x=1,3,224,224", " mask = 2 , 5 ", "in:0=7"]) == {
        "x": (1, 3, 224, 224), "mask": (2, 5), "in:0": (7,)}
    assert parse_input_shapes([]) == {}
    assert parse_input_shapes(None) == {}


@pytest.mark.parametrize("spec", ["x", "x=", "=1,2", "x=1,,2", "x=1.5", "x=-1", "x=a,b", "x=1,2,"])
def test_parse_input_shapes_rejects(spec):
    with pytest.raises(CompileError) as info:
        parse_input_shapes(["y=1", spec])
    assert str(info.value) == f"--input-shape '{spec}': expected NAME=D1,D2,... (for example x=1,3,224,224)"
    assert info.value.exit_code == 2


def typed_model() -> ir.Model:
    """Inputs: x float[N,3], k int64[N,M], m bool[2], and w float[3] with an initializer
    default (not part of the signature)."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"]),
         helper.make_node("Identity", ["k"], ["k_out"]),
         helper.make_node("Identity", ["m"], ["m_out"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("k", TensorProto.INT64, ["N", "M"]),
         helper.make_tensor_value_info("m", TensorProto.BOOL, [2]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("k_out", TensorProto.INT64, ["N", "M"]),
         helper.make_tensor_value_info("m_out", TensorProto.BOOL, [2])],
        [numpy_helper.from_array(np.ones(3, np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return ir.load(model)


def test_signature_leaves_out_inputs_with_initializers():
    assert [v.name for v in signature(typed_model())] == ["x", "k", "m"]


def test_random_feeds_are_deterministic_for_a_seed():
    model = typed_model()
    a, b = random_feeds(model, seed=3), random_feeds(model, seed=3)
    c = random_feeds(model, seed=4)
    assert len(a) == 2
    for fa, fb in zip(a, b):
        assert fa.keys() == fb.keys() == {"x", "k", "m"}
        for k in fa:
            np.testing.assert_array_equal(fa[k], fb[k])
    assert not np.array_equal(a[0]["x"], c[0]["x"])
    assert not np.array_equal(a[0]["x"], a[1]["x"])  # the feeds of one call differ
    assert len(random_feeds(model, count=5)) == 5


def test_random_feeds_types_and_ranges():
    model = typed_model()
    feed = random_feeds(model, {"k": (64, 64)})[0]
    assert feed["x"].dtype == np.float32
    assert feed["k"].dtype == np.int64 and set(np.unique(feed["k"])) == {0, 1, 2, 3}
    assert feed["m"].dtype == np.bool_


def test_symbolic_dims_default_to_one_and_are_bound_by_shapes():
    model = typed_model()
    feed = random_feeds(model)[0]
    assert {k: v.shape for k, v in feed.items()} == {"x": (1, 3), "k": (1, 1), "m": (2,)}
    feed = random_feeds(model, {"x": (5, 3), "k": (5, 7)})[0]
    assert {k: v.shape for k, v in feed.items()} == {"x": (5, 3), "k": (5, 7), "m": (2,)}
    feed = random_feeds(model, {"m": (2,)})[0]
    assert feed["m"].shape == (2,)


def test_a_negative_dimension_is_unknown():
    # Paddle2ONNX writes dim_value -1 for a dynamic size (the PP-OCR models): it is not a size.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3])
    proto = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    model = ir.load(proto)
    assert model.graph.inputs[0].shape == (-1, 3)  # kept as written: the round trip is lossless
    assert random_feeds(model)[0]["x"].shape == (1, 3)
    assert random_feeds(model, {"x": (2, 3)})[0]["x"].shape == (2, 3)


def test_input_shape_for_an_unknown_input():
    with pytest.raises(CompileError) as info:
        random_feeds(typed_model(), {"z": (1,), "x": (1, 3)})
    assert str(info.value) == "--input-shape names 'z', which is not an input of the model (inputs: x, k, m)"


def test_input_shape_for_an_input_with_an_initializer_default():
    with pytest.raises(CompileError, match=r"^--input-shape names 'w', which is not an input of the model"):
        random_feeds(typed_model(), {"w": (3,)})


def test_input_shape_of_the_wrong_rank():
    with pytest.raises(CompileError) as info:
        random_feeds(typed_model(), {"x": (1, 3, 1)})
    assert str(info.value) == "--input-shape x: 3 dimensions given, the input has 2"


def test_input_shape_contradicting_a_fixed_dim():
    with pytest.raises(CompileError) as info:
        random_feeds(typed_model(), {"x": (2, 4)})
    assert str(info.value) == "--input-shape x=2,4 contradicts its fixed shape ['N', 3]"
    with pytest.raises(CompileError, match=r"^--input-shape m=3 contradicts its fixed shape \[2\]$"):
        random_feeds(typed_model(), {"m": (3,)})


def test_compile_binds_input_shapes_from_specs_and_dicts(tmp_path):
    model = onnx.load(FIXTURES / "tiny_cnn.onnx")
    for shapes in (["x=3,3,16,16"], {"x": (3, 3, 16, 16)}):
        result = compiler.compile(model, input_shapes=shapes)
        assert result.report.verification.ok
    with pytest.raises(CompileError, match=r"^--input-shape 'x=3x3': expected NAME=D1,D2"):
        compiler.compile(model, input_shapes=["x=3x3"])
    with pytest.raises(CompileError, match=r"^--input-shape x=3,4,16,16 contradicts its fixed shape"):
        compiler.compile(model, input_shapes=["x=3,4,16,16"])


# -- feeds: --verify-data folders -------------------------------------------------------------


def test_load_feeds_from_npz_files(tmp_path):
    model = typed_model()
    rng = np.random.default_rng(1)
    arrays = []
    for name in ("b.npz", "a.npz"):
        arr = {"x": rng.standard_normal((4, 3)).astype(np.float32),
               "k": np.arange(8, dtype=np.int64).reshape(4, 2), "m": np.array([True, False])}
        np.savez(tmp_path / name, **arr)
        arrays.append(arr)
    feeds = load_feeds(tmp_path, model)
    assert len(feeds) == 2
    for feed, arr in zip(feeds, reversed(arrays)):  # sorted by file name: a.npz first
        assert feed.keys() == {"x", "k", "m"}
        for k in arr:
            np.testing.assert_array_equal(feed[k], arr[k])
            assert feed[k].dtype == arr[k].dtype


def test_npz_missing_a_key(tmp_path):
    path = tmp_path / "feed.npz"
    np.savez(path, x=np.zeros((1, 3), np.float32), m=np.zeros(2, bool))
    with pytest.raises(CompileError) as info:
        load_feeds(tmp_path, typed_model())
    assert str(info.value) == f"{path}: feed does not match the model's inputs (missing k)"


def test_npz_with_an_unknown_key(tmp_path):
    path = tmp_path / "feed.npz"
    np.savez(path, x=np.zeros((1, 3), np.float32), k=np.zeros((1, 1), np.int64), m=np.zeros(2, bool),
             w=np.zeros(3, np.float32))
    with pytest.raises(CompileError) as info:
        load_feeds(tmp_path, typed_model())
    assert str(info.value) == f"{path}: feed does not match the model's inputs (unknown w)"


def test_pickled_npz_is_refused_never_unpickled(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    flag = tmp_path / "unpickled"
    path = data / "feed.npz"
    np.savez(path, x=np.array([PicklePayload(str(flag))], dtype=object))
    with pytest.raises(CompileError) as info:
        load_feeds(data, typed_model())
    assert str(info.value) == (f"{path}: not a readable .npz file "
                               "(Object arrays cannot be loaded when allow_pickle=False)")
    assert not flag.exists()
    # The payload is live: loading it with pickles allowed would have run it.
    with np.load(path, allow_pickle=True) as npz:
        npz["x"]
    assert flag.exists()


def test_not_an_npz(tmp_path):
    path = tmp_path / "feed.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(CompileError, match=r"feed\.npz: not a readable \.npz file \("):
        load_feeds(tmp_path, typed_model())


def write_test_data(folder: Path, tensors: dict[str, np.ndarray], named: bool = True) -> None:
    folder.mkdir(parents=True)
    for i, (name, array) in enumerate(tensors.items()):
        proto = numpy_helper.from_array(array, name if named else "")
        (folder / f"input_{i}.pb").write_bytes(proto.SerializeToString())


def test_load_feeds_from_onnx_test_data_sets(tmp_path):
    model = typed_model()
    sets = []
    for s in range(2):
        arr = {"x": np.full((2, 3), s, np.float32), "k": np.full((2, 1), s, np.int64),
               "m": np.array([s == 0, True])}
        write_test_data(tmp_path / f"test_data_set_{s}", arr, named=(s == 0))
        sets.append(arr)
    feeds = load_feeds(tmp_path, model)
    assert len(feeds) == 2
    for feed, arr in zip(feeds, sets):
        assert feed.keys() == arr.keys()
        for k in arr:
            np.testing.assert_array_equal(feed[k], arr[k])


def test_load_feeds_from_input_pb_files_directly(tmp_path):
    arr = {"x": np.ones((1, 3), np.float32), "k": np.ones((1, 1), np.int64), "m": np.ones(2, bool)}
    write_test_data(tmp_path / "set", arr)
    feeds = load_feeds(tmp_path / "set", typed_model())
    assert len(feeds) == 1 and feeds[0].keys() == arr.keys()


def test_load_feeds_from_a_folder_with_neither(tmp_path):
    (tmp_path / "readme.txt").write_text("no feeds here")
    (tmp_path / "other").mkdir()
    with pytest.raises(CompileError) as info:
        load_feeds(tmp_path, typed_model())
    assert str(info.value) == (f"verification data '{tmp_path}' holds no .npz files and no "
                               "test_data_set_* folders")


def test_load_feeds_from_a_missing_folder(tmp_path):
    with pytest.raises(CompileError) as info:
        load_feeds(tmp_path / "nope", typed_model())
    assert str(info.value) == f"verification data '{tmp_path / 'nope'}' is not a folder"


def test_verify_data_on_a_real_folder(tmp_path):
    x = np.random.default_rng(5).standard_normal((2, 3, 16, 16)).astype(np.float32)
    write_test_data(tmp_path / "test_data_set_0", {"x": x})
    write_test_data(tmp_path / "test_data_set_1", {"x": x[:1] * 2})
    result = compiler.compile(FIXTURES / "tiny_cnn.onnx", verify_data=tmp_path, verify_each_pass=True)
    v = result.report.verification
    assert v.ok and v.feeds == 2
    assert [o.name for o in v.outputs] == ["logits"]
    assert v.outputs[0].max_abs < 1e-5


def test_verify_data_catches_the_broken_pass(tmp_path):
    np.savez(tmp_path / "feed.npz", x=np.arange(6, dtype=np.float32).reshape(2, 3))
    with pytest.raises(compiler.VerificationError) as info:
        compiler.compile(add_model(), pipeline=broken_pipeline(), verify_data=tmp_path)
    # Add -> Sub errs by 2|x|: at most 10 on these feeds.
    assert str(info.value).startswith("verification failed: 'y' max abs 10, max rel ")


def test_verify_data_that_does_not_fit_the_model(tmp_path):
    np.savez(tmp_path / "feed.npz", y=np.zeros((2, 3), np.float32))
    with pytest.raises(CompileError) as info:
        compiler.compile(add_model(), verify_data=tmp_path)
    assert str(info.value) == f"{tmp_path / 'feed.npz'}: feed does not match the model's inputs (missing x)"



def test_a_bound_symbol_sizes_every_input_that_shares_it():
    proto = onnx.parser.parse_model("""<ir_version: 10, opset_import: ["" : 21]>
g (float[N, C] a, float[N, C] b, float[K] c) => (float[N, C] y) { y = Add(a, b) }""")
    feed = random_feeds(ir.load(proto), {"a": (3, 5)})[0]
    assert {k: v.shape for k, v in feed.items()} == {"a": (3, 5), "b": (3, 5), "c": (1,)}


def test_bad_input_shape_is_refused_even_without_verification():
    with pytest.raises(CompileError, match=r"^--input-shape 'x': expected NAME=D1,D2,"):
        compiler.compile(str(FIXTURES / "tiny_cnn.onnx"), verify=False, input_shapes=["x"])


def test_output_dtype_must_match():
    ref = [{"y": np.array([1, 2], np.int64)}]
    result = compare(ref, [{"y": np.array([1, 2], np.int32)}])
    assert not result.ok
    assert result.worst() == "'y' has type int32, expected int64"


def test_complex_outputs_compare_both_parts():
    ref = [{"y": np.array([1 + 1j], np.complex64)}]
    assert compare(ref, [{"y": np.array([1 + 1j], np.complex64)}]).ok
    assert not compare(ref, [{"y": np.array([1 - 5j], np.complex64)}]).ok
