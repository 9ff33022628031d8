"""Feed sources (calibration/data.py): .npz folders, ONNX test data, iterables, seeded random
feeds, image folders with their preprocessing; laziness, limits, held-out splits, and the
one-line errors that name the file."""

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import ir
from calibration import data as data_module
from calibration.data import (Preprocess, Source, as_source, feeds_source, folder_source, image_source,
                              load_preprocess, npz_source, random_source, split, test_data_source)
from compiler.feeds import random_feeds
from ir import CompileError
from tests.payloads import PicklePayload


@pytest.fixture
def pil():
    """PIL.Image for the image tests (Pillow is the optional `images` extra)."""
    return pytest.importorskip("PIL.Image")


def parse(text: str) -> ir.Model:
    return ir.load(onnx.parser.parse_model('<ir_version: 10, opset_import: ["" : 21]>\n' + text))


def two_inputs() -> ir.Model:
    return parse("g (float[N, 3] x, int64[N] k) => (float[N, 3] y, int64[N] z) "
                 "{ y = Identity(x) z = Identity(k) }")


def image_model(shape: str = "N, 3, 4, 4", dtype: str = "float") -> ir.Model:
    return parse(f"g ({dtype}[{shape}] x) => ({dtype}[{shape}] y) {{ y = Identity(x) }}")


def assert_feeds_equal(got, expected):
    got = list(got)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert list(g) == list(e)
        for k in e:
            assert g[k].dtype == e[k].dtype and g[k].shape == e[k].shape, k
            np.testing.assert_array_equal(g[k], e[k])


@pytest.fixture
def npz_folder(tmp_path):
    """c.npz, a.npz, b.npz: feed i has x = i (2x3 float32) and k = [i, i] (int64)."""
    folder = tmp_path / "npz"
    folder.mkdir()
    for i, name in enumerate("abc"):
        np.savez(folder / f"{name}.npz", x=np.full((2, 3), i, np.float32), k=np.array([i, i]))
    return folder


def npz_feed(i):
    return {"x": np.full((2, 3), i, np.float32), "k": np.array([i, i], np.int64)}


# -- .npz folders ---------------------------------------------------------------------------


def test_npz_source_reads_files_sorted_by_name(npz_folder):
    source = npz_source(npz_folder, two_inputs())
    assert isinstance(source, Source) and len(source) == 3
    assert_feeds_equal(source, [npz_feed(0), npz_feed(1), npz_feed(2)])
    assert_feeds_equal(source, [npz_feed(0), npz_feed(1), npz_feed(2)])  # iterating again starts over
    assert_feeds_equal(npz_source(npz_folder, ["x", "k"], limit=2), [npz_feed(0), npz_feed(1)])
    assert len(npz_source(npz_folder, ["x", "k"], limit=2)) == 2
    assert len(npz_source(npz_folder, ["x", "k"], limit=10)) == 3


def test_npz_wrong_keys(npz_folder):
    with pytest.raises(CompileError) as info:
        list(npz_source(npz_folder, ["x", "k", "m"]))
    assert str(info.value) == f"{npz_folder / 'a.npz'}: feed does not match the model's inputs (missing m)"
    with pytest.raises(CompileError) as info:
        list(npz_source(npz_folder, ["x"]))
    assert str(info.value) == f"{npz_folder / 'a.npz'}: feed does not match the model's inputs (unknown k)"


def test_bad_npz_is_named_when_reached(npz_folder):
    (npz_folder / "b.npz").write_bytes(b"not a zip")
    source = npz_source(npz_folder, two_inputs())
    it = iter(source)
    assert_feeds_equal([next(it)], [npz_feed(0)])
    with pytest.raises(CompileError) as info:
        next(it)
    assert str(info.value) == (f"{npz_folder / 'b.npz'}: not a readable .npz file "
                               "(not a zip archive)")


