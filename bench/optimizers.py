"""Optimizer comparison: onnxcc against onnxsim, onnxslim and onnxscript's optimizer.

Every tool optimizes the same files in the same run: the PP-OCR models of
rapidocr-onnxruntime, the silero-vad models, the light models of onnx's backend suite and
a 2-layer pre-norm transformer encoder exported from torch. Each (tool, file) runs in a
fresh child process (`--run-one`) doing only import + load + optimize + save, so its wall
time and peak RSS are its own; a crash or timeout is a result, not a failure of the bench.
The parent then counts nodes, measures the output files and runs input and output in
onnxruntime (CPU, graph optimizations off) on the same feeds.

    python -m bench.optimizers                                  # everything
    python -m bench.optimizers --models silero --tools onnxcc,onnxslim
    python -m bench.optimizers --json results.json --markdown results.md
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

REPO = Path(__file__).resolve().parent.parent
TOOLS = ("onnxcc", "onnxcc-grow", "onnxsim", "onnxslim", "onnxscript")
OURS = ("onnxcc", "onnxcc-grow")
# onnxcc asked to fold everything it can, even when the model grows (what onnxsim and
# onnxslim do by default): IR 3 weights-as-inputs frozen, no growth check, 1 GiB per tensor.
GROW = {"freeze_inputs": True, "allow_growth": True, "fold_size_limit": 1 << 30}
PROTO_LIMIT = 2**31  # a protobuf cannot be serialized past 2 GB: external data beyond
ATOL, RTOL = 1e-4, 1e-3  # |a - b| <= ATOL + RTOL * |b|: optimizers may reassociate floats


# ---- the child: import + load + optimize + save, nothing else --------------------------


def _save_proto(model: onnx.ModelProto, dst: str) -> None:
    big = model.ByteSize() > PROTO_LIMIT
    onnx.save_model(model, dst, save_as_external_data=big, location=Path(dst).name + ".data")


def _optimize(tool: str, src: str, dst: str, pipeline: str) -> dict:
    """Run one tool with its defaults; returns the phase times."""
    t0 = time.perf_counter()
    if tool in OURS:
        import compiler

        t1 = t2 = time.perf_counter()  # compile() loads the file itself: load is in optimize_s
        options = GROW if tool == "onnxcc-grow" else {}
        result = compiler.compile(src, pipeline=pipeline, pipeline_options=options, verify=False)
        t3 = time.perf_counter()
        result.save(dst)
    else:
        if tool == "onnxsim":
            import onnxsim

            def optimize(m):
                return onnxsim.simplify(m)[0]  # (model, check ok); check_n=0 by default
        elif tool == "onnxslim":
            import onnxslim

            optimize = onnxslim.slim
        elif tool == "onnxscript":
            import onnxscript.optimizer

            optimize = onnxscript.optimizer.optimize
        else:
            raise ValueError(f"unknown tool {tool!r}")
        t1 = time.perf_counter()
        model = onnx.load(src)
        t2 = time.perf_counter()
        model = optimize(model)
        t3 = time.perf_counter()
        _save_proto(model, dst)
    t4 = time.perf_counter()
    return {"import_s": t1 - t0, "load_s": t2 - t1, "optimize_s": t3 - t2, "save_s": t4 - t3}


def peak_rss_mb() -> float:
    """Peak RSS of this process image. Not ru_maxrss: Linux carries the parent's RSS at fork
    over exec into it, so every child would report at least the (big) parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # fallback (KiB on Linux)


def run_one(tool: str, src: str, dst: str, pipeline: str) -> None:
    result = _optimize(tool, src, dst, pipeline)
    result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result), flush=True)


def measure(tool: str, src: Path, dst: Path, pipeline: str, timeout: float) -> dict:
    """Run `tool` on `src` in a fresh child; the result has wall_s (the whole child, interpreter
    start included) and the child's phases, or "error" when it crashed or timed out."""
    cmd = [sys.executable, "-m", "bench.optimizers", "--run-one", tool, str(src), str(dst),
           "--pipeline", pipeline]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:g} s", "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT "):]), wall_s=wall)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    why = lines[-1].strip() if lines else "no output"
    if proc.returncode < 0:
        why = f"killed by signal {-proc.returncode}" + (" (out of memory?)" if proc.returncode == -9 else "")
    return {"error": f"crashed: {why[:200]}", "wall_s": wall}


# ---- the models and their feeds ---------------------------------------------------------


@dataclass
class Case:
    name: str
    path: Path
    feeds: Callable[[], list[dict[str, np.ndarray]]]  # lazy: only built for selected models


