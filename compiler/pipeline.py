"""Named pipelines: plain ordered lists of pass instances."""

from __future__ import annotations

from typing import Callable

from rewrites.base import Pass
from rewrites.cleanup import DeadCodeElimination, remove_identity

from .errors import CompileError

PIPELINES: dict[str, Callable[[], list[Pass]]] = {
    # Emits what it read: the IR round trip alone.
    "lossless": lambda: [],
    # The default until the optimize pipeline lands: exact cleanups only.
    "default": lambda: [remove_identity(), DeadCodeElimination()],
}


def get_pipeline(name: str) -> list[Pass]:
    try:
        return PIPELINES[name]()
    except KeyError:
        raise CompileError(f"unknown pipeline '{name}' (choose from: {', '.join(PIPELINES)})") from None
