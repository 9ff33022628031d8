"""Errors a user can cause. They live in `ir` because it is the bottom of the stack;
`compiler` re-exports them. Every message is one line that says what and where."""


class CompileError(Exception):
    """Base of every error caused by the user's input or options."""

    exit_code = 2  # bad input or usage; verification failures override this


class ModelLoadError(CompileError):
    """The model cannot be read: not protobuf, truncated, empty, missing file."""


class MalformedModelError(CompileError):
    """The model parses but breaks ONNX's rules (cycle, undefined input, duplicate name...)."""


class ExternalDataError(CompileError):
    """An external-data reference is unsafe, missing or does not fit its file."""


class InvariantError(Exception):
    """An IR invariant does not hold. After lowering, this is a bug of the pass that ran."""
