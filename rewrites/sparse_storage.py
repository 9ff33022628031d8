"""Store mostly-zero float initializers as COO sparse initializers (exact: same numbers).

A pruned weight is only smaller on disk when its zeros are left out: a `sparse_initializer`
holds the nonzero values and their int64 positions, which pays from about 2/3 zeros in
float32. onnxruntime makes it dense again at load, so this is a file-size feature only.

Indices are 1-D linear positions in ascending order (the [NNZ] form): onnx.checker and
onnxruntime accept it as they do the [NNZ, rank] form, and it is `rank` times smaller.
onnx's shape inference types a sparse initializer as a sparse tensor, which dense ops
reject: this pass runs last, after every pass that infers shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import SparseTensorProto, TensorProto, numpy_helper

from ir import Model, ProtoTensor, SparseTensor, Value

from .base import Change, ChangeLog, Pass, PassResult, Rewriter

FLOATS = (TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.DOUBLE)
INDEX_BYTES = 8  # int64


@dataclass
class StoreSparse(Pass):
    """Main-graph float initializers (not graph inputs) whose values plus indices take fewer
    bytes than the dense data become `ir.SparseTensor`s, emitted as sparse initializers."""

    name = "store-sparse"
    exact = True

    def run(self, model: Model) -> PassResult:
        log = ChangeLog()
        rw = Rewriter(model, log, self.name)
        changed = False
        for value in list(model.graph.initializers.values()):
            if _storable(value):
                changed |= _store(rw, value)
        return PassResult(changed, log)


def _storable(value: Value) -> bool:
    t = value.tensor
    return (t is not None and not value.is_graph_input and not isinstance(t, SparseTensor)
            and t.dtype in FLOATS and len(t.shape) > 0 and t.numel > 0)


def sparse_bytes(nnz: int, itemsize: int) -> int:
    """Bytes of the values and linear indices of `nnz` stored elements."""
    return nnz * (itemsize + INDEX_BYTES)


def _store(rw: Rewriter, value: Value) -> bool:
    dense = value.tensor.numpy()
    flat = dense.reshape(-1)
    # -0.0 is kept as a value: densifying gives +0.0, and the pass is exact to the bit.
    keep = np.flatnonzero((flat != 0) | np.signbit(flat))
    before, after = value.tensor.nbytes, sparse_bytes(keep.size, flat.dtype.itemsize)
    if after >= before:
        return False
    proto = SparseTensorProto()
    proto.values.CopyFrom(numpy_helper.from_array(flat[keep], value.name))
    proto.indices.CopyFrom(numpy_helper.from_array(keep.astype(np.int64)))
    proto.dims.extend(value.tensor.shape)
    source = value.tensor.source_proto
    if source is not None and source.doc_string:
        proto.values.doc_string = source.doc_string
    # Same value, other storage: readers, name and value_info stay as they are.
    rw.log.record(Change(rw.rule, "match", f"%{value.name}", ""))  # one rewrite per tensor stored
    rw.set_tensor(value, SparseTensor(proto, ProtoTensor(proto.values), ProtoTensor(proto.indices)),
                  f"sparse: {before} -> {after} bytes, {keep.size} of {flat.size} nonzero")
    return True


__all__ = ["StoreSparse", "sparse_bytes"]
