"""The sweep report: what fits and what is fastest, from the sweep's rows in the run store.

Charts (matplotlib, embedded so the HTML stands alone): tokens/s vs batch size per series, peak
memory vs max length with the budget line and the OOM points, J/token per configuration, a
side-by-side of each varied choice (optimizer, precision, method, ...), and the Pareto front of
tokens/s vs peak memory with the best configuration that fits named.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from typing import Any

from lorafit.base.config import parse_bytes
from lorafit.reports.compare import (
    GIB,
    _html_table,
    _num,
    _png,
    figures_html,
    html_page,
    markdown_environment,
    markdown_table,
)
from lorafit.run.store import RunRecord

IGNORED = ("out", "max_steps")  # differ per point by construction, or fixed by the sweep
CHOICES = ("optimizer", "precision", "method", "gradient_checkpointing", "packing", "lora_r", "attention")


def sweep_rows(records: list[RunRecord]) -> list[dict[str, Any]]:
    """One row per point with the numbers the charts and the table use."""
    rows = []
    for r in records:
        s = r.summary or {}
        ok = r.status == "ok"
        rows.append(
            {
                "id": r.id,
                "label": r.label,
                "status": r.status,
                "config": r.config,
                "tokens_per_s": s.get("tokens_per_s") if ok else None,
                "peak_bytes": (s.get("peak_memory") or {}).get("peak_bytes") if ok else None,
                "j_per_token": s.get("j_per_token") if ok else None,
                "energy_note": s.get("energy_unavailable_reason"),
                "mfu": s.get("mfu") if ok else None,
                "loss_mean": s.get("loss_mean") if ok else None,
                "error": r.error,
            }
        )
    return rows


def varied_keys(rows: list[dict[str, Any]]) -> list[str]:
    """Config keys whose value differs between points, in config order."""
    keys: list[str] = []
    for row in rows:
        for k in row["config"]:
            if k not in keys and k not in IGNORED:
                keys.append(k)
    return [k for k in keys if len({json.dumps(r["config"].get(k), default=str) for r in rows}) > 1]


def budget_of(rows: list[dict[str, Any]]) -> int | None:
    budgets = {r["config"].get("memory_budget") for r in rows} - {None}
    return max(parse_bytes(b, "memory_budget") for b in budgets) if budgets else None


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points no other point beats on both tokens/s (higher) and peak memory (lower), by memory."""
    ok = sorted(
        (r for r in rows if r["tokens_per_s"] is not None and r["peak_bytes"] is not None),
        key=lambda r: (r["peak_bytes"], -r["tokens_per_s"]),
    )
    front, best = [], -1.0
    for r in ok:
        if r["tokens_per_s"] > best:
            front.append(r)
            best = r["tokens_per_s"]
    return front


def best_point(rows: list[dict[str, Any]], budget: int | None) -> dict[str, Any] | None:
    """The fastest point that trained within the budget."""
    fitting = [r for r in pareto_front(rows) if budget is None or r["peak_bytes"] <= budget]
    return max(fitting, key=lambda r: r["tokens_per_s"]) if fitting else None


