"""The calibration table: per tensor, the chosen range and quantization parameters, as JSON.

QDQ insertion reads only this table, so a compile with a saved table is reproducible without
the calibration data. The text is deterministic (sorted keys, float32 scales written exactly),
so save -> load -> save is byte-identical. Loading is plain JSON with strict validation: any
bad field is a one-line CompileError naming the tensor and the key.

    {"format": "onnxcc-calibration", "version": 1,
     "inputs": {NAME: [dims]},                  # optional: the input shapes placement was sized for
     "tensors": {NAME: {
        "method": "entropy",
        "range": [lo, hi],                      # per channel: [[lo, ...], [hi, ...]]
        "quant": {"dtype": "uint8", "axis": null, "scale": 0.01, "zero_point": 0},
        "observed": {"count": 1000, "nonfinite": 0, "min": -0.5, "max": 7.25}}}}
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np

from calibration.scales import METHODS, QRANGES, QuantParams
from ir.errors import CompileError

FORMAT = "onnxcc-calibration"
VERSION = 1
_ENTRY_KEYS = ("method", "observed", "quant", "range")
_QUANT_KEYS = ("axis", "dtype", "scale", "zero_point")
_OBSERVED_KEYS = ("count", "max", "min", "nonfinite")


@dataclass(eq=False)
class TableEntry:
    method: str
    range: tuple  # (lo, hi): floats, or float arrays per channel
    params: QuantParams
    observed: dict  # an observer's summary(): count, nonfinite, exact min and max (None if empty)

    def to_dict(self) -> dict:
        lo, hi = self.range
        per_channel = self.params.axis is not None
        return {
            "method": self.method,
            "range": [_floats(lo), _floats(hi)] if per_channel else [float(lo), float(hi)],
            "quant": {
                "dtype": self.params.dtype,
                "axis": self.params.axis,
                # float32 -> float64 is exact, and JSON keeps float64 exactly.
                "scale": _floats(self.params.scale) if per_channel else float(self.params.scale),
                "zero_point": self.params.zero_point.tolist(),
            },
            "observed": {
                "count": int(self.observed["count"]),
                "nonfinite": int(self.observed["nonfinite"]),
                **{k: None if self.observed[k] is None else float(self.observed[k]) for k in ("min", "max")},
            },
        }

    def __eq__(self, other) -> bool:
        return isinstance(other, TableEntry) and self.to_dict() == other.to_dict()


def _floats(a) -> list[float]:
    return [float(v) for v in np.ravel(a)]


class CalibrationTable:
    """Tensor name -> TableEntry."""

    def __init__(self, entries: dict[str, TableEntry] | None = None,
                 inputs: dict[str, tuple[int, ...]] | None = None):
        self.entries: dict[str, TableEntry] = dict(entries or {})
        # The calibration feeds' input shapes: where tensor sizes decide the placement
        # (Target.small_tensor), a compile from the saved table decides the same way.
        self.inputs: dict[str, tuple[int, ...]] = dict(inputs or {})

    def __getitem__(self, name: str) -> TableEntry:
        return self.entries[name]

    def __setitem__(self, name: str, entry: TableEntry) -> None:
        self.entries[name] = entry

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def __eq__(self, other) -> bool:
        return isinstance(other, CalibrationTable) and self.to_dict() == other.to_dict()

    def to_dict(self) -> dict:
        d = {"format": FORMAT, "version": VERSION,
             "tensors": {name: e.to_dict() for name, e in self.entries.items()}}
        if self.inputs:
            d["inputs"] = {name: [int(n) for n in dims] for name, dims in self.inputs.items()}
        return d

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True, allow_nan=False) + "\n"

    def save(self, target) -> None:
        """Write to a path or a text file object."""
        text = self.dumps()
        if hasattr(target, "write"):
            target.write(text)
            return
        try:
            with open(target, "w", encoding="utf-8", newline="\n") as f:
                f.write(text)
        except OSError as e:
            raise CompileError(f"calibration table {os.fspath(target)}: cannot write ({e.strerror or e})") from None

    @classmethod
    def from_dict(cls, d, where: str = "") -> "CalibrationTable":
        return _Reader(where).table(d)

    @classmethod
    def loads(cls, text: str, where: str = "") -> "CalibrationTable":
        return _Reader(where).table(_parse(text, where))

    @classmethod
    def load(cls, source) -> "CalibrationTable":
        """Read from a path or a (text or binary) file object."""
        where = getattr(source, "name", None) if hasattr(source, "read") else os.fspath(source)
        where = where if isinstance(where, str) else ""
        try:
            if hasattr(source, "read"):
                text = source.read()
            else:
                with open(source, "rb") as f:
                    text = f.read()
            if isinstance(text, bytes):
                text = text.decode("utf-8")
        except OSError as e:
            raise CompileError(f"{_prefix(where)}: cannot read ({e.strerror or e})") from None
        except UnicodeDecodeError:
            raise CompileError(f"{_prefix(where)}: not UTF-8 text") from None
        return cls.loads(text, where)


def _prefix(where: str) -> str:
    return f"calibration table {where}" if where else "calibration table"


def _parse(text: str, where: str):
    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        for k in keys:
            if keys.count(k) > 1:
                raise CompileError(f"{_prefix(where)}: key {k!r} appears twice in one object")
        return dict(pairs)

    def no_constant(name):  # NaN, Infinity: not JSON, and never a valid range or scale
        raise CompileError(f"{_prefix(where)}: {name} is not allowed")

    try:
        return json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constant)
    except json.JSONDecodeError as e:
        raise CompileError(f"{_prefix(where)}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise CompileError(f"{_prefix(where)}: nested too deeply") from None


class _Reader:
    """Validates the parsed JSON; every error names where it is."""

    def __init__(self, where: str):
        self.prefix = _prefix(where)

    def fail(self, what: str):
        raise CompileError(f"{self.prefix}: {what}")

    def table(self, d) -> CalibrationTable:
        if not isinstance(d, dict):
            self.fail("expected a JSON object at the top level")
        self.keys({k: v for k, v in d.items() if k != "inputs"}, ("format", "tensors", "version"), "")
        if d["format"] != FORMAT:
            self.fail(f"'format' is {d['format']!r}, expected {FORMAT!r}")
        if d["version"] != VERSION or isinstance(d["version"], bool):
            self.fail(f"version {d['version']!r} is not supported (this onnxcc reads version {VERSION})")
        if not isinstance(d["tensors"], dict):
            self.fail("'tensors' must be an object")
        return CalibrationTable({name: self.entry(name, e) for name, e in d["tensors"].items()},
                                self.inputs(d.get("inputs", {})))

    def inputs(self, d) -> dict[str, tuple[int, ...]]:
        if not isinstance(d, dict) or not all(
                isinstance(dims, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                               for n in dims) for dims in d.values()):
            self.fail("'inputs' must map input names to lists of non-negative integers")
        return {name: tuple(dims) for name, dims in d.items()}

    def keys(self, d, expected: tuple, at: str) -> None:
        where = f"{at}: " if at else ""
        if not isinstance(d, dict):
            self.fail(f"{where}expected an object")
        for k in expected:
            if k not in d:
                self.fail(f"{where}missing key '{k}'")
        for k in sorted(d):
            if k not in expected:
                self.fail(f"{where}unknown key {k!r}")

    def entry(self, name: str, e) -> TableEntry:
        at = f"tensor {name!r}"
        self.keys(e, _ENTRY_KEYS, at)
        if e["method"] not in METHODS:
            self.fail(f"{at}: 'method' is {e['method']!r}, expected one of {', '.join(METHODS)}")
        q = e["quant"]
        self.keys(q, _QUANT_KEYS, f"{at}: 'quant'")
        dtype, axis = q["dtype"], q["axis"]
        if dtype not in QRANGES:
            self.fail(f"{at}: 'quant.dtype' is {dtype!r}, expected one of {', '.join(QRANGES)}")
        if axis is not None and not _is_int(axis):
            self.fail(f"{at}: 'quant.axis' must be an integer or null, got {axis!r}")
        n = None if axis is None else self.length(q["scale"], f"{at}: 'quant.scale'")
        scale = self.numbers(q["scale"], n, f"{at}: 'quant.scale'")
        scale = np.array(scale, dtype=np.float32)  # what the model will store
        if not (np.isfinite(scale).all() and (scale > 0).all()):
            self.fail(f"{at}: 'quant.scale' must be positive and fit in float32")
        zp = self.ints(q["zero_point"], n, f"{at}: 'quant.zero_point'")
        qmin, qmax = QRANGES[dtype]
        if not all(qmin <= v <= qmax for v in np.ravel(zp)):
            self.fail(f"{at}: 'quant.zero_point' outside the {dtype} range [{qmin}, {qmax}]")
        r = e["range"]
        if not isinstance(r, list) or len(r) != 2:
            self.fail(f"{at}: 'range' must be [lo, hi]")
        lo, hi = (self.numbers(v, n, f"{at}: 'range'") for v in r)
        if np.any(np.asarray(lo) > np.asarray(hi)):
            self.fail(f"{at}: 'range' has lo > hi")
        o = e["observed"]
        self.keys(o, _OBSERVED_KEYS, f"{at}: 'observed'")
        for k in ("count", "nonfinite"):
            if not _is_int(o[k]) or o[k] < 0:
                self.fail(f"{at}: 'observed.{k}' must be a non-negative integer, got {o[k]!r}")
        observed = {k: o[k] for k in ("count", "nonfinite")}
        for k in ("min", "max"):
            observed[k] = None if o[k] is None else self.numbers(o[k], None, f"{at}: 'observed.{k}'")
        params = QuantParams(scale, np.array(zp), dtype, axis)
        range_ = (np.array(lo), np.array(hi)) if n is not None else (lo, hi)
        return TableEntry(e["method"], range_, params, observed)

    def length(self, v, at: str) -> int:
        if not isinstance(v, list) or not v:
            self.fail(f"{at} must be a non-empty list (per-channel, 'quant.axis' is set)")
        return len(v)

    def numbers(self, v, n: int | None, at: str):
        """A finite number (n None) or a list of n finite numbers."""
        if n is None:
            if not _is_number(v):
                self.fail(f"{at} must be a finite number, got {v!r}")
            return float(v)
        if not isinstance(v, list) or len(v) != n or not all(_is_number(x) for x in v):
            self.fail(f"{at} must be a list of {n} finite numbers")
        return [float(x) for x in v]

    def ints(self, v, n: int | None, at: str):
        if n is None:
            if not _is_int(v):
                self.fail(f"{at} must be an integer, got {v!r}")
            return v
        if not isinstance(v, list) or len(v) != n or not all(_is_int(x) for x in v):
            self.fail(f"{at} must be a list of {n} integers")
        return v


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def entry_from_observer(obs, method: str, range_, params: QuantParams) -> TableEntry:
    """A table entry for a tensor calibrated from `obs` with `method`."""
    return TableEntry(method, range_, params, obs.summary())
