"""The conformance gate through `compiler.compile` with the default pipeline and
verification on: every backend case onnxruntime runs still matches, bit for bit."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

import compiler
from tests.conformance import load_folder_case, model_folders
from tests.test_conformance_roundtrip import NODE_CASES, check_case


def compiled(model: onnx.ModelProto, data_sets) -> onnx.ModelProto:
    inits = {t.name for t in model.graph.initializer}
    names = [vi.name for vi in model.graph.input if vi.name not in inits]
    feeds = [dict(zip(names, inputs)) for inputs, _ in data_sets]
    return compiler.compile(model, feeds=feeds).model


@pytest.mark.parametrize("name", sorted(NODE_CASES))
def test_node_case_compiles(name):
    case = NODE_CASES[name]
    check_case(case.model, case.data_sets, case.rtol, case.atol, transform=compiled)


@pytest.mark.parametrize("folder", model_folders(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_model_folder_compiles(folder: Path):
    model, data_sets = load_folder_case(folder)
    check_case(model, data_sets, rtol=1e-3, atol=1e-7, transform=compiled)