def test_pickled_npz_is_refused_never_unpickled(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    flag = tmp_path / "unpickled"
    np.savez(folder / "feed.npz", x=np.array([PicklePayload(str(flag))], dtype=object))
    with pytest.raises(CompileError) as info:
        list(npz_source(folder, ["x"]))
    assert str(info.value) == (f"{folder / 'feed.npz'}: not a readable .npz file "
                               "(Object arrays cannot be loaded when allow_pickle=False)")
    assert not flag.exists()


def test_a_source_over_1000_files_opens_only_what_is_consumed(tmp_path, monkeypatch):
    folder = tmp_path / "many"
    folder.mkdir()
    np.savez(folder / "0000.npz", x=np.zeros((1, 3), np.float32), k=np.zeros(1, np.int64))
    payload = (folder / "0000.npz").read_bytes()
    for i in range(1, 1000):
        (folder / f"{i:04d}.npz").write_bytes(payload)
    opened = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda path, *a, **k: opened.append(Path(path).name)
                        or real_load(path, *a, **k))

    source = npz_source(folder, two_inputs())
    assert len(source) == 1000 and opened == []
    it = iter(source)
    for _ in range(3):
        next(it)
    assert opened == ["0000.npz", "0001.npz", "0002.npz"]

    opened.clear()
    calibration, held_out = split(source, holdout=10)
    assert (len(calibration), len(held_out)) == (990, 10) and opened == []
    next(iter(calibration))
    assert opened == ["0010.npz"]  # the held-out files are skipped, not read
    opened.clear()
    assert len(list(held_out)) == 10 and opened == [f"{i:04d}.npz" for i in range(10)]
    opened.clear()
    assert len(list(source.limit(5))) == 5 and len(opened) == 5


# -- ONNX test data -------------------------------------------------------------------------


def write_test_data(folder: Path, tensors: dict, named: bool = True) -> None:
    folder.mkdir(parents=True)
    for i, (name, array) in enumerate(tensors.items()):
        proto = numpy_helper.from_array(array, name if named else "")
        (folder / f"input_{i}.pb").write_bytes(proto.SerializeToString())


def test_test_data_source_by_name_and_by_position(tmp_path):
    # Set 0 names its tensors (in the reverse order of the inputs), set 1 relies on positions.
    write_test_data(tmp_path / "test_data_set_0",
                    {"k": np.array([7], np.int64), "x": np.ones((1, 3), np.float32)})
    write_test_data(tmp_path / "test_data_set_1", {"x": np.zeros((2, 3), np.float32), "k": np.array([1, 2])},
                    named=False)
    source = test_data_source(tmp_path, two_inputs())
    assert len(source) == 2
    assert_feeds_equal(source, [{"k": np.array([7], np.int64), "x": np.ones((1, 3), np.float32)},
                                {"x": np.zeros((2, 3), np.float32), "k": np.array([1, 2], np.int64)}])


def test_test_data_source_from_the_input_files_themselves(tmp_path):
    write_test_data(tmp_path / "set", {"x": np.ones((1, 3), np.float32), "k": np.array([3], np.int64)})
    assert_feeds_equal(test_data_source(tmp_path / "set", two_inputs()),
                       [{"x": np.ones((1, 3), np.float32), "k": np.array([3], np.int64)}])


def test_bad_tensor_file(tmp_path):
    write_test_data(tmp_path / "test_data_set_0", {"x": np.ones((1, 3), np.float32)})
    (tmp_path / "test_data_set_0" / "input_1.pb").write_bytes(b"\xff\xff\xff")
    with pytest.raises(CompileError) as info:
        list(test_data_source(tmp_path, two_inputs()))
    assert str(info.value).startswith(f"{tmp_path / 'test_data_set_0' / 'input_1.pb'}: not a TensorProto (")
    assert "\n" not in str(info.value)


def test_folder_source_picks_the_kind_and_names_bad_folders(tmp_path, npz_folder):
    assert len(folder_source(npz_folder, two_inputs())) == 3
    write_test_data(tmp_path / "td" / "test_data_set_0", {"x": np.ones((1, 3), np.float32), "k": np.array([1])})
    assert len(folder_source(tmp_path / "td", two_inputs())) == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(CompileError) as info:
        folder_source(tmp_path / "empty", two_inputs(), what="calibration data")
    assert str(info.value) == (f"calibration data '{tmp_path / 'empty'}' holds no .npz files and no "
                               "test_data_set_* folders")
    with pytest.raises(CompileError) as info:
        folder_source(tmp_path / "nope", two_inputs())
    assert str(info.value) == f"data '{tmp_path / 'nope'}' is not a folder"
    with pytest.raises(CompileError) as info:
        test_data_source(npz_folder, two_inputs())
    assert str(info.value) == f"data '{npz_folder}' holds no test_data_set_* folders and no input_*.pb files"


