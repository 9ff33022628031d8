"""Small models written as ONNX text, lowered into the IR for rule tests."""

from onnx import parser

import ir


def parse(text: str) -> ir.Model:
    """Lower a model in ONNX text syntax, at IR version 10 (what onnxruntime accepts for
    the opsets these tests use)."""
    proto = parser.parse_model(text)
    proto.ir_version = 10
    return ir.load(proto)