def _series(rows: list[dict[str, Any]], axis: str, keys: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped by every varied key except `axis`, each group sorted along `axis`."""
    others = [k for k in keys if k != axis]
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        name = " ".join(f"{k}={r['config'].get(k)}" for k in others) or "all"
        groups[name].append(r)
    return {name: sorted(g, key=lambda r: r["config"].get(axis) or 0) for name, g in groups.items()}


def charts(rows: list[dict[str, Any]]) -> dict[str, str]:
    """{chart name: base64 PNG}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = varied_keys(rows)
    budget = budget_of(rows)
    out: dict[str, str] = {}

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, group in _series(rows, "batch_size", keys).items():
        done = [r for r in group if r["tokens_per_s"] is not None]
        ax.plot([r["config"]["batch_size"] for r in done], [r["tokens_per_s"] for r in done], marker="o", label=name)
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens/s")
    ax.set_title("Throughput vs batch size (OOM and failed points have no marker)", fontsize=10)
    _legend_or_note(ax, rows)
    out["tokens_vs_batch"] = _png(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    oom_marked = False
    for name, group in _series(rows, "max_length", keys).items():
        done = [r for r in group if r["peak_bytes"] is not None]
        (line,) = ax.plot(
            [r["config"]["max_length"] for r in done], [r["peak_bytes"] / GIB for r in done], marker="o", label=name
        )
        ooms = [r for r in group if r["status"] == "oom"]
        if ooms:
            y = (budget or max((r["peak_bytes"] or 0) for r in rows) or GIB) / GIB
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
        ax.axhline(budget / GIB, color="red", linestyle="--", label=f"budget {budget / GIB:.2f} GiB")
    ax.set_xlabel("max length (tokens)")
    ax.set_ylabel("peak memory (GiB)")
    ax.set_title("Peak memory vs sequence length", fontsize=10)
    _legend_or_note(ax, rows)
    out["memory_vs_length"] = _png(fig)

    fig, ax = plt.subplots(figsize=(9, 4.5))
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
    out["j_per_token"] = _png(fig)

    for key in (k for k in CHOICES if k in keys):
        out[f"choice_{key}"] = _choice_chart(plt, rows, keys, key)

    fig, ax = plt.subplots(figsize=(8, 5))
    done = [r for r in rows if r["tokens_per_s"] is not None and r["peak_bytes"] is not None]
    ax.scatter([r["peak_bytes"] / GIB for r in done], [r["tokens_per_s"] for r in done], color="#999", label="points")
    front = pareto_front(rows)
    ax.plot([r["peak_bytes"] / GIB for r in front], [r["tokens_per_s"] for r in front], "o-", label="Pareto front")
    best = best_point(rows, budget)
    if best is not None:
        ax.annotate(
            f"best: {best['label']}",
            (best["peak_bytes"] / GIB, best["tokens_per_s"]),
            xytext=(10, -15),
            textcoords="offset points",
            fontsize=8,
            arrowprops={"arrowstyle": "->"},
        )
    if budget is not None:
        ax.axvline(budget / GIB, color="red", linestyle="--", label="budget")
    ax.set_xlabel("peak memory (GiB)")
    ax.set_ylabel("tokens/s")
    ax.set_title("Tokens/s vs peak memory: the Pareto front", fontsize=10)
    _legend_or_note(ax, rows)
    out["pareto"] = _png(fig)
    return out


def _choice_chart(plt: Any, rows: list[dict[str, Any]], keys: list[str], key: str) -> str:
    """Tokens/s and peak memory side by side for each value of one choice, per rest-of-config."""
    values = sorted({str(r["config"].get(key)) for r in rows})
    groups = _series(rows, key, keys)
    names = list(groups)
    width = 0.8 / len(values)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, metric, scale, unit in (
        (axes[0], "tokens_per_s", 1, "tokens/s"),
        (axes[1], "peak_bytes", GIB, "peak memory (GiB)"),
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
    return _png(fig)


def _legend_or_note(ax: Any, rows: list[dict[str, Any]]) -> None:
    if any(r["status"] == "ok" for r in rows):
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no point finished", ha="center", va="center", transform=ax.transAxes)


def table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = ["point", "status", "tokens/s", "peak memory", "J/token", "MFU", "mean loss", "error"]
    body = [
        [
            r["label"],
            r["status"],
            _num(r["tokens_per_s"], "{:.1f}"),
            _num(r["peak_bytes"], "{:.2f} GiB", GIB),
            _num(r["j_per_token"], "{:.3f}"),
            _num(r["mfu"], "{:.1%}"),
            _num(r["loss_mean"], "{:.4f}"),
            (r["error"] or "")[:120],
        ]
        for r in rows
    ]
    return head, body


def verdict(rows: list[dict[str, Any]]) -> str:
    budget = budget_of(rows)
    best = best_point(rows, budget)
    within = f" within the {budget / GIB:.2f} GiB budget" if budget else ""
    if best is None:
        return f"No point trained{within}."
    return (
        f"Best configuration{within}: {best['label']} at {best['tokens_per_s']:.1f} tokens/s, "
        f"peak {best['peak_bytes'] / GIB:.2f} GiB."
    )


CHART_TITLES = {
    "tokens_vs_batch": "Tokens/s vs batch size, one line per other setting",
    "memory_vs_length": "Peak memory vs max length, with the budget and OOM points (x)",
    "j_per_token": "Energy per token per configuration",
    "pareto": "Pareto front of tokens/s vs peak memory",
}


def render_html(records: list[RunRecord], title: str, command: list[str] | None = None) -> str:
    rows = sweep_rows(records)
    titles = {**CHART_TITLES, **{f"choice_{k}": f"Comparison of {k}" for k in CHOICES}}
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "oom", "failed")}
    return html_page(
        title,
        f'<p id="verdict"><strong>{html.escape(verdict(rows))}</strong></p>'
        f"<p>{len(rows)} points: {counts['ok']} ok, {counts['oom']} out of memory, {counts['failed']} failed. "
        f"Varied: {html.escape(', '.join(varied_keys(rows)) or 'nothing')}.</p>"
        f'<h2>Points</h2><div id="points">{_html_table(*table(rows))}</div>'
        f"<h2>Charts</h2>{figures_html(charts(rows), titles)}",
        records,
        command,
    )


def render_markdown(records: list[RunRecord], title: str, command: list[str] | None = None) -> str:
    rows = sweep_rows(records)
    lines = [f"# {title}", "", verdict(rows), "", markdown_table(*table(rows)), ""]
    return "\n".join(lines + markdown_environment(records, command)) + "\n"
