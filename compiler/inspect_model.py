"""`onnxcc inspect`: what is in a model, as text. Pure: takes an IR model, returns lines."""

from __future__ import annotations

from collections import Counter

from ir import Graph, Model
from ir.printer import format_bytes
from ir.printer import format_type
from ir.tensors import dtype_name


def describe(model: Model, label: str, file_bytes: int | None = None) -> str:
    size = f"  ({format_bytes(file_bytes)})" if file_bytes is not None else ""
    opsets = ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in sorted(model.opset_imports.items()))
    producer = f"{model.producer_name} {model.producer_version}".strip() or "-"
    lines = [f"model: {label}{size}",
             f"ir_version {model.ir_version}, producer {producer}, opsets: {opsets}", "inputs:"]
    lines += [f"  {v.name}  {format_type(v)}" for v in model.graph.inputs if v.tensor is None] or ["  (none)"]
    overridable = [v for v in model.graph.inputs if v.tensor is not None]
    if overridable:
        lines.append(f"  (+{len(overridable)} inputs with initializer defaults)")
    lines.append("outputs:")
    lines += [f"  {v.name}  {format_type(v)}" for v in model.graph.outputs]

    nodes = list(model.graph.walk())
    in_subgraphs = len(nodes) - len(model.graph.nodes)
    lines.append(f"nodes: {len(nodes)}" + (f" ({in_subgraphs} in subgraphs)" if in_subgraphs else ""))
    ops = Counter(f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in nodes)
    lines += [f"  {op:<24} {count}" for op, count in sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))]

    lines += _parameters(model)
    subgraphs = [(n, name, g) for n in nodes for name, a in n.attributes.items() for g in a.graphs()]
    if subgraphs:
        lines.append(f"subgraphs: {len(subgraphs)}")
        lines += [f"  {n.op_type} '{n.name}'.{name}: {_count(g)} nodes" for n, name, g in subgraphs]
    if model.functions:
        lines.append(f"functions: {len(model.functions)}")
        lines += [f"  {f.domain}.{f.name}: {len(f.graph.nodes)} nodes" for f in model.functions]
    if model.metadata_props:
        lines.append("metadata keys:")
        lines += [f"  {k}  ({len(v)} chars)" for k, v in model.metadata_props.items()]
    return "\n".join(lines) + "\n"


def _parameters(model: Model) -> list[str]:
    """Constant tensors (initializers and Constant nodes, subgraphs too) by dtype."""
    count: Counter = Counter()
    nbytes: Counter = Counter()
    tensors = 0
    for g in model.graphs():
        for v in list(g.initializers.values()) + [o for n in g.nodes for o in n.outputs if o is not None]:
            t = v.tensor if v.tensor is not None else v.const
            if t is None:
                continue
            tensors += 1
            count[t.dtype] += t.numel
            nbytes[t.dtype] += t.nbytes
    lines = [f"parameters: {sum(count.values()):,} in {tensors} tensors, {format_bytes(sum(nbytes.values()))}"]
    for dtype in sorted(count, key=lambda d: -nbytes[d]):
        lines.append(f"  {dtype_name(dtype):<10} {count[dtype]:>14,}  {format_bytes(nbytes[dtype])}")
    return lines


def _count(g: Graph) -> int:
    return sum(1 for _ in g.walk())
