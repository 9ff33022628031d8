"""The `onnxcc` command line.

Exit codes: 0 success, 1 verification failed, 2 bad input or usage, 3 internal error (a bug
of onnxcc: rerun with --traceback and report it). Errors are one line on stderr; the
Python traceback is shown only with --traceback. Nothing is written unless verification
passed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import ir
from calibration import load_preprocess

from .api import check_output_folder, compile as compile_model
from .errors import CompileError
from .inspect_model import describe
from .pipeline import PIPELINES

EXAMPLES = """\
examples:
  onnxcc compile model.onnx -o out.onnx
  onnxcc compile model.onnx -o out.onnx --debug-dump dump/          one folder of files per pass
  onnxcc compile model.onnx -o out.onnx --input-shape x=1,3,224,224 bind symbolic dims for verification
  onnxcc compile model.onnx -o out.onnx --verify-data feeds/        .npz files or test_data_set_* folders
  onnxcc compile model.onnx -o out.onnx --verify-each-pass          name the first pass that breaks numerics
  onnxcc compile model.onnx -o int8.onnx --quantize int8 --calib feeds/ --save-calibration calib.json
  onnxcc compile model.onnx -o int8.onnx --quantize int8 --calibration-table calib.json
  onnxcc compile model.onnx -o small.onnx --prune 0.2 --prune-mode channel --calib feeds/
                                                                    remove 20% of channels, refit on data
  onnxcc compile model.onnx -o sparse.onnx --prune 0.7 --prune-scope global --sparse-storage
  onnxcc compile old.onnx -o out.onnx --freeze-inputs --allow-growth --fold-size-limit 1G
                                                                    fold everything, even if it grows
  onnxcc inspect model.onnx                                         ops, parameters, signature, metadata

