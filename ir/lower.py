"""Lowering: an ONNX model (path, bytes or ModelProto) into the IR.

Every name is resolved to a `Value` once, here; after this, names are only labels.
Malformed input is refused with a one-line `CompileError` naming the node or tensor.
"""

from __future__ import annotations

import os
from collections import ChainMap
from pathlib import Path
from typing import Iterable

import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError
from onnx import AttributeProto as A
from onnx import TensorProto

from .errors import MalformedModelError, ModelLoadError
from .external import external_tensor
from .graph import Function, Graph, Model
from .node import Attr, Node
from .tensors import ProtoTensor, SparseTensor, Tensor, check_inline_tensor
from .value import Value

Scope = ChainMap  # name -> Value, innermost graph first


def load(source, *, base_dir: str | os.PathLike | None = None) -> Model:
    """Lower a model given as a path, bytes or `onnx.ModelProto` (which is not modified).
    External data is resolved against the model's folder (or `base_dir`) and mapped lazily."""
    if isinstance(source, onnx.ModelProto):
        proto, where = source, "model"
    elif isinstance(source, (bytes, bytearray, memoryview)):
        where = "model bytes"
        proto = _parse(bytes(source), where, "empty (0 bytes)")
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        where = str(path)
        proto = _parse(_read(path), where, "empty file (0 bytes)")
        base_dir = path.parent if base_dir is None else base_dir
    else:
        raise ModelLoadError(f"cannot read a model from an object of type {type(source).__name__}; "
                             "give a path, bytes or onnx.ModelProto")
    if not proto.HasField("graph"):
        raise ModelLoadError(f"{where}: no graph (an empty model, or not an ONNX model)")
    if proto.ir_version >= 3 and not proto.opset_import:
        raise MalformedModelError(f"{where}: no opset_import (required since IR version 3; truncated file?)")
    _check_text(proto, where)
    return _Lowerer(Path(base_dir) if base_dir is not None else None).model(proto)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ModelLoadError(f"{path}: is a directory, not a model file") from None
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read ({e.strerror})") from None


def _parse(data: bytes, where: str, empty: str) -> onnx.ModelProto:
    if not data:
        raise ModelLoadError(f"{where}: {empty}")
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError):
        # protobuf's own reason ("Error parsing message...") says no more than this
        raise ModelLoadError(f"{where}: not a valid ONNX model (truncated, or not protobuf)") from None
    return proto


def _check_text(message, where: str) -> None:
    """ONNX's protos are proto2, whose parser does not check that strings are UTF-8: upb
    hands back the bytes of a corrupt name, which would break every later step."""
    for field, value in message.ListFields():
        if field.type == FieldDescriptor.TYPE_STRING:
            if any(isinstance(s, bytes) for s in (value if _repeated(field) else (value,))):
                raise ModelLoadError(
                    f"{where}: not a valid ONNX model (a {field.containing_type.name}.{field.name} "
                    "string is not UTF-8; is the file corrupt?)")
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            for sub in value if _repeated(field) else (value,):
                _check_text(sub, where)


def _repeated(field: FieldDescriptor) -> bool:
    if hasattr(field, "is_repeated"):  # newer protobuf; older ones only have `label`
        return field.is_repeated
    return field.label == FieldDescriptor.LABEL_REPEATED


