"""Weight-only low-bit MatMul: the constant weights of MatMul and Gemm stored as 8-, 4- or
2-bit integers in blocks of `block_size` input features, each block with its own scale
(and zero point when asymmetric); activations stay float.

Two forms, both run by onnxruntime's CPU EP as its MatMulNBits kernel:
- "nbits": com.microsoft MatMulNBits (B packed [N, blocks, block_size * bits / 8], scales
  [N, blocks], a Gemm's bias as its bias input), with accuracy_level 4 (activations
  quantized to int8 inside the kernel: at 2 and 8 bits level 0 takes a path 30-100x slower).
  Any opset; adds the com.microsoft import.
- "dq": a blocked DequantizeLinear of the int weight [K, N] before the MatMul (standard
  ONNX: int4 and int8 blocks need opset 21, int2 opset 25; a lower opset is refused, the
  compiler upgrades first). onnxruntime fuses the pair into MatMulNBits at load; a Gemm
  becomes MatMul (+ Add of its bias) so the pair forms.

Rounding: "rtn" (nearest), "gptq" (rewrites/gptq.py) or "adaround" (rewrites/adaround.py);
the last two need `stats`, the input statistics of every target from calibration (node
name -> calibration.gram.InputStats), which the compiler gathers. Embeddings (constant
[V, D] tables read only by Gather on axis 0) optionally become int4 blocks along D: com.microsoft
GatherBlockQuantized for "nbits", DequantizeLinear -> Gather for "dq" (not fused by
onnxruntime: the whole table is dequantized on every run).

Main graph only; float32 weights only."""

from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from onnx import AttributeProto, TensorProto, helper

from calibration.gram import InputStats
from ir import Attr, CompileError, Model, Node, Value

from .base import Change, ChangeLog, Pass, PassResult, Rewriter
from .block_quant import BITS, block_params, expand, nbits_weight, nbits_zero_points, pack, rtn, signed_range
from .gptq import gptq, inverse_factor
from .patterns import attr, check_exclude, default_opset

FORMATS = ("nbits", "dq")
ROUNDINGS = ("rtn", "gptq", "adaround")
MS = "com.microsoft"
DQ_OPSET = {8: 21, 4: 21, 2: 25}  # blocked DequantizeLinear; int2 arrived in opset 25
EMBEDDING_BITS = 4
ACCURACY_LEVEL = 4
_INT_TYPES = {8: np.int8, 4: ml_dtypes.int4, 2: ml_dtypes.int2}


@dataclass(frozen=True)
class Target:
    """A MatMul/Gemm whose weight goes low-bit."""

    node: Node
    weight: Value
    transposed: bool  # the weight is stored [N, K] (Gemm transB=1)
    alpha: float = 1.0
    bias: np.ndarray | None = None  # [N] float32: a Gemm's beta * C

    def matrix(self) -> np.ndarray:
        """The weight as [N, K] float64 (rows: outputs), alpha folded in."""
        b = self.weight.const.numpy().astype(np.float64)
        return (b if self.transposed else b.T) * self.alpha


def targets(model: Model, exclude=()) -> tuple[list[Target], list[tuple[str, str]]]:
    """The MatMul/Gemm nodes of the main graph whose constant weight can go low-bit, and
    (node or value, reason) for the ones that cannot."""
    found, skipped = [], []
    for node in model.graph.nodes:
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        if node.name in exclude or node.op_type in exclude:
            skipped.append((node.name, "excluded"))
            continue
        t = _target(node)
        if isinstance(t, str):
            if t:
                skipped.append((node.name, t))
        else:
            found.append(t)
    # A weight also read elsewhere (a tied embedding, another op) keeps its float copy.
    readers = {}
    for t in found:
        readers.setdefault(id(t.weight), set()).add(id(t.node))
    kept = []
    for t in found:
        other = [n for n, i in t.weight.uses if id(n) not in readers[id(t.weight)] or i != 1]
        if other:
            skipped.append((t.node.name, f"weight %{t.weight.name} is also read by {other[0].name}"))
        else:
            kept.append(t)
    return kept, skipped


