"""Malformed input: every case is refused with a `CompileError` subclass whose message is one
exact line that says what is wrong and where (DESIGN.md §9), never a raw protobuf, numpy or
KeyError exception."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import ir
from tests.conformance import DATA_ROOT

REAL_MODEL = DATA_ROOT / "light" / "light_inception_v1.onnx"  # ships with onnx itself


# -- helpers ------------------------------------------------------------------------------

def model(nodes, inputs=None, outputs=None, initializers=(), name="g") -> onnx.ModelProto:
    """A model at IR 10 / opset 21 (helper.make_model would stamp an IR onnxruntime rejects)."""
    inputs = [vi("x")] if inputs is None else inputs
    outputs = [vi("y")] if outputs is None else outputs
    graph = helper.make_graph(nodes, name, inputs, outputs, list(initializers))
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21)])


def vi(name: str, dtype: int = TensorProto.FLOAT, shape=(2,)) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, list(shape))


def node(op: str, inputs, outputs, name: str, **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, outputs, name=name, **attrs)


def refused(source, cls: type, message: str, **kwargs) -> None:
    """`ir.load(source)` raises exactly `cls` with exactly `message`, on one line."""
    with pytest.raises(ir.CompileError) as info:
        ir.load(source, **kwargs)
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"
    text = str(info.value)
    assert text == message
    assert len(text.splitlines()) == 1


def refused_somehow(source) -> ir.CompileError:
    """`ir.load(source)` raises a load or malformed-model error with a one-line message."""
    with pytest.raises(ir.CompileError) as info:
        ir.load(source)
    assert type(info.value) in (ir.ModelLoadError, ir.MalformedModelError), repr(info.value)
    text = str(info.value)
    assert text and len(text.splitlines()) == 1
    return info.value


def small_model() -> onnx.ModelProto:
    """y = Relu(x + w), with an initializer and one opset import (nothing after it)."""
    w = numpy_helper.from_array(np.arange(2, dtype=np.float32), "w")
    return model([node("Add", ["x", "w"], ["t"], "add"), node("Relu", ["t"], ["y"], "relu")],
                 initializers=[w])


def if_model(then_nodes, then_outputs=None, then_inits=(), name="then_body") -> onnx.ModelProto:
    """y = If(c) then <given branch> else Neg(x); the branches read x from the outer graph."""
    then_g = helper.make_graph(then_nodes, name, [], then_outputs or [vi("t")], list(then_inits))
    else_g = helper.make_graph([node("Neg", ["x"], ["e"], "else_neg")], "else_body", [], [vi("e")])
    the_if = node("If", ["c"], ["y"], "the_if", then_branch=then_g, else_branch=else_g)
    return model([the_if], inputs=[vi("x"), vi("c", TensorProto.BOOL, ())])


IF_WHERE = "graph 'g': node 'the_if' (If) attribute 'then_branch' graph 'then_body'"


def test_well_formed_models_load():
    """The bases the cases below break are themselves fine."""
    ir.verify(ir.load(small_model()))
    ir.verify(ir.load(if_model([node("Abs", ["x"], ["t"], "then_abs")])))


# -- not a model at all --------------------------------------------------------------------

def test_random_bytes():
    data = b"".join(hashlib.sha256(bytes([i])).digest() for i in range(8))  # 256 fixed bytes
    refused(data, ir.ModelLoadError, "model bytes: not a valid ONNX model (truncated, or not protobuf)")


def test_bytes_that_are_not_protobuf():
    refused(b"\xff\xff\xff not protobuf", ir.ModelLoadError,
            "model bytes: not a valid ONNX model (truncated, or not protobuf)")


def test_text_file(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("This is a README, not a model.\nIt has two lines.\n")
    refused(path, ir.ModelLoadError, f"{path}: not a valid ONNX model (truncated, or not protobuf)")


def test_model_in_onnx_text_format(tmp_path):
    """The textual form of a model is not the binary protobuf ir.load reads."""
    path = tmp_path / "model.onnx"
    path.write_text(onnx.printer.to_text(small_model()))
    refused(str(path), ir.ModelLoadError, f"{path}: not a valid ONNX model (truncated, or not protobuf)")


def test_protobuf_without_graph():
    """Valid protobuf that holds no graph (here: an empty ModelProto, and one with only an
    ir_version) is not a model."""
    refused(onnx.ModelProto(), ir.ModelLoadError, "model: no graph (an empty model, or not an ONNX model)")
    refused(onnx.ModelProto(ir_version=10).SerializeToString(), ir.ModelLoadError,
            "model bytes: no graph (an empty model, or not an ONNX model)")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    refused(path, ir.ModelLoadError, f"{path}: empty file (0 bytes)")


def test_empty_bytes():
    refused(b"", ir.ModelLoadError, "model bytes: empty (0 bytes)")
    refused(bytearray(), ir.ModelLoadError, "model bytes: empty (0 bytes)")


def test_missing_path(tmp_path):
    path = tmp_path / "no" / "such" / "model.onnx"
    refused(path, ir.ModelLoadError, f"{path}: no such file")
    refused(str(path), ir.ModelLoadError, f"{path}: no such file")


def test_directory_given_as_model(tmp_path):
    refused(tmp_path, ir.ModelLoadError, f"{tmp_path}: is a directory, not a model file")


@pytest.mark.parametrize("source, type_name", [(3, "int"), (None, "NoneType"), (3.5, "float"),
                                               ([b"\x08\x0a"], "list"), (np.zeros(3), "ndarray")])
def test_wrong_type_given_to_load(source, type_name):
    refused(source, ir.ModelLoadError,
            f"cannot read a model from an object of type {type_name}; give a path, bytes or onnx.ModelProto")


# -- truncated and corrupt files --------------------------------------------------------------

def test_real_model_cut_in_half(tmp_path):
    data = REAL_MODEL.read_bytes()
    ir.verify(ir.load(data))  # whole, it loads
    path = tmp_path / "half.onnx"
    path.write_bytes(data[: len(data) // 2])
    refused(path, ir.ModelLoadError, f"{path}: not a valid ONNX model (truncated, or not protobuf)")


@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.1, 0.25, 0.75, 0.9, 0.99, 0.9999])
def test_real_model_cut_elsewhere(fraction):
    data = REAL_MODEL.read_bytes()
    cut = max(1, int(len(data) * fraction))
    refused(data[:cut], ir.ModelLoadError, "model bytes: not a valid ONNX model (truncated, or not protobuf)")


def test_real_model_missing_its_last_byte():
    data = REAL_MODEL.read_bytes()
    refused(data[:-1], ir.ModelLoadError, "model bytes: not a valid ONNX model (truncated, or not protobuf)")


def test_model_cut_after_its_ir_version():
    """The first field alone parses: it is a model without a graph."""
    data = small_model().SerializeToString()
    refused(data[:2], ir.ModelLoadError, "model bytes: no graph (an empty model, or not an ONNX model)")


def test_model_cut_right_after_its_graph():
    """A cut on a field boundary parses cleanly; the missing opset_import gives it away."""
    proto = small_model()
    data = proto.SerializeToString()
    assert data.endswith(proto.opset_import[0].SerializeToString())
    cut = len(data) - len(proto.opset_import[0].SerializeToString()) - 2  # tag + length byte
    refused(data[:cut], ir.MalformedModelError,
            "model bytes: no opset_import (required since IR version 3; truncated file?)")


def test_every_truncation_of_a_small_model_is_refused():
    """Whatever protobuf makes of a prefix, the user gets a CompileError with one line."""
    proto = if_model([node("Abs", ["x"], ["t"], "then_abs")],
                     then_inits=[numpy_helper.from_array(np.ones(2, np.float32), "unused")])
    data = proto.SerializeToString()
    for cut in range(len(data)):
        refused_somehow(data[:cut])
    ir.load(data)


def test_name_that_is_not_utf8():
    """proto2 does not check strings; a corrupt name must not reach later steps as bytes."""
    data = small_model().SerializeToString()
    assert data.count(b"relu") == 1
    refused(data.replace(b"relu", b"re\xa5u"), ir.ModelLoadError,
            "model bytes: not a valid ONNX model (a NodeProto.name string is not UTF-8; is the file corrupt?)")


def test_bit_flips_give_compile_errors_only():
    """Corrupting a few bytes anywhere never escapes as a raw exception or a multi-line message."""
    data = small_model().SerializeToString()
    rng = np.random.default_rng(7)
    for _ in range(500):
        corrupt = bytearray(data)
        for _ in range(rng.integers(1, 4)):
            corrupt[rng.integers(len(corrupt))] = rng.integers(256)
        try:
            m = ir.load(bytes(corrupt))
        except ir.CompileError as e:
            assert type(e) in (ir.ModelLoadError, ir.MalformedModelError)
            assert len(str(e).splitlines()) == 1
            continue
        ir.verify(m)
        ir.to_proto(m)


def test_control_characters_in_names_stay_on_one_line():
    m = model([node("Add", ["x", "bad\nname\r\u2028"], ["y"], "add")])
    refused(m, ir.MalformedModelError,
            "graph 'g': node 'add' (Add) reads 'bad\\nname\\r\\u2028' (input 1), "
            "which no node, input or initializer produces")


# -- broken graphs ------------------------------------------------------------------------------

def test_node_cycle():
    """Two nodes reading each other's outputs."""
    m = model([node("Add", ["x", "b"], ["a"], "first"), node("Relu", ["a"], ["b"], "second"),
               node("Neg", ["a"], ["y"], "out")])
    refused(m, ir.MalformedModelError, "graph 'g': node 'first' (Add) is part of a cycle")


