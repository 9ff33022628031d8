"""Deterministic text form of the IR, for golden tests, debug dumps and diffs.

Names are printed as they are (lowering made them unique), attributes sorted, tensors of up
to 8 elements inline and larger ones as dtype, shape and a short content hash.
"""

from __future__ import annotations

import hashlib

import numpy as np
from onnx import AttributeProto as A

from .graph import Function, Graph, Model
from .node import Attr, Node
from .tensors import SparseTensor, Tensor, dtype_name
from .value import Value

INLINE_ELEMENTS = 8


def print_model(model: Model) -> str:
    lines = [f"model ir_version={model.ir_version} opset_import={_opsets(model.opset_imports)}"]
    for key, text in (("producer", f"{model.producer_name} {model.producer_version}".strip()),
                      ("domain", model.domain), ("doc", model.doc_string)):
        if text:
            lines.append(f"  {key}: {_str(text)}")
    if model.model_version:
        lines.append(f"  model_version: {model.model_version}")
    for key, value in sorted(model.metadata_props.items()):
        lines.append(f"  metadata {_str(key)}: {_short(value)}")
    if model.training_info:
        lines.append(f"  training_info: {len(model.training_info)} entries (kept as given)")
    lines += _graph(model.graph, "graph", 0)
    for f in model.functions:
        lines += _function(f)
    return "\n".join(lines) + "\n"


def print_graph(graph: Graph) -> str:
    return "\n".join(_graph(graph, "graph", 0)) + "\n"


def _function(f: Function) -> list[str]:
    head = f"function {f.domain}.{f.name}"
    if f.overload:
        head += f":{f.overload}"
    if f.attributes:
        head += f"<{', '.join(f.attributes)}>"
    lines = [head + f" opset_import={_opsets(f.opset_imports)}"]
    for name, a in sorted(f.attribute_defaults.items()):
        lines.append(f"  default {name}={_attr(a, 1)}")
    return lines + _graph(f.graph, "body", 0)


def _graph(g: Graph, kind: str, depth: int) -> list[str]:
    pad = "  " * depth
    ins = ", ".join(_decl(v) for v in g.inputs)
    lines = [f"{pad}{kind} {_str(g.name)} ({ins}) {{"]
    for name, v in g.initializers.items():
        role = "default" if v.is_graph_input else "init"
        lines.append(f"{pad}  {role} %{v.name} = {_tensor(v.tensor)}")
    for node in g.nodes:
        lines += _node(node, depth + 1)
    lines.append(f"{pad}  return {', '.join(_decl(v) for v in g.outputs)}")
    lines.append(f"{pad}}}")
    return lines


def _node(n: Node, depth: int) -> list[str]:
    pad = "  " * depth
    outs = ", ".join(_decl(v) if v is not None else "_" for v in n.outputs)
    op = f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
    if n.overload:
        op += f":{n.overload}"
    args = ", ".join(f"%{v.name}" if v is not None else "_" for v in n.inputs)
    simple = {k: a for k, a in sorted(n.attributes.items()) if not a.graphs()}
    attrs = " {" + ", ".join(f"{k}={_attr(a, depth)}" for k, a in simple.items()) + "}" if simple else ""
    lines = [f"{pad}{outs} = {op}({args}){attrs}  # {n.name}"]
    for k, a in sorted(n.attributes.items()):
        for i, sub in enumerate(a.graphs()):
            label = k if a.type == A.GRAPH else f"{k}[{i}]"
            lines += _graph(sub, label, depth + 1)
    return lines


def _decl(v: Value) -> str:
    return f"%{v.name}: {format_type(v)}"


def format_type(v: Value) -> str:
    if v.type is not None:
        return v.type.WhichOneof("value") or "?"
    if v.dtype is None:
        return "?"
    if v.shape is None:
        return f"{dtype_name(v.dtype)}[...]"
    return f"{dtype_name(v.dtype)}[{','.join('?' if d is None else str(d) for d in v.shape)}]"


def _attr(a: Attr, depth: int) -> str:
    if a.ref_attr_name:
        return f"@{a.ref_attr_name}"
    t, v = a.type, a.value
    if t == A.FLOAT:
        return _float(v)
    if t == A.STRING:
        return _str(v)
    if t == A.FLOATS:
        return "[" + ", ".join(_float(x) for x in v) + "]"
    if t == A.STRINGS:
        return "[" + ", ".join(_str(x) for x in v) + "]"
    if t == A.TENSOR:
        return _tensor(v)
    if t == A.TENSORS:
        return "[" + ", ".join(_tensor(x) for x in v) + "]"
    if t in (A.SPARSE_TENSOR, A.TYPE_PROTO, A.SPARSE_TENSORS, A.TYPE_PROTOS):
        blob = b"".join(p.SerializeToString(deterministic=True) for p in (v if isinstance(v, list) else [v]))
        return f"<{A.AttributeType.Name(t).lower()} sha:{hashlib.sha256(blob).hexdigest()[:12]}>"
    return str(v)


def _tensor(t: Tensor) -> str:
    head = f"{dtype_name(t.dtype)}[{','.join(map(str, t.shape))}]"
    if isinstance(t, SparseTensor):
        head = "sparse " + head
    if t.numel <= INLINE_ELEMENTS:
        return f"{head} {_values(t.numpy())}"
    where = " external" if t.is_external else ""
    return f"{head}{where} <{format_bytes(t.nbytes)} sha:{t.fingerprint()}>"


def _values(arr: np.ndarray) -> str:
    flat = np.asarray(arr).ravel()
    if flat.dtype.kind == "f":
        items = [_float(float(x)) for x in flat]
    elif flat.dtype.kind in "OSU":
        items = [_str(x) for x in flat]
    elif flat.dtype.kind in "iub":
        items = [str(x.item() if hasattr(x, "item") else x) for x in flat]
    else:
        items = [str(x) for x in flat]
    return "[" + ", ".join(items) + "]"


def _float(x: float) -> str:
    return repr(float(np.float32(x))) if np.isfinite(x) else str(float(x))


def _str(s) -> str:
    if isinstance(s, bytes):
        s = s.decode("utf-8", "backslashreplace")
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _short(s: str, limit: int = 60) -> str:
    return _str(s) if len(s) <= limit else _str(s[:limit]) + f"... ({len(s)} chars)"


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _opsets(opsets: dict[str, int]) -> str:
    return "{" + ", ".join(f"{_str(d)}: {v}" for d, v in sorted(opsets.items())) + "}"


__all__ = ["print_model", "print_graph"]
