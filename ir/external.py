"""External data: where a tensor's bytes live, checked so a model cannot read outside
its own folder or past the end of a file."""

from __future__ import annotations

import os
from pathlib import Path

from onnx import TensorProto

from .errors import ExternalDataError
from .tensors import ExternalTensor, checked_numel, dtype_name, storage_bytes


def external_tensor(proto: TensorProto, base_dir: Path | None, where: str) -> ExternalTensor:
    info = {e.key: e.value for e in proto.external_data}
    location = info.get("location", "")
    if not location:
        raise ExternalDataError(f"{where}: external data without a location")
    if base_dir is None:
        raise ExternalDataError(
            f"{where}: data is in external file '{location}' but the model was not loaded "
            "from a path; load it from its file or pass base_dir")
    path = _inside(base_dir, location, where)
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise ExternalDataError(f"{where}: external data offset/length is not an integer") from None
    expected = storage_bytes(proto.data_type, checked_numel(proto, where))
    if expected is None:
        raise ExternalDataError(f"{where}: string tensors cannot be stored as external data")
    if length is not None and length != expected:
        raise ExternalDataError(
            f"{where}: external data length {length} does not match shape {list(proto.dims)} "
            f"of {dtype_name(proto.data_type)} ({expected} bytes)")
    if offset < 0:
        raise ExternalDataError(f"{where}: external data offset {offset} is negative")
    size = path.stat().st_size
    if offset + expected > size:
        raise ExternalDataError(
            f"{where}: external data [{offset}, {offset + expected}) does not fit in "
            f"'{location}' ({size} bytes)")
    return ExternalTensor(path, offset, proto.data_type, tuple(proto.dims), proto)


def _inside(base_dir: Path, location: str, where: str) -> Path:
    if os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in location:
        raise ExternalDataError(f"{where}: external data location '{location}' is an absolute path")
    if ".." in Path(location.replace("\\", "/")).parts:
        raise ExternalDataError(f"{where}: external data location '{location}' leaves the model's folder")
    base = os.path.realpath(base_dir)
    real = os.path.realpath(os.path.join(base, location))
    if os.path.commonpath([base, real]) != base:
        raise ExternalDataError(
            f"{where}: external data location '{location}' points outside the model's folder")
    if not os.path.exists(real):
        raise ExternalDataError(f"{where}: external data file '{location}' not found in {base_dir}")
    if not os.path.isfile(real):
        raise ExternalDataError(f"{where}: external data location '{location}' is not a file")
    return Path(real)