def test_node_reading_its_own_output():
    m = model([node("Add", ["x", "y"], ["y"], "self_loop")])
    refused(m, ir.MalformedModelError, "graph 'g': node 'self_loop' (Add) is part of a cycle")


def test_cycle_reports_a_node_on_the_cycle_not_one_behind_it():
    m = model([node("Relu", ["a"], ["y"], "behind"),  # waits on the cycle, is not part of it
               node("Relu", ["b"], ["a"], "loop_a"), node("Relu", ["a"], ["b"], "loop_b")])
    refused(m, ir.MalformedModelError, "graph 'g': node 'loop_a' (Relu) is part of a cycle")


def test_input_nothing_produces():
    m = model([node("Add", ["x", "nowhere"], ["y"], "add")])
    refused(m, ir.MalformedModelError,
            "graph 'g': node 'add' (Add) reads 'nowhere' (input 1), which no node, input or initializer produces")


def test_two_nodes_produce_the_same_output():
    m = model([node("Relu", ["x"], ["y"], "a"), node("Neg", ["x"], ["y"], "b")])
    refused(m, ir.MalformedModelError, "graph 'g': value 'y' is defined twice (output of node 'b')")


def test_node_output_redefines_a_graph_input():
    m = model([node("Relu", ["x"], ["x"], "a"), node("Neg", ["x"], ["y"], "b")])
    refused(m, ir.MalformedModelError, "graph 'g': value 'x' is defined twice (output of node 'a')")


