"""onnxcc's graph IR: values, nodes, graphs, lowering from and emission to ONNX."""

from .emit import EXTERNAL_THRESHOLD, save, skeleton_proto, to_proto
from .errors import CompileError, ExternalDataError, InvariantError, MalformedModelError, ModelLoadError
from .graph import Function, Graph, Model
from .lower import load
from .node import Attr, Node
from .printer import print_graph, print_model
from .tensors import ArrayTensor, ExternalTensor, ProtoTensor, SparseTensor, Tensor
from .value import Value
from .verify import verify

__all__ = [
    "Attr", "ArrayTensor", "CompileError", "EXTERNAL_THRESHOLD", "ExternalDataError",
    "ExternalTensor", "Function", "Graph", "InvariantError", "MalformedModelError", "Model",
    "ModelLoadError", "Node", "ProtoTensor", "SparseTensor", "Tensor", "Value", "load",
    "print_graph", "print_model", "save", "skeleton_proto", "to_proto", "verify",
]
