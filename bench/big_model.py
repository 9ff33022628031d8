"""Big-model benchmark: a synthetic ONNX model with over 2 GB of external weights.

The weights are streamed to `<model>.onnx.data` chunk by chunk, so building the
model never holds more than one chunk in memory. Each measured step (onnxruntime
reference, onnxcc round trip, check of the output) runs in a fresh child process
so that its peak RSS is not polluted by the build or by earlier steps.

    python -m bench.big_model                      # full size: 12 x [8192, 8192] f32 = 3 GiB
    python -m bench.big_model --layers 2 --dim 64  # tiny, for a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ALIGN = 4096  # external-data offsets are page aligned so the file can be mmapped
CHUNK_BYTES = 16 << 20  # weight bytes generated and written per step
GiB = 1 << 30
REPO = Path(__file__).resolve().parent.parent


def _external_tensor(name: str, dims: list[int], location: str, offset: int, length: int):
    """A TensorProto that only points into the data file (no payload in the proto)."""
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = t.external_data.add()
        entry.key, entry.value = key, str(value)
    return t


def _write_weight(f, rng: np.random.Generator, dim: int, scale: float) -> tuple[int, int]:
    """Pad f to ALIGN, then stream a [dim, dim] float32 weight; returns (offset, length)."""
    f.write(b"\0" * (-f.tell() % ALIGN))
    offset = f.tell()
    rows = max(1, CHUNK_BYTES // (4 * dim))
    for start in range(0, dim, rows):
        chunk = rng.standard_normal((min(rows, dim - start), dim), dtype=np.float32)
        chunk *= scale
        f.write(chunk.data)
    return offset, f.tell() - offset


def build(folder: Path, layers: int = 12, dim: int = 8192, seed: int = 0, name: str = "model") -> Path:
    """Write `folder/<name>.onnx` and `folder/<name>.onnx.data`; returns the .onnx path.

    y = L x (Reshape(a @ W_i, [-1, dim])), where the Reshape target is computed by
    Shape -> Gather(1) -> Unsqueeze -> Concat([-1], .): all static, so foldable, and the
    Reshape is a no-op once folded: an optimizer can reach one node (MatMul) per layer.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.onnx"
    data_name = path.name + ".data"
    # Variance-preserving scaling keeps activations O(1) through any depth.
    scale = float(np.sqrt(1.0 / dim))

    weights, nodes = [], []
    with open(folder / data_name, "wb") as f:
        for i in range(layers):
            rng = np.random.default_rng([seed, i])  # one stream per layer: reproducible
            offset, length = _write_weight(f, rng, dim, scale)
            weights.append(_external_tensor(f"w{i}", [dim, dim], data_name, offset, length))

    # Tiny constants stay inline in the proto.
    consts = [
        numpy_helper.from_array(np.array(1, np.int64), "idx1"),
        numpy_helper.from_array(np.array([0], np.int64), "axes0"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
    ]
    a = "x"
    for i in range(layers):
        p = f"l{i}_"
        nodes += [
            helper.make_node("MatMul", [a, f"w{i}"], [p + "mm"]),
            helper.make_node("Shape", [p + "mm"], [p + "shape"]),
            helper.make_node("Gather", [p + "shape", "idx1"], [p + "dim"], axis=0),
            helper.make_node("Unsqueeze", [p + "dim", "axes0"], [p + "dim1"]),
            helper.make_node("Concat", ["minus1", p + "dim1"], [p + "target"], axis=0),
        ]
        a = "y" if i == layers - 1 else p + "out"
        nodes.append(helper.make_node("Reshape", [p + "mm", p + "target"], [a]))
    if layers == 0:
        nodes.append(helper.make_node("Identity", ["x"], ["y"]))

    graph = helper.make_graph(
        nodes,
        "big_model",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dim])],
        initializer=weights + consts,
    )
    # ir_version set by hand: the helper's default is newer than onnxruntime accepts.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    # Serialize directly: the proto is small (weights are external) and onnx.save's
    # external-data handling is not needed.
    path.write_bytes(model.SerializeToString())
    return path


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def files_size(paths) -> int:
    return sum(Path(p).stat().st_size for p in paths)


