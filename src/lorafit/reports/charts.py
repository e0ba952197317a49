"""The comparison report's charts, one function each: rows (from `compare.build_rows`) in, a matplotlib
figure out; `charts` turns every chart into a base64 PNG for the page.

Each run keeps one colour across the charts (`run_colors`), so a run is easy to follow from the
bars to the radar to the loss curves. The six-panel chart is the QLoRA report's Figure 1, its panels in
its order (model size, training time, trainable parameters on a log axis, perplexity, MFU, inference
speed); the radar its Figure 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lorafit.base.units import GiB, MiB
from lorafit.measurement.figures import MemoryBreakdown
from lorafit.reports.page import png, pyplot

Row = dict[str, Any]


def _count(n: float) -> str:
    """A parameter count as the study writes it: 1.1B, 12.6M."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def _figure(v: float) -> str:
    """A bar's value: three significant digits, whole numbers from 1,000 up (2,098 MiB, not 2.1e+03)."""
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


@dataclass(frozen=True)
class Panel:
    """One bar panel: the row key it plots, divided by `scale`, in `unit`; `larger_is_better` None:
    neither; `log`: a logarithmic value axis (the study's for trainable parameters, 1.1B against 12.6M)."""

    title: str
    key: str
    scale: float
    unit: str
    larger_is_better: bool | None
    log: bool = False
    label: Callable[[float], str] = _figure


# Figure 1 of the QLoRA report, panel for panel
PANELS: list[Panel] = [
    Panel("Model size (as deployed)", "deployed_bytes", MiB, "MiB", False),
    Panel("Training time", "train_s", 1.0, "s", False),
    Panel("Trainable parameters", "trainable_params", 1.0, "parameters (log scale)", None, log=True, label=_count),
    Panel("Perplexity", "ppl", 1.0, "", False),
    Panel("MFU", "mfu", 0.01, "%", True),
    Panel("Inference speed", "gen_tokens_per_s", 1.0, "generated tokens/s", True),
]
# (axis name, row key, larger is better)
RADAR = [
    ("size as deployed", "deployed_bytes", False),
    ("MFU", "mfu", True),
    ("train tokens/s", "train_tokens_per_s", True),
    ("peak memory", "peak_memory_bytes", False),
    ("perplexity", "ppl", False),
    ("generation tokens/s", "gen_tokens_per_s", True),
]
BREAKDOWN = [part for part, _ in MemoryBreakdown().items()]  # the parts of a peak, stacked bottom up


def run_colors(rows: list[Row]) -> dict[str, str]:
    """{run label: colour}, in matplotlib's default colour cycle."""
    colors = pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    return {r["label"]: colors[i % len(colors)] for i, r in enumerate(rows)}


def _bars(ax: Any, rows: list[Row], panel: Panel, color: dict[str, str]) -> None:
    """One panel: a bar per run that has the figure, its value written on top; "n/a" when none has it."""
    shown = [r for r in rows if r[panel.key] is not None]
    values = [r[panel.key] / panel.scale for r in shown]
    ax.bar([r["label"] for r in shown], values, color=[color[r["label"]] for r in shown])
    for i, v in enumerate(values):
        ax.annotate(panel.label(v), (i, v), ha="center", va="bottom", fontsize=8)
    better = panel.larger_is_better
    direction = "" if better is None else f" ({'higher' if better else 'lower'} is better)"
    ax.set_title(panel.title + direction, fontsize=10)
    ax.set_ylabel(panel.unit)
    if panel.log and any(v > 0 for v in values):
        ax.set_yscale("log")  # from the decade below the smallest bar, so that bar shows
        low, high = min(v for v in values if v > 0), max(values)
        ax.set_ylim(10 ** math.floor(math.log10(low)), high * 3)
    if not shown:
        ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)


def six_panel(rows: list[Row]) -> Any:
    """Figure 1 of the QLoRA report: model size, training time, trainable parameters (log axis),
    perplexity, MFU and inference speed, a bar per run."""
    plt, color = pyplot(), run_colors(rows)
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, panel in zip(axes.flat, PANELS, strict=True):
        _bars(ax, rows, panel, color)
    fig.tight_layout()
    return fig


def radar_scores(rows: list[Row], row: Row) -> list[float]:
    """`row`'s RADAR metrics normalized so that larger is better and the best run scores 1; missing: 0."""
    scores = []
    for _, key, better in RADAR:
        present = [x[key] for x in rows if x[key]]
        v = row[key]
        scores.append(0.0 if not v or not present else (v / max(present) if better else min(present) / v))
    return scores


def radar(rows: list[Row]) -> Any:
    """Every run's metrics on one polar plot, each normalized to the best run."""
    plt, color = pyplot(), run_colors(rows)
    fig = plt.figure(figsize=(6.5, 6.5))
    ax = fig.add_subplot(projection="polar")
    angles = [2 * math.pi * i / len(RADAR) for i in range(len(RADAR))]
    for r in rows:
        values = radar_scores(rows, r)
        ax.plot(angles + angles[:1], values + values[:1], color=color[r["label"]], label=r["label"])
        ax.fill(angles + angles[:1], values + values[:1], color=color[r["label"]], alpha=0.1)
    ax.set_xticks(angles, [name for name, _, _ in RADAR])
    ax.set_ylim(0, 1.05)
    ax.set_title("Normalized: 1 = best run, larger is better", fontsize=10)
    ax.legend(loc="upper right", bbox_to_anchor=(1.3, 1.1))
    return fig


def memory_breakdown(rows: list[Row]) -> Any:
    """The peak of each training run stacked by part (runtime, weights, ..., activations)."""
    plt = pyplot()
    trained = [r for r in rows if r["memory_breakdown"]]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bottom = [0.0] * len(trained)
    for part in BREAKDOWN:
        heights = [(r["memory_breakdown"].get(part) or 0) / GiB for r in trained]
        ax.bar([r["label"] for r in trained], heights, bottom=bottom, label=part.replace("_", " "))
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_ylabel("GiB at peak")
    ax.set_title("Peak memory breakdown", fontsize=10)
    if trained:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def loss_curves(rows: list[Row]) -> Any:
    """Training loss per optimizer step, one line per training run."""
    plt, color = pyplot(), run_colors(rows)
    trained = [r for r in rows if r["memory_breakdown"]]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in trained:
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], marker=".", label=r["label"], color=color[r["label"]])
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("Loss per step", fontsize=10)
    if trained:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no training runs", ha="center", va="center", transform=ax.transAxes)
    return fig


# {chart name: (caption, chart)}, in the order the report shows them
CHARTS: dict[str, tuple[str, Callable[[list[Row]], Any]]] = {
    "six_panel": (
        "Model size as deployed, training time, trainable parameters (log scale), perplexity, MFU, inference speed",
        six_panel,
    ),
    "radar": ("All metrics normalized (larger is better)", radar),
    "memory_breakdown": ("Peak memory breakdown per run", memory_breakdown),
    "loss_curves": ("Training loss per step", loss_curves),
}
CHART_TITLES = {name: caption for name, (caption, _) in CHARTS.items()}


def charts(rows: list[Row]) -> dict[str, str]:
    """{chart name: base64 PNG} of every chart in CHARTS."""
    return {name: png(chart(rows)) for name, (_, chart) in CHARTS.items()}
