"""The `onnxcc` command line. Exit codes: 0 success, 1 verification failed, 2 bad input
or usage. Errors are one line on stderr; `--traceback` shows the Python traceback."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import ir

from .errors import CompileError
from .inspect_model import describe

EXAMPLES = """\
examples:
  onnxcc inspect model.onnx            op histogram, parameters by dtype, inputs/outputs
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnxcc", description="Ahead-of-time compiler for ONNX models.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("inspect", help="describe a model: ops, parameters, signature, metadata",
                       description="Describe a model: op histogram, parameters and bytes by dtype, "
                                   "opsets, inputs and outputs with shapes, subgraphs, metadata keys.")
    p.add_argument("model", type=Path, help="an .onnx file (external data is read beside it)")
    p.add_argument("--traceback", action="store_true", help="show the Python traceback on error")
    return parser




def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed usage; 2 on bad usage, 0 on --help
        return int(e.code or 0)
    try:
        if args.command == "inspect":
            return _inspect(args)
    except CompileError as e:
        if args.traceback:
            raise
        print(f"onnxcc: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("onnxcc: interrupted", file=sys.stderr)
        return 130
    return 2


def _inspect(args) -> int:
    model = ir.load(args.model)
    sys.stdout.write(describe(model, str(args.model), args.model.stat().st_size))
    return 0