# ---- steps run in a child process ---------------------------------------------------


def _step_ort(path: str, x_npy: str, y_npy: str) -> dict:
    """onnx.load without data + ORT session + one run; saves y for the parent to compare."""
    import onnxruntime as ort

    t0 = time.perf_counter()
    onnx.load(path, load_external_data=False)
    t1 = time.perf_counter()
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    t2 = time.perf_counter()
    (y,) = sess.run(None, {"x": np.load(x_npy)})
    t3 = time.perf_counter()
    np.save(y_npy, y)
    return {"load_s": t1 - t0, "session_s": t2 - t1, "run_s": t3 - t2, "finite": bool(np.isfinite(y).all())}


def _step_ir(path: str, out_path: str) -> dict:
    """The onnxcc round trip: load, verify, save."""
    try:
        import ir

        load, verify, save = ir.load, ir.verify, ir.save
    except (ImportError, AttributeError) as e:  # API still being written
        return {"unavailable": f"{type(e).__name__}: {e}"}
    t0 = time.perf_counter()
    m = load(Path(path))
    t1 = time.perf_counter()
    verify(m)
    t2 = time.perf_counter()
    save(m, Path(out_path))
    t3 = time.perf_counter()
    return {"load_s": t1 - t0, "verify_s": t2 - t1, "save_s": t3 - t2}


def _step_onnxcc(path: str, out_path: str, pipeline: str) -> dict:
    """onnxcc's compile with a pipeline (verification is a separate, measured step: it runs
    onnxruntime, whose own memory is not the compiler's)."""
    import compiler

    t0 = time.perf_counter()
    result = compiler.compile(path, pipeline=pipeline, verify=False)
    t1 = time.perf_counter()
    result.save(out_path)
    return {"compile_s": t1 - t0, "save_s": time.perf_counter() - t1}


def _step_onnxscript(path: str, out_path: str) -> dict:
    """onnxscript's optimizer on an onnx_ir model (weights memory-mapped by onnx_ir)."""
    try:
        import onnx_ir
        import onnxscript.optimizer
    except ImportError as e:
        return {"unavailable": f"{type(e).__name__}: {e}"}
    t0 = time.perf_counter()
    model = onnx_ir.load(path)
    onnxscript.optimizer.optimize(model)
    onnx_ir.save(model, out_path, external_data=Path(out_path).name + ".data")
    return {"optimize_s": time.perf_counter() - t0}


_STEPS = {"ort": _step_ort, "ir": _step_ir, "onnxcc": _step_onnxcc, "onnxscript": _step_onnxscript}


def node_count(path: Path) -> int:
    return len(onnx.load(str(path), load_external_data=False).graph.node)


def _child(step: str, kwargs: dict) -> None:
    t0 = time.perf_counter()
    result = _STEPS[step](**kwargs)
    result.update(wall_s=time.perf_counter() - t0, peak_rss_mb=peak_rss_mb())
    print("RESULT " + json.dumps(result), flush=True)


def measure(step: str, **kwargs) -> dict:
    """Run step `step` in a fresh `python -c` child; returns its result dict with
    wall_s and peak_rss_mb (the child's own peak, imports included), or
    {"error": ...} if the child failed (e.g. killed by the OOM killer)."""
    code = f"from bench.big_model import _child; _child({step!r}, {kwargs!r})"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    hint = " (killed: out of memory?)" if proc.returncode == -9 else ""
    return {"error": f"child exited with {proc.returncode}{hint}"}


# ---- the bench ----------------------------------------------------------------------


