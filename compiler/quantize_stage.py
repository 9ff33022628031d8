"""The passes `--quantize int8` appends, in the order their facts need: equalization and
SmoothQuant change activation ranges, so they run before calibration; AdaRound snaps weights
with the calibrated table in hand and bias correction reads the weights as they then stand,
so both run between calibration and QDQ insertion."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np

from calibration import CalibrationTable
from rewrites.base import Pass
from rewrites.cleanup import DeadCodeElimination
from rewrites.integer_forms import IntegerForms
from rewrites.qdq import InsertQDQ
from rewrites.qdq_targets import ORT_CPU

from .adaround import AdaRound, check_rounding
from .depthwise import DEPTHWISE_MODES
from .errors import CompileError
from .quantize import Calibrate
from .smooth_quant import CalibratedSmoothQuant, parse_alpha


def quantize_passes(mode, calib, held_out, table, method, exclude, per_channel, depthwise,
                    equalizers: list[Pass], smooth_quant, rounding: str, correct: Pass | None,
                    progress) -> tuple[list[Pass], Calibrate]:
    """(the passes, the Calibrate pass, which holds the InsertQDQ pass among them)."""
    calibrate = calibrate_pass(mode, calib, held_out, table, method, exclude, per_channel, depthwise,
                               progress)
    insert = calibrate.insert
    passes = list(equalizers) + _smooth_stage(smooth_quant, calib, calibrate, progress)
    passes += [IntegerForms(insert.target, tuple(exclude), calibrate.input_shapes), calibrate]
    if check_rounding(rounding) == "adaround":
        if calib is None:
            raise CompileError("weight rounding 'adaround' needs calibration data (--calib DIR), "
                               "not only a calibration table")
        passes.append(AdaRound(insert=insert, feeds=calib, progress=progress))
    if correct is not None:  # after AdaRound: W_q is computed from the weights as they stand
        correct.insert, correct.progress = insert, progress
        passes.append(correct)
    return passes + [insert, DeadCodeElimination()], calibrate


def calibrate_pass(mode, calib, held_out, table, method, exclude, per_channel, depthwise, progress):
    """The Calibrate pass, which holds the InsertQDQ pass that follows it."""
    if mode != "int8":
        raise CompileError(f"quantization '{mode}' is not supported (choose from: int8)")
    if isinstance(table, (str, os.PathLike)):
        table = CalibrationTable.load(table)
    # Tensors are sized at the calibration inputs' shapes, or at those the table recorded. The
    # held-out feeds are read for it: they can be read again, a one-shot iterator cannot.
    shapes = table.inputs if table is not None else _first_shapes(held_out)
    if depthwise not in DEPTHWISE_MODES:
        raise CompileError(f"depthwise '{depthwise}' is not supported (choose from: {', '.join(DEPTHWISE_MODES)})")
    # "auto" plans them integer; compiler/depthwise.py then keeps float those it must.
    target = ORT_CPU if depthwise == "float" else replace(ORT_CPU, integer_depthwise=True)
    insert = InsertQDQ(target=target, exclude=tuple(exclude), per_channel=per_channel, input_shapes=shapes or None)
    return Calibrate(insert=insert, feeds=calib, method=method, exclude=tuple(exclude), table=table,
                     input_shapes=shapes or None, progress=progress)


def _smooth_stage(alpha, calib, calibrate, progress) -> list[Pass]:
    """The SmoothQuant pass before calibration, or nothing when `alpha` is None."""
    if alpha is None:
        return []
    alpha = parse_alpha(alpha)
    if calib is None:
        raise CompileError("smooth_quant needs calibration data (it measures activations), "
                           "not only a calibration table")
    insert = calibrate.insert
    return [CalibratedSmoothQuant(alpha=alpha, feeds=calib, method=calibrate.method, target=insert.target,
                                  exclude=insert.exclude, per_channel=insert.per_channel, progress=progress)]


def _first_shapes(source) -> dict[str, tuple[int, ...]]:
    """The input shapes of the source's first feed ({} without data)."""
    if source is None:
        return {}
    first = next(iter(source), None)
    return {name: tuple(np.shape(a)) for name, a in (first or {}).items()}
