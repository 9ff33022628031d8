"""Real models with control flow and metadata, shipped inside PyPI packages.

silero-vad's files hold nested If subgraphs that read outer values (and one torch.export
model whose value_info carries provenance metadata); the PP-OCR recognizer of
rapidocr-onnxruntime carries its whole character dictionary in metadata_props. For every
shipped file: lower -> ir.verify -> emit must give back the same model (structurally) and
onnxruntime must produce bit-identical outputs on realistic feeds, also after a round trip
through a file written by ir.save.

The packages are found without importing them (they import torch / cv2); when one is
absent its tests skip with the pip command that installs it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import pytest

import ir
from tests.conformance import canonical
from tests.real_models import find_model_files, metadata, realistic_feeds

pytestmark = pytest.mark.slow

INSTALL = {
    "silero_vad": "silero-vad not installed: pip install --no-deps silero-vad",
    "rapidocr_onnxruntime": "rapidocr-onnxruntime not installed: pip install --no-deps rapidocr-onnxruntime",
}


def _cases(packages=tuple(INSTALL)):
    """One case per shipped file; a single skipping case when the package is absent."""
    for pkg in packages:
        files = find_model_files(pkg)
        if not files:
            yield pytest.param(pkg, None, id=f"{pkg}-not-installed")
        for path in files:
            yield pytest.param(pkg, path, id=f"{pkg}/{path.name}")


ALL = list(_cases())
SILERO = list(_cases(("silero_vad",)))


def _require(pkg: str, path: Path | None) -> Path:
    if path is None:
        pytest.skip(INSTALL[pkg])
    return path


def _session(model: onnx.ModelProto | Path | str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # silence "unused initializer" warnings
    opts.intra_op_num_threads = 1  # same kernels, same order: bit-identical is meaningful
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def _run_all(model, feeds_list) -> list[list[np.ndarray]]:
    sess = _session(model)
    return [sess.run(None, feeds) for feeds in feeds_list]


@functools.lru_cache(maxsize=None)
def _feeds(path: Path) -> list[dict[str, np.ndarray]]:
    return realistic_feeds(path, seed=0)


@functools.lru_cache(maxsize=None)
def _reference(path: Path) -> list[list[np.ndarray]]:
    """The original file's outputs on the realistic feeds (computed once per file)."""
    return _run_all(path, _feeds(path))


def _assert_bit_identical(got: list[list[np.ndarray]], expected: list[list[np.ndarray]], what: str) -> None:
    assert len(got) == len(expected)
    for k, (outs, refs) in enumerate(zip(got, expected)):
        assert len(outs) == len(refs), f"{what}, feed {k}: {len(outs)} outputs, expected {len(refs)}"
        for j, (a, e) in enumerate(zip(outs, refs)):
            assert a.dtype == e.dtype and a.shape == e.shape, \
                f"{what}, feed {k}, output {j}: {a.dtype}{a.shape} vs {e.dtype}{e.shape}"
            assert np.array_equal(a, e, equal_nan=a.dtype.kind in "fc"), \
                f"{what}, feed {k}, output {j}: max abs diff {np.max(np.abs(a.astype(np.float64) - e))}"


def _roundtrip(path: Path) -> tuple[ir.Model, onnx.ModelProto]:
    model = ir.load(path)
    ir.verify(model)
    return model, ir.to_proto(model)


def _first_diff(a, b, where: str = "") -> str | None:
    """Where two canonical dicts first differ (keeps an assertion message readable)."""
    if type(a) is not type(b):
        return f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{where}/{k}: only in the {'original' if k in a else 'emitted'} model"
            if (d := _first_diff(a[k], b[k], f"{where}/{k}")) is not None:
                return d
        return None
    if isinstance(a, list):
        if all(isinstance(x, dict) and "name" in x for x in a + b):  # value_info, initializers...
            names_a, names_b = [x["name"] for x in a], [x["name"] for x in b]
            if names_a != names_b:
                return (f"{where}: only in the original {sorted(set(names_a) - set(names_b))[:5]}, "
                        f"only in the emitted {sorted(set(names_b) - set(names_a))[:5]}")
        for i, (x, y) in enumerate(zip(a, b)):
            if (d := _first_diff(x, y, f"{where}[{i}]")) is not None:
                return d
        return None if len(a) == len(b) else f"{where}: {len(a)} entries vs {len(b)}"
    return None if a == b else f"{where}: {str(a)[:80]!r} vs {str(b)[:80]!r}"


# ------------------------------------------------------------------ every shipped file


@pytest.mark.parametrize("pkg, path", ALL)
def test_emitted_model_is_structurally_identical(pkg, path):
    path = _require(pkg, path)
    _, emitted = _roundtrip(path)
    original = onnx.load(str(path))
    assert emitted.ir_version == original.ir_version
    want, got = canonical(original), canonical(emitted)
    assert got == want, f"emit(lower(m)) differs from m at {_first_diff(want, got)}"


@pytest.mark.parametrize("pkg, path", ALL)
def test_emitted_model_runs_bit_identical(pkg, path):
    path = _require(pkg, path)
    _, emitted = _roundtrip(path)
    _assert_bit_identical(_run_all(emitted, _feeds(path)), _reference(path), f"emitted {path.name}")


@pytest.mark.parametrize("pkg, path", ALL)
def test_metadata_props_kept_exactly(pkg, path):
    path = _require(pkg, path)
    model, emitted = _roundtrip(path)
    original = metadata(path)
    assert model.metadata_props == original
    assert [(p.key, p.value) for p in emitted.metadata_props] == \
        [(p.key, p.value) for p in onnx.load(str(path), load_external_data=False).metadata_props]