class _Lowerer:
    def __init__(self, base_dir: Path | None):
        self.base_dir = base_dir
        self.value_names: set[str] = set()
        self.node_names: set[str] = set()
        self.given_names: set[str] = set()  # names in the file: generated ones avoid them
        self._next_suffix: dict[str, int] = {}

    # -- model --------------------------------------------------------------------------
    def model(self, proto: onnx.ModelProto) -> Model:
        gp = proto.graph
        self.given_names = _node_names(gp.node)
        graph = self.body(f"graph '{gp.name}'", gp.name, gp.input, gp.initializer,
                          gp.sparse_initializer, gp.node, gp.output, gp.value_info, None)
        graph.doc_string = gp.doc_string
        graph.metadata_props = _props(gp.metadata_props)
        graph.quantization_annotation = [_copy(a) for a in gp.quantization_annotation]
        model = Model(
            graph=graph, ir_version=proto.ir_version,
            opset_imports={o.domain: o.version for o in proto.opset_import},
            producer_name=proto.producer_name, producer_version=proto.producer_version,
            domain=proto.domain, model_version=proto.model_version, doc_string=proto.doc_string,
            metadata_props=_props(proto.metadata_props), base_dir=self.base_dir,
            training_info=[_copy(t) for t in proto.training_info],
            configuration=[_copy(c) for c in getattr(proto, "configuration", [])],
        )
        for fp in proto.functions:
            self.value_names, self.node_names = set(), set()  # a function is its own scope
            self.given_names = _node_names(fp.node)
            model.functions.append(self.function(fp))
        return model

    def function(self, fp: onnx.FunctionProto) -> Function:
        where = f"function '{fp.domain}.{fp.name}'"
        inputs = [onnx.ValueInfoProto(name=n) for n in fp.input]
        outputs = [onnx.ValueInfoProto(name=n) for n in fp.output]
        body = self.body(where, fp.name, inputs, (), (), fp.node, outputs,
                         getattr(fp, "value_info", ()), None)
        return Function(
            domain=fp.domain, name=fp.name, graph=body, attributes=list(fp.attribute),
            attribute_defaults={a.name: self.attr(a, None, where) for a in fp.attribute_proto},
            opset_imports={o.domain: o.version for o in fp.opset_import},
            overload=getattr(fp, "overload", ""), doc_string=fp.doc_string,
            metadata_props=_props(getattr(fp, "metadata_props", ())))

    # -- graphs -------------------------------------------------------------------------
    def body(self, where, name, inputs, initializers, sparse, nodes, outputs, value_info,
             outer: Scope | None) -> Graph:
        g = Graph(name)
        local: dict[str, Value] = {}
        scope = ChainMap(local, *(outer.maps if outer is not None else []))

        def define(v: Value, what: str) -> Value:
            if v.name in local:
                raise MalformedModelError(f"{where}: value '{v.name}' is defined twice ({what})")
            local[v.name] = v
            if v.name in self.value_names:  # shadows an outer or sibling name: keep names unique
                v.name = self._fresh(v.name, self.value_names)
            self.value_names.add(v.name)
            return v

        for vi in inputs:
            g.add_input(_typed(define(Value(vi.name), "graph input"), vi))
        for tp in initializers:
            tensor = self.tensor(tp, f"{where}: initializer '{tp.name}'")
            existing = local.get(tp.name)
            if existing is not None and existing.is_graph_input and existing.tensor is None:
                existing.tensor = tensor  # an overridable input with a default value
                g.add_initializer(existing)
            else:
                g.add_initializer(define(Value(tp.name, tensor.dtype, tensor.shape, tensor=tensor),
                                         "initializer"))
        for sp in sparse:
            tensor = self.sparse(sp, where)
            g.add_initializer(define(Value(sp.values.name, tensor.dtype, tensor.shape, tensor=tensor),
                                     "sparse initializer"))

        produced = []
        for np_ in nodes:
            outs = []
            for out in np_.output:
                outs.append(define(Value(out), f"output of node '{np_.name or np_.op_type}'") if out else None)
            produced.append(outs)

        for np_, outs in zip(nodes, produced):
            g.append(self.node(np_, outs, scope, where))
        _sort(g, where)

        for vi in value_info:
            v = local.get(vi.name)
            if v is None:
                continue
            if v.producer is None:
                v.value_info = _copy(vi)
            elif v.dtype is None and v.type is None:
                _typed(v, vi)
                v.declared = True
        for vi in outputs:
            v = scope.get(vi.name)
            if v is None:
                raise MalformedModelError(
                    f"{where}: graph output '{vi.name}' is not produced by any node, input or initializer")
            if local.get(vi.name) is v and v.producer is not None:
                _typed(v, vi)  # the output's declared type; inputs and initializers keep theirs
            g.outputs.append(v)
        return g

    def node(self, np_: onnx.NodeProto, outs: list, scope: Scope, where: str) -> Node:
        name = np_.name if np_.name and np_.name not in self.node_names else \
            self._fresh(np_.name or np_.op_type, self.node_names, self.given_names)
        self.node_names.add(name)
        here = f"node '{name}' ({np_.op_type})"
        inputs = []
        for i, inp in enumerate(np_.input):
            if not inp:
                inputs.append(None)
                continue
            v = scope.get(inp)
            if v is None:
                raise MalformedModelError(
                    f"{where}: {here} reads '{inp}' (input {i}), which no node, input or initializer produces")
            inputs.append(v)
        attrs = {}
        for ap in np_.attribute:
            if ap.name in attrs:
                raise MalformedModelError(f"{where}: {here} has attribute '{ap.name}' twice")
            attrs[ap.name] = self.attr(ap, scope, f"{where}: {here} attribute '{ap.name}'")
        node = Node(np_.op_type, inputs, outs, domain=np_.domain, name=name, attributes=attrs,
                    overload=getattr(np_, "overload", ""))
        node.name_generated = not np_.name
        node.doc_string = np_.doc_string
        node.metadata_props = _props(getattr(np_, "metadata_props", ()))
        return node

    def attr(self, ap: onnx.AttributeProto, scope: Scope | None, where: str) -> Attr:
        t = ap.type or _guess_type(ap)
        attr = Attr(t, None, ap.ref_attr_name, ap.doc_string)
        if ap.ref_attr_name:
            return attr
        if t == A.FLOAT:
            attr.value = ap.f
        elif t == A.INT:
            attr.value = ap.i
        elif t == A.STRING:
            attr.value = ap.s
        elif t == A.TENSOR:
            attr.value = self.tensor(ap.t, where)
        elif t == A.GRAPH:
            attr.value = self.subgraph(ap.g, scope, where)
        elif t in (A.SPARSE_TENSOR, A.TYPE_PROTO):
            attr.value = _copy(ap.sparse_tensor if t == A.SPARSE_TENSOR else ap.tp)
        elif t == A.FLOATS:
            attr.value = list(ap.floats)
        elif t == A.INTS:
            attr.value = list(ap.ints)
        elif t == A.STRINGS:
            attr.value = list(ap.strings)
        elif t == A.TENSORS:
            attr.value = [self.tensor(tp, where) for tp in ap.tensors]
        elif t == A.GRAPHS:
            attr.value = [self.subgraph(gp, scope, where) for gp in ap.graphs]
        elif t in (A.SPARSE_TENSORS, A.TYPE_PROTOS):
            attr.value = [_copy(p) for p in (ap.sparse_tensors if t == A.SPARSE_TENSORS else ap.type_protos)]
        else:
            raise MalformedModelError(f"{where}: unknown attribute type {t}")
        return attr

    def subgraph(self, gp: onnx.GraphProto, scope: Scope | None, where: str) -> Graph:
        if scope is None:
            raise MalformedModelError(f"{where}: a function's default attribute cannot be a graph")
        g = self.body(f"{where} graph '{gp.name}'", gp.name, gp.input, gp.initializer,
                      gp.sparse_initializer, gp.node, gp.output, gp.value_info, scope)
        g.doc_string = gp.doc_string
        g.metadata_props = _props(gp.metadata_props)
        g.quantization_annotation = [_copy(a) for a in gp.quantization_annotation]
        return g

    # -- tensors ------------------------------------------------------------------------
    def tensor(self, tp: TensorProto, where: str) -> Tensor:
        if tp.data_location == TensorProto.EXTERNAL:
            return external_tensor(tp, self.base_dir, where)
        check_inline_tensor(tp, where)
        return ProtoTensor(tp)

    def sparse(self, sp: onnx.SparseTensorProto, graph: str) -> SparseTensor:
        where = f"{graph}: sparse initializer '{sp.values.name}'"
        values = self.tensor(sp.values, where)
        indices = self.tensor(sp.indices, where + " indices")
        nnz = values.shape[0] if values.shape else 0
        if len(values.shape) != 1 or indices.shape not in ((nnz,), (nnz, len(sp.dims))):
            raise MalformedModelError(
                f"{where}: values {list(values.shape)} and indices {list(indices.shape)} "
                f"do not describe a sparse tensor of shape {list(sp.dims)}")
        return SparseTensor(sp, values, indices)

    def _fresh(self, base: str, *taken: set[str]) -> str:
        """`base__k` for the smallest k not taken, counting on from the last k handed out
        for this base (so thousands of unnamed Relu nodes cost linear time)."""
        k = self._next_suffix.get(base, 1)
        while any(f"{base}__{k}" in t for t in taken):
            k += 1
        self._next_suffix[base] = k + 1
        return f"{base}__{k}"


