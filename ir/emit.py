"""Emission: the IR back into an `onnx.ModelProto`, or into a file whose large tensors go
to an external data file beside it (streamed, so a huge model is never held whole)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import onnx
from onnx import AttributeProto as A
from onnx import TensorProto

from .errors import CompileError
from .graph import Function, Graph, Model
from .node import Attr, Node
from .tensors import ExternalTensor, SparseTensor, Tensor
from .value import Value

PROTOBUF_LIMIT = 2**31 - 1  # a serialized ModelProto cannot be larger
EXTERNAL_THRESHOLD = 1024  # bytes; smaller tensors stay inline (onnx's own default)


def to_proto(model: Model) -> onnx.ModelProto:
    """The whole model in memory, every tensor inline."""
    if tensor_bytes(model) > PROTOBUF_LIMIT:
        raise CompileError(f"model holds {tensor_bytes(model) / 2**30:.1f} GiB of tensors, more than "
                           "one protobuf can carry; save it to a file (external data is written beside it)")
    return _Emitter(None).model(model)


def skeleton_proto(model: Model, threshold: int = EXTERNAL_THRESHOLD) -> onnx.ModelProto:
    """The model's structure with every tensor of `threshold` bytes or more (in any graph,
    Constant attributes included) replaced by an external reference to nothing: what shape
    inference needs (dtypes and dims) without reading a single weight."""
    return _Emitter(_Placeholders(threshold)).model(model)


def save(model: Model, path: str | os.PathLike, *, external: bool | None = None,
         threshold: int = EXTERNAL_THRESHOLD, reuse: "Written | None" = None) -> "Written":
    """Write the model to `path`. With `external` (default: when the model already has
    external data or holds over 1 GiB of tensors, half of what one protobuf can carry),
    tensors of `threshold` bytes or more go to `<name>.data` beside it (not created when no
    tensor qualifies). Each file is written to a temporary name, then renamed.

    Returns where each external tensor went. Passing that as `reuse` to a later save in the
    same folder makes the tensors still in the model point into that earlier data file
    instead of being copied again (debug dumps of a huge model write its weights once)."""
    path = Path(path)
    if path.is_dir():
        raise CompileError(f"cannot write '{path}': it is a folder")
    if external is None:
        external = has_external(model) or tensor_bytes(model) > PROTOBUF_LIMIT // 2
    if not external:
        _replace(path, _Emitter(None).model(model).SerializeToString())
        return {}
    data_path = path.with_name(path.name + ".data")
    tmp_data = data_path.with_name(f".{data_path.name}.{os.getpid()}.tmp")
    tmp_model = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp_data, "wb") as f:
            writer = _DataWriter(f, data_path, threshold, reuse or {})
            blob = writer.check(_Emitter(writer).model(model).SerializeToString())
        tmp_model.write_bytes(blob)
        # Both files are complete before either is renamed: a failure leaves the old pair.
        if writer.offset:
            os.replace(tmp_data, data_path)
        os.replace(tmp_model, path)
    finally:
        for tmp in (tmp_data, tmp_model):
            if tmp.exists():
                tmp.unlink()
    writer.repoint()
    return writer.placed


# id(tensor) -> (tensor, file name, offset, length); the tensor is kept so its id stays its own
Written = dict[int, tuple[Tensor, str, int, int]]


def _replace(path: Path, blob: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(blob)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class _Placeholders:
    """Stands in for the data writer in `skeleton_proto`: large tensors become references
    to a file that does not exist; nothing is read or written."""

    LOCATION = "onnxcc-skeleton-placeholder"

    def __init__(self, threshold: int):
        self.threshold = threshold

    def wants(self, tensor: Tensor, *, attribute: bool = False) -> bool:
        return tensor.dtype != TensorProto.STRING and not isinstance(tensor, SparseTensor) \
            and tensor.nbytes >= max(self.threshold, 1)

    def inline(self, tensor: Tensor, proto: TensorProto) -> None:
        pass

    def write(self, tensor: Tensor, name: str) -> TensorProto:
        proto = TensorProto(name=name, data_type=tensor.dtype, dims=tensor.shape,
                            data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.LOCATION), ("offset", "0"), ("length", str(tensor.nbytes))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        return proto


class _DataWriter:
    """Appends tensors to the external data file and makes the protos that point at them."""

    def __init__(self, file: BinaryIO, data_path: Path, threshold: int, reuse: "Written"):
        self.file = file
        self.reuse = reuse
        self.placed: Written = {}
        self.location = data_path.name
        self.real = os.path.realpath(data_path)
        self.threshold = threshold
        self.offset = 0
        self.written: list[tuple[ExternalTensor, int]] = []
        self.inlined: list[tuple[ExternalTensor, TensorProto]] = []

    def wants(self, tensor: Tensor, *, attribute: bool = False) -> bool:
        if tensor.dtype == TensorProto.STRING or isinstance(tensor, SparseTensor):
            return False
        if tensor.nbytes < max(self.threshold, 1):  # an empty tensor needs no file
            return False
        # Constant attributes stay inline unless they were external already.
        return tensor.is_external or not attribute

    def inline(self, tensor: Tensor, proto: TensorProto) -> None:
        """An external tensor written inline: remember it if its file is the one replaced."""
        if tensor.is_external and os.path.realpath(tensor.path) == self.real:
            self.inlined.append((tensor, proto))

    def write(self, tensor: Tensor, name: str) -> TensorProto:
        known = self.reuse.get(id(tensor))
        if known is not None and known[0] is tensor:  # already in an earlier file: point there
            return self._reference(tensor, name, *known[1:])
        align = 4096 if tensor.nbytes >= 1 << 20 else 64  # page-aligned big tensors can be mapped
        pad = -self.offset % align
        self.file.write(b"\0" * pad)
        self.offset += pad
        start = self.offset
        tensor.copy_into(self.file)
        self.offset = start + tensor.nbytes
        if self.file.tell() != self.offset:  # the offsets of every later tensor depend on it
            raise AssertionError(f"tensor '{name}': wrote {self.file.tell() - start} bytes, "
                                 f"expected {tensor.nbytes}")
        if isinstance(tensor, ExternalTensor):
            self.written.append((tensor, start))
        self.placed[id(tensor)] = (tensor, self.location, start, self.offset - start)
        return self._reference(tensor, name, self.location, start, self.offset - start)

    @staticmethod
    def _reference(tensor: Tensor, name: str, location: str, offset: int, length: int) -> TensorProto:
        proto = TensorProto(name=name, data_type=tensor.dtype, dims=tensor.shape,
                            data_location=TensorProto.EXTERNAL)
        template = tensor.source_proto
        if template is not None:
            proto.doc_string = template.doc_string
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        return proto

    def check(self, blob: bytes) -> bytes:
        if len(blob) > PROTOBUF_LIMIT:
            raise CompileError("model structure exceeds 2 GiB even with weights as external data")
        return blob

    def repoint(self) -> None:
        """Tensors read from the file just replaced now live in the new one, or in memory
        when they were written inline."""
        for tensor, offset in self.written:
            if tensor.is_external and os.path.realpath(tensor.path) == self.real:
                tensor.path, tensor.offset = Path(self.real), offset
        for tensor, proto in self.inlined:
            tensor.hold(proto.raw_data)


class _Emitter:
    def __init__(self, writer: _DataWriter | None):
        self.writer = writer

    def model(self, m: Model) -> onnx.ModelProto:
        p = onnx.ModelProto(ir_version=m.ir_version, **_given(
            producer_name=m.producer_name, producer_version=m.producer_version, domain=m.domain,
            model_version=m.model_version, doc_string=m.doc_string))
        for domain, version in m.opset_imports.items():
            p.opset_import.add(domain=domain, version=version)
        _set_props(p.metadata_props, m.metadata_props)
        p.graph.CopyFrom(self.graph(m.graph))
        p.functions.extend(self.function(f) for f in m.functions)
        p.training_info.extend(m.training_info)
        if m.configuration:
            p.configuration.extend(m.configuration)
        return p

    def function(self, f: Function) -> onnx.FunctionProto:
        p = onnx.FunctionProto(domain=f.domain, name=f.name,
                               **_given(doc_string=f.doc_string, overload=f.overload))
        p.input.extend(v.name for v in f.graph.inputs)
        p.output.extend(v.name for v in f.graph.outputs)
        p.attribute.extend(f.attributes)
        p.attribute_proto.extend(self.attr(name, a) for name, a in f.attribute_defaults.items())
        for domain, version in f.opset_imports.items():
            p.opset_import.add(domain=domain, version=version)
        p.node.extend(self.node(n) for n in f.graph.nodes)
        if hasattr(p, "value_info"):
            p.value_info.extend(_value_infos(f.graph))
        if f.metadata_props:
            _set_props(p.metadata_props, f.metadata_props)
        return p

    def graph(self, g: Graph) -> onnx.GraphProto:
        p = onnx.GraphProto(name=g.name, **_given(doc_string=g.doc_string))
        p.input.extend(_value_info(v) for v in g.inputs)
        for v in g.initializers.values():
            if isinstance(v.tensor, SparseTensor):
                p.sparse_initializer.append(v.tensor.proto)
                p.sparse_initializer[-1].values.name = v.name  # the value may have been renamed
            else:
                p.initializer.append(self.tensor(v.tensor, v.name))
        p.node.extend(self.node(n) for n in g.nodes)
        p.output.extend(_value_info(v) for v in g.outputs)
        p.value_info.extend(_value_infos(g))
        p.quantization_annotation.extend(g.quantization_annotation)
        _set_props(p.metadata_props, g.metadata_props)
        return p

    def node(self, n: Node) -> onnx.NodeProto:
        p = onnx.NodeProto(op_type=n.op_type, **_given(name="" if n.name_generated else n.name,
            domain=n.domain, doc_string=n.doc_string, overload=n.overload))
        p.input.extend(v.name if v is not None else "" for v in n.inputs)
        p.output.extend(v.name if v is not None else "" for v in n.outputs)
        p.attribute.extend(self.attr(name, a) for name, a in n.attributes.items())
        _set_props(p.metadata_props, n.metadata_props)
        return p

    def attr(self, name: str, a: Attr) -> onnx.AttributeProto:
        p = onnx.AttributeProto(name=name, type=a.type, **_given(doc_string=a.doc_string))
        if a.ref_attr_name:
            p.ref_attr_name = a.ref_attr_name
            return p
        t, v = a.type, a.value
        if t == A.FLOAT:
            p.f = v
        elif t == A.INT:
            p.i = v
        elif t == A.STRING:
            p.s = v
        elif t == A.TENSOR:
            p.t.CopyFrom(self.tensor(v, v_name(v), attribute=True))
        elif t == A.GRAPH:
            p.g.CopyFrom(self.graph(v))
        elif t == A.SPARSE_TENSOR:
            p.sparse_tensor.CopyFrom(v)
        elif t == A.TYPE_PROTO:
            p.tp.CopyFrom(v)
        elif t == A.FLOATS:
            p.floats.extend(v)
        elif t == A.INTS:
            p.ints.extend(v)
        elif t == A.STRINGS:
            p.strings.extend(v)
        elif t == A.TENSORS:
            p.tensors.extend(self.tensor(x, v_name(x), attribute=True) for x in v)
        elif t == A.GRAPHS:
            p.graphs.extend(self.graph(x) for x in v)
        elif t == A.SPARSE_TENSORS:
            p.sparse_tensors.extend(v)
        elif t == A.TYPE_PROTOS:
            p.type_protos.extend(v)
        return p

    def tensor(self, t: Tensor, name: str, *, attribute: bool = False) -> TensorProto:
        if self.writer is None:
            return t.to_proto(name)
        if self.writer.wants(t, attribute=attribute):
            return self.writer.write(t, name)
        proto = t.to_proto(name)
        if isinstance(t, ExternalTensor):
            self.writer.inline(t, proto)
        return proto


def v_name(t: Tensor) -> str:
    """Attribute tensors keep the name they came with (it is part of the proto)."""
    proto = t.source_proto
    return proto.name if proto is not None else ""


def _value_info(v: Value) -> onnx.ValueInfoProto:
    p = onnx.ValueInfoProto(name=v.name, **_given(doc_string=v.doc_string))
    if v.type is not None:
        p.type.CopyFrom(v.type)
    elif v.dtype is not None:
        tt = p.type.tensor_type
        tt.elem_type = v.dtype
        if v.shape is not None:
            tt.shape.SetInParent()
            for d in v.shape:
                dim = tt.shape.dim.add()
                if isinstance(d, int):
                    dim.dim_value = d
                elif isinstance(d, str):
                    dim.dim_param = d
    _set_props(p.metadata_props, v.metadata_props)
    return p


def _value_infos(g: Graph):
    """The value_info entries: node outputs whose type the model declared (inferred types
    stay in the IR) and that are not graph outputs, then the entries the model gave for
    inputs and initializers."""
    outputs = {id(v) for v in g.outputs}
    for node in g.nodes:
        for v in node.outputs:
            if v is not None and v.declared and id(v) not in outputs and \
                    (v.dtype is not None or v.type is not None):
                yield _value_info(v)
    for v in list(g.inputs) + [v for v in g.initializers.values() if not v.is_graph_input]:
        if v.value_info is not None:
            entry = onnx.ValueInfoProto()
            entry.CopyFrom(v.value_info)
            entry.name = v.name
            yield entry


def _given(**fields):
    """Only the fields that carry something: ONNX's protos are proto2, where an empty
    string that is set is still written."""
    return {k: v for k, v in fields.items() if v}


def _set_props(field, props: dict[str, str]) -> None:
    for key, value in props.items():
        field.add(key=key, value=value)


def _all_tensors(model: Model):
    for g in model.graphs():
        for v in g.initializers.values():
            yield v.tensor
        for node in g.nodes:
            for a in node.attributes.values():
                if a.type == A.TENSOR and not a.ref_attr_name:
                    yield a.value
                elif a.type == A.TENSORS:
                    yield from a.value


def has_external(model: Model) -> bool:
    return any(t.is_external for t in _all_tensors(model))


def tensor_bytes(model: Model) -> int:
    return sum(t.nbytes for t in _all_tensors(model))


__all__ = ["to_proto", "save", "EXTERNAL_THRESHOLD"]
