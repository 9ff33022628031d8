"""Real ONNX models shipped inside PyPI packages, plus realistic inputs for them.

Used by the test-suite for round-trip checks on real-world graphs:

    for path in find_model_files("silero_vad"):
        for feeds in realistic_feeds(path):
            ...

Packages are located with importlib.util.find_spec and never imported: silero_vad
imports torch and rapidocr_onnxruntime imports cv2, and neither may be installed.
Only numpy and onnx are needed here; onnxruntime is imported lazily by
run_onnxruntime(), so that reference outputs are optional.
"""
from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import onnx

# Packages known to ship .onnx files together with the feeds that suit them.
MODEL_PACKAGES = ("silero_vad", "rapidocr_onnxruntime")


def find_model_files(package: str) -> list[pathlib.Path]:
    """Sorted .onnx files inside an installed package; [] when it isn't installed."""
    try:
        spec = importlib.util.find_spec(package)  # top-level name: no import happens
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:  # single-module distribution
        roots = [pathlib.Path(spec.origin).parent]
    return sorted({p.resolve() for r in roots for p in pathlib.Path(r).rglob("*.onnx")})


def metadata(path) -> dict[str, str]:
    """The model's metadata_props (e.g. rapidocr rec models carry 'character')."""
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def realistic_feeds(path, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Two or three deterministic, realistic feed dicts for a known real model.

    Arrays have the model's declared dtypes and its input order; ValueError for
    models this module knows nothing about.
    """
    model = onnx.load(str(path), load_external_data=False)
    inputs = _graph_inputs(model)
    rng = np.random.default_rng(seed)
    name = pathlib.Path(path).name.lower()
    if "state" in inputs or {"h", "c"} <= inputs.keys():
        feeds = _silero_feeds(inputs, name, rng)
    elif list(inputs) == ["x"] and len(inputs["x"][1]) == 4:
        # PP-OCR: tell det/rec/cls apart by output rank (prob map / CTC / 2-way).
        rank = len(model.graph.output[0].type.tensor_type.shape.dim)
        kind = {4: "det", 3: "rec", 2: "cls"}[rank]
        feeds = [{"x": x} for x in _OCR_FEEDS[kind](rng)]
    else:
        raise ValueError(f"no realistic feeds known for {path}")
    # Cast to the declared element types (e.g. a float16 variant would need it).
    return [{k: v.astype(inputs[k][0]) for k, v in f.items()} for f in feeds]


def run_onnxruntime(path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Reference outputs from onnxruntime on CPU (imported lazily: optional dep)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # silence "unused initializer" warnings
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _graph_inputs(model) -> dict[str, tuple[np.dtype, list]]:
    """Real (non-initializer) inputs: name -> (numpy dtype, dims; None if symbolic)."""
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                for d in tt.shape.dim]
        out[vi.name] = (onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type), dims)
    return out


# ---------------------------------------------------------------- silero-vad
# Silero VAD v5/v6 consumes 32 ms windows: 512 new samples at 16 kHz (256 at
# 8 kHz), prefixed by the last 64 (32) samples of the previous window, exactly
# as silero_vad's OnnxWrapper does; so the real "input" width is 576 (288).
_SILERO_RATE = {16000: (512, 64), 8000: (256, 32)}


def _voiced(n: int, sr: int, rng) -> np.ndarray:
    """Speech-like audio: harmonic source with vibrato, formants, syllables, noise."""
    t = np.arange(n) / sr
    f0 = rng.uniform(100, 220) * (1 + 0.03 * np.sin(2 * np.pi * 5 * t))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    formants = rng.uniform([500, 1200, 2300], [800, 1800, 3000])
    sig = np.zeros(n)
    for k in range(1, int(sr / 2 / f0.max())):
        fk = k * f0.mean()
        gain = sum(np.exp(-((fk - f) / 150.0) ** 2) for f in formants) + 0.05
        sig += gain / k * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    sig *= 0.6 - 0.4 * np.cos(2 * np.pi * 4 * t)  # ~4 syllables per second
    sig = 0.3 * sig / np.abs(sig).max()
    return sig + 0.005 * rng.standard_normal(n)


def _windows(audio: np.ndarray, sr: int) -> np.ndarray:
    """Rows of [previous-window context | window], as silero's frame_blocks()."""
    size, ctx = _SILERO_RATE[sr]
    frames = audio[: len(audio) // size * size].reshape(-1, size)
    prev = np.vstack([np.zeros((1, ctx)), frames[:-1, -ctx:]])
    return np.hstack([prev, frames])


def _lstm_state(shape, rng) -> np.ndarray:
    """Plausible non-zero recurrent state (as after some audio), bounded like h."""
    return 0.5 * np.tanh(rng.normal(0.0, 0.7, shape))


def _silero_feeds(inputs, name, rng) -> list[dict[str, np.ndarray]]:
    speech = _windows(_voiced(16 * 512, 16000, rng), 16000)
    silence = _windows(0.003 * rng.standard_normal(4 * 512), 16000)
    if "h" in inputs:  # "sequence" model: many windows per call, separate h and c
        zero = np.zeros((1, 1, 128))
        return [
            {"input": speech[:4], "h": zero, "c": zero},
            {"input": speech[4:5], "h": _lstm_state((1, 1, 128), rng),
             "c": _lstm_state((1, 1, 128), rng)},
            {"input": np.vstack([silence, speech[5:13], silence]), "h": zero, "c": zero},
        ]

    def feed(rows, sr, state):
        f = {"input": rows, "state": state}
        if "sr" in inputs:
            f["sr"] = np.array(sr, dtype=np.int64)  # scalar, as the wrapper passes it
        return {k: f[k] for k in inputs}  # keep the model's input order

    batch_fixed = inputs["input"][1][0] is not None  # e.g. the openvino export
    second = speech[1:2] if batch_fixed else np.vstack([speech[1], silence[1]])
    feeds = [
        feed(speech[:1], 16000, np.zeros((2, 1, 128))),  # stream start
        feed(second, 16000, _lstm_state((2, len(second), 128), rng)),  # mid-stream
    ]
    # Only the multi-rate files (with 'sr' input, no '16k' in the name) know 8 kHz.
    if "sr" in inputs and "16k" not in name:
        feeds.append(feed(_windows(_voiced(4 * 256, 8000, rng), 8000)[:1], 8000,
                          np.zeros((2, 1, 128))))
    else:
        feeds.append(feed(silence[:1], 16000, np.zeros((2, 1, 128))))
    return feeds


# ---------------------------------------------------------------- PP-OCR
# Pre-processing as rapidocr_onnxruntime 1.4.4 does it (see its config.yaml):
#   det: image resized to multiples of 32, (x/255 - 0.5)/0.5 (this package's
#        config; PaddleOCR itself uses ImageNet mean/std, so one feed uses each);
#   rec: 3x48xW text line, (x/255 - 0.5)/0.5, right-padded with 0 to the batch width;
#   cls: 3x48x192 text line, same normalisation and padding; labels '0'/'180'.


# Simple characters drawn as strokes (y0, x0, y1, x1) in a unit cell, so that the
# recogniser reads real glyphs rather than noise (random strokes decode to blanks).
def _h(y, a=0.1, b=0.9):  # horizontal bar
    return (y, a, y, b)


def _v(x, a=0.1, b=0.9):  # vertical bar
    return (a, x, b, x)


_BOX = [_h(0.15, 0.15, 0.85), _h(0.85, 0.15, 0.85), _v(0.15, 0.15, 0.85), _v(0.85, 0.15, 0.85)]
_GLYPHS = [
    [_h(0.5)],                                                          # 一
    [_h(0.3, 0.2, 0.8), _h(0.75)],                                      # 二
    [_h(0.2, 0.2, 0.8), _h(0.5, 0.25, 0.75), _h(0.85)],                 # 三
    [_h(0.45), _v(0.5)],                                                # 十
    _BOX,                                                               # 口
    [_h(0.1, 0.25, 0.75), _h(0.5, 0.25, 0.75), _h(0.9, 0.25, 0.75),
     _v(0.25), _v(0.75)],                                               # 日
    [_h(0.15, 0.2, 0.8), _v(0.5, 0.15, 0.85), _h(0.85)],                # 工
    [_h(0.15, 0.2, 0.8), _h(0.5, 0.25, 0.75), _h(0.85), _v(0.5, 0.15, 0.85)],  # 王
    [_h(0.4, 0.25, 0.75), _h(0.85), _v(0.5, 0.1, 0.85)],                # 土
    [_v(0.45, 0.1, 0.85), _h(0.45, 0.45, 0.8), _h(0.85)],               # 上
    [_h(0.3, 0.15, 0.85), _h(0.7, 0.15, 0.85), _v(0.15, 0.3, 0.7),
     _v(0.85, 0.3, 0.7), _v(0.5, 0.05, 0.95)],                          # 中
    _BOX + [_h(0.5, 0.15, 0.85), _v(0.5, 0.15, 0.85)],                  # 田
    [(0.1, 0.5, 0.9, 0.1), (0.35, 0.45, 0.9, 0.9)],                     # 人
    [_h(0.35), (0.1, 0.5, 0.9, 0.1), (0.4, 0.5, 0.9, 0.9)],             # 大
    [_v(0.55), (0.1, 0.55, 0.3, 0.35)],                                 # 1
    [_h(0.1, 0.2, 0.8), (0.1, 0.8, 0.9, 0.4)],                          # 7
    [_v(0.3), _h(0.9, 0.3, 0.8)],                                       # L
    [_h(0.1, 0.2, 0.8), _v(0.5)],                                       # T
    [_v(0.25), _v(0.75), _h(0.5, 0.25, 0.75)],                          # H
    [_v(0.3), _h(0.1, 0.3, 0.8), _h(0.5, 0.3, 0.7), _h(0.9, 0.3, 0.8)],  # E
]


def _ink(img: np.ndarray, y0, x0, h, w, rng) -> None:
    """Write a line of jittered stroke glyphs (with word gaps) of height h into img."""
    t = max(1, round(h / 9))  # stroke width ~ 11% of the glyph height
    tone = rng.uniform(15, 70)  # dark ink, not pure black
    for cx in range(x0, x0 + w - h, int(h * 1.1)):
        if rng.random() < 0.12:  # word gap
            continue
        for ya, xa, yb, xb in _GLYPHS[rng.integers(len(_GLYPHS))]:
            ya, xa, yb, xb = np.array([ya, xa, yb, xb]) + rng.normal(0, 0.03, 4)
            n = int(max(abs(yb - ya), abs(xb - xa)) * h) + 1
            ys = (y0 + np.linspace(ya, yb, n) * (h - t)).astype(int)
            xs = (cx + np.linspace(xa, xb, n) * (h - t)).astype(int)
            for dy in range(t):
                for dx in range(t):
                    img[np.clip(ys + dy, 0, img.shape[0] - 1),
                        np.clip(xs + dx, 0, img.shape[1] - 1)] = tone


def _paper(h: int, w: int, rng) -> np.ndarray:
    """Off-white page with lighting gradient and sensor noise (grey levels 0..255)."""
    ramp = np.linspace(0, rng.uniform(-20, 10), w)[None, :] + np.linspace(0, -10, h)[:, None]
    return 240 + ramp + 3 * rng.standard_normal((h, w))


def _to_chw(gray: np.ndarray, rng) -> np.ndarray:
    """Grey page -> uint8-range BGR with slight colour cast, shape 3xHxW."""
    tint = rng.uniform(-6, 6, 3)[:, None, None]
    return np.clip(gray[None] + tint, 0, 255).round()


def _page(h: int, w: int, rng) -> np.ndarray:
    img = _paper(h, w, rng)
    y = int(rng.integers(20, 40))
    while y < h - 60:  # paragraphs of text lines of a few sizes
        lh = int(rng.choice([16, 20, 28]))
        x = int(rng.integers(16, 40))
        _ink(img, y, x, lh, int(rng.integers(w // 3, w - x - 16)), rng)
        y += int(lh * rng.uniform(1.5, 2.2))
    return _to_chw(img, rng)


def _line(w_text: int, w_pad: int, rng, flip: bool = False) -> np.ndarray:
    """One 48-px-high text-line crop, normalised, zero-padded to w_pad like rapidocr."""
    img = _paper(48, w_text, rng)
    _ink(img, 8, 4, 32, w_text - 4, rng)
    chw = _to_chw(img, rng)
    if flip:  # upside-down crop: what the 0/180 classifier is for
        chw = chw[:, ::-1, ::-1]
    out = np.zeros((3, 48, w_pad))
    out[:, :, :w_text] = (chw / 255 - 0.5) / 0.5
    return out


def _det(rng):
    portrait, landscape = _page(640, 480, rng), _page(320, 640, rng)
    mean = np.array([0.485, 0.456, 0.406])[:, None, None]
    std = np.array([0.229, 0.224, 0.225])[:, None, None]
    return [((portrait / 255 - 0.5) / 0.5)[None],  # as rapidocr normalises
            ((landscape / 255 - mean) / std)[None]]  # as PaddleOCR normalises


def _rec(rng):
    return [
        _line(320, 320, rng)[None],
        np.stack([_line(w, 320, rng) for w in (320, 200, 96)]),  # batch of 3
        _line(560, 640, rng)[None],  # long line: width ratio > 320/48
    ]


def _cls(rng):
    return [_line(192, 192, rng)[None],
            np.stack([_line(120, 192, rng), _line(192, 192, rng, flip=True)])]


_OCR_FEEDS = {"det": _det, "rec": _rec, "cls": _cls}
