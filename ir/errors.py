"""Errors a user can cause. They live in `ir` because it is the bottom of the stack;
`compiler` re-exports them. Every message is one line that says what and where."""


# Line breaks and control characters, e.g. in the names of a corrupt model, shown escaped.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(32), 0x7F, 0x85)}
_ESCAPES.update({0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"})


class CompileError(Exception):
    """Base of every error caused by the user's input or options."""

    exit_code = 2  # bad input or usage; verification failures override this

    def __str__(self) -> str:
        return super().__str__().translate(_ESCAPES)  # one line, whatever the names hold


class ModelLoadError(CompileError):
    """The model cannot be read: not protobuf, truncated, empty, missing file."""


class MalformedModelError(CompileError):
    """The model parses but breaks ONNX's rules (cycle, undefined input, duplicate name...)."""


class ExternalDataError(CompileError):
    """An external-data reference is unsafe, missing or does not fit its file."""


class InvariantError(Exception):
    """An IR invariant does not hold. After lowering, this is a bug of the pass that ran."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (libraries' messages span many lines), or
    its type name when it has none: what a one-line error can quote."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__
