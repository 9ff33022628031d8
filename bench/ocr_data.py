"""Evaluation data and task metrics for the PP-OCRv4 models shipped by rapidocr-onnxruntime.

A quantized model is only as good as what it still reads, so the benchmark compares
float and quantized det/rec/cls models on rendered text with known ground truth:

* text: English sentences from the Python documentation bundled with the interpreter
  (``pydoc_data.topics.topics``), cut into lines of 8-40 characters. Sentences are
  assigned to the "calib" or "test" split by a stable hash, so the splits never share
  a sentence. (The text follows the running Python version's docs.)
* fonts: TrueType fonts shipped by matplotlib (``mpl-data/fonts/ttf``), else the same
  files under ``/usr/share/fonts/truetype``. The splits use different families
  (``SPLIT_FONTS``): calibration sees serif and monospace faces, the test sans faces.
* images: rendered with Pillow, seeded, with jitter of size, margins, ink and paper
  tone, blur and noise. Like ``cv2.imread`` in rapidocr, images are **BGR** uint8.

Pre- and post-processing follow rapidocr-onnxruntime 1.4.4 (its config.yaml and
ch_ppocr_* modules), re-implemented with numpy only (no cv2): bilinear resizes match
cv2's INTER_LINEAR, det is DB post-processing restricted to axis-aligned boxes.

    python -m bench.ocr_data       # float metrics of det, rec and cls on the test split
"""

from __future__ import annotations

import functools
import re
import textwrap
import time
import zlib
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive)

SPLITS = ("calib", "test")
# Disjoint font families per split, so a quantization calibrated on one kind of type is
# tested on another. Only faces that map all of ASCII to the usual glyphs are listed
# (matplotlib's cm*10 fonts use TeX encodings for some ASCII codes).
SPLIT_FONTS = {
    "calib": ("DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
              "DejaVuSerif-BoldItalic.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf",
              "DejaVuSansMono-Oblique.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf",
              "STIXGeneralItalic.ttf"),
    "test": ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf",
             "DejaVuSans-BoldOblique.ttf"),
}
MIN_CHARS, MAX_CHARS = 8, 40
# Letters, digits and the punctuation of prose; code-like characters (`_*=<>[]{}...)
# are left out so that lines read as running text.
_PROSE = re.compile(r"[A-Za-z0-9 .,;:!?'\"()/-]+")

# rapidocr 1.4.4 config.yaml: Det / Rec / Cls sections.
DET_LIMIT_SIDE = 736  # limit_type "min": the short side is scaled up to at least this
DET_THRESH, DET_BOX_THRESH, DET_UNCLIP, DET_MIN_SIZE = 0.3, 0.5, 1.6, 3
REC_HEIGHT, REC_MIN_WIDTH = 48, 320  # rec_img_shape [3, 48, 320]
CLS_HEIGHT, CLS_WIDTH = 48, 192  # cls_image_shape [3, 48, 192]

_TASKS = ("det", "rec", "cls")
_MODEL_FILES = {"det": "ch_PP-OCRv4_det_infer.onnx", "rec": "ch_PP-OCRv4_rec_infer.onnx",
                "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx"}


# ------------------------------------------------------------------ text and fonts
def text_lines(split: str) -> tuple[str, ...]:
    """The deterministic, de-duplicated text lines of one split (8-40 characters); no
    line is in both splits."""
    _check_split(split)
    return _split_lines()[split]


@functools.cache
def _split_lines() -> dict[str, tuple[str, ...]]:
    from pydoc_data.topics import topics

    lines: dict[str, dict[str, None]] = {s: {} for s in SPLITS}  # ordered sets
    for key in sorted(topics):
        for sentence in _sentences(topics[key]):
            # The hash of the whole sentence picks the split, so its pieces stay together.
            split = SPLITS[zlib.crc32(sentence.encode()) % 2]
            # Vary the wrap width per sentence for a spread of line lengths.
            width = 12 + zlib.crc32(sentence.encode(), 1) % (MAX_CHARS - 12 + 1)
            for piece in textwrap.wrap(sentence, width):
                if len(piece) >= MIN_CHARS:
                    lines[split][piece] = None
    # Short pieces ("is equivalent to") recur in other sentences: drop them from both.
    common = lines["calib"].keys() & lines["test"].keys()
    return {s: tuple(t for t in lines[s] if t not in common) for s in SPLITS}


