"""Shared by the conformance tests: run a model in onnxruntime and compare outputs.

The suite is onnx's own backend tests: models and expected outputs nobody here wrote.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import onnx
import onnx.backend.test
from onnx import numpy_helper

DATA_ROOT = Path(onnx.backend.test.__file__).parent / "data"
MODEL_FOLDERS = ("light", "pytorch-converted", "pytorch-operator", "simple")


def run_ort(model: onnx.ModelProto | str, feeds: list) -> list:
    """Outputs of onnxruntime (CPU, one thread, all optimizations) on positional feeds."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 4  # errors come back as exceptions; ORT need not print them too
    blob = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, dict(zip(names, (_feed(f) for f in feeds))))


def _feed(x):
    """onnx's case data as onnxruntime takes it: 0-d arrays for scalars, arrays for protos."""
    if isinstance(x, onnx.TensorProto):
        return numpy_helper.to_array(x)
    if isinstance(x, list):
        return [_feed(e) for e in x]
    if isinstance(x, np.generic):
        return np.asarray(x)
    return x


def matches(actual, expected, rtol: float, atol: float) -> str | None:
    """None when equal within tolerance, else what differs. Handles sequences and optionals."""
    if isinstance(expected, (list, tuple)):
        if not isinstance(actual, (list, tuple)) or len(actual) != len(expected):
            return f"sequence of {len(expected)} vs {actual!r:.60}"
        for a, e in zip(actual, expected):
            if (why := matches(a, e, rtol, atol)) is not None:
                return why
        return None
    if expected is None or actual is None:
        return None if actual is None and expected is None else "optional presence differs"
    if isinstance(expected, dict):
        return None if sorted(actual) == sorted(expected) else "map keys differ"
    a, e = np.asarray(actual), np.asarray(expected)
    if a.shape != e.shape:
        return f"shape {a.shape} vs expected {e.shape}"
    if e.dtype.kind in "OSU" or a.dtype.kind in "OSU":
        return None if a.tolist() == e.tolist() else "strings differ"
    if e.dtype.kind == "b":
        return None if np.array_equal(a, e) else "booleans differ"
    try:
        ok = np.allclose(a.astype(np.float64), e.astype(np.float64), rtol=rtol, atol=atol, equal_nan=True)
    except (TypeError, ValueError):
        ok = np.array_equal(a.view(np.uint8), e.view(np.uint8))
    return None if ok else f"max abs diff {np.nanmax(np.abs(a.astype(np.float64) - e.astype(np.float64)))}"


def identical(actual: list, reference: list) -> str | None:
    """Bit-equal outputs (NaN equal to NaN): the round trip must not change one bit."""
    return matches(actual, reference, rtol=0.0, atol=0.0)


def load_folder_case(folder: Path) -> tuple[onnx.ModelProto, list[tuple[list, list]]]:
    """A model folder of onnx's test data: model.onnx plus test_data_set_*/{input,output}_*.pb."""
    model = onnx.load(str(folder / "model.onnx"))
    sets = []
    for ds in sorted(glob.glob(str(folder / "test_data_set_*"))):
        sets.append((_read_pbs(ds, "input"), _read_pbs(ds, "output")))
    return model, sets


def _read_pbs(folder: str, prefix: str) -> list:
    arrays = []
    for path in sorted(glob.glob(os.path.join(folder, f"{prefix}_*.pb")),
                       key=lambda p: int(Path(p).stem.split("_")[-1])):
        t = onnx.TensorProto()
        t.ParseFromString(Path(path).read_bytes())
        arrays.append(numpy_helper.to_array(t))
    return arrays


def model_folders() -> list[Path]:
    found = []
    for kind in MODEL_FOLDERS:
        found += sorted(p.parent for p in (DATA_ROOT / kind).glob("*/model.onnx"))
    return found


def canonical(model: onnx.ModelProto) -> dict:
    """A model as a dict, minus what lowering may legitimately change: node names (unnamed
    nodes get one), fields set to their default (proto2 writes 'set but empty', readers
    cannot tell), value_info order."""
    from google.protobuf import json_format

    m = onnx.ModelProto()
    m.CopyFrom(model)

    def clean(graph) -> None:
        for node in graph.node:
            node.name = ""
            for a in node.attribute:
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    clean(sub)
        ordered = sorted(graph.value_info, key=lambda v: v.name)
        del graph.value_info[:]
        graph.value_info.extend(ordered)

    clean(m.graph)
    for f in m.functions:
        clean(f)
    return _strip(json_format.MessageToDict(m, preserving_proto_field_name=True))


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if v not in ("", "0", 0, 0.0, False, [], {})}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x