# -- iterables of feed dicts ----------------------------------------------------------------


def test_a_list_of_feeds_is_re_iterable_and_checked():
    feeds = [{"x": np.ones((1, 3), np.float32), "k": np.int64(4)}, npz_feed(1)]
    source = feeds_source(feeds, two_inputs())
    assert len(source) == 2
    first = list(source)
    assert first[0]["k"].shape == () and first[0]["k"].dtype == np.int64  # numpy scalars become arrays
    assert len(list(source)) == 2
    with pytest.raises(CompileError) as info:
        list(feeds_source([npz_feed(0), {"x": np.ones((1, 3), np.float32)}], two_inputs()))
    assert str(info.value) == "feeds[1]: feed does not match the model's inputs (missing k)"
    with pytest.raises(CompileError) as info:
        list(feeds_source([np.ones(3)]))
    assert str(info.value) == "feeds[0]: a ndarray, not a dict of input name -> array"


def test_a_generator_is_read_once_and_its_length_is_unknown():
    source = feeds_source(npz_feed(i) for i in range(4))
    assert source.length is None and bool(source)
    with pytest.raises(TypeError):
        len(source)
    assert_feeds_equal(source, [npz_feed(i) for i in range(4)])
    with pytest.raises(CompileError) as info:
        list(source)
    assert str(info.value) == ("feeds is a one-shot iterator and was already read; pass a list or a "
                               "Source to read it again")
    limited = feeds_source((npz_feed(i) for i in range(4)), limit=2)
    assert limited.length is None  # at most 2: the generator may hold fewer
    assert_feeds_equal(limited, [npz_feed(0), npz_feed(1)])


def test_as_source_and_what_it_refuses(npz_folder):
    assert len(as_source(npz_folder, two_inputs(), limit=1)) == 1
    assert len(as_source([npz_feed(0)])) == 1
    src = as_source([npz_feed(0), npz_feed(1)])
    assert as_source(src) is src
    with pytest.raises(CompileError) as info:
        as_source(npz_feed(0))
    assert str(info.value) == ("feeds: expected an iterable of feed dicts, got one dict; "
                               "wrap a single feed in a list")
    with pytest.raises(CompileError) as info:
        as_source(3)
    assert str(info.value) == "feeds: expected an iterable of feed dicts, got int"
    with pytest.raises(CompileError) as info:
        as_source([npz_feed(0)], limit=-1)
    assert str(info.value) == "limit must be a whole number of feeds, not -1"


# -- split ----------------------------------------------------------------------------------


def test_split_holds_out_the_first_feeds():
    feeds = [npz_feed(i) for i in range(5)]
    calibration, held_out = split(feeds, holdout=2)
    assert (len(calibration), len(held_out)) == (3, 2)
    assert_feeds_equal(held_out, feeds[:2])
    assert_feeds_equal(calibration, feeds[2:])
    assert_feeds_equal(calibration.limit(2), feeds[2:4])
    assert_feeds_equal(calibration.skip(1).limit(1), feeds[3:4])
    with pytest.raises(CompileError) as info:
        split(feeds, holdout=5)
    assert str(info.value) == "feeds has 5 feeds: holding out 5 leaves none for calibration"


def test_split_of_a_generator_reads_only_the_held_out_feeds():
    drawn = []

    def gen():
        for i in range(6):
            drawn.append(i)
            yield npz_feed(i)

    calibration, held_out = split(gen(), holdout=2)
    assert drawn == [0, 1]
    assert_feeds_equal(held_out, [npz_feed(0), npz_feed(1)])
    assert_feeds_equal(held_out, [npz_feed(0), npz_feed(1)])  # held-out feeds can be read again
    assert_feeds_equal(calibration, [npz_feed(i) for i in range(2, 6)])


# -- seeded random feeds --------------------------------------------------------------------