exit codes: 0 success, 1 verification failed, 2 bad input or usage, 3 internal error
"""


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line on stderr like every other error (exit 2), without
    argparse's multi-line usage block; --help still shows it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="onnxcc", description="Ahead-of-time compiler for ONNX models.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    c = sub.add_parser("compile", help="compile a model through a pipeline, verify it, write it",
                       description="Lower MODEL, run a pipeline of rewrites, check the result against "
                                   "the input in onnxruntime, and write it to OUT only if it verifies.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("model", type=Path, help="input .onnx file (external data is read beside it)")
    c.add_argument("-o", "--output", type=Path, required=True,
                   help="output .onnx file; large weights go to OUT.data when the input had external data")
    c.add_argument("--pipeline", default="default", choices=sorted(PIPELINES),
                   help="named pipeline (default: %(default)s)")
    c.add_argument("--fold-size-limit", type=_byte_size, metavar="BYTES",
                   help="largest tensor constant folding may create (default 1MiB; suffixes K, M, G)")
    c.add_argument("--allow-growth", action="store_true",
                   help="let constant folding make the model larger (off: folding never grows it)")
    c.add_argument("--freeze-inputs", action="store_true",
                   help="treat graph inputs that have initializer defaults as constants (IR 3 models "
                        "list every weight as an input); the model's signature loses them")
    q = c.add_argument_group("quantization (W8A8 QDQ for onnxruntime's CPU EP)")
    q.add_argument("--quantize", choices=["int8"], help="quantize: uint8 activations, int8 per-channel weights")
    q.add_argument("--calib", type=Path, metavar="DIR",
                   help="calibration data: .npz files (keys are input names) or test_data_set_* folders; "
                        "a few are held out to verify the result")
    q.add_argument("--calib-preprocess", type=Path, metavar="FILE",
                   help="--calib holds images: a JSON file saying how they become inputs (keys size, "
                        "layout, channels, scale, mean, std, resize, fit; the --image-* options override it)")
    q.add_argument("--image-size", type=_pair, metavar="H,W", help="resize calibration images to H x W")
    q.add_argument("--image-layout", choices=["NCHW", "NHWC"], help="input layout (default NCHW)")
    q.add_argument("--image-channels", choices=["RGB", "BGR", "GRAY"], help="channel order (default RGB)")
    q.add_argument("--image-scale", type=float, metavar="F", help="pixel values are multiplied by F first")
    q.add_argument("--image-mean", type=_floats, metavar="M[,M,M]", help="subtracted per channel after scaling")
    q.add_argument("--image-std", type=_floats, metavar="S[,S,S]", help="divided per channel after the mean")
    q.add_argument("--image-fit", choices=["stretch", "pad", "crop"],
                   help="how the aspect ratio is handled when resizing (default stretch)")
    q.add_argument("--calib-method", default="mse", choices=["minmax", "percentile", "entropy", "mse"],
                   help="how ranges are chosen from the observed values (default: %(default)s)")
    q.add_argument("--calib-samples", type=int, metavar="N", help="use at most N calibration feeds")
    q.add_argument("--exclude", action="append", default=[], metavar="NAME_OR_OP",
                   help="keep this node (by name) or op type in float (repeatable)")
    q.add_argument("--save-calibration", type=Path, metavar="FILE",
                   help="write the calibration table (JSON) so the compile can be reproduced")
    q.add_argument("--calibration-table", type=Path, metavar="FILE",
                   help="reuse a calibration table instead of calibrating (no data needed)")
    q.add_argument("--depthwise", choices=["auto", "integer", "float"],
                   help="depthwise Convs as integer kernels: auto (default) on big maps, except those "
                        "that would lower the outputs' SQNR on the verification data below keeping them "
                        "float; integer: all; float: none")
    q.add_argument("--per-tensor-weights", action="store_true",
                   help="one scale per weight tensor instead of per output channel (needed below opset 13)")
    q.add_argument("--weight-rounding", default="rtn", choices=["rtn", "gptq", "adaround"],
                   help="how weights are rounded to int8: to nearest, or adaround: each weight up or down so "
                        "that its layer's output error on --calib data is smallest (slower compile); with "
                        "--weight-only also gptq (default: %(default)s)")
    q.add_argument("--equalize", action="store_true",
                   help="cross-layer equalization before calibrating: balance consecutive layers' per-channel "
                        "weight ranges (exact; helps --per-tensor-weights most)")
    q.add_argument("--bias-correction", choices=["analytic", "empirical"],
                   help="subtract each quantized layer's weight-rounding mean error from its bias, with input "
                        "means from the BatchNorm statistics (analytic) or the --calib data (empirical)")
    q.add_argument("--absorb-high-bias", action="store_true",
                   help="after equalization, move the part of a Relu layer's bias that its BatchNorm statistics "
                        "say always passes into the next layer (lossy; narrows the activation ranges)")
    q.add_argument("--sensitivity", action="store_true",
                   help="rank the quantized nodes by what quantizing each costs the outputs (alone, and all "
                        "but it), on the verification feeds; printed after the pass table")
    q.add_argument("--accuracy-budget", type=float, metavar="DROP",
                   help="keep the most sensitive nodes in float, one at a time, until the outputs' cosine with "
                        "the float model drops by at most DROP (e.g. 0.005); prints each step's cosine and "
                        "one-thread latency")
    q.add_argument("--smooth-quant", nargs="?", const="auto", type=_smooth_alpha, metavar="ALPHA|auto",
                   help="before calibrating, move activation outliers into the weights of the MatMul/Gemm "
                        "after them (SmoothQuant): ALPHA in [0, 1] for every layer, or auto (the default "
                        "without a value): per layer, by its simulated W8A8 output error")
    q.add_argument("--min-cosine", type=float, default=0.99, metavar="C",
                   help="fail when an output's cosine with the float model falls below C (default: %(default)s)")
    p = c.add_argument_group("pruning (after the pipeline, before quantizing)")
    p.add_argument("--prune", type=float, metavar="SHARE",
                   help="prune this share of the weights (unstructured, 2:4) or of the channels (channel), "
                        "e.g. 0.5")
    p.add_argument("--prune-mode", default="unstructured", choices=["unstructured", "2:4", "channel"],
                   help="zero single weights (size only in onnxruntime), 2 of every 4 along the reduction "
                        "axis, or remove whole channels (smaller and faster) (default: %(default)s)")
    p.add_argument("--prune-scope", default="layer", choices=["layer", "global"],
                   help="the share per layer, or over the whole model with per-layer normalised scores "
                        "(default: %(default)s)")
    p.add_argument("--prune-importance", choices=["l1", "l2", "activation"],
                   help="channel ranking: weight norms, or what a channel adds to the next layer's output "
                        "on --calib data (default: activation with --calib, else l1)")
    p.add_argument("--refit", choices=["lstsq", "bias", "none"],
                   help="after channel pruning, refit each consumer to the float model's outputs on --calib "
                        "data (lstsq), only correct its bias (bias), or neither (default: lstsq with --calib)")
    p.add_argument("--prune-multiple", type=int, default=16, metavar="N",
                   help="channel pruning keeps channel counts that are multiples of N: onnxruntime's fast "
                        "convolutions take 16 channels at a time on AVX-512 CPUs, 8 on AVX2 "
                        "(default: %(default)s)")
    p.add_argument("--prune-exclude", action="append", default=[], metavar="NAME_OR_OP",
                   help="leave this node (by name) or op type unpruned (repeatable)")
    p.add_argument("--prune-first-last", action="store_true",
                   help="prune the first and last layers' weights too (off: they are left whole)")
    p.add_argument("--sparse-storage", action="store_true",
                   help="store pruned weights as sparse initializers where that is smaller")
    w = c.add_argument_group("weight-only low-bit MatMul (activations stay float)")
    w.add_argument("--weight-only", choices=["int8", "int4", "int2"],
                   help="store MatMul/Gemm weights as blocked low-bit integers (gptq/adaround rounding: --calib)")
    w.add_argument("--block-size", type=int, default=32, metavar="N",
                   help="input features per scale: a power of two >= 16 (default: %(default)s)")
    w.add_argument("--weight-format", default="nbits", choices=["nbits", "dq"],
                   help="com.microsoft MatMulNBits, or blocked DequantizeLinear (opset 21, int2 25: the model "
                        "is upgraded) that onnxruntime fuses into it (default: %(default)s)")
    w.add_argument("--quantize-embeddings", action="store_true",
                   help="store constant Gather tables (embeddings) as int4 blocks too")
    c.add_argument("--debug-dump", type=Path, metavar="DIR",
                   help="write NNN_<pass>.onnx/.txt/.diff per pass and summary.txt into DIR")
    c.add_argument("--no-verify", action="store_true", help="skip the final check in onnxruntime")
    c.add_argument("--verify-each-pass", action="store_true",
                   help="check after every pass and name the first one that changes the outputs")
    c.add_argument("--verify-data", type=Path, metavar="DIR",
                   help="feeds for verification: .npz files (keys are input names) or test_data_set_* "
                        "folders; default: 2 seeded random feeds")
    c.add_argument("--input-shape", action="append", default=[], metavar="NAME=D1,D2,...",
                   help="bind an input's symbolic dimensions for random feeds (repeatable; unbound "
                        "symbolic dimensions are 1)")
    c.add_argument("--traceback", action="store_true", help="show the Python traceback on error")

    i = sub.add_parser("inspect", help="describe a model: ops, parameters, signature, metadata",
                       description="Describe a model: op histogram, parameters and bytes by dtype, "
                                   "opsets, inputs and outputs with shapes, subgraphs, metadata keys.")
    i.add_argument("model", type=Path, help="an .onnx file (external data is read beside it)")
    i.add_argument("--traceback", action="store_true", help="show the Python traceback on error")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse printed a one-line usage error (code 2) or help (code 0)
        return int(e.code or 0)
    try:
        return _compile(args) if args.command == "compile" else _inspect(args)
    except CompileError as e:
        if args.traceback:
            raise
        kind = "internal error" if e.exit_code == 3 else "error"
        hint = " (rerun with --traceback and report it)" if e.exit_code == 3 else ""
        print(f"onnxcc: {kind}: {e}{hint}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("onnxcc: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug of ours: one line, not a traceback
        if args.traceback:
            raise
        print(f"onnxcc: internal error: {type(e).__name__}: {e} (rerun with --traceback and report it)",
              file=sys.stderr)
        return 3


def _compile(args) -> int:
    if args.output.is_dir():
        raise CompileError(f"output '{args.output}' is a folder; give a file name")
    check_output_folder(args.output)  # before compiling, not after minutes of work
    options = {k: v for k, v in (("fold_size_limit", args.fold_size_limit),
                                 ("allow_growth", args.allow_growth or None),
                                 ("freeze_inputs", args.freeze_inputs or None)) if v is not None}
    lossy = {}
    if args.quantize or args.prune is not None or args.weight_only:
        lossy = dict(calibration=args.calib, calibration_preprocess=_image_preprocess(args),
                     calibration_samples=args.calib_samples, min_cosine=args.min_cosine, progress=_progress())
    elif args.calib or args.calib_preprocess or any(getattr(args, flag) is not None for flag in IMAGE_OPTIONS):
        raise CompileError("--calib, --calib-preprocess and --image-* need --quantize int8, --prune or "
                           "--weight-only")
    if args.quantize:
        lossy.update(quantize=args.quantize, calibration_table=args.calibration_table,
                     calibration_method=args.calib_method, exclude=args.exclude,
                     per_channel=not args.per_tensor_weights, depthwise=args.depthwise or "auto",
                     sensitivity=args.sensitivity, accuracy_budget=args.accuracy_budget,
                     weight_rounding=args.weight_rounding)
    elif (args.calibration_table or args.save_calibration or args.exclude or args.sensitivity
          or args.accuracy_budget is not None or args.depthwise is not None):
        raise CompileError("--calibration-table, --save-calibration, --exclude, --sensitivity, "
                           "--accuracy-budget and --depthwise need --quantize int8")
    if args.smooth_quant is not None:
        if not args.quantize:
            raise CompileError("--smooth-quant needs --quantize int8")
        lossy["smooth_quant"] = args.smooth_quant
    if args.equalize or args.bias_correction or args.absorb_high_bias:
        if not args.quantize:
            raise CompileError("--equalize, --bias-correction and --absorb-high-bias need --quantize int8")
        lossy.update(equalize=args.equalize, bias_correction=args.bias_correction,
                     absorb_high_bias=args.absorb_high_bias)
    if args.weight_only:
        lossy.update(weight_only=args.weight_only, block_size=args.block_size, weight_format=args.weight_format,
                     quantize_embeddings=args.quantize_embeddings, weight_rounding=args.weight_rounding)
    elif args.block_size != 32 or args.weight_format != "nbits" or args.quantize_embeddings:
        raise CompileError("--block-size, --weight-format and --quantize-embeddings need --weight-only")
    elif not args.quantize and args.weight_rounding != "rtn":
        raise CompileError(f"--weight-rounding {args.weight_rounding} needs --quantize int8 or --weight-only")
    if args.prune is not None:
        lossy.update(prune=args.prune, prune_mode=args.prune_mode, prune_scope=args.prune_scope,
                     prune_importance=args.prune_importance, refit=args.refit, prune_exclude=args.prune_exclude,
                     prune_first_last=args.prune_first_last, prune_multiple=args.prune_multiple,
                     sparse_storage=args.sparse_storage)
    elif (args.refit or args.prune_exclude or args.prune_first_last or args.sparse_storage
          or args.prune_mode != "unstructured" or args.prune_scope != "layer" or args.prune_importance
          or args.prune_multiple != 16):
        raise CompileError("--prune-mode, --prune-scope, --prune-importance, --refit, --prune-multiple, "
                           "--prune-exclude, --prune-first-last and --sparse-storage need --prune SHARE")
    result = compile_model(args.model, pipeline=args.pipeline, pipeline_options=options, **lossy,
                           verify=not args.no_verify,
                           verify_each_pass=args.verify_each_pass, debug_dump=args.debug_dump,
                           verify_data=args.verify_data, input_shapes=args.input_shape)
    result.save(args.output)
    if args.save_calibration and result.calibration_table is not None:
        result.calibration_table.save(args.save_calibration)
    print(result.report)
    print(f"wrote {args.output}")
    return 0


IMAGE_OPTIONS = {"image_size": "size", "image_layout": "layout", "image_channels": "channels",
                 "image_scale": "scale", "image_mean": "mean", "image_std": "std", "image_fit": "fit"}


def _image_preprocess(args):
    """The declared preprocessing of calibration images, or None when none was declared."""
    options = {key: getattr(args, flag) for flag, key in IMAGE_OPTIONS.items() if getattr(args, flag) is not None}
    if args.calib_preprocess is None and not options:
        return None
    if args.calib is None:
        raise CompileError("--calib-preprocess and the --image-* options describe the images of --calib DIR")
    return load_preprocess(args.calib_preprocess, **options)


def _pair(text: str) -> list[int]:
    try:
        h, w = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,W in pixels, got '{text}'") from None
    return [h, w]


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got '{text}'") from None


def _progress():
    """A one-line progress counter for calibration (feeds), sensitivity analysis (nodes), the
    depthwise choice (depthwise Convs) and the budgeted fallback (steps), on a terminal only."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int | None, stage: str = "calibrating") -> None:
        of = f"/{total}" if total else ""
        unit = {"sensitivity": "nodes", "depthwise": "depthwise Convs", "fallback": "steps"}.get(stage, "feeds")
        end = "\n" if total and done == total else ""
        print(f"\r{stage}: {done}{of} {unit}", end=end, file=sys.stderr, flush=True)

    return show


def _smooth_alpha(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'auto', got '{text}'") from None


def _byte_size(text: str) -> int:
    """'1048576', '512K', '1M', '2G' (powers of 1024)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        size = int(float(number) * units[unit])
    except (ValueError, OverflowError):
        size = -1
    if size < 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size (e.g. 1048576, 512K, 1M)")
    return size


def _inspect(args) -> int:
    model = ir.load(args.model)
    sys.stdout.write(describe(model, str(args.model), args.model.stat().st_size))
    return 0
