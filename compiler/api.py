"""The Python API: `compile(model, ...) -> CompileResult`."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import onnx

import ir
from calibration import CalibrationTable, as_source, image_source, split
from rewrites.base import Pass
from rewrites.sparse_storage import StoreSparse

from .errors import CompileError
from .feeds import as_feed, load_feeds, parse_input_shapes, random_feeds
from .quantize import DEFAULT_MIN_COSINE, integer_kernels, quantize_tolerance, upgrade_for_per_channel
from .quantize_stage import quantize_passes
from .instruments import DebugDump, VerifyEachPass
from .pass_manager import PassManager, count_nodes, param_bytes
from .pipeline import get_pipeline
from .prune import model_size, prune_passes, pruning_summary
from .weight_only import upgrade_for_dq, weight_only_passes, weight_only_summary
from .recovery import recovery_passes
from .depthwise import ChooseDepthwise
from .fallback import BudgetedQuantize
from .sensitivity import Sensitivity
from .report import CompileReport
from .verify import EXACT, Tolerance, VerificationError, compare, run, runnable


@dataclass
class CompileResult:
    ir_model: ir.Model
    report: CompileReport
    calibration_table: CalibrationTable | None = None  # when quantizing: save it to reuse it

    @property
    def model(self) -> onnx.ModelProto:
        """The compiled model as an `onnx.ModelProto` (every tensor inline)."""
        return ir.to_proto(self.ir_model)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model atomically; large weights go to `<path>.data` when the input had
        external data or the model exceeds one protobuf."""
        path = Path(path)
        check_output_folder(path)
        try:
            ir.save(self.ir_model, path)
        except OSError as e:  # full disk, no permission: the user's environment, not our bug
            raise CompileError(f"cannot write '{path}': {e.strerror or e}") from None
        return path


def check_output_folder(path: Path) -> None:
    """The folder `path` goes into must exist (and be a folder): never created on a guess."""
    if not path.parent.exists():
        raise CompileError(f"output folder '{path.parent}' does not exist")
    if not path.parent.is_dir():
        raise CompileError(f"output folder '{path.parent}' is not a folder")


