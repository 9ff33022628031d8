"""Feed sources for calibration and verification: a folder of .npz files, an ONNX test-data
folder, a folder of images with a declared preprocessing, any iterable of feed dicts, and
seeded random feeds built from the model's input signature.

A source is lazy: it lists a folder when made (so a bad folder fails at once and its length
is known) but opens a file only when its feed is reached, so a calibration run holds one
sample at a time whatever the folder's size. Nothing is ever unpickled. Every user error is a
one-line `CompileError` naming the file."""

from __future__ import annotations

import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ir import CompileError, Model
from ir.errors import first_line
from ir.tensors import dtype_name, np_dtype

Feed = dict[str, np.ndarray]
Inputs = Model | list[str]  # what a source checks feed names against: a model or its input names

DEFAULT_DIM = 1  # a symbolic or unknown dimension not bound by a shape
MAX_RANDOM_ELEMENTS = 1 << 26  # a random feed larger than this is surely a wrong binding
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


# -- the source -----------------------------------------------------------------------------


class Source:
    """Feed dicts read lazily, in a fixed order. Iterating again starts over, except over a
    one-shot iterator (`once`), which refuses a second pass rather than silently give nothing.
    `len()` works when the number of samples is known; `length` is None otherwise."""

    def __init__(self, what: str, stream: Callable[[int, int | None], Iterator[Feed]],
                 length: int | None, once: bool = False):
        # stream(start, stop) yields feeds start..stop-1 (stop None: to the end), loading only those
        self.what, self._stream, self.length, self.once = what, stream, length, once
        self._read = False

    def __iter__(self) -> Iterator[Feed]:
        return self._take(0, self.length)

    def _take(self, start: int, stop: int | None) -> Iterator[Feed]:
        if self.once:
            if self._read:
                raise CompileError(f"{self.what} is a one-shot iterator and was already read; "
                                   "pass a list or a Source to read it again")
            self._read = True
        return self._stream(start, stop)

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError(f"the number of feeds in {self.what} is not known")
        return self.length

    def __bool__(self) -> bool:  # without this, bool() would call __len__ and fail when unknown
        return self.length != 0

    def __repr__(self) -> str:
        return f"<Source {self.what}: {'?' if self.length is None else self.length} feeds>"

    def limit(self, n: int | None) -> Source:
        """The first n feeds (all of them when n is None)."""
        return self if n is None else self._view(0, _count(n, "limit"))

    def skip(self, n: int) -> Source:
        """Every feed after the first n, without loading those n."""
        return self._view(_count(n, "skip"), None)

    def _view(self, start: int, stop: int | None) -> Source:
        if self.length is not None:
            stop = self.length if stop is None else min(stop, self.length)
            start = min(start, stop)
        length = None if self.length is None else stop - start  # a limit caps, it does not count

        def stream(a: int, b: int | None) -> Iterator[Feed]:
            end = stop if b is None else start + b if stop is None else min(stop, start + b)
            return self._take(start + a, end)  # a view of a one-shot source reads it

        return Source(self.what, stream, length, self.once)


def split(source: Source | Iterable[Feed], holdout: int) -> tuple[Source, Source]:
    """(calibration, held_out): the first `holdout` feeds are held out (for verification), the
    rest calibrates. Neither side loads anything until read; over a one-shot iterator the held-out
    feeds are read into a list at once (they are few, and verification reads them several
    times)."""
    source = as_source(source)
    holdout = _count(holdout, "holdout")
    if source.length is not None and holdout >= source.length:
        raise CompileError(f"{source.what} has {source.length} feeds: holding out {holdout} leaves none "
                           "for calibration")
    if source.once:
        it = iter(source)
        held = list(islice(it, holdout))
        return (Source(source.what, lambda a, b: islice(it, a, b), None, once=True),
                feeds_source(held, what=f"held-out feeds of {source.what}"))
    return source.skip(holdout), source.limit(holdout)


def as_source(data, model: Inputs | None = None, *, limit: int | None = None,
              what: str = "data") -> Source:
    """A Source from what a caller gives: a Source (as is), a folder (.npz files or ONNX test
    data), or an iterable of feed dicts."""
    if isinstance(data, Source):
        return data.limit(limit)
    if isinstance(data, (str, os.PathLike)):
        if model is None:
            raise CompileError(f"{what} '{data}': a folder source needs the model to check input names")
        return folder_source(data, model, limit=limit, what=what)
    return feeds_source(data, model, limit=limit, what="feeds" if what == "data" else what)