def _sentences(doc: str):
    """Prose sentences of one pydoc topic: indented blocks (code, grammar) and titles
    are skipped, sentences with characters outside _PROSE are dropped."""
    for para in re.split(r"\n\s*\n", doc):
        if not para.strip() or para[0].isspace():
            continue
        rows = para.splitlines()
        if len(rows) > 1 and set(rows[1].strip()) <= set("*=-"):
            continue  # a title underlined with *** or ===
        text = " ".join(r.strip() for r in rows)
        for sentence in re.split(r"(?<=[.!?])\s+", text):
            if len(sentence) >= MIN_CHARS and _PROSE.fullmatch(sentence):
                yield sentence


@functools.cache
def font_files(split: str) -> tuple[Path, ...]:
    """The TTF files rendering a split: matplotlib's copies, else the system's."""
    _check_split(split)
    roots = []
    try:
        import matplotlib

        roots.append(Path(matplotlib.get_data_path()) / "fonts" / "ttf")
    except ImportError:
        pass
    roots.append(Path("/usr/share/fonts/truetype"))
    found: dict[str, Path] = {}
    for root in roots:
        for path in sorted(root.rglob("*.ttf")):
            found.setdefault(path.name, path)  # the first root wins
    files = tuple(found[n] for n in SPLIT_FONTS[split] if n in found)
    if not files:
        raise FileNotFoundError(f"none of the {split} fonts found: pip install matplotlib")
    return files


@functools.cache
def _font(path: Path, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), size)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")


def _rng(task: str, split: str, seed: int) -> np.random.Generator:
    # Independent streams per (task, split, seed).
    return np.random.default_rng([seed, _TASKS.index(task), SPLITS.index(split)])


# ------------------------------------------------------------------ rendering
def _ink_mask(text: str, font: ImageFont.FreeTypeFont, blur: float) -> tuple[np.ndarray, Box]:
    """Coverage (0..1, float32) of the text's ink, cropped to its bounding box, and
    that box relative to the drawing origin."""
    x0, y0, x1, y1 = font.getbbox(text)
    canvas = Image.new("L", (x1 - x0 + 4, y1 - y0 + 4), 0)  # +2 px each side for blur
    ImageDraw.Draw(canvas).text((2 - x0, 2 - y0), text, fill=255, font=font)
    if blur > 0:
        canvas = canvas.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(canvas, np.float32)[2:-2, 2:-2] / 255.0, (x0, y0, x1, y1)