@pytest.mark.parametrize("pkg, path", ALL)
def test_save_then_reload_runs_bit_identical(pkg, path, tmp_path):
    path = _require(pkg, path)
    model, _ = _roundtrip(path)
    out = tmp_path / path.name
    ir.save(model, out)
    assert out.is_file()
    reloaded = ir.load(out)
    ir.verify(reloaded)
    assert reloaded.metadata_props == metadata(path)
    # The file itself, as onnxruntime reads it from disk (external data if any beside it).
    _assert_bit_identical(_run_all(out, _feeds(path)), _reference(path), f"saved {path.name}")
    # And once more through the IR: lowering the saved file emits the same model again.
    _assert_bit_identical(_run_all(ir.to_proto(reloaded), _feeds(path)), _reference(path),
                          f"reloaded {path.name}")


@pytest.mark.parametrize("pkg, path", ALL)
def test_printing_is_deterministic(pkg, path):
    path = _require(pkg, path)
    first, second = ir.load(path), ir.load(path)
    assert ir.print_model(first) == ir.print_model(second)


# ------------------------------------------------------------------ PP-OCR recognizer


def test_ppocr_recognizer_character_dictionary_kept():
    files = find_model_files("rapidocr_onnxruntime")
    if not files:
        pytest.skip(INSTALL["rapidocr_onnxruntime"])
    recs = [p for p in files if "character" in metadata(p)]
    assert recs, f"no PP-OCR recognizer with a 'character' dictionary among {[p.name for p in files]}"
    for path in recs:
        chars = metadata(path)["character"]
        assert len(chars.splitlines()) > 1000  # the real dictionary, thousands of entries
        model, emitted = _roundtrip(path)
        assert model.metadata_props["character"] == chars
        kept = {p.key: p.value for p in emitted.metadata_props}
        assert kept["character"] == chars  # exactly, byte for byte (CJK, newlines, spaces)
        assert kept["character"].encode("utf-8") == chars.encode("utf-8")


# ------------------------------------------------------------------ silero If subgraphs


def _defined_in(g: ir.Graph) -> set[int]:
    """ids of the values a graph and its nested subgraphs define."""
    ids = {id(v) for v in g.inputs} | {id(v) for v in g.initializers.values()}
    for node in g.walk():
        ids |= {id(v) for v in node.outputs if v is not None}
        for sub in node.subgraphs():
            ids |= {id(v) for v in sub.inputs} | {id(v) for v in sub.initializers.values()}
    return ids


def _check_captures(graph: ir.Graph, outer: set[int]) -> tuple[int, int]:
    """Check every If under `graph`; returns (If nodes seen, captured reads seen)."""
    ifs = reads = 0
    here = outer | {id(v) for v in graph.inputs} | {id(v) for v in graph.initializers.values()}
    for node in graph.nodes:
        if node.op_type == "If":
            ifs += 1
            assert set(node.attributes) >= {"then_branch", "else_branch"}
            for key in ("then_branch", "else_branch"):
                attr = node.attributes[key]
                assert attr.type == onnx.AttributeProto.GRAPH
                assert isinstance(attr.value, ir.Graph), f"{node.name}.{key} is {type(attr.value)}"
        for sub in node.subgraphs():
            assert isinstance(sub, ir.Graph)
            assert sub.owner is node
            inner = _defined_in(sub)
            for inner_node in sub.walk():
                for i, v in enumerate(inner_node.inputs):
                    if v is None or id(v) in inner:
                        continue
                    # An outer capture: defined by an enclosing graph, and the read is a use.
                    assert id(v) in here, f"{inner_node.name} reads %{v.name}, defined nowhere above"
                    assert (inner_node, i) in v.uses, \
                        f"capture of %{v.name} by '{inner_node.name}' input {i} missing from its uses"
                    reads += 1
            a, b = _check_captures(sub, here)
            ifs, reads = ifs + a, reads + b
        here |= {id(v) for v in node.outputs if v is not None}
    return ifs, reads


@pytest.mark.parametrize("pkg, path", SILERO)
def test_silero_if_subgraphs_are_nested_graphs_with_captures_as_uses(pkg, path):
    path = _require(pkg, path)
    proto = onnx.load(str(path), load_external_data=False)
    has_if = any(n.op_type == "If" for n in proto.graph.node)
    model = ir.load(path)
    ifs, reads = _check_captures(model.graph, set())
    if has_if:  # (the sequence and openvino exports have no control flow)
        assert ifs > 0 and reads > 0, f"{path.name}: {ifs} If nodes, {reads} captured reads"
    else:
        assert ifs == 0


def test_silero_ships_models_with_if():
    files = find_model_files("silero_vad")
    if not files:
        pytest.skip(INSTALL["silero_vad"])
    with_if = [p.name for p in files
               if any(n.op_type == "If" for n in onnx.load(str(p), load_external_data=False).graph.node)]
    assert with_if, "no silero model with an If node: the control-flow tests above checked nothing"


def test_silero_capture_keeps_its_producer_alive():
    """A value read only from inside an If body counts as used: the node producing it
    cannot be removed."""
    files = [p for p in find_model_files("silero_vad") if p.name == "silero_vad_16k_op15.onnx"] or \
        find_model_files("silero_vad")
    if not files:
        pytest.skip(INSTALL["silero_vad"])
    for path in files:
        model = ir.load(path)
        g = model.graph
        for node in g.nodes:
            for v in node.outputs:
                if v is None or not v.uses or v in g.outputs:
                    continue
                if all(user.graph is not g for user, _ in v.uses):  # read only by subgraphs
                    with pytest.raises(ValueError, match="still used"):
                        g.remove(node)
                    assert node in g.nodes
                    ir.verify(model)
                    return
    raise AssertionError("no shipped silero model has a value read only by an If body")