def test_random_source_is_seeded_and_re_iterable():
    model = parse("g (float[N, C] a, float[N, C] b, int32[K] c, bool[2] m) => (float[N, C] y) { y = Add(a, b) }")
    source = random_source(model, {"a": (3, 5)}, count=3, seed=7)
    assert len(source) == 3
    first = list(source)
    assert_feeds_equal(source, first)
    assert {k: (v.dtype, v.shape) for k, v in first[0].items()} == {
        "a": (np.float32, (3, 5)), "b": (np.float32, (3, 5)), "c": (np.int32, (1,)), "m": (np.bool_, (2,))}
    rng = np.random.default_rng(7)  # the draws, in input order, one feed after the other
    a = rng.standard_normal((3, 5)).astype(np.float32)
    b = rng.standard_normal((3, 5)).astype(np.float32)
    c = rng.integers(0, 4, (1,)).astype(np.int32)
    m = rng.random((2,)) < 0.5
    assert_feeds_equal(first[:1], [{"a": a, "b": b, "c": c, "m": m}])
    assert_feeds_equal(source.skip(1), first[1:])
    assert_feeds_equal(random_feeds(model, {"a": (3, 5)}, count=3, seed=7), first)  # one implementation


def test_random_source_checks_shapes_before_drawing():
    model = parse("g (float[N, 3] x, float[] s) => (float[N, 3] y) { y = Mul(x, s) }")
    with pytest.raises(CompileError) as info:
        random_source(model, {"x": (2, 4)})
    assert str(info.value) == "--input-shape x=2,4 contradicts its fixed shape ['N', 3]"
    with pytest.raises(CompileError) as info:
        random_source(model, {"y": (2,)})
    assert str(info.value) == "--input-shape names 'y', which is not an input of the model (inputs: x, s)"
    model = parse("g (complex64[2] x) => (complex64[2] y) { y = Identity(x) }")
    with pytest.raises(CompileError) as info:
        random_source(model)
    assert str(info.value) == ("input 'x' has type complex64, which random feeds do not cover; "
                               "give real data instead")


# -- images ---------------------------------------------------------------------------------


# A 2x2 RGB image: rows [red, green], [blue, (10, 20, 30)].
PIXELS = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [10, 20, 30]]], np.uint8)


def write_image(path: Path, pixels: np.ndarray = PIXELS) -> Path:
    from PIL import Image  # the tests that call this take the `pil` fixture
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def test_image_preprocessing_exact_on_a_2x2_image(tmp_path, pil):
    write_image(tmp_path / "img" / "a.png")
    # x = (pixel * 0.5 - mean) / std per channel: all exact in binary.
    source = image_source(tmp_path / "img", input="x", scale=0.5, mean=[1, 2, 3], std=[2, 4, 0.5])
    assert len(source) == 1
    r = (PIXELS[..., 0] * 0.5 - 1) / 2
    g = (PIXELS[..., 1] * 0.5 - 2) / 4
    b = (PIXELS[..., 2] * 0.5 - 3) / 0.5
    nchw = np.stack([r, g, b])[None].astype(np.float32)
    assert nchw[0, :, 1, 1].tolist() == [2.0, 2.0, 24.0]
    assert_feeds_equal(source, [{"x": nchw}])

    bgr_nhwc = np.stack([b, g, r], axis=-1)[None].astype(np.float32)
    source = image_source(tmp_path / "img", input="x", layout="NHWC", channels="BGR", scale=0.5,
                          mean=[3, 2, 1], std=[0.5, 4, 2])  # mean/std follow the channel order
    assert_feeds_equal(source, [{"x": bgr_nhwc}])


def test_image_preprocessing_from_a_json_config(tmp_path, pil):
    write_image(tmp_path / "img" / "a.png")
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    config = tmp_path / "pre.json"
    config.write_text(json.dumps({"input": "x", "size": [2, 2], "layout": "NCHW", "channels": "RGB",
                                  "scale": 0.00392156862745098, "mean": mean, "std": std}))
    (feed,) = image_source(tmp_path / "img", config)
    expected = ((PIXELS * 0.00392156862745098 - mean) / std).transpose(2, 0, 1)[None]
    assert feed["x"].dtype == np.float32 and feed["x"].shape == (1, 3, 2, 2)
    np.testing.assert_allclose(feed["x"], expected, rtol=1e-6)
    assert load_preprocess(config) == Preprocess(input="x", size=(2, 2), scale=0.00392156862745098,
                                                 mean=tuple(mean), std=tuple(std))
    assert load_preprocess(config, layout="nhwc").layout == "NHWC"  # keywords override the file


