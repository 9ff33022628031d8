"""Named pipelines: plain ordered lists of pass instances."""

from __future__ import annotations

from typing import Callable

from rewrites.base import Pass
from rewrites.cleanup import DeadCodeElimination, remove_noops
from rewrites.constants import FreezeInitializerInputs, lift_constants
from rewrites.cse import CommonSubexpressions
from rewrites.depth_to_space import depth_to_space
from rewrites.fold import FoldConstants
from rewrites.fusions import fuse
from rewrites.shapes import InferShapes

from .errors import CompileError


def optimize(fold_size_limit: int = 1 << 20, allow_growth: bool = False,
             freeze_inputs: bool = False) -> list[Pass]:
    """The default lossless pipeline: size-safe folding, cleanup and portable fusions.

    Constants are lifted first so every rule sees initializers; shapes are inferred before
    folding (shape arithmetic needs them) and again after fusions created new values; a
    second fold/cleanup round catches what fusions and the first round exposed.
    `freeze_inputs` turns inputs with initializer defaults into constants (IR 3 models list
    every weight as an input); `allow_growth` lets folding enlarge the model."""
    def fold() -> FoldConstants:
        return FoldConstants(size_limit=fold_size_limit, allow_growth=allow_growth)

    first = [FreezeInitializerInputs()] if freeze_inputs else []
    return first + [
        lift_constants(),
        InferShapes(),
        fold(),
        remove_noops(),
        fuse(),
        depth_to_space(),
        CommonSubexpressions(),
        DeadCodeElimination(),
        InferShapes(),
        fold(),
        remove_noops(),
        fuse(),
        DeadCodeElimination(),
    ]


PIPELINES: dict[str, Callable[..., list[Pass]]] = {
    # Emits what it read: the IR round trip alone (takes no options).
    "lossless": lambda: [],
    "default": optimize,
}


def get_pipeline(name: str, **options) -> list[Pass]:
    """The passes of a named pipeline; `options` are the pipeline function's arguments
    (e.g. allow_growth=True for `default`)."""
    try:
        make = PIPELINES[name]
    except KeyError:
        raise CompileError(f"unknown pipeline '{name}' (choose from: {', '.join(PIPELINES)})") from None
    try:
        return make(**options)
    except TypeError:
        raise CompileError(f"pipeline '{name}' does not take the options "
                           f"{', '.join(sorted(options))}") from None