def light_feeds(path: Path) -> list[dict[str, np.ndarray]]:
    """arange(n) / n in each real input's shape, as onnx's runner (and
    tests/test_conformance_roundtrip.py light_inputs) feeds a light model."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    feed = {}
    for vi in model.graph.input:
        if vi.name in inits:  # IR 3 lists initializers as inputs: not fed
            continue
        shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim)
        n = math.prod(shape)
        feed[vi.name] = (np.arange(n).reshape(shape) / n).astype(np.float32)
    return [feed]


def export_transformer(folder: Path, seed: int = 0) -> Path:
    """2 pre-norm encoder layers (d_model 256, 4 heads, FFN 1024, GELU) through torch's
    TorchScript exporter, batch and sequence dynamic so the shape arithmetic (Shape, Gather,
    Concat, Reshape) stays in the graph. Written out rather than nn.TransformerEncoderLayer,
    whose traced attention bakes the sequence length into its Reshapes."""
    import torch
    from torch import nn

    class Layer(nn.Module):
        def __init__(self, d=256, heads=4, ffn=1024):
            super().__init__()
            self.heads = heads
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.ff = nn.Sequential(nn.Linear(d, ffn), nn.GELU(), nn.Linear(ffn, d))

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            att = torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, dim=-1)
            x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
            return x + self.ff(self.ln2(x))

    torch.manual_seed(seed)
    model = nn.Sequential(Layer(), Layer()).eval()
    path = folder / "transformer_block.onnx"
    dims = {0: "batch", 1: "seq"}
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, but asked for
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 16, 256),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": dims, "y": dims})
    return path


def transformer_feeds(seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for shape in ((1, 7, 256), (3, 32, 256))]


def collect(folder: Path, wanted: str | None) -> list[Case]:
    from tests.real_models import MODEL_PACKAGES, find_model_files, realistic_feeds

    cases = [Case(p.stem, p, lambda p=p: realistic_feeds(p, seed=0))
             for pkg in reversed(MODEL_PACKAGES) for p in find_model_files(pkg)]
    light = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    cases += [Case(p.stem, p, lambda p=p: light_feeds(p)) for p in sorted(light.glob("*.onnx"))]
    if wanted is None or wanted in "transformer_block":
        cases.append(Case("transformer_block", export_transformer(folder), transformer_feeds))
    return [c for c in cases if wanted is None or wanted in c.name]


# ---- checks in the parent ---------------------------------------------------------------


def _subgraphs(node: onnx.NodeProto):
    for attr in node.attribute:
        yield from [attr.g] if attr.HasField("g") else attr.graphs


def count_nodes(graph: onnx.GraphProto) -> tuple[int, int]:
    """(top-level nodes, nodes including every If/Loop/Scan body)."""
    total = len(graph.node) + sum(count_nodes(g)[1] for node in graph.node for g in _subgraphs(node))
    return len(graph.node), total


def model_bytes(path: Path, model: onnx.ModelProto) -> int:
    """The model file plus every external data file its tensors point to."""
    def tensors(graph):
        yield from graph.initializer
        for node in graph.node:
            yield from (a.t for a in node.attribute if a.HasField("t"))
            for g in _subgraphs(node):
                yield from tensors(g)

    files = {e.value for t in tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL
             for e in t.external_data if e.key == "location"}
    return path.stat().st_size + sum((path.parent / f).stat().st_size for f in files)


def ort_run(path: Path, feeds: list[dict]) -> list[list[np.ndarray]]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # a difference is the tool's
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return [sess.run(None, {k: v for k, v in f.items() if k in names}) for f in feeds]


def compare(ref: list[list[np.ndarray]], out: list[list[np.ndarray]]) -> tuple[bool, float]:
    """(every output within tolerance, max abs diff); a shape or count mismatch fails."""
    ok, worst = True, 0.0
    for r_outs, o_outs in zip(ref, out):
        if len(r_outs) != len(o_outs):
            return False, math.inf
        for b, a in zip(r_outs, o_outs):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            if a.shape != b.shape:
                return False, math.inf
            diff = np.where(np.isnan(a) & np.isnan(b), 0.0, np.abs(a - b))  # NaN where both are: same
            ok = ok and bool(np.all(diff <= ATOL + RTOL * np.abs(b)))  # a NaN on one side fails
            worst = math.inf if np.isnan(diff).any() else max(worst, float(diff.max(initial=0.0)))
    return ok, worst


def bench_case(case: Case, tools, work: Path, pipeline: str, timeout: float, keep: bool) -> dict:
    model = onnx.load(str(case.path), load_external_data=False)
    top, total = count_nodes(model.graph)
    entry = {"model": case.name, "tools": {},
             "input": {"nodes": top, "nodes_total": total, "bytes": model_bytes(case.path, model)}}
    feeds = case.feeds()
    try:
        ref = ort_run(case.path, feeds)
    except Exception as e:  # noqa: BLE001 - a bad model or feed must not stop the bench
        entry["error"] = f"input does not run in onnxruntime: {type(e).__name__}: {e}"[:300]
        entry["summary"] = None
        return entry
    for tool in tools:
        out_dir = work / case.name / tool
        out_dir.mkdir(parents=True, exist_ok=True)
        dst = out_dir / case.path.name
        r = measure(tool, case.path, dst, pipeline, timeout)
        if "error" not in r:
            m = onnx.load(str(dst), load_external_data=False)
            r["nodes"], r["nodes_total"] = count_nodes(m.graph)
            r["bytes"] = model_bytes(dst, m)
            try:
                r["verified"], worst = compare(ref, ort_run(dst, feeds))
                r["max_abs"] = worst if math.isfinite(worst) else None  # None: shapes or NaNs differ
            except Exception as e:  # noqa: BLE001 - ORT refusing the output is a result
                r["verified"], r["max_abs"], r["ort_error"] = False, None, f"{type(e).__name__}: {e}"[:200]
        entry["tools"][tool] = r
        if not keep:
            shutil.rmtree(out_dir, ignore_errors=True)
    entry["summary"] = summarize(entry)
    return entry


def summarize(entry: dict) -> dict | None:
    """onnxcc against the best competitor that produced a verified output."""
    ours = entry["tools"].get("onnxcc")
    others = [r for t, r in entry["tools"].items() if t not in OURS and r.get("verified")]
    if ours is None or "error" in ours:
        return None if ours is None else {"onnxcc_ok": False}
    s = {"onnxcc_ok": True, "verified": ours["verified"],
         "size_vs_input": ours["bytes"] / entry["input"]["bytes"]}
    s["size_ok"] = s["size_vs_input"] <= 1.10
    if others:
        for key in ("nodes_total", "bytes", "wall_s", "peak_rss_mb"):
            s[f"best_{key}"] = best = min(r[key] for r in others)
            s[f"{key}_ratio"] = ours[key] / best if best else math.inf
        s["nodes_ok"] = ours["nodes_total"] <= s["best_nodes_total"]
        grow = entry["tools"].get("onnxcc-grow")
        if grow is not None and "error" not in grow:
            s["grow_nodes"] = grow["nodes_total"]
            s["grow_nodes_ok"] = grow["nodes_total"] <= s["best_nodes_total"] and grow["verified"]
    return s


# ---- reporting --------------------------------------------------------------------------

COLUMNS = ("tool", "nodes", "size", "x input", "wall s", "opt s", "peak RSS MB", "verifies (max abs)")


def rows(entry: dict) -> list[tuple[str, ...]]:
    inp = entry["input"]
    out = [("input", _nodes(inp), _size(inp["bytes"]), "1.00", "", "", "", "")]
    for tool, r in entry["tools"].items():
        if "error" in r:
            out.append((tool, "-", "-", "-", f"{r['wall_s']:.1f}", "-", "-", f"no, {r['error']}"))
            continue
        verdict = "yes" if r["verified"] else "NO"
        verdict += f" ({r['max_abs']:.1e})" if r["max_abs"] is not None else f" ({r.get('ort_error', 'mismatch')})"
        out.append((tool, _nodes(r), _size(r["bytes"]), f"{r['bytes'] / inp['bytes']:.2f}",
                    f"{r['wall_s']:.1f}", f"{r['load_s'] + r['optimize_s']:.2f}", f"{r['peak_rss_mb']:.0f}",
                    verdict))
    return out


def summary_line(entry: dict) -> str:
    s = entry["summary"]
    if "error" in entry:
        return "skipped: " + entry["error"]
    if s is None:
        return "onnxcc not run"
    if not s["onnxcc_ok"]:
        return "onnxcc FAILED: " + entry["tools"]["onnxcc"]["error"]
    yn = {True: "yes", False: "NO"}
    parts = []
    if "nodes_ok" in s:
        parts.append(f"nodes <= best other: {yn[s['nodes_ok']]} "
                     f"({entry['tools']['onnxcc']['nodes_total']} vs {s['best_nodes_total']})")
    if "grow_nodes_ok" in s:
        parts.append(f"asked to grow: nodes <= best other: {yn[s['grow_nodes_ok']]} ({s['grow_nodes']})")
    parts.append(f"size <= 1.10x input: {yn[s['size_ok']]} ({s['size_vs_input']:.2f}x)")
    parts.append(f"verified: {yn[s['verified']]}")
    if "nodes_ok" in s:
        parts.append("vs best other: nodes {nodes_total_ratio:.2f}x, size {bytes_ratio:.2f}x, "
                     "wall {wall_s_ratio:.2f}x, RSS {peak_rss_mb_ratio:.2f}x".format(**s))
    return "onnxcc: " + "; ".join(parts)


def _nodes(r: dict) -> str:
    return str(r["nodes"]) if r["nodes"] == r["nodes_total"] else f"{r['nodes']} ({r['nodes_total']})"


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def text_table(entry: dict) -> str:
    table = [COLUMNS] + rows(entry)
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i in (0, 1, 7) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([f"== {entry['model']}"] + lines + [summary_line(entry)])


def markdown(entries: list[dict], header: str) -> str:
    out = [header, ""]
    for e in entries:
        out += [f"**{e['model']}**", "", "| " + " | ".join(COLUMNS) + " |",
                "|" + "|".join("---" if i in (0, 7) else "---:" for i in range(len(COLUMNS))) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows(e)]
        out += ["", summary_line(e), ""]
    return "\n".join(out)


def totals(entries: list[dict]) -> str:
    ss = [e["summary"] for e in entries if e["summary"] and e["summary"]["onnxcc_ok"]]
    if not ss:
        return ""
    count = lambda k: sum(bool(s.get(k)) for s in ss)  # noqa: E731
    compared = sum("nodes_ok" in s for s in ss)  # models where some other tool verified
    return (f"onnxcc over {len(entries)} models: nodes <= best other on {count('nodes_ok')} of {compared} "
            f"(asked to grow: {count('grow_nodes_ok')}), "
            f"size <= 1.10x input on {count('size_ok')}, verified on {count('verified')}, "
            f"failed on {len(entries) - len(ss)}")


def versions(tools) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("onnxcc", *tools, "onnx", "onnxruntime", "torch"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "source tree" if name == "onnxcc" else "not installed"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset of " + ",".join(TOOLS))
    ap.add_argument("--models", help="only models whose name contains this")
    ap.add_argument("--pipeline", default="default", help="onnxcc pipeline (default: default)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per (tool, model)")
    ap.add_argument("--keep", type=Path, metavar="DIR", help="write (and keep) the outputs in DIR")
    ap.add_argument("--json", type=Path, metavar="FILE")
    ap.add_argument("--markdown", type=Path, metavar="FILE")
    ap.add_argument("--run-one", nargs=3, metavar=("TOOL", "IN", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run_one:
        run_one(*args.run_one, pipeline=args.pipeline)
        return 0
    tools = [t for t in args.tools.split(",") if t]
    if unknown := set(tools) - set(TOOLS):
        ap.error(f"unknown tools: {', '.join(sorted(unknown))}")

    t0 = time.perf_counter()
    work = args.keep or Path(tempfile.mkdtemp(prefix="onnxcc-bench-opt-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        cases = collect(work, args.models)
        vers = versions(tools)
        print("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()))
        print(f"onnxcc pipeline: {args.pipeline}; tolerance |a-b| <= {ATOL:g} + {RTOL:g}|b|; "
              f"{len(cases)} models x {len(tools)} tools\n", flush=True)
        entries = []
        for case in cases:
            entries.append(bench_case(case, tools, work, args.pipeline, args.timeout, args.keep is not None))
            print(text_table(entries[-1]) + "\n", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - t0
    print(totals(entries))
    print(f"total bench time {elapsed:.0f} s")

    header = (f"onnxcc pipeline `{args.pipeline}`; " + ", ".join(f"{k} {v}" for k, v in vers.items())
              + f". Nodes: top level (with subgraphs). Wall: the whole child process; opt: load + optimize. "
              f"Verifies: onnxruntime, every output within {ATOL:g} + {RTOL:g}·|b|.")
    if args.json:
        args.json.write_text(json.dumps({"pipeline": args.pipeline, "versions": vers, "tolerance": [ATOL, RTOL],
                                         "total_s": elapsed, "models": entries}, indent=1, default=str))
    if args.markdown:
        args.markdown.write_text(markdown(entries, header) + "\n" + totals(entries) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
