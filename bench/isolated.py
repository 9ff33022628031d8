"""Run one benchmark step in a fresh process under watch: its own peak memory, a memory cap
and a timeout, and a one-line result whatever happens (onnxruntime's histogram calibrators can
take tens of GB, and crash on feeds of different shapes). Also `quantize_static` on a folder
of .npz feeds, the way the benchmarks call it."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
GB = 1e9


def peak_rss() -> int:
    """Peak RSS of this process so far, in bytes (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:  # the child just exited
        pass
    return 0


def measure(cmd: list[str], scratch: Path, cap: float, timeout: float) -> dict:
    """Run a worker that prints one JSON object; that object, or {"error": ...} when it was
    killed over `cap` bytes of RSS or `timeout` seconds, or crashed."""
    out_path, err_path = scratch / "worker.out", scratch / "worker.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err)
        start, killed = time.perf_counter(), None
        while proc.poll() is None:
            if _rss(proc.pid) > cap:
                killed = f"killed > {cap / GB:g} GB"
            elif time.perf_counter() - start > timeout:
                killed = "timeout"
            if killed:
                proc.kill()
                proc.wait()
                return {"error": killed}
            time.sleep(0.05)
    lines = [ln for ln in out_path.read_text().splitlines() if ln.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    errors = [ln.strip() for ln in err_path.read_text().splitlines() if ln.strip()]
    why = f"signal {-proc.returncode}" if proc.returncode < 0 else errors[-1] if errors else "no output"
    return {"error": f"crashed: {why}"}


def npz_reader(files: list[Path]):
    """A CalibrationDataReader over .npz feed files, counting what it handed out."""
    from onnxruntime.quantization import CalibrationDataReader

    class NpzReader(CalibrationDataReader):
        def __init__(self):
            self.files, self.read = iter(files), 0

        def get_next(self):
            path = next(self.files, None)
            if path is None:
                return None
            self.read += 1
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}

    return NpzReader()


def quantize_static_npz(model: str | Path, out: str | Path, files: list[Path], method: str) -> int:
    """onnxruntime's static quantizer in the setting the issue compares with: QDQ, per-channel,
    uint8 activations, int8 weights; `method` MinMax, Entropy or Percentile. Returns the number
    of feeds it read."""
    from onnxruntime import quantization as q

    reader = npz_reader(files)
    q.quantize_static(str(model), str(out), reader, quant_format=q.QuantFormat.QDQ, per_channel=True,
                      activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                      calibrate_method=q.CalibrationMethod[method])
    return reader.read


def prepare_for_quantize_static(model: str | Path, out: Path, opset: int = 13) -> None:
    """What a user does before `quantize_static`: onnxruntime's `quant_pre_process`, and onnx's
    version converter below opset 13 (quantize_static writes per-channel DequantizeLinear, an
    opset 13 attribute, into older models without raising their opset: they do not load)."""
    import onnx
    import onnx.version_converter
    from onnxruntime.quantization.shape_inference import quant_pre_process

    cwd = os.getcwd()
    os.chdir(out.parent)  # it leaves a sym_shape_infer_temp.onnx in the working folder
    try:
        # Its symbolic shape inference (written for transformers) fails on the OCR models; onnx's
        # shape inference and the optimizer still run.
        quant_pre_process(str(model), str(out), skip_symbolic_shape=True)
    finally:
        os.chdir(cwd)
    proto = onnx.load(str(out))
    current = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if current < opset:
        onnx.save(onnx.version_converter.convert_version(proto, opset), str(out))
