"""The sweep report's charts, one function each: sweep rows (`sweep_points.sweep_rows`) in, a matplotlib
figure out; `charts` renders every chart (a base64 PNG for the report, an SVG for `lorafit ui`).

Throughput against batch size, peak memory against sequence length (with the budget and the
points that ran out of memory), energy per token, a side-by-side per varied choice, and the
Pareto front of tokens/s against peak memory with the best point that fits named. A named point
(`points:` in the grid file) is its own line or group, under its name (`sweep_points.series`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lorafit.base.units import GiB
from lorafit.reports.page import png, pyplot
from lorafit.reports.sweep_points import Row, best_point, budget_of, pareto_front, series, varied_keys

# choices that get a side-by-side chart when the sweep varied them
CHOICES = ("optimizer", "precision", "method", "gradient_checkpointing", "packing", "lora_r", "attention")


def _legend_or_note(ax: Any, rows: list[Row]) -> None:
    if any(r["status"] == "ok" for r in rows):
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no point finished", ha="center", va="center", transform=ax.transAxes)


def tokens_vs_batch(rows: list[Row]) -> Any:
    """Tokens/s against batch size, one line per combination of the other varied keys."""
    fig, ax = pyplot().subplots(figsize=(8, 4.5))
    for name, group in series(rows, "batch_size", varied_keys(rows)).items():
        done = [r for r in group if r["tokens_per_s"] is not None]
        ax.plot([r["config"]["batch_size"] for r in done], [r["tokens_per_s"] for r in done], marker="o", label=name)
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens/s")
    ax.set_title("Throughput vs batch size (OOM and failed points have no marker)", fontsize=10)
    _legend_or_note(ax, rows)
    return fig


def memory_vs_length(rows: list[Row]) -> Any:
    """Peak memory against max length; OOM points drawn as x at the budget (or the largest peak)."""
    budget = budget_of(rows)
    fig, ax = pyplot().subplots(figsize=(8, 4.5))
    oom_marked = False
    for name, group in series(rows, "max_length", varied_keys(rows)).items():
        done = [r for r in group if r["peak_bytes"] is not None]
        (line,) = ax.plot(
            [r["config"]["max_length"] for r in done], [r["peak_bytes"] / GiB for r in done], marker="o", label=name
        )
        ooms = [r for r in group if r["status"] == "oom"]
        if ooms:
            y = (budget or max((r["peak_bytes"] or 0) for r in rows) or GiB) / GiB
            ax.scatter(
                [r["config"]["max_length"] for r in ooms],
                [y] * len(ooms),
                marker="x",
                s=80,
                color=line.get_color(),
                label=None if oom_marked else "out of memory",
            )
            oom_marked = True
    if budget is not None:
        ax.axhline(budget / GiB, color="red", linestyle="--", label=f"budget {budget / GiB:.2f} GiB")
    ax.set_xlabel("max length (tokens)")
    ax.set_ylabel("peak memory (GiB)")
    ax.set_title("Peak memory vs sequence length", fontsize=10)
    _legend_or_note(ax, rows)
    return fig


def j_per_token(rows: list[Row]) -> Any:
    """Joules per token per point; where energy was not measured, the reasons instead."""
    fig, ax = pyplot().subplots(figsize=(9, 4.5))
    energy = [r for r in rows if r["j_per_token"] is not None]
    if energy:
        ax.barh([r["label"] for r in energy], [r["j_per_token"] for r in energy])
        ax.set_xlabel("J/token (lower is better)")
    else:
        notes = sorted({r["energy_note"] for r in rows if r["energy_note"]})
        text = "J/token n/a\n" + "\n".join(notes)
        ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True)
        ax.set_axis_off()
    ax.set_title("Energy per token", fontsize=10)
    return fig


def choice(rows: list[Row], key: str) -> Any:
    """Tokens/s and peak memory side by side for each value of one choice, per rest-of-config."""
    values = sorted({str(r["config"].get(key)) for r in rows})
    groups = series(rows, key, varied_keys(rows))
    names = list(groups)
    width = 0.8 / len(values)
    fig, axes = pyplot().subplots(1, 2, figsize=(13, 4.5))
    for ax, metric, scale, unit in (
        (axes[0], "tokens_per_s", 1, "tokens/s"),
        (axes[1], "peak_bytes", GiB, "peak memory (GiB)"),
    ):
        for j, value in enumerate(values):
            heights = []
            for name in names:
                match = [r for r in groups[name] if str(r["config"].get(key)) == value and r[metric] is not None]
                heights.append(match[0][metric] / scale if match else 0)
            ax.bar([i + j * width for i in range(len(names))], heights, width, label=f"{key}={value}")
        ax.set_xticks([i + width * (len(values) - 1) / 2 for i in range(len(names))], names, rotation=30, ha="right")
        ax.tick_params(axis="x", labelsize=7)
        ax.set_ylabel(unit)
        ax.legend(fontsize=8)
    fig.suptitle(f"{key}: throughput and memory (a missing bar: OOM or failed)", fontsize=10)
    fig.tight_layout()
    return fig


def pareto(rows: list[Row]) -> Any:
    """Every point's tokens/s against peak memory, the Pareto front, the budget and the best point."""
    budget = budget_of(rows)
    fig, ax = pyplot().subplots(figsize=(8, 5))
    done = [r for r in rows if r["tokens_per_s"] is not None and r["peak_bytes"] is not None]
    ax.scatter([r["peak_bytes"] / GiB for r in done], [r["tokens_per_s"] for r in done], color="#999", label="points")
    front = pareto_front(rows)
    ax.plot([r["peak_bytes"] / GiB for r in front], [r["tokens_per_s"] for r in front], "o-", label="Pareto front")
    best = best_point(rows, budget)
    if best is not None:
        ax.annotate(
            f"best: {best['label']}",
            (best["peak_bytes"] / GiB, best["tokens_per_s"]),
            xytext=(10, -15),
            textcoords="offset points",
            fontsize=8,
            arrowprops={"arrowstyle": "->"},
        )
    if budget is not None:
        ax.axvline(budget / GiB, color="red", linestyle="--", label="budget")
    ax.set_xlabel("peak memory (GiB)")
    ax.set_ylabel("tokens/s")
    ax.set_title("Tokens/s vs peak memory: the Pareto front", fontsize=10)
    _legend_or_note(ax, rows)
    return fig


CHART_TITLES = {
    "tokens_vs_batch": "Tokens/s vs batch size, one line per other setting",
    "memory_vs_length": "Peak memory vs max length, with the budget and OOM points (x)",
    "j_per_token": "Energy per token per configuration",
    **{f"choice_{k}": f"Comparison of {k}" for k in CHOICES},
    "pareto": "Pareto front of tokens/s vs peak memory",
}


def charts(rows: list[Row], render: Callable[[Any], str] = png) -> dict[str, str]:
    """{chart name: rendered chart} (`render`: base64 PNG by default): the fixed charts, with one
    `choice_<key>` per varied choice before the Pareto front."""
    keys = varied_keys(rows)
    figures = {"tokens_vs_batch": tokens_vs_batch, "memory_vs_length": memory_vs_length, "j_per_token": j_per_token}
    out = {name: render(chart(rows)) for name, chart in figures.items()}
    out.update({f"choice_{key}": render(choice(rows, key)) for key in CHOICES if key in keys})
    out["pareto"] = render(pareto(rows))
    return out
