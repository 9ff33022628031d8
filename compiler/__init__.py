"""onnxcc's driver: pipelines, verification, debug dumps, CLI and Python API."""

from .errors import CompileError

__all__ = ["CompileError"]