def compile(model, *, pipeline: str | Sequence[Pass] = "default", pipeline_options: dict | None = None,
            verify: bool = True,
            verify_each_pass: bool = False, debug_dump: str | os.PathLike | None = None,
            verify_data: str | os.PathLike | None = None, feeds: Sequence[dict] | None = None,
            input_shapes: dict[str, Sequence[int]] | Sequence[str] | None = None,
            tolerance: Tolerance = EXACT, quantize: str | None = None, calibration=None,
            calibration_table=None, calibration_method: str = "mse",
            calibration_samples: int | None = None, calibration_preprocess=None,
            exclude: Sequence[str] = (),
            min_cosine: float = DEFAULT_MIN_COSINE, per_channel: bool = True, depthwise: str = "auto",
            prune: float | None = None, prune_mode: str = "unstructured", prune_scope: str = "layer",
            prune_importance: str | None = None, refit: str | None = None, prune_exclude: Sequence[str] = (),
            prune_first_last: bool = False, prune_multiple: int = 16, sparse_storage: bool = False,
            sensitivity: bool = False, accuracy_budget: float | None = None, accuracy_metric=None,
            weight_rounding: str = "rtn", weight_only: str | None = None, block_size: int = 32,
            weight_format: str = "nbits", quantize_embeddings: bool = False,
            weight_only_exclude: Sequence[str] = (),
            smooth_quant: float | str | None = None, equalize: bool = False, bias_correction: str | None = None,
            absorb_high_bias: bool = False,
            progress=None) -> CompileResult:
    """Compile `model` (a path, bytes, `onnx.ModelProto` or `onnx_graphsurgeon.Graph`; the
    caller's object is never modified) through `pipeline` (a name, with `pipeline_options`
    for its function in compiler/pipeline.py, or a list of passes), then check the result
    against the input in onnxruntime unless `verify=False`.

    Verification feeds: `feeds` (feed dicts), else `verify_data` (a folder), else (when
    quantizing) feeds held out of the calibration data, else two seeded random feeds with
    symbolic dimensions bound by `input_shapes` ({name: dims} or ["name=1,3,224,224"]) or 1.

    `quantize="int8"` appends calibration and QDQ insertion to the pipeline: ranges come from
    `calibration` (a folder, feed dicts or a calibration Source; `calibration_samples` caps
    it; a folder of images with `calibration_preprocess`, a JSON file, dict or
    calibration.Preprocess) with `calibration_method`, or from `calibration_table` (a path or
    CalibrationTable); `exclude` names nodes or op types to keep in float; `per_channel=False`
    gives one weight scale per tensor (models below opset 13); `depthwise` "auto" runs the
    depthwise Convs on big maps as integer kernels except those that would lower the outputs'
    worst SQNR on the verification feeds below keeping them all float (compiler/depthwise.py),
    "integer" quantizes every one, "float" none; the result must keep every output's cosine
    with the float model at `min_cosine` or more.

    `prune` (a share in [0, 1)) prunes after the pipeline and before quantizing:
    `prune_mode` "unstructured" or "2:4" zeroes weights (`prune_scope` "layer" or "global"
    with LAMP scores; `sparse_storage=True` stores them as sparse initializers where that is
    smaller), "channel" removes that share of the channels of every prunable channel space
    (`prune_importance` "l1", "l2" or "activation"; `refit` "lstsq", "bias" or "none"; by
    default "activation" and "lstsq" with `calibration` data, else "l1" and "none"; kept
    counts are multiples of `prune_multiple`). `prune_exclude` names nodes or op
    types to leave whole; weight pruning leaves the first and last layers whole unless
    `prune_first_last`.
    A pruned model is held to `min_cosine` like a quantized one.

    `sensitivity=True` (with `quantize`) measures, on the verification feeds, each quantized
    node's cost: the outputs' worst cosine and SQNR with only that node quantized, and with
    all but it (`report.sensitivity`, ranked). `accuracy_budget` (with `quantize`) keeps the
    most sensitive nodes in float, one more at a time, until the metric drops at most that
    much from the float model's: the outputs' worst cosine on the verification feeds, or
    `accuracy_metric(model)` (bytes or a path onnxruntime loads; higher is better) on the
    user's own data; every step's metric and one-thread latency is in `report.fallback`.
    `smooth_quant` (with `quantize` and calibration data) moves activation outliers into the
    following MatMul/Gemm weights before calibrating (SmoothQuant): a number is alpha for
    every layer, "auto" chooses it per layer by simulated W8A8 error (compiler/smooth_quant.py).
    `weight_rounding` (with `quantize="int8"`): "rtn" rounds weights to nearest, "adaround"
    picks each weight's up/down rounding to minimise its layer's output error on the
    calibration data (rewrites/adaround.py; needs `calibration`, not only a table).
    `weight_only` ("int8", "int4" or "int2") stores the constant weights of MatMul/Gemm in
    blocks of `block_size` input features with a scale each, activations float:
    `weight_format` "nbits" (com.microsoft MatMulNBits) or "dq" (blocked DequantizeLinear
    before the MatMul, opset 21, 25 for int2: the model is upgraded; onnxruntime fuses it
    into MatMulNBits); `weight_rounding` "rtn", "gptq" or "adaround" (both need
    `calibration`); `quantize_embeddings` stores Gather tables as int4 blocks;
    `weight_only_exclude` names nodes or op types to keep float. It runs before int8
    quantization, which then leaves those MatMuls alone; held to `min_cosine`
    (rewrites/weight_only.py, compiler/weight_only.py).
    `equalize=True` (with `quantize`) runs cross-layer equalization before calibrating (exact:
    only through Relu-like ops, rewrites/equalize.py); `bias_correction` "analytic" (from the
    BatchNorm statistics, read before folding) or "empirical" (input means on the calibration
    data) subtracts each quantized layer's weight-rounding mean error from its bias just before
    QDQ insertion (compiler/recovery.py). `absorb_high_bias=True` (with `quantize`, after
    equalization) moves the part of a Relu layer's bias its BatchNorm statistics say is always
    passed into the next layer's bias (lossy; rewrites/absorb_bias.py).
    `progress(done, total)` is called as calibration feeds are read,
    `progress(done, total, "sensitivity")` as nodes are measured, `progress(done, total,
    "depthwise")` as depthwise Convs are measured and `progress(done, total, "fallback")` as
    fallback steps are tried."""
    source = _as_source(model)
    ir_model = ir.load(source)
    notes = []
    if quantize is not None and per_channel:
        ir_model, note = upgrade_for_per_channel(ir_model)
        notes += [note] if note else []
    if weight_only is not None and weight_format == "dq":
        ir_model, note = upgrade_for_dq(ir_model, weight_only, quantize_embeddings)
        notes += [note] if note else []
    pipeline_name = pipeline if isinstance(pipeline, str) else "custom"
    passes = get_pipeline(pipeline, **(pipeline_options or {})) if isinstance(pipeline, str) \
        else list(pipeline)
    report = CompileReport(pipeline_name, nodes_before=count_nodes(ir_model),
                           param_bytes_before=param_bytes(ir_model), notes=notes)

    calibrate = None
    if calibration_preprocess is not None:
        if not isinstance(calibration, (str, os.PathLike)):
            raise CompileError("calibration_preprocess needs calibration to be a folder of images")
        calibration = image_source(calibration, calibration_preprocess, model=ir_model, what="calibration data")
    calib, held_out = _calibration_split(ir_model, calibration, calibration_samples)
    equalizers, tie, correct = recovery_passes(equalize, bias_correction, quantize, ir_model, calib, accuracy_budget,
                                               absorb_high_bias)
    passes += [tie] if tie is not None else []  # right after the optimize pipeline folds BatchNorms
    if prune is not None:
        passes += prune_passes(prune, prune_mode, prune_scope, prune_importance, refit, prune_exclude,
                               prune_first_last, prune_multiple, calib, progress)
        tolerance = quantize_tolerance(min_cosine)
    elif sparse_storage:
        raise CompileError("sparse_storage stores pruned weights: it needs prune")
    low_bit = None
    if weight_only is not None:  # before calibration: the QDQ plan then skips these MatMuls
        passes += weight_only_passes(weight_only, block_size, weight_rounding, weight_format,
                                     quantize_embeddings, weight_only_exclude, calib, progress)
        low_bit = passes[-1]
        tolerance = quantize_tolerance(min_cosine)
    elif quantize_embeddings or weight_only_exclude or block_size != 32 or weight_format != "nbits":
        raise CompileError("block_size, weight_format, quantize_embeddings and weight_only_exclude are "
                           "for weight-only quantization: they need weight_only")
    if quantize is not None:
        # With weight_only, "gptq" is for the low-bit MatMuls; the int8 weights round to nearest.
        rounding = "rtn" if low_bit is not None and weight_rounding == "gptq" else weight_rounding
        stage, calibrate = quantize_passes(quantize, calib, held_out, calibration_table, calibration_method,
                                           exclude, per_channel, depthwise, equalizers, smooth_quant,
                                           rounding, correct, progress)
        passes += stage
        tolerance = quantize_tolerance(min_cosine)
    elif smooth_quant is not None:
        raise CompileError("smooth_quant prepares a model for int8 quantization: it needs quantize='int8'")
    if quantize is None and weight_only is None and weight_rounding != "rtn":
        raise CompileError(f"weight_rounding '{weight_rounding}' is for quantized weights: it needs quantize='int8'")
    if sparse_storage:
        passes.append(StoreSparse())
    if sensitivity and quantize is None:
        raise CompileError("sensitivity analysis is of quantization: it needs quantize='int8'")
    budgeted = None
    if accuracy_budget is not None:
        if quantize is None:
            raise CompileError("an accuracy budget is for quantization: it needs quantize='int8'")
        budgeted = BudgetedQuantize(insert=calibrate.insert, budget=accuracy_budget, metric=accuracy_metric,
                                    progress=progress)
        passes[passes.index(calibrate.insert)] = budgeted
        if accuracy_metric is None:  # the budget is the cosine's: verification holds it too
            tolerance = quantize_tolerance(min(min_cosine, 1.0 - accuracy_budget))
    chooser = None
    if quantize is not None and depthwise == "auto" and budgeted is None:  # a budget measures itself
        chooser = ChooseDepthwise(insert=calibrate.insert, progress=progress)
        passes[passes.index(calibrate.insert)] = chooser
        calibrate.depthwise_variants = True
    if sensitivity or budgeted is not None:
        if calib is None:
            raise CompileError("sensitivity analysis and accuracy budgets need calibration data (they "
                               "range the tensors each variant quantizes), not only a calibration table")
        calibrate.node_variants = True
    shapes = parse_input_shapes(input_shapes) if _is_spec_list(input_shapes) else \
        {k: tuple(v) for k, v in (input_shapes or {}).items()}  # parsed even unused: bad flags fail
    reference = []
    if verify or verify_each_pass or sensitivity or budgeted is not None or chooser is not None:
        if feeds is not None:
            feeds = [as_feed(f) for f in feeds]
        elif verify_data is not None:
            feeds = load_feeds(Path(verify_data), ir_model)
        elif held_out is not None:
            feeds = list(held_out)
        else:
            feeds = random_feeds(ir_model, shapes)
        reference = run(_reference_source(source), feeds, "input model", error=CompileError)

    instruments = []
    dump = DebugDump(debug_dump) if debug_dump is not None else None
    if dump is not None:  # first, so the pass that breaks the numbers is dumped too
        instruments.append(dump)
    if verify_each_pass:
        instruments.append(VerifyEachPass(feeds, reference, EXACT, lossy_tolerance=tolerance))
    if budgeted is not None:
        budgeted.feeds, budgeted.reference = feeds, reference
    if chooser is not None:  # calibration feeds too, unless they can be read only once
        chooser.feeds, chooser.more = feeds, None if calib is None or calib.once else calib
    analysis = Sensitivity(calibrate.insert, feeds, reference, progress) if sensitivity else None
    instruments += [analysis] if analysis is not None else []
    if prune is not None or low_bit is not None:
        report.file_size_before = model_size(ir_model)
    report.records = PassManager(passes, instruments).run(ir_model)
    report.nodes_after, report.param_bytes_after = count_nodes(ir_model), param_bytes(ir_model)
    if analysis is not None:
        report.sensitivity = analysis.results
    if budgeted is not None:
        report.fallback = budgeted.curve
    if chooser is not None and chooser.summary:
        report.notes.append(chooser.summary)
    if dump is not None:
        report.notes += dump.write_analyses(report.sensitivity, report.fallback)
    if prune is not None:
        report.pruning = pruning_summary(ir_model, report.records)
    if prune is not None or low_bit is not None:
        report.file_size_after = model_size(ir_model)
    if low_bit is not None:
        report.weight_only = weight_only_summary(low_bit, report.records)

    deployed = quantize is not None or low_bit is not None
    if verify or deployed:
        scratch = Path(tempfile.mkdtemp(prefix="onnxcc-verify-"))
        # A quantized model is verified as it will run: with onnxruntime's QDQ fusions on,
        # whose fused graph also tells how many integer kernels it got.
        optimized = scratch / "optimized.onnx" if deployed else None
        try:
            model_file = runnable(ir_model, scratch)
            if verify:
                outputs = run(model_file, feeds, "compiled model", optimized=optimized)
            else:
                run(model_file, [], "compiled model", optimized=optimized)
            if optimized is not None:
                report.integer_kernels = integer_kernels(optimized)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    if verify:
        report.verification = compare(reference, outputs, tolerance)
        if not report.verification.ok:
            raise VerificationError(f"verification failed: {report.verification.worst()}"
                                    + _budget_hint(report.verification, tolerance))
    return CompileResult(ir_model, report, calibrate.table if calibrate is not None else None)


