"""Constant tensor data, loaded only when asked for.

Three sources: a TensorProto stored in the model file, bytes in an external data file
(memory-mapped on demand, streamed in chunks when copied), and numpy arrays made by passes.
Emission reads `to_proto()` for inline data and `iter_bytes()` for external data, so a big
external weight is never held in memory whole.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from .errors import MalformedModelError

CHUNK = 16 << 20  # bytes read at a time when streaming external data

# Element width in bits of the packed ONNX types; every other type is 8 * itemsize.
_PACKED_BITS = {
    TensorProto.UINT4: 4, TensorProto.INT4: 4, TensorProto.FLOAT4E2M1: 4,
    TensorProto.UINT2: 2, TensorProto.INT2: 2,
}
for _name, _bits in (("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6)):
    if hasattr(TensorProto, _name):
        _PACKED_BITS[getattr(TensorProto, _name)] = _bits

# Which typed field holds each data type, and how many entries one element takes.
_FIELD_OF = {
    TensorProto.FLOAT: ("float_data", 1), TensorProto.COMPLEX64: ("float_data", 2),
    TensorProto.DOUBLE: ("double_data", 1), TensorProto.COMPLEX128: ("double_data", 2),
    TensorProto.INT64: ("int64_data", 1), TensorProto.STRING: ("string_data", 1),
    TensorProto.UINT32: ("uint64_data", 1), TensorProto.UINT64: ("uint64_data", 1),
}


def dtype_name(dtype: int) -> str:
    """Short lower-case name of an ONNX element type, e.g. 'float32' or 'int4'."""
    if dtype == TensorProto.FLOAT:
        return "float32"
    if dtype == TensorProto.DOUBLE:
        return "float64"
    if dtype == TensorProto.FLOAT16:
        return "float16"
    try:
        return TensorProto.DataType.Name(dtype).lower()
    except ValueError:
        return f"dtype{dtype}"


def np_dtype(dtype: int) -> np.dtype:
    return helper.tensor_dtype_to_np_dtype(dtype)


def storage_bytes(dtype: int, numel: int) -> int | None:
    """Bytes of `numel` elements in raw/external form; None for strings (no raw form)."""
    if dtype == TensorProto.STRING:
        return None
    bits = _PACKED_BITS.get(dtype)
    if bits is not None:
        return math.ceil(numel * bits / 8)
    return numel * np_dtype(dtype).itemsize


def _check_dtype(dtype: int, where: str) -> None:
    if dtype == TensorProto.UNDEFINED or dtype not in TensorProto.DataType.values():
        raise MalformedModelError(f"{where}: unknown data type {dtype}")


class Tensor:
    """Base class: dtype (TensorProto code), shape (tuple of ints) and lazily loaded data."""

    dtype: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return storage_bytes(self.dtype, self.numel) or 0

    @property
    def is_external(self) -> bool:
        return False

    @property
    def source_proto(self) -> TensorProto | None:
        """The TensorProto this tensor was read from (its name and doc string are kept on
        emission), or None for tensors made in memory."""
        return getattr(self, "proto", None)

    def numpy(self) -> np.ndarray:
        raise NotImplementedError

    def to_proto(self, name: str) -> TensorProto:
        """An inline TensorProto named `name` (data loaded into memory)."""
        raise NotImplementedError

    def iter_bytes(self) -> Iterator[bytes]:
        """The raw little-endian bytes, in chunks (used to write external data). Typed
        fields are re-encoded through from_array, which packs 4- and 2-bit types as
        raw_data requires (to_array unpacks them to a byte each)."""
        proto = self.to_proto("")
        if not proto.HasField("raw_data"):
            proto = numpy_helper.from_array(numpy_helper.to_array(proto))
        yield proto.raw_data

    def copy_into(self, out: BinaryIO) -> None:
        """Append the raw bytes to a file opened for writing."""
        for chunk in self.iter_bytes():
            out.write(chunk)

    def fingerprint(self) -> str:
        """Short content hash for the printer. Exact up to 16 MiB; above, a hash of 64
        evenly spaced 64 KiB windows so a dump of a huge model stays fast."""
        h = hashlib.sha256()
        if self.dtype == TensorProto.STRING:
            for s in self.numpy().ravel():
                h.update(s if isinstance(s, bytes) else str(s).encode())
        elif self.nbytes <= CHUNK:
            for chunk in self.iter_bytes():
                h.update(chunk)
        else:
            h.update(self._sample_windows())
        return h.hexdigest()[:12]

    def _sample_windows(self) -> bytes:
        data = b"".join(self.iter_bytes())
        step = len(data) // 64
        return b"".join(data[i * step: i * step + (64 << 10)] for i in range(64))


class ProtoTensor(Tensor):
    """A tensor stored inside the model file; the proto is kept so emission is exact."""

    def __init__(self, proto: TensorProto):
        self.proto = proto
        self.dtype = proto.data_type
        self.shape = tuple(proto.dims)

    def numpy(self) -> np.ndarray:
        p = self.proto
        if p.HasField("raw_data") and p.data_type not in _PACKED_BITS and p.data_type != TensorProto.STRING:
            # A read-only view of the protobuf's bytes: no copy.
            arr = np.frombuffer(p.raw_data, dtype=np_dtype(p.data_type).newbyteorder("<"))
            return arr.astype(arr.dtype.newbyteorder("="), copy=False).reshape(self.shape)
        return numpy_helper.to_array(p)

    def to_proto(self, name: str) -> TensorProto:
        out = TensorProto()
        out.CopyFrom(self.proto)
        out.name = name
        return out

    def iter_bytes(self) -> Iterator[bytes]:
        if self.proto.HasField("raw_data"):
            yield self.proto.raw_data
        else:
            yield from super().iter_bytes()



class ExternalTensor(Tensor):
    """Bytes [offset, offset+length) of a file beside the model; mapped, never copied whole."""

    def __init__(self, path: Path, offset: int, dtype: int, shape: tuple[int, ...], proto: TensorProto):
        self.path = path
        self.offset = offset
        self.dtype = dtype
        self.shape = shape
        self._template = proto  # keeps doc_string / metadata of the original proto
        self._held: bytes | None = None  # the bytes, once the file they were in is replaced

    @property
    def is_external(self) -> bool:
        return self._held is None

    @property
    def source_proto(self) -> TensorProto:
        return self._template

    def hold(self, data: bytes) -> None:
        """Keep the (small) data in memory: its file is being replaced by one without it."""
        self._held = data

    def numpy(self) -> np.ndarray:
        if self.dtype in _PACKED_BITS:
            return numpy_helper.to_array(self.to_proto(""))
        if self.numel == 0:
            return np.zeros(self.shape, np_dtype(self.dtype))
        if self._held is not None:
            arr = np.frombuffer(self._held, dtype=np_dtype(self.dtype).newbyteorder("<"))
            return arr.astype(arr.dtype.newbyteorder("="), copy=False).reshape(self.shape)
        return np.memmap(self.path, dtype=np_dtype(self.dtype).newbyteorder("<"), mode="r",
                         offset=self.offset, shape=self.shape)

    def to_proto(self, name: str) -> TensorProto:
        out = TensorProto()
        out.CopyFrom(self._template)
        out.ClearField("external_data")
        out.data_location = TensorProto.DEFAULT
        out.name = name
        out.raw_data = b"".join(self.iter_bytes())
        return out

    def iter_bytes(self) -> Iterator[bytes]:
        if self._held is not None:
            yield self._held
            return
        # Plain reads, not the mapping: copying a huge weight must not grow the RSS.
        left = self.nbytes
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            while left > 0:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    raise MalformedModelError(f"external data file '{self.path.name}' ended early")
                left -= len(chunk)
                yield chunk

    def copy_into(self, out: BinaryIO) -> None:
        """Copy file to file inside the kernel (copy_file_range) when it can: a big weight
        then never passes through Python, which is what makes a 3 GiB save fast."""
        if self._held is None and hasattr(os, "copy_file_range"):
            out.flush()
            try:
                self._kernel_copy(out.fileno(), out.tell())
                out.seek(0, os.SEEK_END)
                return
            except OSError:  # another filesystem or an old kernel: copy through Python
                out.seek(0, os.SEEK_END)
        super().copy_into(out)

    def _kernel_copy(self, dst: int, position: int) -> None:
        left, source = self.nbytes, self.offset
        with open(self.path, "rb") as f:
            while left > 0:
                n = os.copy_file_range(f.fileno(), dst, min(left, 1 << 30), source, position)
                if n == 0:
                    raise MalformedModelError(f"external data file '{self.path.name}' ended early")
                left, source, position = left - n, source + n, position + n

    def _sample_windows(self) -> bytes:
        if self._held is not None:
            return super()._sample_windows()
        step = self.nbytes // 64
        with open(self.path, "rb") as f:
            parts = []
            for i in range(64):
                f.seek(self.offset + i * step)
                parts.append(f.read(64 << 10))
        return b"".join(parts)


class ArrayTensor(Tensor):
    """A tensor computed in memory (by a pass, or from a Constant's value_* attribute)."""

    def __init__(self, array: np.ndarray, dtype: int | None = None):
        self.array = np.asarray(array)
        self.dtype = dtype if dtype is not None else helper.np_dtype_to_tensor_dtype(self.array.dtype)
        self.shape = tuple(self.array.shape)

    def numpy(self) -> np.ndarray:
        return self.array

    def to_proto(self, name: str) -> TensorProto:
        return numpy_helper.from_array(self.array, name)


class SparseTensor(Tensor):
    """A sparse initializer: the SparseTensorProto is kept and emitted as it came;
    `numpy()` gives the dense array."""

    def __init__(self, proto, values: Tensor, indices: Tensor):
        self.proto = proto  # a SparseTensorProto, emitted as it came
        self.dtype = values.dtype
        self.shape = tuple(proto.dims)
        self._values = values
        self._indices = indices

    @property
    def source_proto(self) -> None:
        return None  # no dense TensorProto: the sparse one is emitted as a sparse initializer

    @property
    def nbytes(self) -> int:
        """Bytes stored: values and indices, not the dense size."""
        return self._values.nbytes + self._indices.nbytes

    def numpy(self) -> np.ndarray:
        dense = np.zeros(self.numel, dtype=np_dtype(self.dtype))
        values = self._values.numpy().ravel()
        idx = self._indices.numpy().astype(np.int64)
        flat = np.ravel_multi_index(idx.T, self.shape) if idx.ndim == 2 else idx.ravel()
        dense[flat] = values
        return dense.reshape(self.shape)

    def to_proto(self, name: str) -> TensorProto:
        return numpy_helper.from_array(self.numpy(), name)


def checked_numel(proto: TensorProto, where: str) -> int:
    """Element count of a tensor whose data type is known and whose dims are not negative."""
    _check_dtype(proto.data_type, where)
    if any(d < 0 for d in proto.dims):
        raise MalformedModelError(f"{where}: negative dimension in shape {list(proto.dims)}")
    return math.prod(proto.dims)


def check_inline_tensor(proto: TensorProto, where: str) -> None:
    """Raise if an in-file tensor's data does not match its declared shape and type."""
    numel = checked_numel(proto, where)
    expected_raw = storage_bytes(proto.data_type, numel)
    if proto.HasField("raw_data"):
        if expected_raw is None:
            raise MalformedModelError(f"{where}: string tensor cannot use raw_data")
        if len(proto.raw_data) != expected_raw:
            raise MalformedModelError(
                f"{where}: {len(proto.raw_data)} bytes of data for shape {list(proto.dims)} "
                f"of {dtype_name(proto.data_type)} (expected {expected_raw})")
        return
    field, per = _FIELD_OF.get(proto.data_type, ("int32_data", 1))
    have = len(getattr(proto, field))
    bits = _PACKED_BITS.get(proto.data_type)
    want = math.ceil(numel * bits / 8) if bits else numel * per
    if have != want and not (bits and have == numel):
        raise MalformedModelError(
            f"{where}: {have} values in {field} for shape {list(proto.dims)} "
            f"of {dtype_name(proto.data_type)} (expected {want})")


def constant_tensor(attr_name: str, value) -> Tensor | None:
    """The tensor a Constant node produces, from whichever value_* attribute it uses."""
    if attr_name == "value":
        return value
    if attr_name == "value_float":
        return ArrayTensor(np.array(value, dtype=np.float32))
    if attr_name == "value_floats":
        return ArrayTensor(np.array(value, dtype=np.float32))
    if attr_name == "value_int":
        return ArrayTensor(np.array(value, dtype=np.int64))
    if attr_name == "value_ints":
        return ArrayTensor(np.array(value, dtype=np.int64))
    if attr_name == "value_string":
        return ArrayTensor(np.array(value, dtype=object), TensorProto.STRING)
    if attr_name == "value_strings":
        return ArrayTensor(np.array(value, dtype=object), TensorProto.STRING)
    return None  # sparse_value: no dense constant without materializing


__all__ = ["Tensor", "ProtoTensor", "ExternalTensor", "ArrayTensor", "SparseTensor", "dtype_name", "np_dtype",
           "storage_bytes", "checked_numel", "check_inline_tensor", "constant_tensor"]