def _target(node: Node) -> Target | str:
    """A Target, a reason not to (""): not a constant-weight linear layer at all)."""
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return ""
    a, b = node.inputs[0], node.inputs[1]
    w = b.const
    if w is None:
        return ""
    if w.dtype != TensorProto.FLOAT or a.dtype not in (None, TensorProto.FLOAT):
        return "not float32"
    if len(w.shape) != 2 or not w.numel:
        return f"weight of shape {list(w.shape)} is not a 2-D matrix"
    if a.shape is not None and len(a.shape) < 2 and node.op_type == "MatMul":
        return "1-D input"
    if node.op_type == "MatMul":
        return Target(node, b, transposed=False)
    if attr(node, "transA", 0):
        return "Gemm with transA"
    transposed = bool(attr(node, "transB", 0))
    alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
    n = w.shape[0] if transposed else w.shape[1]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    bias = None
    if c is not None:
        if c.const is None or c.const.dtype != TensorProto.FLOAT or \
                tuple(c.const.shape) not in ((), (1,), (n,), (1, n), (1, 1)):
            return "bias is not a constant of one value per output"
        bias = np.broadcast_to(c.const.numpy().reshape(-1) * beta, (n,)).astype(np.float32)
    if not math.isfinite(alpha):
        return "alpha is not finite"
    return Target(node, b, transposed, alpha, bias)


def embedding_tables(model: Model, exclude=()) -> tuple[list[tuple[Value, list[Node]]], list[tuple[str, str]]]:
    """Constant float32 [V, D] tables read only by Gathers on axis 0 (not excluded)."""
    found, skipped = [], []
    seen = set()
    for node in model.graph.nodes:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or node.inputs[0] is None:
            continue
        table = node.inputs[0]
        t = table.const
        if t is None or id(table) in seen:
            continue
        seen.add(id(table))
        readers = [n for n, _ in table.uses]
        reason = None
        if t.dtype != TensorProto.FLOAT or len(t.shape) != 2:
            reason = "not a float32 matrix"
        elif any(n.op_type != "Gather" or n.domain not in ("", "ai.onnx") or attr(n, "axis", 0) != 0
                 or n.inputs[0] is not table or n.inputs[1] is table for n, _ in table.uses):
            reason = "also read by another op than Gather on axis 0"
        elif any(n.name in exclude or "Gather" in exclude for n in readers):
            reason = "excluded"
        if reason:
            skipped.append((f"%{table.name}", reason))
        else:
            found.append((table, readers))
    return found, skipped


