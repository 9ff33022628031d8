"""Inputs for verification: a folder of .npz files, an ONNX test-data folder, or seeded random
feeds built from the input signature."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ir import Model
from ir.tensors import dtype_name, np_dtype

from .errors import CompileError

DEFAULT_DIM = 1  # a symbolic or unknown dimension not bound by --input-shape
MAX_RANDOM_ELEMENTS = 1 << 26  # a random feed larger than this is surely a wrong binding

Feed = dict[str, np.ndarray]


def parse_input_shapes(specs: list[str]) -> dict[str, tuple[int, ...]]:
    """'name=1,3,224,224' -> {'name': (1, 3, 224, 224)}."""
    shapes = {}
    for spec in specs or []:
        m = re.fullmatch(r"\s*([^=]+?)\s*=\s*(\d+(?:\s*,\s*\d+)*)\s*", spec)
        if not m:
            raise CompileError(f"--input-shape '{spec}': expected NAME=D1,D2,... (for example x=1,3,224,224)")
        shapes[m.group(1)] = tuple(int(d) for d in m.group(2).split(","))
    return shapes


def signature(model: Model) -> list:
    """The inputs a caller must feed: graph inputs without an initializer default."""
    return [v for v in model.graph.inputs if v.tensor is None]


def random_feeds(model: Model, shapes: dict[str, tuple[int, ...]] | None = None,
                 count: int = 2, seed: int = 0) -> list[Feed]:
    """Seeded feeds: floats ~ N(0, 1), integers in [0, 4), booleans at random. An input's
    shape is `shapes[name]` when given; a symbolic dimension of another input takes the size
    bound to the same symbol there (binding x=1,3,640,480 for [N,3,H,W] sets N, H and W
    everywhere), else 1."""
    shapes = shapes or {}
    inputs = signature(model)
    unknown = sorted(set(shapes) - {v.name for v in inputs})
    if unknown:
        raise CompileError(f"--input-shape names '{unknown[0]}', which is not an input of the model "
                           f"(inputs: {', '.join(v.name for v in inputs)})")
    symbols = {d: size for v in inputs if v.name in shapes and v.shape is not None
               and len(v.shape) == len(shapes[v.name])
               for d, size in zip(v.shape, shapes[v.name]) if isinstance(d, str)}
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        feed = {}
        for v in inputs:
            feed[v.name] = _random_array(v, shapes.get(v.name), symbols, rng)
        feeds.append(feed)
    return feeds


def _random_array(v, bound: tuple[int, ...] | None, symbols: dict[str, int],
                  rng: np.random.Generator) -> np.ndarray:
    if v.dtype is None:
        raise CompileError(f"input '{v.name}' is not a tensor of known type; give verification data "
                           "with --verify-data")
    if bound is not None:
        if v.shape is not None and len(bound) != len(v.shape):
            raise CompileError(f"--input-shape {v.name}: {len(bound)} dimensions given, the input has "
                               f"{len(v.shape)}")
        if v.shape is not None and any(isinstance(d, int) and d != b for d, b in zip(v.shape, bound)):
            raise CompileError(f"--input-shape {v.name}={','.join(map(str, bound))} contradicts its fixed "
                               f"shape {list(v.shape)}")
        shape = bound
    elif v.shape is None:
        raise CompileError(f"input '{v.name}' has unknown rank; give its shape with --input-shape "
                           f"{v.name}=D1,D2,...")
    else:
        shape = tuple(d if isinstance(d, int) else symbols.get(d, DEFAULT_DIM) for d in v.shape)
    if int(np.prod(shape)) > MAX_RANDOM_ELEMENTS:
        raise CompileError(f"input '{v.name}' of shape {list(shape)} is too large for a random feed")
    dtype = np_dtype(v.dtype)
    if v.dtype == TensorProto.BOOL:
        return rng.random(shape) < 0.5
    if v.dtype == TensorProto.STRING:
        return np.array(rng.integers(0, 4, shape).astype(str), dtype=object)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 4, shape).astype(dtype)
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    raise CompileError(f"input '{v.name}' has type {dtype_name(v.dtype)}, which random feeds do not "
                       "cover; give verification data with --verify-data")


def load_feeds(folder: Path, model: Model) -> list[Feed]:
    """Feeds from a folder of .npz files (keys are input names) or an ONNX test-data folder
    (test_data_set_*/input_*.pb, or the input_*.pb files themselves). Never unpickles."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CompileError(f"verification data '{folder}' is not a folder")
    names = [v.name for v in signature(model)]
    npz = sorted(folder.glob("*.npz"))
    if npz:
        return [_npz_feed(p, names) for p in npz]
    sets = sorted(p for p in folder.glob("test_data_set_*") if p.is_dir())
    if not sets and list(folder.glob("input_*.pb")):
        sets = [folder]
    if sets:
        return [_pb_feed(s, names) for s in sets]
    raise CompileError(f"verification data '{folder}' holds no .npz files and no test_data_set_* folders")


def _npz_feed(path: Path, names: list[str]) -> Feed:
    try:
        with np.load(path, allow_pickle=False) as data:
            feed = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise CompileError(f"{path}: not a readable .npz file ({_first(e)})") from None
    return _check_names(feed, names, path)


def _pb_feed(folder: Path, names: list[str]) -> Feed:
    files = sorted(folder.glob("input_*.pb"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    feed = {}
    for i, path in enumerate(files):
        t = onnx.TensorProto()
        try:
            t.ParseFromString(path.read_bytes())
            array = numpy_helper.to_array(t)
        except Exception as e:  # noqa: BLE001 - any decoding failure is bad user data
            raise CompileError(f"{path}: not a TensorProto ({_first(e)})") from None
        name = t.name if t.name in names else (names[i] if i < len(names) else t.name)
        feed[name] = array
    return _check_names(feed, names, folder)


def _check_names(feed: Feed, names: list[str], where: Path) -> Feed:
    missing = [n for n in names if n not in feed]
    extra = [k for k in feed if k not in names]
    if missing or extra:
        what = f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(extra)}"
        raise CompileError(f"{where}: feed does not match the model's inputs ({what})")
    return feed


def as_feed(feed: dict) -> Feed:
    """A caller's feed dict as onnxruntime takes it: numpy scalars become 0-d arrays."""
    return {k: np.asarray(v) if isinstance(v, (np.generic, int, float, bool)) else v for k, v in feed.items()}


def describe_feed(feed: Feed) -> str:
    return ", ".join(f"{k}: {v.dtype}{list(v.shape)}" if hasattr(v, "shape") else f"{k}: {type(v).__name__}"
                     for k, v in feed.items())


def _first(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]
