"""onnxcc's driver: pipelines, verification, debug dumps, CLI and Python API."""

from .api import CompileResult, compile
from .errors import CompileError
from .pipeline import PIPELINES
from .verify import Tolerance, VerificationError

__all__ = ["CompileError", "CompileResult", "PIPELINES", "Tolerance", "VerificationError", "compile"]