def _paper(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A light background (float32 BGR): tinted, with a gentle gradient."""
    base = rng.uniform(185, 250) + rng.uniform(-12, 12, size=3)
    gy, gx = rng.uniform(-15, 15, size=2)
    ramp = (np.linspace(-0.5, 0.5, h)[:, None] * gy + np.linspace(-0.5, 0.5, w)[None, :] * gx)
    return (base[None, None, :] + ramp[:, :, None]).astype(np.float32)


def _compose(paper: np.ndarray, cover: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dark ink over the paper, plus sensor-like noise; uint8 BGR."""
    ink = rng.uniform(0, 70) + rng.uniform(-10, 10, size=3)
    img = paper * (1 - cover[:, :, None]) + ink * cover[:, :, None]
    img += rng.normal(0, rng.uniform(0, 4), size=img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _render_crop(text: str, font_path: Path, rng: np.random.Generator) -> np.ndarray:
    """One text line cropped like a detector box: ink box plus a small jittered margin.

    Margins are in font sizes. The recognizer needs about a quarter of one above and
    below (tighter crops lose spaces and letters at small sizes) and little on the
    sides (wide side margins make it read a leading or trailing space)."""
    size = int(rng.integers(16, 41))
    cover, _ = _ink_mask(text, _font(font_path, size), rng.uniform(0, 0.8))
    top, bottom = (int(round(m * size)) for m in rng.uniform(0.25, 0.45, size=2))
    left, right = (int(round(m * size)) for m in rng.uniform(0.03, 0.15, size=2))
    h, w = cover.shape
    full = np.zeros((h + top + bottom, w + left + right), np.float32)
    full[top:top + h, left:left + w] = cover
    return _compose(_paper(*full.shape, rng), full, rng)


def rec_samples(split: str, n: int, seed: int = 0) -> list[tuple[np.ndarray, str]]:
    """n (BGR uint8 line crop, its text) pairs from the split's sentences and fonts."""
    rng = _rng("rec", split, seed)
    lines, fonts = text_lines(split), font_files(split)
    return [(_render_crop(lines[i], fonts[rng.integers(len(fonts))], rng), lines[i])
            for i in rng.choice(len(lines), size=n, replace=n > len(lines))]


def cls_samples(split: str, n: int, seed: int = 0) -> list[tuple[np.ndarray, int]]:
    """n (BGR uint8 line crop, label): 0 upright, 1 rotated by 180 degrees, half each."""
    rng = _rng("cls", split, seed)
    lines, fonts = text_lines(split), font_files(split)
    labels = rng.permutation(np.arange(n) % 2)
    out = []
    for label, i in zip(labels, rng.choice(len(lines), size=n, replace=n > len(lines))):
        img = _render_crop(lines[i], fonts[rng.integers(len(fonts))], rng)
        out.append((np.ascontiguousarray(img[::-1, ::-1]) if label else img, int(label)))
    return out


def det_samples(split: str, n: int, seed: int = 0) -> list[tuple[np.ndarray, list[Box]]]:
    """n (BGR uint8 page, ground-truth line boxes): 4-10 non-overlapping lines each."""
    rng = _rng("det", split, seed)
    lines, fonts = text_lines(split), font_files(split)
    return [_render_page(rng, lines, fonts) for _ in range(n)]


def _render_page(rng: np.random.Generator, lines: Sequence[str],
                 fonts: Sequence[Path]) -> tuple[np.ndarray, list[Box]]:
    long = int(rng.integers(480, 737))
    short = int(long * rng.uniform(0.7, 1.0))
    h, w = (long, short) if rng.random() < 0.5 else (short, long)
    cover = np.zeros((h, w), np.float32)
    boxes: list[Box] = []
    want = int(rng.integers(4, 11))
    for _ in range(60):  # placement attempts; a crowded page may end with fewer lines
        if len(boxes) == want:
            break
        text = lines[rng.integers(len(lines))]
        font = _font(fonts[rng.integers(len(fonts))], int(rng.integers(14, 37)))
        ink, (_, iy0, _, iy1) = _ink_mask(text, font, rng.uniform(0, 0.6))
        # The ground truth spans the font's cap-to-descender band even when this line
        # has no capital or descender ("indices."): the detector marks whole lines.
        _, by0, _, by1 = font.getbbox("Hg")
        above, below = max(0, iy0 - by0), max(0, by1 - iy1)
        ih, iw = ink.shape
        bh = above + ih + below
        if iw > w - 16 or bh > h - 16:
            continue
        x, y = int(rng.integers(8, w - iw - 7)), int(rng.integers(8, h - bh - 7))
        box = (x, y, x + iw, y + bh)
        if any(_too_close(box, b) for b in boxes):
            continue
        cover[y + above:y + above + ih, x:x + iw] = ink
        boxes.append(box)
    return _compose(_paper(h, w, rng), cover, rng), boxes


def _too_close(a: Box, b: Box) -> bool:
    """Whether two lines would read as one: closer than half the taller line's height
    above or below, or than two heights side by side (a wide word space)."""
    h = max(a[3] - a[1], b[3] - b[1])
    gx, gy = 2 * h, h // 2
    return a[0] - gx < b[2] and b[0] < a[2] + gx and a[1] - gy < b[3] and b[1] < a[3] + gy


# ------------------------------------------------------------------ preprocessing
def _linear_taps(n_src: int, n_dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of cv2 INTER_LINEAR (half-pixel centres, clamped
    edges, no antialiasing when shrinking)."""
    pos = (np.arange(n_dst) + 0.5) * (n_src / n_dst) - 0.5
    i0 = np.floor(pos).astype(np.int64)
    frac = (pos - i0).astype(np.float32)
    frac[i0 < 0] = 0
    i0 = np.maximum(i0, 0)
    last = i0 >= n_src - 1
    frac[last] = 0
    i0[last] = n_src - 1
    return i0, np.minimum(i0 + 1, n_src - 1), frac


def resize_bilinear(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """cv2.resize(img, (width, height)) for HxWxC uint8 images, in numpy."""
    y0, y1, fy = _linear_taps(img.shape[0], height)
    x0, x1, fx = _linear_taps(img.shape[1], width)
    src = img.astype(np.float32)
    rows = src[y0] * (1 - fy)[:, None, None] + src[y1] * fy[:, None, None]
    out = rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)  # cv2 returns uint8 too


def _to_chw(img: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 -> float32 3xHxW in [-1, 1]: (x/255 - 0.5) / 0.5, as rapidocr."""
    return ((img.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


def _line_feed(img: np.ndarray, height: int, min_width: int, max_width: int | None
               ) -> np.ndarray:
    """Shared rec/cls layout: height fixed, width from the aspect ratio, zero padding
    on the right up to min_width (and squeezed to max_width when given)."""
    h, w = img.shape[:2]
    width = max(min_width, int(height * w / h))
    if max_width is not None:
        width = min(width, max_width)
    resized_w = min(width, int(np.ceil(height * w / h)))
    out = np.zeros((1, 3, height, width), np.float32)
    out[0, :, :, :resized_w] = _to_chw(resize_bilinear(img, resized_w, height))
    return out


def rec_feed(image: np.ndarray) -> dict[str, np.ndarray]:
    """rapidocr's rec input for one BGR crop: 1x3x48xW, W = max(320, 48*w/h)."""
    # With a batch of one, rapidocr's max_wh_ratio is max(320/48, w/h): no upper limit.
    return {"x": _line_feed(image, REC_HEIGHT, REC_MIN_WIDTH, None)}


def cls_feed(image: np.ndarray) -> dict[str, np.ndarray]:
    """rapidocr's cls input for one BGR crop: 1x3x48x192 (long lines are squeezed)."""
    return {"x": _line_feed(image, CLS_HEIGHT, CLS_WIDTH, CLS_WIDTH)}


class PageShape(NamedTuple):
    """The original page size, to map the det probability map back onto the page."""
    height: int
    width: int


def det_feed(image: np.ndarray) -> tuple[dict[str, np.ndarray], PageShape]:
    """rapidocr's det input: short side scaled up to 736 (limit_type 'min'), both sides
    rounded to multiples of 32, then (x/255 - 0.5) / 0.5."""
    h, w = image.shape[:2]
    ratio = max(1.0, DET_LIMIT_SIDE / min(h, w))
    rh, rw = (max(32, int(round(int(s * ratio) / 32) * 32)) for s in (h, w))
    return {"x": _to_chw(resize_bilinear(image, rw, rh))[None]}, PageShape(h, w)


# ------------------------------------------------------------------ postprocessing
def rec_charset(model: Any = None) -> list[str]:
    """The CTC classes of a rec model (path or session): blank, the lines of its
    'character' metadata, then a space (appended by rapidocr: the dict has none).
    Without a model, or for one that lost its metadata, the packaged float model's."""
    meta = _metadata(model) if model is not None else {}
    if "character" not in meta:
        meta = _metadata(model_path("rec"))
    return ["<blank>", *meta["character"].splitlines(), " "]


def rec_decode(logits: np.ndarray, charset: Sequence[str]) -> list[str]:
    """CTC greedy decoding of a Nx T x C output: best class per step, repeats merged,
    blanks (class 0) dropped."""
    best = np.asarray(logits).argmax(axis=-1).reshape(-1, np.shape(logits)[-2])
    texts = []
    for seq in best:
        keep = np.ones(len(seq), bool)
        keep[1:] = seq[1:] != seq[:-1]
        texts.append("".join(charset[c] for c in seq[keep & (seq != 0)]))
    return texts


def det_boxes(prob_map: np.ndarray, page: PageShape) -> list[Box]:
    """DB post-processing of a det output (any shape squeezing to HxW), boxes in page
    pixels. Axis-aligned: connected regions of prob > 0.3 (after rapidocr's 2x2
    dilation), kept when the mean probability of their box is >= 0.5, then grown by
    DB's unclip distance area * 1.6 / perimeter on every side."""
    prob = np.asarray(prob_map, np.float32).reshape(np.shape(prob_map)[-2:])
    mh, mw = prob.shape
    mask = prob > DET_THRESH
    # cv2.dilate with a 2x2 kernel (anchor at its centre): OR with the up/left pixels.
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:, 1:] |= grown[:, :-1].copy()
    out = []
    for x0, y0, x1, y1 in _components(grown):  # inclusive pixel extents
        w, h = x1 - x0, y1 - y0  # extent between pixel centres, as cv2.minAreaRect
        if min(w, h) < DET_MIN_SIZE or prob[y0:y1 + 1, x0:x1 + 1].mean() < DET_BOX_THRESH:
            continue
        d = w * h * DET_UNCLIP / (2 * (w + h))
        if min(w, h) + 2 * d < DET_MIN_SIZE + 2:
            continue
        sx, sy = page.width / mw, page.height / mh
        out.append((int(np.clip(round((x0 - d) * sx), 0, page.width)),
                    int(np.clip(round((y0 - d) * sy), 0, page.height)),
                    int(np.clip(round((x1 + d) * sx), 0, page.width)),
                    int(np.clip(round((y1 + d) * sy), 0, page.height))))
    return out


def _components(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Bounding boxes x0, y0, x1, y1 (all inclusive) of the 8-connected regions of a
    boolean mask.

    Works on horizontal runs rather than pixels: text maps have few runs, so a
    union-find over runs in Python is fast."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    rows_s, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)  # same row-major order as the starts
    runs = list(zip(rows_s.tolist(), starts.tolist(), (ends - 1).tolist()))
    parent = list(range(len(runs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    prev: list[int] = []  # run indices of the previous row
    cur: list[int] = []
    row = -1
    for k, (r, a, b) in enumerate(runs):
        if r != row:
            prev, cur = (cur if r == row + 1 else []), []
            row = r
        for j in prev:
            _, pa, pb = runs[j]
            if pa <= b + 1 and a <= pb + 1:  # touching, diagonals included
                parent[find(j)] = find(k)
        cur.append(k)
    boxes: dict[int, list[int]] = {}
    for k, (r, a, b) in enumerate(runs):
        box = boxes.setdefault(find(k), [a, r, b, r])
        box[0], box[1] = min(box[0], a), min(box[1], r)
        box[2], box[3] = max(box[2], b), max(box[3], r)
    return [tuple(b) for b in boxes.values()]


# ------------------------------------------------------------------ metrics
def _edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        diag, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (ca != cb))
    return row[-1]


def char_accuracy(preds: Sequence[str], truths: Sequence[str]) -> float:
    """1 - total edit distance / total truth length, floored at 0."""
    errors = sum(_edit_distance(p, t) for p, t in zip(preds, truths, strict=True))
    return max(0.0, 1.0 - errors / max(1, sum(len(t) for t in truths)))


def cls_accuracy(outputs: Sequence[np.ndarray], labels: Sequence[int]) -> float:
    """Share of crops whose arg-max class (0: '0', 1: '180') is the label."""
    hits = [int(np.argmax(np.asarray(o).reshape(-1))) == y
            for o, y in zip(outputs, labels, strict=True)]
    return float(np.mean(hits)) if hits else 0.0


def _iou(a: Box, b: Box) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def det_f1(pred_boxes_per_page: Sequence[Sequence[Box]],
           gt_boxes_per_page: Sequence[Sequence[Box]], iou: float = 0.5) -> float:
    """F1 over all pages; per page, pairs are matched one-to-one, highest IoU first."""
    tp = n_pred = n_gt = 0
    for preds, gts in zip(pred_boxes_per_page, gt_boxes_per_page, strict=True):
        n_pred, n_gt = n_pred + len(preds), n_gt + len(gts)
        pairs = sorted(((_iou(p, g), i, j) for i, p in enumerate(preds)
                        for j, g in enumerate(gts)), reverse=True)
        used_p, used_g = set(), set()
        for score, i, j in pairs:
            if score < iou:
                break
            if i not in used_p and j not in used_g:
                used_p.add(i)
                used_g.add(j)
        tp += len(used_p)
    return 2 * tp / (n_pred + n_gt) if n_pred + n_gt else 1.0


# ------------------------------------------------------------------ running models
def model_path(task: str) -> Path:
    """The float model rapidocr-onnxruntime ships for a task (found, never imported)."""
    import importlib.util

    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("rapidocr-onnxruntime is not installed")
    return Path(spec.submodule_search_locations[0]) / "models" / _MODEL_FILES[task]


def session(model: Any):
    """An onnxruntime CPU session, one intra-op thread; sessions pass through."""
    import onnxruntime as ort

    if isinstance(model, ort.InferenceSession):
        return model
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3  # silence "unused initializer" warnings
    return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])


def _metadata(model: Any) -> dict[str, str]:
    """metadata_props of a model file or session."""
    if hasattr(model, "get_modelmeta"):
        return dict(model.get_modelmeta().custom_metadata_map)
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def evaluate(task: str, model: Any, samples: Sequence[tuple[np.ndarray, Any]]) -> float:
    """Run a model (path or InferenceSession) on each sample, one at a time, and score
    it: det -> F1 of line boxes, rec -> character accuracy, cls -> accuracy."""
    sess = session(model)
    if task == "det":
        preds = []
        for page, _ in samples:
            feed, shape = det_feed(page)
            preds.append(det_boxes(sess.run(None, feed)[0], shape))
        return det_f1(preds, [gt for _, gt in samples])
    if task == "rec":
        charset = rec_charset(sess)
        texts = [rec_decode(sess.run(None, rec_feed(img))[0], charset)[0] for img, _ in samples]
        return char_accuracy(texts, [t for _, t in samples])
    if task == "cls":
        return cls_accuracy([sess.run(None, cls_feed(img))[0] for img, _ in samples],
                            [y for _, y in samples])
    raise ValueError(f"task must be one of {_TASKS}, not {task!r}")


def calibration_feeds(task: str, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """n feed dicts from the calib split (det and rec feeds vary in shape)."""
    if task == "det":
        return [det_feed(page)[0] for page, _ in det_samples("calib", n, seed)]
    if task == "rec":
        return [rec_feed(img) for img, _ in rec_samples("calib", n, seed)]
    if task == "cls":
        return [cls_feed(img) for img, _ in cls_samples("calib", n, seed)]
    raise ValueError(f"task must be one of {_TASKS}, not {task!r}")


def main() -> None:
    sizes = {"det": 20, "rec": 200, "cls": 200}
    makers = {"det": det_samples, "rec": rec_samples, "cls": cls_samples}
    start = time.perf_counter()
    for task in _TASKS:
        t0 = time.perf_counter()
        samples = makers[task]("test", sizes[task])
        t1 = time.perf_counter()
        score = evaluate(task, model_path(task), samples)
        t2 = time.perf_counter()
        print(f"{task}: {score:.4f} on {sizes[task]} test samples "
              f"(generate {t1 - t0:.1f}s, evaluate {t2 - t1:.1f}s)")
    print(f"total {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