@dataclass
class WeightOnly(Pass):
    """See the module docstring. `exclude` holds node names or op types (MatMul, Gemm,
    Gather); `symmetric=False` adds zero points; `damp` is GPTQ's ridge."""

    name = "weight-only"
    exact = False

    bits: int = 4
    block_size: int = 32
    format: str = "nbits"
    rounding: str = "rtn"
    symmetric: bool = True
    embeddings: bool = False
    exclude: tuple[str, ...] = ()
    stats: dict[str, InputStats] | None = None
    damp: float = 0.01
    accuracy_level: int = ACCURACY_LEVEL
    search: bool = True  # block ranges by squared error (block_quant.block_params)

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise CompileError(f"weight-only: bits must be one of 2, 4, 8, got {self.bits!r}")
        bs = self.block_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 16 or bs & (bs - 1):
            raise CompileError(f"weight-only: block size must be a power of two >= 16, got {bs!r}")
        if self.format not in FORMATS:
            raise CompileError(f"weight-only: unknown format '{self.format}' (expected nbits or dq)")
        if self.rounding not in ROUNDINGS:
            raise CompileError(f"weight-only: unknown rounding '{self.rounding}' (expected rtn, gptq or adaround)")
        self.exclude = (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude)

    def run(self, model: Model) -> PassResult:
        log = ChangeLog()
        rw = Rewriter(model, log, self.name)
        check_exclude(model, self.exclude, "weight-only", ("MatMul", "Gemm", "Gather"))
        found, skipped = targets(model, self.exclude)
        if self.format == "dq" and self.bits == 2:
            found, wrong = _fused_correctly(found)
            skipped += wrong
        tables, skipped_tables = embedding_tables(model, self.exclude) if self.embeddings else ([], [])
        if self.format == "dq" and (found or tables):
            need = max([DQ_OPSET[self.bits]] * bool(found) + [DQ_OPSET[EMBEDDING_BITS]] * bool(tables))
            have = default_opset(model.opset_imports)
            if have < need:
                raise CompileError(f"weight-only: {self.bits if found else EMBEDDING_BITS}-bit blocked "
                                   f"DequantizeLinear needs opset {need}, the model has opset {have} "
                                   "(use the nbits format, or upgrade the model)")
        for target, reason in skipped + skipped_tables:
            log.record(Change(self.name, "skip", target, reason))
        groups: dict[tuple, list[Target]] = {}
        for t in found:
            groups.setdefault((id(t.weight), t.transposed, t.alpha), []).append(t)
        self._factors = {}  # id(Gram) -> its inverse factor, for GPTQ
        for group in groups.values():
            codes, scale, zero = self._round(group, log)
            if self.format == "nbits":
                self._emit_nbits(rw, group, codes, scale, zero)
            else:
                self._emit_dq(rw, group, codes, scale, zero)
        for table, readers in tables:
            self._embedding(rw, table, readers)
        if found or tables:
            self._imports(model, log)
        return PassResult(bool(found or tables), log)

    # -- rounding -----------------------------------------------------------------------------

    def _round(self, group: list[Target], log: ChangeLog):
        """(codes [N, K], scale [N, nb], zero [N, nb]) of the group's shared weight."""
        w = group[0].matrix()
        where = group[0].node.name
        if self.rounding == "rtn":
            return rtn(w, self.bits, self.block_size, self.symmetric, self.search)
        gram = self._gram(group)
        if gram is None:
            log.record(Change(self.name, "note", where, f"{w.shape[1]} input features: too many for a Gram "
                                                        "matrix, rounded to nearest"))
            return rtn(w, self.bits, self.block_size, self.symmetric, self.search)
        if self.rounding == "gptq":
            # Layers reading one tensor (Q, K, V) share its Gram: factor it once.
            if id(gram) not in self._factors:
                self._factors[id(gram)] = inverse_factor(gram, self.damp, where)
            return gptq(w, gram, self.bits, self.block_size, self.symmetric, damp=self.damp,
                        search=self.search, where=where, factor=self._factors[id(gram)])
        return self._adaround(w, gram, where)

    def _gram(self, group: list[Target]) -> np.ndarray | None:
        """E[x x^T] over the rows of every reader of the weight (their errors add up)."""
        if len(group) == 1:  # the stats' own array: shared by the readers of one tensor
            s = (self.stats or {}).get(group[0].node.name)
            if s is not None:
                return s.gram
        total, count = None, 0
        for t in group:
            s = (self.stats or {}).get(t.node.name)
            if s is None:
                raise CompileError(f"weight-only: rounding '{self.rounding}' has no input statistics for "
                                   f"'{t.node.name}' (it needs calibration data)")
            if s.gram is None:
                return None
            total = s.gram * s.count if total is None else total + s.gram * s.count
            count += s.count
        return total / count

    def _adaround(self, w: np.ndarray, gram: np.ndarray, where: str):
        from .adaround import adaround  # the per-weight rounding search

        scale, zero = block_params(w, self.bits, self.block_size, self.symmetric, self.search)
        f = w.shape[1]
        s, z = expand(scale, self.block_size, f), expand(zero, self.block_size, f)
        # A symmetric block with a negative scale s is the block |s| * (q' + 1), q' = -q - 1:
        # adaround takes positive scales, and q' stays in [qmin, qmax].
        neg = s < 0
        qmin, qmax = signed_range(self.bits)
        codes = adaround(w, gram, np.abs(s), np.where(neg, -1, z), qmin, qmax, where=where).astype(np.int64)
        return np.where(neg, -codes - 1, codes), scale, zero

    # -- emission -----------------------------------------------------------------------------

    def _emit_nbits(self, rw: Rewriter, group: list[Target], codes, scale, zero) -> None:
        graph = group[0].node.graph
        base = group[0].weight.name
        n, k = codes.shape
        packed = rw.add_initializer(graph, f"{base}_q{self.bits}", nbits_weight(codes, self.bits, self.block_size))
        scales = rw.add_initializer(graph, f"{base}_scales", scale.astype(np.float32))
        zps = None if self.symmetric else \
            rw.add_initializer(graph, f"{base}_zero_points", nbits_zero_points(zero, self.bits))
        attrs = {"K": _int(k), "N": _int(n), "bits": _int(self.bits), "block_size": _int(self.block_size),
                 "accuracy_level": _int(self.accuracy_level)}
        for t in group:
            node = t.node
            inputs = [node.inputs[0], packed, scales, zps]
            if t.bias is not None:
                inputs += [None, rw.add_initializer(graph, f"{node.name}_bias", t.bias)]
            while inputs[-1] is None:
                inputs.pop()
            _match(rw, "WeightOnlyMatMul", node, f"{node.op_type} [{k}x{n}] -> {self.bits}-bit MatMulNBits")
            new = rw.add_node(graph, node, "MatMulNBits", inputs, domain=MS, name=f"{node.name}_nbits",
                              attributes=dict(attrs))
            self._replace(rw, node, new.outputs[0])

    def _emit_dq(self, rw: Rewriter, group: list[Target], codes, scale, zero) -> None:
        graph = group[0].node.graph
        first = min((t.node for t in group), key=graph.nodes.index)
        base = group[0].weight.name
        n, k = codes.shape
        dq = self._dequantize(rw, first, base, codes.T, scale.T, zero.T, axis=0, bits=self.bits)
        for t in group:
            node = t.node
            _match(rw, "WeightOnlyMatMul", node, f"{node.op_type} [{k}x{n}] -> {self.bits}-bit DequantizeLinear")
            if node.op_type == "MatMul":
                old = node.inputs[1]
                rw.set_input(node, 1, dq)
                _drop_if_unused(rw, graph, old)
                if any(n.op_type in ("Relu", "Clip") for n, _ in node.outputs[0].uses):
                    # onnxruntime 1.32 leaves DQ -> MatMul -> Relu unfused (it keeps a
                    # Relu/Clip for a Q that never comes): the DQ then runs on every call.
                    rw.log.record(Change(self.name, "note", node.name, "followed by Relu/Clip: onnxruntime "
                                                                       "does not fuse it, the nbits format does"))
                continue
            mm = rw.add_node(graph, node, "MatMul", [node.inputs[0], dq], name=f"{node.name}_matmul")
            out = mm.outputs[0]
            if t.bias is not None:
                bias = rw.add_initializer(graph, f"{node.name}_bias", t.bias)
                out = rw.add_node(graph, node, "Add", [out, bias], name=f"{node.name}_bias_add").outputs[0]
            self._replace(rw, node, out)

    def _dequantize(self, rw: Rewriter, before: Node, base: str, codes, scale, zero, axis: int, bits: int) -> Value:
        """DequantizeLinear(int codes, scale, zero) blocked along `axis`, placed before `before`."""
        graph = before.graph
        kind = _INT_TYPES[bits]
        inputs = [rw.add_initializer(graph, f"{base}_q{bits}", codes.astype(kind)),
                  rw.add_initializer(graph, f"{base}_scales", scale.astype(np.float32))]
        if not self.symmetric:
            inputs.append(rw.add_initializer(graph, f"{base}_zero_points", zero.astype(kind)))
        dq = rw.add_node(graph, before, "DequantizeLinear", inputs, name=f"{base}_DequantizeLinear",
                         attributes={"axis": _int(axis), "block_size": _int(self.block_size)})
        shape = tuple(codes.shape)
        rw.set_type(dq.outputs[0], TensorProto.FLOAT, shape)
        return dq.outputs[0]

    def _embedding(self, rw: Rewriter, table: Value, readers: list[Node]) -> None:
        graph = readers[0].graph
        bits = EMBEDDING_BITS
        data = table.const.numpy().astype(np.float64)
        v, d = data.shape
        if self.format == "nbits" and d % 2:
            rw.log.record(Change(self.name, "skip", f"%{table.name}", f"odd width {d}: GatherBlockQuantized "
                                                                       "packs two codes a byte"))
            return
        codes, scale, zero = rtn(data, bits, self.block_size, self.symmetric, self.search)
        if self.format == "dq":
            first = min(readers, key=graph.nodes.index)
            dq = self._dequantize(rw, first, table.name, codes, scale, zero, axis=1, bits=bits)
            for node in readers:
                _match(rw, "WeightOnlyGather", node, f"Gather [{v}x{d}] -> {bits}-bit DequantizeLinear")
                rw.set_input(node, 0, dq)
        else:
            qmin, _ = signed_range(bits)
            packed = rw.add_initializer(graph, f"{table.name}_q{bits}", pack(codes - qmin, bits))
            scales = rw.add_initializer(graph, f"{table.name}_scales", scale.astype(np.float32))
            inputs_tail = [scales] if self.symmetric else \
                [scales, rw.add_initializer(graph, f"{table.name}_zero_points", pack(zero - qmin, bits))]
            for node in readers:
                _match(rw, "WeightOnlyGather", node, f"Gather [{v}x{d}] -> {bits}-bit GatherBlockQuantized")
                new = rw.add_node(graph, node, "GatherBlockQuantized", [packed, node.inputs[1], *inputs_tail],
                                  domain=MS, name=f"{node.name}_quantized",
                                  attributes={"gather_axis": _int(0), "quantize_axis": _int(1),
                                              "block_size": _int(self.block_size), "bits": _int(bits)})
                self._replace(rw, node, new.outputs[0])
        _drop_if_unused(rw, graph, table)

    @staticmethod
    def _replace(rw: Rewriter, node: Node, new: Value) -> None:
        old, graph = node.outputs[0], node.graph
        rw.set_type(new, old.dtype if old.dtype is not None else TensorProto.FLOAT, old.shape)
        inputs = [v for v in node.inputs if v is not None]
        rw.replace_uses(old, new)
        rw.remove_node(node)
        for v in inputs:
            _drop_if_unused(rw, graph, v)

    def _imports(self, model: Model, log: ChangeLog) -> None:
        """The com.microsoft import (nbits), and an IR version that knows int4/int2 (dq)."""
        if self.format == "nbits":
            if MS not in model.opset_imports:
                model.opset_imports[MS] = 1
                log.record(Change(self.name, "set-opset", MS, "1"))
            return
        opset = default_opset(model.opset_imports)
        need = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
        if model.ir_version < need:
            log.record(Change(self.name, "set-ir-version", "model", f"{model.ir_version} -> {need}"))
            model.ir_version = need


