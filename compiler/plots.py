"""PNG figures of the quantization analyses, for the debug dump: the sensitivity ranking and
the fallback's accuracy/latency curve. matplotlib is an optional extra (`onnxcc[plots]`):
without it the figures are skipped and the caller says so; the tables are always written."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

from .fallback import FallbackCurve
from .sensitivity import NodeSensitivity

MOST_NODES = 40  # a taller sensitivity figure is unreadable; the table has every node


def plotting_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window or need a display
    import matplotlib.pyplot as plt

    return plt


def sensitivity_plot(results: Sequence[NodeSensitivity], path: Path) -> Path:
    """Horizontal bars of each node's worst output SQNR with only it quantized (and with all
    but it, when measured), most harmful at the top."""
    plt = _pyplot()
    shown = list(results[:MOST_NODES])
    labels = [f"{r.node} ({r.op})" for r in shown]
    rows = range(len(shown))
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.28 * len(shown)))
    ax.barh([y + 0.2 for y in rows], [r.alone.sqnr_db for r in shown], height=0.4, label="only this node quantized")
    if all(r.without is not None for r in shown):
        ax.barh([y - 0.2 for y in rows], [r.without.sqnr_db for r in shown], height=0.4,
                label="all but this node quantized")
    ax.set_yticks(list(rows), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("worst output SQNR vs the float model (dB; lower is worse)")
    more = f" (first {len(shown)} of {len(results)})" if len(results) > len(shown) else ""
    ax.set_title(f"quantization sensitivity{more}")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def fallback_plot(curve: FallbackCurve, path: Path) -> Path:
    """The trade-off curve: each fallback step's metric against its one-thread latency
    relative to float, numbered by how many nodes it keeps float, with the budget's floor."""
    plt = _pyplot()
    steps, float_metric, budget = curve.steps, curve.float_metric, curve.budget
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [s.latency_ratio for s in steps]
    ys = [s.metric for s in steps]
    ax.plot(xs, ys, marker="o")
    for s in steps:
        ax.annotate(str(len(s.float_nodes)), (s.latency_ratio, s.metric), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    ax.plot([1.0], [float_metric], marker="s", color="black", linestyle="none", label="float model")
    ax.axhline(float_metric - budget, color="red", linestyle="--", linewidth=1,
               label=f"budget: float - {budget:g}")
    ax.set_xlabel("one-thread latency vs the float model")
    ax.set_ylabel("metric (higher is better)")
    ax.ticklabel_format(axis="y", useOffset=False)  # cosines near 1 read as themselves
    ax.set_title("float fallback: nodes kept float at each step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
