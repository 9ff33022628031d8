"""The user-facing errors. They are defined at the bottom of the stack (`ir.errors`) so every
layer can raise them; the compiler re-exports them for API users."""

from ir.errors import CompileError, ExternalDataError, MalformedModelError, ModelLoadError

__all__ = ["CompileError", "ExternalDataError", "MalformedModelError", "ModelLoadError"]