def test_initializer_defined_twice():
    w = numpy_helper.from_array(np.ones(2, np.float32), "w")
    m = model([node("Add", ["x", "w"], ["y"], "add")], initializers=[w, w])
    refused(m, ir.MalformedModelError, "graph 'g': value 'w' is defined twice (initializer)")


def test_graph_input_listed_twice():
    m = model([node("Relu", ["x"], ["y"], "relu")], inputs=[vi("x"), vi("x")])
    refused(m, ir.MalformedModelError, "graph 'g': value 'x' is defined twice (graph input)")


def test_graph_output_not_produced():
    m = model([node("Relu", ["x"], ["t"], "relu")])
    refused(m, ir.MalformedModelError,
            "graph 'g': graph output 'y' is not produced by any node, input or initializer")


# -- initializer data that does not match its shape and type ----------------------------------

def bad_initializer(**fields) -> onnx.ModelProto:
    return model([node("Add", ["x", "w"], ["y"], "add")], initializers=[TensorProto(name="w", **fields)])


@pytest.mark.parametrize("fields, message", [
    (dict(data_type=TensorProto.FLOAT, dims=[2], raw_data=b"\0" * 4),
     "4 bytes of data for shape [2] of float32 (expected 8)"),
    (dict(data_type=TensorProto.FLOAT, dims=[2, 3], raw_data=b"\0" * 25),
     "25 bytes of data for shape [2, 3] of float32 (expected 24)"),
    (dict(data_type=TensorProto.FLOAT, dims=[2], float_data=[1.0, 2.0, 3.0]),
     "3 values in float_data for shape [2] of float32 (expected 2)"),
    (dict(data_type=TensorProto.FLOAT, dims=[3]),
     "0 values in float_data for shape [3] of float32 (expected 3)"),
    (dict(data_type=TensorProto.INT64, dims=[3], int64_data=[1]),
     "1 values in int64_data for shape [3] of int64 (expected 3)"),
    (dict(data_type=TensorProto.FLOAT, dims=[-2], float_data=[1.0, 2.0]),
     "negative dimension in shape [-2]"),
    (dict(data_type=99, dims=[2], raw_data=b"\0" * 8), "unknown data type 99"),
    (dict(dims=[2], raw_data=b"\0" * 8), "unknown data type 0"),
    (dict(data_type=TensorProto.STRING, dims=[1], raw_data=b"ab"), "string tensor cannot use raw_data"),
], ids=["raw-short", "raw-long", "float_data-count", "no-data", "int64_data-count", "negative-dim",
        "unknown-dtype", "undefined-dtype", "string-raw"])
def test_initializer_data_does_not_match(fields, message):
    refused(bad_initializer(**fields), ir.MalformedModelError, f"graph 'g': initializer 'w': {message}")