def _budget_hint(verification, tolerance: Tolerance) -> str:
    """When an output fails on the cosine budget of a lossy compile, say which and how to set it."""
    if not any(not o.ok and not o.note and o.cosine < tolerance.min_cosine for o in verification.outputs):
        return ""
    return f" (below the cosine budget {tolerance.min_cosine:g}, which --min-cosine sets)"


HOLDOUT = 4  # calibration feeds kept apart to verify the quantized model on unseen data


def _calibration_split(model, calibration, samples):
    """(calibration feeds, held-out feeds for verification) from the user's data, or
    (None, None) without any."""
    if calibration is None:
        return None, None
    source = as_source(calibration, model, what="calibration data")
    if source.length == 1:
        return source, source  # one sample: verify on it rather than on nothing
    holdout = HOLDOUT if source.length is None else min(HOLDOUT, max(1, source.length // 5))
    calib, held_out = split(source, holdout=holdout)
    return (calib.limit(samples) if samples is not None else calib), held_out


def _as_source(model):
    """Paths, bytes and ModelProtos go to `ir.load` as they are; a graphsurgeon Graph is
    exported to a ModelProto first."""
    if type(model).__module__.startswith("onnx_graphsurgeon"):
        import onnx_graphsurgeon as gs

        try:
            return gs.export_onnx(model)
        except Exception as e:  # noqa: BLE001 - graphsurgeon raises assorted errors
            raise CompileError(f"cannot export the onnx-graphsurgeon graph: {e}") from None
    return model


def _reference_source(source) -> bytes | Path:
    """The input exactly as the user gave it, for onnxruntime to run."""
    if isinstance(source, onnx.ModelProto):
        return source.SerializeToString()
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    return Path(source)


def _is_spec_list(shapes) -> bool:
    return isinstance(shapes, (list, tuple)) and all(isinstance(s, str) for s in shapes)