def test_gray_images(tmp_path, pil):
    write_image(tmp_path / "img" / "a.png", np.array([[0, 64], [128, 255]], np.uint8))
    (feed,) = image_source(tmp_path / "img", input="x", channels="GRAY", scale=0.25, mean=1, std=2)
    expected = ((np.array([[0, 64], [128, 255]]) * 0.25 - 1) / 2)[None, None].astype(np.float32)
    assert_feeds_equal([feed], [{"x": expected}])


def test_resize_and_fit(tmp_path, pil):
    write_image(tmp_path / "img" / "a.png")
    (feed,) = image_source(tmp_path / "img", input="x", size=[4, 4], resize="nearest", layout="NHWC")
    assert_feeds_equal([feed], [{"x": PIXELS.repeat(2, 0).repeat(2, 1)[None].astype(np.float32)}])

    wide = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3)
    write_image(tmp_path / "wide" / "a.png", wide)
    # pad: keeps the 2x4 image (it fits 4x4), zeros below, after normalizing (mean 1 -> -1 in the image)
    (feed,) = image_source(tmp_path / "wide", input="x", size=[4, 4], fit="pad", layout="NHWC", mean=1)
    expected = np.zeros((4, 4, 3))
    expected[:2] = wide - 1.0
    assert_feeds_equal([feed], [{"x": expected[None].astype(np.float32)}])
    # crop: the centre 2x2
    (feed,) = image_source(tmp_path / "wide", input="x", size=[2, 2], fit="crop", layout="NHWC")
    assert_feeds_equal([feed], [{"x": wide[:, 1:3][None].astype(np.float32)}])
    # stretch (default): straight to the size; nearest takes the pixel under each centre
    (feed,) = image_source(tmp_path / "wide", input="x", size=[4, 2], resize="nearest", layout="NHWC")
    assert_feeds_equal([feed], [{"x": wide[:, 1::2].repeat(2, 0)[None].astype(np.float32)}])


def test_images_sorted_by_name_lazy_and_limited(tmp_path, monkeypatch, pil):
    for name, value in (("b.png", 2), ("a.jpg", 1), ("c.bmp", 3)):
        write_image(tmp_path / "img" / name, np.full((2, 2, 3), value * 50, np.uint8))
    (tmp_path / "img" / "notes.txt").write_text("not an image")
    opened = []
    real_open = pil.open
    monkeypatch.setattr(pil, "open", lambda p, *a: opened.append(Path(p).name) or real_open(p, *a))
    source = image_source(tmp_path / "img", input="x", limit=2)
    assert len(source) == 2 and opened == []
    firsts = [float(f["x"][0, 0, 0, 0]) for f in source]
    assert opened == ["a.jpg", "b.png"]
    assert firsts[1] == 100.0 and abs(firsts[0] - 50.0) <= 2  # jpeg is lossy


def test_image_source_takes_name_size_and_dtype_from_the_model(tmp_path, pil):
    write_image(tmp_path / "img" / "a.png")
    (feed,) = image_source(tmp_path / "img", model=image_model(dtype="float16"), resize="nearest")
    assert list(feed) == ["x"] and feed["x"].dtype == np.float16 and feed["x"].shape == (1, 3, 4, 4)
    np.testing.assert_array_equal(feed["x"][0], PIXELS.repeat(2, 0).repeat(2, 1).transpose(2, 0, 1))


@pytest.mark.parametrize("model, options, message", [
    (image_model("N, 1, 4, 4"), {}, "image preprocessing: 'channels' RGB gives 3 channels in NCHW, "
                                    "input 'x' has 1 (shape ['N', 1, 4, 4])"),
    (image_model(), {"input": "img"}, "image preprocessing: 'input' names 'img', which is not an input of "
                                      "the model (inputs: x)"),
    (two_inputs(), {}, "image preprocessing: images feed a model with one input; this one has x, k"),
    (None, {}, "image preprocessing: 'input' is required without a model (the input the images feed)"),
])
def test_image_source_and_the_model_disagree(tmp_path, pil, model, options, message):
    write_image(tmp_path / "img" / "a.png")
    with pytest.raises(CompileError) as info:
        image_source(tmp_path / "img", model=model, **options)
    assert str(info.value) == message