def _count(n, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise CompileError(f"{what} must be a whole number of feeds, not {n!r}")
    return n


def _files(what: str, paths: list, load: Callable[[Path], Feed], limit: int | None) -> Source:
    return Source(what, lambda a, b: (load(p) for p in paths[a:b]), len(paths)).limit(limit)


# -- iterables of feed dicts ----------------------------------------------------------------


def as_feed(feed: dict) -> Feed:
    """A caller's feed dict as onnxruntime takes it: numpy scalars become 0-d arrays."""
    return {k: np.asarray(v) if isinstance(v, (np.generic, int, float, bool)) else v for k, v in feed.items()}


def feeds_source(feeds: Iterable[dict], model: Inputs | None = None, *, limit: int | None = None,
                 what: str = "feeds") -> Source:
    """Feed dicts from any iterable (a list, a generator, a DataLoader-like object). With a
    model, each feed's names are checked against its inputs."""
    if isinstance(feeds, dict):
        raise CompileError(f"{what}: expected an iterable of feed dicts, got one dict; "
                           "wrap a single feed in a list")
    try:
        once = iter(feeds) is feeds  # an iterator (generator, file reader): one pass only
    except TypeError:
        raise CompileError(f"{what}: expected an iterable of feed dicts, got {type(feeds).__name__}") from None
    names = _names(model) if model is not None else None

    def check(i: int, feed) -> Feed:
        if not isinstance(feed, dict):
            raise CompileError(f"{what}[{i}]: a {type(feed).__name__}, not a dict of input name -> array")
        feed = as_feed(feed)
        return feed if names is None else _check_names(feed, names, f"{what}[{i}]")

    length = len(feeds) if hasattr(feeds, "__len__") and not once else None
    stream = lambda a, b: (check(i, f) for i, f in enumerate(islice(feeds, a, b), a))  # noqa: E731
    return Source(what, stream, length, once).limit(limit)


# -- folders: .npz files and ONNX test data ------------------------------------------------


def signature(model: Model) -> list:
    """The inputs a caller must feed: graph inputs without an initializer default."""
    return [v for v in model.graph.inputs if v.tensor is None]


def folder_source(folder: str | os.PathLike, model: Inputs, *, limit: int | None = None,
                  what: str = "data") -> Source:
    """Feeds from a folder of .npz files or an ONNX test-data folder, whichever it holds."""
    folder = _folder(folder, what)
    if any(folder.glob("*.npz")):
        return npz_source(folder, model, limit=limit, what=what)
    if any(p.is_dir() for p in folder.glob("test_data_set_*")) or any(folder.glob("input_*.pb")):
        return test_data_source(folder, model, limit=limit, what=what)
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir()):
        raise CompileError(f"{what} '{folder}' holds images: declare how they become inputs "
                           "(--calib-preprocess FILE or the --image-* options)")
    raise CompileError(f"{what} '{folder}' holds no .npz files and no test_data_set_* folders")


def npz_source(folder: str | os.PathLike, model: Inputs, *, limit: int | None = None,
               what: str = "data") -> Source:
    """One feed per .npz file, sorted by name; the keys are input names. Loaded without pickle."""
    folder = _folder(folder, what)
    paths = sorted(folder.glob("*.npz"))
    if not paths:
        raise CompileError(f"{what} '{folder}' holds no .npz files")
    names = _names(model)
    return _files(f"{what} '{folder}'", paths, lambda p: _npz_feed(p, names), limit)


def test_data_source(folder: str | os.PathLike, model: Inputs, *, limit: int | None = None,
                     what: str = "data") -> Source:
    """One feed per test_data_set_* folder (or the folder itself when it holds input_*.pb).
    A tensor's name picks its input, else its position does."""
    folder = _folder(folder, what)
    sets = sorted(p for p in folder.glob("test_data_set_*") if p.is_dir())
    if not sets and any(folder.glob("input_*.pb")):
        sets = [folder]
    if not sets:
        raise CompileError(f"{what} '{folder}' holds no test_data_set_* folders and no input_*.pb files")
    names = _names(model)
    return _files(f"{what} '{folder}'", sets, lambda s: _pb_feed(s, names), limit)


test_data_source.__test__ = False  # a loader, not a test, for pytest's collector


def _folder(folder, what: str) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise CompileError(f"{what} '{folder}' is not a folder")
    return folder


def _names(model: Inputs) -> list[str]:
    return [v.name for v in signature(model)] if isinstance(model, Model) else list(model)


