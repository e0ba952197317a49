"""The comparison report's charts, one function each: rows (from `compare.build_rows`) in, a base64 PNG out.

Each run keeps one colour across the charts (`run_colors`), so a run is easy to follow from the
bars to the radar to the loss curves.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from lorafit.base.units import GiB, MiB
from lorafit.measurement.figures import MemoryBreakdown
from lorafit.reports.page import png, pyplot

Row = dict[str, Any]

# (title, row key, unit scale, unit label, larger is better; None: neither)
PANELS: list[tuple[str, str, float, str, bool | None]] = [
    ("Size on disk", "disk_bytes", MiB, "MiB", False),
    ("Trainable parameters", "trainable_params", 1e6, "M", None),
    ("MFU", "mfu", 0.01, "%", True),
    ("Time per optimizer step", "step_time_s", 1.0, "s", False),
    ("Perplexity", "ppl", 1.0, "", False),
    ("Inference decode tokens/s", "decode_tokens_per_s", 1.0, "tokens/s", True),
]
# (axis name, row key, larger is better)
RADAR = [
    ("size", "disk_bytes", False),
    ("MFU", "mfu", True),
    ("train tokens/s", "train_tokens_per_s", True),
    ("peak memory", "peak_memory_bytes", False),
    ("perplexity", "ppl", False),
    ("decode tokens/s", "decode_tokens_per_s", True),
]
BREAKDOWN = [part for part, _ in MemoryBreakdown().items()]  # the parts of a peak, stacked bottom up


def run_colors(rows: list[Row]) -> dict[str, str]:
    """{run label: colour}, in matplotlib's default colour cycle."""
    colors = pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    return {r["label"]: colors[i % len(colors)] for i, r in enumerate(rows)}


def six_panel(rows: list[Row]) -> str:
    """Bars of size, trainable parameters, MFU, time per step, perplexity and decode speed per run."""
    plt, color = pyplot(), run_colors(rows)
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (title, key, scale, unit, better) in zip(axes.flat, PANELS, strict=True):
        shown = [r for r in rows if r[key] is not None]
        ax.bar([r["label"] for r in shown], [r[key] / scale for r in shown], color=[color[r["label"]] for r in shown])
        for i, r in enumerate(shown):
            ax.annotate(f"{r[key] / scale:.3g}", (i, r[key] / scale), ha="center", va="bottom", fontsize=8)
        direction = "" if better is None else f" ({'higher' if better else 'lower'} is better)"
        ax.set_title(title + direction, fontsize=10)
        ax.set_ylabel(unit)
        if not shown:
            ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return png(fig)


def radar_scores(rows: list[Row], row: Row) -> list[float]:
    """`row`'s RADAR metrics normalized so that larger is better and the best run scores 1; missing: 0."""
    scores = []
    for _, key, better in RADAR:
        present = [x[key] for x in rows if x[key]]
        v = row[key]
        scores.append(0.0 if not v or not present else (v / max(present) if better else min(present) / v))
    return scores


def radar(rows: list[Row]) -> str:
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
    return png(fig)


def memory_breakdown(rows: list[Row]) -> str:
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
    return png(fig)


def loss_curves(rows: list[Row]) -> str:
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
    return png(fig)


# {chart name: (caption, chart)}, in the order the report shows them
CHARTS: dict[str, tuple[str, Callable[[list[Row]], str]]] = {
    "six_panel": ("Size, trainable parameters, MFU, time per step, perplexity, inference speed", six_panel),
    "radar": ("All metrics normalized (larger is better)", radar),
    "memory_breakdown": ("Peak memory breakdown per run", memory_breakdown),
    "loss_curves": ("Training loss per step", loss_curves),
}
CHART_TITLES = {name: caption for name, (caption, _) in CHARTS.items()}


def charts(rows: list[Row]) -> dict[str, str]:
    """{chart name: base64 PNG} of every chart in CHARTS."""
    return {name: chart(rows) for name, (_, chart) in CHARTS.items()}