@pytest.mark.parametrize("config, message", [
    ({"size": [224]}, "'size' must be [height, width] in pixels, not [224]"),
    ({"size": [0, 4]}, "'size' must be [height, width] in pixels, not [0, 4]"),
    ({"layout": "NCWH"}, "'layout' must be one of NCHW, NHWC, not \"NCWH\""),
    ({"channels": "RGBA"}, "'channels' must be one of RGB, BGR, GRAY, not \"RGBA\""),
    ({"resize": "cubic"}, "'resize' must be one of bilinear, nearest, bicubic, lanczos, box, not \"cubic\""),
    ({"fit": "letterbox"}, "'fit' must be one of stretch, pad, crop, not \"letterbox\""),
    ({"scale": 0}, "'scale' must be a positive number, not 0"),
    ({"scale": "1/255"}, "'scale' must be a positive number, not \"1/255\""),
    ({"mean": [0.5, 0.5]}, "'mean' must be a number or a list of 3 numbers (one per RGB channel), "
                           "not [0.5, 0.5]"),
    ({"std": [1, 0, 1]}, "'std' must be a nonzero number or a list of 3 nonzero numbers (one per RGB channel), "
                         "not [1, 0, 1]"),
    ({"input": 3}, "'input' must be an input name, not 3"),
    ({"sizes": [2, 2]}, "unknown key 'sizes' (known: input, size, layout, channels, scale, mean, std, "
                        "resize, fit)"),
])
def test_bad_preprocessing_values_name_the_config(tmp_path, config, message):
    path = tmp_path / "pre.json"
    path.write_text(json.dumps(config))
    with pytest.raises(CompileError) as info:
        load_preprocess(path)
    assert str(info.value) == f"{path}: {message}"
    with pytest.raises(CompileError) as info:
        load_preprocess(**config)
    assert str(info.value) == f"image preprocessing: {message}"


def test_unreadable_config_and_images(tmp_path, pil):
    path = tmp_path / "pre.json"
    path.write_text("{size: 3}")
    with pytest.raises(CompileError) as info:
        load_preprocess(path)
    assert str(info.value) == (f"{path}: not valid JSON (Expecting property name enclosed in double quotes: "
                               "line 1 column 2 (char 1))")
    path.write_text("[1, 2]")
    with pytest.raises(CompileError) as info:
        load_preprocess(path)
    assert str(info.value) == f"{path}: expected a JSON object of preprocessing options"
    with pytest.raises(CompileError) as info:
        load_preprocess(tmp_path / "missing.json")
    assert str(info.value) == (f"{tmp_path / 'missing.json'}: cannot read the preprocessing config "
                               "(No such file or directory)")

    write_image(tmp_path / "img" / "a.png")
    bad = tmp_path / "img" / "b.png"
    bad.write_bytes(b"not a png")
    source = image_source(tmp_path / "img", input="x")
    with pytest.raises(CompileError) as info:
        list(source)
    assert str(info.value) == f"{bad}: not a readable image (cannot identify image file {str(bad)!r})"
    (tmp_path / "none").mkdir()
    with pytest.raises(CompileError) as info:
        image_source(tmp_path / "none", input="x")
    assert str(info.value) == (f"data '{tmp_path / 'none'}' holds no images "
                               "(.png, .jpg, .jpeg, .bmp, .gif, .tif, .tiff, .webp, .ppm, .pgm)")


def test_missing_pillow_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"never read")
    monkeypatch.setitem(sys.modules, "PIL", None)  # `from PIL import Image` now raises ImportError
    with pytest.raises(CompileError) as info:
        image_source(tmp_path / "img", input="x")
    assert str(info.value) == "reading images needs Pillow: pip install onnxcc[images]"
    assert data_module.signature  # the module itself imports without Pillow