def _npz_feed(path: Path, names: list[str]) -> Feed:
    if not zipfile.is_zipfile(path):  # else np.load tries .npy, then calls it pickled data
        raise CompileError(f"{path}: not a readable .npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as data:
            feed = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise CompileError(f"{path}: not a readable .npz file ({first_line(e)})") from None
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
            raise CompileError(f"{path}: not a TensorProto ({first_line(e)})") from None
        name = t.name if t.name in names else (names[i] if i < len(names) else t.name)
        feed[name] = array
    return _check_names(feed, names, folder)


def _check_names(feed: Feed, names: list[str], where) -> Feed:
    missing = [n for n in names if n not in feed]
    extra = [k for k in feed if k not in names]
    if missing or extra:
        what = f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(extra)}"
        raise CompileError(f"{where}: feed does not match the model's inputs ({what})")
    return feed



# -- seeded random feeds --------------------------------------------------------------------


def random_source(model: Model, shapes: dict[str, tuple[int, ...]] | None = None, *, count: int = 2,
                  seed: int = 0, remedy: str = "give real data instead") -> Source:
    """`count` seeded feeds: floats ~ N(0, 1), integers in [0, 4), booleans at random; the same
    feeds on every pass. An input's shape is `shapes[name]` when given; a symbolic dimension of
    another input takes the size bound to the same symbol there (binding x=1,3,640,480 for
    [N,3,H,W] sets N, H and W everywhere), else 1. Shapes and types are checked here, before
    any feed is drawn; `remedy` ends the message for an input random feeds cannot cover.
    (Messages name --input-shape: the CLI flag and the API's input_shapes are the same thing.)"""
    shapes = shapes or {}
    inputs = signature(model)
    unknown = sorted(set(shapes) - {v.name for v in inputs})
    if unknown:
        raise CompileError(f"--input-shape names '{unknown[0]}', which is not an input of the model "
                           f"(inputs: {', '.join(v.name for v in inputs)})")
    symbols = {d: size for v in inputs if v.name in shapes and v.shape is not None
               and len(v.shape) == len(shapes[v.name])
               for d, size in zip(v.shape, shapes[v.name]) if isinstance(d, str)}
    specs = [(v.name, _random_shape(v, shapes.get(v.name), symbols), _random_kind(v, remedy)) for v in inputs]

    def stream(a: int, b: int | None) -> Iterator[Feed]:
        rng = np.random.default_rng(seed)  # restarted per pass: every pass sees the same feeds
        feeds = ({name: _draw(kind, dtype, shape, rng) for name, shape, (kind, dtype) in specs}
                 for _ in range(count))
        return islice(feeds, a, b)

    return Source(f"random feeds (seed {seed})", stream, _count(count, "count"))


def _random_shape(v, bound: tuple[int, ...] | None, symbols: dict[str, int]) -> tuple[int, ...]:
    if v.dtype is None:
        return ()  # _random_kind refuses it
    if bound is not None:
        if v.shape is not None and len(bound) != len(v.shape):
            raise CompileError(f"--input-shape {v.name}: {len(bound)} dimensions given, the input has "
                               f"{len(v.shape)}")
        if v.shape is not None and any(isinstance(d, int) and 0 <= d != b for d, b in zip(v.shape, bound)):
            raise CompileError(f"--input-shape {v.name}={','.join(map(str, bound))} contradicts its fixed "
                               f"shape {list(v.shape)}")
        shape = tuple(bound)
    elif v.shape is None:
        raise CompileError(f"input '{v.name}' has unknown rank; give its shape with --input-shape "
                           f"{v.name}=D1,D2,...")
    else:
        # A negative size is unknown too: Paddle2ONNX writes dim_value -1 for a dynamic one.
        shape = tuple(d if isinstance(d, int) and d >= 0 else symbols.get(d, DEFAULT_DIM) for d in v.shape)
    if int(np.prod(shape)) > MAX_RANDOM_ELEMENTS:
        raise CompileError(f"input '{v.name}' of shape {list(shape)} is too large for a random feed")
    return shape


def _random_kind(v, remedy: str) -> tuple[str, np.dtype]:
    if v.dtype is None:
        raise CompileError(f"input '{v.name}' is not a tensor of known type; {remedy}")
    dtype = np_dtype(v.dtype)
    if v.dtype == TensorProto.BOOL:
        return "bool", dtype
    if v.dtype == TensorProto.STRING:
        return "string", dtype
    if np.issubdtype(dtype, np.integer):
        return "int", dtype
    if np.issubdtype(dtype, np.floating):
        return "float", dtype
    raise CompileError(f"input '{v.name}' has type {dtype_name(v.dtype)}, which random feeds do not "
                       f"cover; {remedy}")