def _node_names(nodes) -> set[str]:
    """Every node name in these nodes and the bodies inside them."""
    names = set()
    for np_ in nodes:
        names.add(np_.name)
        for ap in np_.attribute:
            for gp in ([ap.g] if ap.HasField("g") else []) + list(ap.graphs):
                names |= _node_names(gp.node)
    return names


def _sort(g: Graph, where: str) -> None:
    """Keep the given order if it is topological; otherwise sort stably; refuse cycles.
    A node that owns subgraphs depends on every outer value its bodies read."""
    position = {id(n): i for i, n in enumerate(g.nodes)}
    deps: list[list[int]] = []
    in_order = True
    for i, node in enumerate(g.nodes):
        d = [position[id(v.producer)] for v in _reads(node)
             if v.producer is not None and id(v.producer) in position]
        deps.append(d)
        in_order = in_order and all(j < i for j in d)
    if in_order:
        return
    import heapq
    waiting = [len(set(d)) for d in deps]
    users: list[list[int]] = [[] for _ in g.nodes]
    for i, d in enumerate(deps):
        for j in set(d):
            users[j].append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(g.nodes):
        # Every node left waits on another node left; follow them until one repeats.
        i, seen = next(i for i, w in enumerate(waiting) if w > 0), set()
        while i not in seen:
            seen.add(i)
            i = next(j for j in deps[i] if waiting[j] > 0)
        stuck = g.nodes[i]
        raise MalformedModelError(f"{where}: node '{stuck.name}' ({stuck.op_type}) is part of a cycle")
    g.nodes = [g.nodes[i] for i in order]