def test_constant_value_does_not_match():
    bad = TensorProto(name="v", data_type=TensorProto.FLOAT, dims=[2], raw_data=b"\0" * 6)
    m = model([node("Constant", [], ["c"], "const", value=bad), node("Add", ["x", "c"], ["y"], "add")])
    refused(m, ir.MalformedModelError,
            "graph 'g': node 'const' (Constant) attribute 'value': 6 bytes of data for shape [2] "
            "of float32 (expected 8)")


def test_missing_external_data_file(tmp_path):
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2], data_location=TensorProto.EXTERNAL)
    w.external_data.add(key="location", value="weights.bin")
    path = tmp_path / "model.onnx"
    onnx.save(model([node("Add", ["x", "w"], ["y"], "add")], initializers=[w]), path)
    refused(path, ir.ExternalDataError,
            f"graph 'g': initializer 'w': external data file 'weights.bin' not found in {tmp_path}")


# -- the same inside a subgraph: the message names the node and the subgraph -----------------

def test_subgraph_reads_undefined_name():
    m = if_model([node("Add", ["x", "undefined_name"], ["t"], "then_add")])
    refused(m, ir.MalformedModelError,
            f"{IF_WHERE}: node 'then_add' (Add) reads 'undefined_name' (input 1), "
            "which no node, input or initializer produces")


def test_subgraph_cycle():
    m = if_model([node("Add", ["x", "b"], ["a"], "then_first"), node("Relu", ["a"], ["b"], "then_second"),
                  node("Neg", ["a"], ["t"], "then_out")])
    refused(m, ir.MalformedModelError, f"{IF_WHERE}: node 'then_first' (Add) is part of a cycle")


def test_subgraph_duplicate_output():
    m = if_model([node("Relu", ["x"], ["t"], "then_a"), node("Neg", ["x"], ["t"], "then_b")])
    refused(m, ir.MalformedModelError, f"{IF_WHERE}: value 't' is defined twice (output of node 'then_b')")


def test_subgraph_initializer_defined_twice():
    w = numpy_helper.from_array(np.ones(2, np.float32), "w")
    m = if_model([node("Add", ["x", "w"], ["t"], "then_add")], then_inits=[w, w])
    refused(m, ir.MalformedModelError, f"{IF_WHERE}: value 'w' is defined twice (initializer)")


def test_subgraph_output_not_produced():
    m = if_model([node("Abs", ["x"], ["s"], "then_abs")])
    refused(m, ir.MalformedModelError,
            f"{IF_WHERE}: graph output 't' is not produced by any node, input or initializer")


def test_subgraph_initializer_data_does_not_match():
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2], raw_data=b"\0" * 4)
    m = if_model([node("Add", ["x", "w"], ["t"], "then_add")], then_inits=[w])
    refused(m, ir.MalformedModelError,
            f"{IF_WHERE}: initializer 'w': 4 bytes of data for shape [2] of float32 (expected 8)")


def test_nested_subgraph_names_the_whole_path():
    inner_then = helper.make_graph([node("Add", ["x", "ghost"], ["u"], "inner_add")], "inner_then", [], [vi("u")])
    inner_else = helper.make_graph([node("Abs", ["x"], ["v"], "inner_abs")], "inner_else", [], [vi("v")])
    inner_if = node("If", ["c"], ["t"], "inner_if", then_branch=inner_then, else_branch=inner_else)
    m = if_model([inner_if])
    refused(m, ir.MalformedModelError,
            f"{IF_WHERE}: node 'inner_if' (If) attribute 'then_branch' graph 'inner_then': "
            "node 'inner_add' (Add) reads 'ghost' (input 1), which no node, input or initializer produces")


def test_subgraph_may_read_outer_values_defined_later():
    """Not an error: lowering orders the If after the value its branch captures."""
    then_g = helper.make_graph([node("Add", ["x", "late"], ["t"], "then_add")], "then_body", [], [vi("t")])
    else_g = helper.make_graph([node("Neg", ["x"], ["e"], "else_neg")], "else_body", [], [vi("e")])
    m = model([node("If", ["c"], ["y"], "the_if", then_branch=then_g, else_branch=else_g),
               node("Abs", ["x"], ["late"], "late_abs")],
              inputs=[vi("x"), vi("c", TensorProto.BOOL, ())])
    lowered = ir.load(m)
    ir.verify(lowered)
    assert [n.name for n in lowered.graph.nodes] == ["late_abs", "the_if"]


def test_truncated_file_is_named_by_its_path(tmp_path):
    path = Path(tmp_path) / "model.onnx"
    path.write_bytes(small_model().SerializeToString()[:40])
    refused(path, ir.ModelLoadError, f"{path}: not a valid ONNX model (truncated, or not protobuf)")
