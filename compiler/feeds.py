"""Inputs for verification: the feed sources of `calibration.data` (a folder of .npz files, an
ONNX test-data folder, seeded random feeds), read into lists, plus --input-shape parsing."""

from __future__ import annotations

import re
from pathlib import Path

from calibration.data import (DEFAULT_DIM, MAX_RANDOM_ELEMENTS, Feed, as_feed, folder_source, random_source,
                              signature)
from ir import Model

from .errors import CompileError

__all__ = ["DEFAULT_DIM", "MAX_RANDOM_ELEMENTS", "Feed", "as_feed", "describe_feed", "load_feeds",
           "parse_input_shapes", "random_feeds", "signature"]


def parse_input_shapes(specs: list[str]) -> dict[str, tuple[int, ...]]:
    """'name=1,3,224,224' -> {'name': (1, 3, 224, 224)}."""
    shapes = {}
    for spec in specs or []:
        m = re.fullmatch(r"\s*([^=]+?)\s*=\s*(\d+(?:\s*,\s*\d+)*)\s*", spec)
        if not m:
            raise CompileError(f"--input-shape '{spec}': expected NAME=D1,D2,... (for example x=1,3,224,224)")
        shapes[m.group(1)] = tuple(int(d) for d in m.group(2).split(","))
    return shapes


def random_feeds(model: Model, shapes: dict[str, tuple[int, ...]] | None = None,
                 count: int = 2, seed: int = 0) -> list[Feed]:
    """Seeded feeds from the input signature (see `calibration.data.random_source`)."""
    return list(random_source(model, shapes, count=count, seed=seed,
                              remedy="give verification data with --verify-data"))


def load_feeds(folder: Path, model: Model) -> list[Feed]:
    """Feeds from a folder of .npz files (keys are input names) or an ONNX test-data folder
    (test_data_set_*/input_*.pb, or the input_*.pb files themselves). Never unpickles.
    Verification runs the same feeds several times, so they are read into a list."""
    return list(folder_source(folder, model, what="verification data"))


def describe_feed(feed: Feed) -> str:
    return ", ".join(f"{k}: {v.dtype}{list(v.shape)}" if hasattr(v, "shape") else f"{k}: {type(v).__name__}"
                     for k, v in feed.items())