def _reads(node: Node) -> Iterable[Value]:
    yield from (v for v in node.inputs if v is not None)
    for sub in node.subgraphs():
        for inner in sub.walk():
            yield from (v for v in inner.inputs if v is not None)


def _typed(v: Value, vi: onnx.ValueInfoProto) -> Value:
    """Copy a ValueInfoProto's type, doc string and metadata onto a value."""
    if vi.doc_string:
        v.doc_string = vi.doc_string
    v.metadata_props.update(_props(getattr(vi, "metadata_props", ())))
    if not vi.HasField("type"):
        return v
    if vi.type.WhichOneof("value") == "tensor_type":  # denotations are not kept
        tt = vi.type.tensor_type
        v.dtype = tt.elem_type or None
        v.shape = tuple(_dim(d) for d in tt.shape.dim) if tt.HasField("shape") else None
        v.type = None
    else:
        v.type = _copy(vi.type)
    return v


def _dim(d) -> int | str | None:
    if d.HasField("dim_value"):
        return d.dim_value
    if d.HasField("dim_param"):
        return d.dim_param
    return None


def _guess_type(ap: onnx.AttributeProto) -> int:
    """Very old models leave AttributeProto.type unset; infer it from the field in use."""
    for field, t in (("f", A.FLOAT), ("i", A.INT), ("s", A.STRING), ("t", A.TENSOR), ("g", A.GRAPH)):
        if ap.HasField(field):
            return t
    for field, t in (("floats", A.FLOATS), ("ints", A.INTS), ("strings", A.STRINGS),
                     ("tensors", A.TENSORS), ("graphs", A.GRAPHS)):
        if len(getattr(ap, field)):
            return t
    return A.UNDEFINED


def _props(entries) -> dict[str, str]:
    return {e.key: e.value for e in entries}


def _copy(proto):
    out = type(proto)()
    out.CopyFrom(proto)
    return out