def _fused_correctly(found: list[Target]) -> tuple[list[Target], list[tuple[str, str]]]:
    """onnxruntime 1.32 turns an int2 DequantizeLinear -> MatMul whose N is not a multiple
    of 4 into a MatMulNBits computing something else (the int2 rows are packed along N):
    such MatMuls stay float in the "dq" form."""
    ok, wrong = [], []
    for t in found:
        n = t.weight.const.shape[0 if t.transposed else 1]
        if n % 4:
            wrong.append((t.node.name, f"N = {n} is not a multiple of 4: onnxruntime's fusion of int2 "
                                       "DequantizeLinear miscomputes it (the nbits format does not)"))
        else:
            ok.append(t)
    return ok, wrong


def _match(rw: Rewriter, rule: str, node: Node, detail: str) -> None:
    """One low-bit node, counted per rule by the change log (the report's count)."""
    rw.log.record(Change(rule, "match", node.name, detail))


def _int(v: int) -> Attr:
    return Attr(AttributeProto.INT, int(v))


def _drop_if_unused(rw: Rewriter, graph, v: Value) -> None:
    """Remove a main-graph initializer nothing reads any more."""
    if not v.uses and graph.initializers.get(v.name) is v and not v.is_graph_input \
            and id(v) not in rw.graph_output_ids():
        rw.remove_initializer(graph, v)