def _draw(kind: str, dtype, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if kind == "bool":
        return rng.random(shape) < 0.5
    if kind == "string":
        return np.array(rng.integers(0, 4, shape).astype(str), dtype=object)
    if kind == "int":
        return rng.integers(0, 4, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


# -- images ---------------------------------------------------------------------------------

_LAYOUTS, _CHANNELS = ("NCHW", "NHWC"), ("RGB", "BGR", "GRAY")
_RESIZES, _FITS = ("bilinear", "nearest", "bicubic", "lanczos", "box"), ("stretch", "pad", "crop")


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes an input tensor, in this order: convert to `channels`; resize to
    `size` (H, W) with `resize` interpolation, `fit` saying how (stretch: ignore the aspect
    ratio; pad: keep it, zeros right and bottom after normalizing, as PaddleOCR does; crop:
    keep it, centre crop); x = (pixel * scale - mean) / std per channel, in `channels` order;
    `layout` with a batch dimension of 1. No size: the model's fixed H, W, else the image's."""

    input: str | None = None
    size: tuple[int, int] | None = None
    layout: str = "NCHW"
    channels: str = "RGB"
    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    resize: str = "bilinear"
    fit: str = "stretch"
    where: str = field(default="image preprocessing", compare=False, repr=False)  # for messages


def load_preprocess(config: str | os.PathLike | dict | Preprocess | None = None, **options) -> Preprocess:
    """A checked Preprocess from a JSON config file, a dict or a Preprocess, with keyword
    `options` overriding it. A bad key or value names the config file."""
    where, values = "image preprocessing", {}
    if isinstance(config, Preprocess):
        where = config.where
        values = {k: getattr(config, k) for k in Preprocess.__dataclass_fields__ if k != "where"}
    elif isinstance(config, dict):
        values = dict(config)
    elif config is not None:
        where = str(config)
        try:
            values = json.loads(Path(config).read_text())
        except OSError as e:
            raise CompileError(f"{config}: cannot read the preprocessing config "
                               f"({e.strerror or first_line(e)})") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise CompileError(f"{config}: not valid JSON ({first_line(e)})") from None
        if not isinstance(values, dict):
            raise CompileError(f"{config}: expected a JSON object of preprocessing options")
    values.update(options)
    known = [k for k in Preprocess.__dataclass_fields__ if k != "where"]
    for key in values:
        if key not in known:
            raise CompileError(f"{where}: unknown key '{key}' (known: {', '.join(known)})")

    def bad(key: str, expected: str):
        return CompileError(f"{where}: '{key}' must be {expected}, not {_show(values[key])}")

    def choice(key: str, choices: tuple[str, ...], default: str) -> str:
        value = values.get(key, default)
        for c in choices:  # case does not matter: "nchw" is NCHW
            if isinstance(value, str) and value.lower() == c.lower():
                return c
        raise bad(key, f"one of {', '.join(choices)}")

    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)

    channels = choice("channels", _CHANNELS, "RGB")
    n_channels = 1 if channels == "GRAY" else 3

    def per_channel(key: str, default: float, nonzero: bool) -> tuple[float, ...]:
        value = values.get(key, (default,))
        items = [value] if number(value) else value
        if (not isinstance(items, (list, tuple)) or len(items) not in (1, n_channels)
                or not all(number(x) and (x != 0 or not nonzero) for x in items)):
            raise bad(key, f"a {'nonzero ' if nonzero else ''}number or a list of {n_channels} "
                           f"{'nonzero ' if nonzero else ''}numbers (one per {channels} channel)")
        return tuple(float(x) for x in items)

    name = values.get("input")
    if name is not None and not (isinstance(name, str) and name):
        raise bad("input", "an input name")
    size = values.get("size")
    if size is not None:
        if not (isinstance(size, (list, tuple)) and len(size) == 2
                and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in size)):
            raise bad("size", "[height, width] in pixels")
        size = tuple(size)
    scale = values.get("scale", 1.0)
    if not (number(scale) and scale > 0):
        raise bad("scale", "a positive number")
    return Preprocess(input=name, size=size, layout=choice("layout", _LAYOUTS, "NCHW"), channels=channels,
                      scale=float(scale), mean=per_channel("mean", 0.0, False),
                      std=per_channel("std", 1.0, True), resize=choice("resize", _RESIZES, "bilinear"),
                      fit=choice("fit", _FITS, "stretch"), where=where)


def _show(value) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def image_source(folder: str | os.PathLike, config: str | os.PathLike | dict | Preprocess | None = None, *,
                 model: Model | None = None, limit: int | None = None, what: str = "data",
                 **options) -> Source:
    """One feed per image file in `folder` (sorted by name), preprocessed as `config` (a JSON
    file, a dict or a Preprocess) and keyword `options` declare. With a model, the input name,
    dtype, size and channel count come from or are checked against its single input."""
    prep = load_preprocess(config, **options)
    image_module = _pillow()
    folder = _folder(folder, what)
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise CompileError(f"{what} '{folder}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
    name, size, dtype = prep.input, prep.size, np.dtype(np.float32)
    if model is not None:
        name, size, dtype = _image_input(prep, model)
    elif name is None:
        raise CompileError(f"{prep.where}: 'input' is required without a model (the input the images feed)")
    return _files(f"{what} '{folder}'", paths,
                  lambda p: {name: _read_image(p, prep, size, dtype, image_module)}, limit)


def _image_input(prep: Preprocess, model: Model) -> tuple[str, tuple[int, int] | None, np.dtype]:
    inputs = signature(model)
    if len(inputs) != 1:
        raise CompileError(f"{prep.where}: images feed a model with one input; this one has "
                           f"{', '.join(v.name for v in inputs) or 'none'}")
    v = inputs[0]
    if prep.input is not None and prep.input != v.name:
        raise CompileError(f"{prep.where}: 'input' names '{prep.input}', which is not an input of the "
                           f"model (inputs: {v.name})")
    size = prep.size
    if v.shape is not None and len(v.shape) == 4:
        c, h, w = v.shape[1:] if prep.layout == "NCHW" else (v.shape[3], v.shape[1], v.shape[2])
        n_channels = 1 if prep.channels == "GRAY" else 3
        if isinstance(c, int) and c != n_channels:
            raise CompileError(f"{prep.where}: 'channels' {prep.channels} gives {n_channels} channel"
                               f"{'s' if n_channels > 1 else ''} in {prep.layout}, input '{v.name}' has {c} "
                               f"(shape {list(v.shape)})")
        if size is None and isinstance(h, int) and isinstance(w, int):
            size = (h, w)
    dtype = np.dtype(np.float32) if v.dtype is None else np_dtype(v.dtype)
    return v.name, size, dtype


def _pillow():
    try:
        from PIL import Image  # optional: only image folders need it
    except ImportError:
        raise CompileError("reading images needs Pillow: pip install onnxcc[images]") from None
    return Image


def _read_image(path: Path, prep: Preprocess, size: tuple[int, int] | None, dtype: np.dtype,
                image_module) -> np.ndarray:
    try:
        with image_module.open(path) as im:
            im = im.convert("L" if prep.channels == "GRAY" else "RGB")  # decodes, inside the with
    except Exception as e:  # noqa: BLE001 - whatever Pillow raises, the file is bad user data
        raise CompileError(f"{path}: not a readable image ({first_line(e)})") from None
    if size is not None:
        im = _fit(im, size, prep, image_module)
    x = np.asarray(im, np.float64).reshape(im.height, im.width, -1)  # GRAY gets its channel axis
    if prep.channels == "BGR":
        x = x[..., ::-1]
    x = (x * prep.scale - np.array(prep.mean)) / np.array(prep.std)
    if size is not None and x.shape[:2] != size:  # fit "pad": zeros right and bottom
        padded = np.zeros((*size, x.shape[2]))
        padded[:x.shape[0], :x.shape[1]] = x
        x = padded
    if prep.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x[None]).astype(dtype)


def _fit(im, size: tuple[int, int], prep: Preprocess, image_module):
    h, w = size
    resample = image_module.Resampling[prep.resize.upper()]
    if prep.fit == "stretch":
        return im.resize((w, h), resample)
    s = min(h / im.height, w / im.width) if prep.fit == "pad" else max(h / im.height, w / im.width)
    nw, nh = max(1, round(im.width * s)), max(1, round(im.height * s))
    if prep.fit == "pad":
        return im.resize((min(nw, w), min(nh, h)), resample)
    im = im.resize((max(nw, w), max(nh, h)), resample)
    left, top = (im.width - w) // 2, (im.height - h) // 2
    return im.crop((left, top, left + w, top + h))