def run(folder: Path, layers: int, dim: int, pipeline: str = "default") -> bool:
    """Build, measure and print; returns False if a check failed."""
    t0 = time.perf_counter()
    path = build(folder / "src", layers=layers, dim=dim)
    build_s = time.perf_counter() - t0
    model_bytes = files_size([path, str(path) + ".data"])
    print(f"built {path}: {model_bytes / GiB:.2f} GiB ({model_bytes:,} bytes) in {build_s:.1f} s")

    x_npy, ref_npy, out_npy = (str(folder / n) for n in ("x.npy", "y_ref.npy", "y_out.npy"))
    np.save(x_npy, np.random.default_rng(1234).standard_normal((1, dim), dtype=np.float32))
    rows = [("build (streamed)", build_s, peak_rss_mb())]
    ok = True

    ref = measure("ort", path=str(path), x_npy=x_npy, y_npy=ref_npy)
    if "error" in ref:
        print(f"onnxruntime reference: FAILED, {ref['error']}")
        ok = False
    else:
        print("onnxruntime reference: onnx.load {load_s:.2f} s, session {session_s:.1f} s, "
              "run {run_s:.2f} s, output finite: {finite}".format(**ref))
        rows.append(("onnxruntime reference", ref["wall_s"], ref["peak_rss_mb"]))

    tools = [("onnxcc round trip (lossless)", "ir", {}),
             (f"onnxcc compile ({pipeline})", "onnxcc", {"pipeline": pipeline}),
             ("onnxscript optimizer", "onnxscript", {})]
    for label, step, extra in tools:
        out_dir = folder / f"out_{step}"
        out_dir.mkdir(exist_ok=True)
        out_path = out_dir / path.name
        res = measure(step, path=str(path), out_path=str(out_path), **extra)
        if "unavailable" in res:
            print(f"{label}: not available ({res['unavailable']})")
            continue
        if "error" in res:
            print(f"{label}: FAILED, {res['error']}")
            ok = ok and step == "onnxscript"  # a competitor's failure is reported, not ours
            continue
        sizes = ", ".join(f"{p.name} {p.stat().st_size:,} B" for p in sorted(out_dir.iterdir()))
        chk = measure("ort", path=str(out_path), x_npy=x_npy, y_npy=out_npy)
        if "error" in chk or "error" in ref:
            verdict, same = f"FAILED ({chk.get('error', 'no reference')})", False
        else:
            same = np.array_equal(np.load(ref_npy), np.load(out_npy))
            verdict = "equal to the input's" if same else "DIFFERENT from the input's"
        print(f"{label}: {res['wall_s']:.1f} s, peak RSS {res['peak_rss_mb'] / 1024:.2f} GiB, "
              f"{node_count(out_path)} nodes (input {node_count(path)}); {sizes}; onnxruntime output {verdict}")
        if step != "onnxscript":
            ok = ok and bool(same)
        rows.append((label, res["wall_s"], res["peak_rss_mb"]))

    print(f"\n{'step':<32}{'wall s':>9}{'peak RSS GiB':>14}{'RSS/model':>11}")
    for step, wall, rss_mb in rows:
        print(f"{step:<32}{wall:>9.1f}{rss_mb / 1024:>14.2f}{rss_mb * 2**20 / model_bytes:>11.2f}")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, help="work folder (default: a temp dir, deleted after)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--keep", action="store_true", help="keep the model and outputs")
    ap.add_argument("--pipeline", default="default", help="onnxcc pipeline to compile with")
    args = ap.parse_args(argv)

    temp = args.folder is None
    folder = Path(tempfile.mkdtemp(prefix="onnxcc-big-model-")) if temp else args.folder
    folder.mkdir(parents=True, exist_ok=True)
    try:
        ok = run(folder, args.layers, args.dim, args.pipeline)
    finally:
        if args.keep:
            print(f"kept files in {folder}")
        elif temp:
            shutil.rmtree(folder, ignore_errors=True)
        else:  # only remove what the bench wrote into a user folder
            for name in ("src", "out_ir", "out_onnxcc", "out_onnxscript"):
                shutil.rmtree(folder / name, ignore_errors=True)
            for name in ("x.npy", "y_ref.npy", "y_out.npy"):
                (folder / name).unlink(missing_ok=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
