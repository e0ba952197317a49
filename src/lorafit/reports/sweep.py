"""The sweep report: what fits and what is fastest, from the sweep's rows in the run store.

A verdict (the fastest configuration within the memory budget), a table of every point, what each
named point sets, and the charts of `reports.sweep_charts`, on the page of `reports.page`; the numbers
come from `reports.sweep_points`. Named points are labelled by their names everywhere.
"""

from __future__ import annotations

import html

from lorafit.base.units import format_bytes
from lorafit.reports.page import figures_html, html_page, html_table, markdown_environment, markdown_table, num
from lorafit.reports.sweep_charts import CHART_TITLES, charts
from lorafit.reports.sweep_points import Row, best_point, budget_of, settings, sweep_rows, varied_keys
from lorafit.run.store import RunRecord


def table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    head = ["point", "status", "tokens/s", "peak memory", "J/token", "MFU", "mean loss", "error"]
    body = [
        [
            r["label"],
            r["status"],
            num(r["tokens_per_s"], "{:.1f}"),
            format_bytes(r["peak_bytes"], "GiB"),
            num(r["j_per_token"], "{:.3f}"),
            num(r["mfu"], "{:.1%}"),
            num(r["loss_mean"], "{:.4f}"),
            (r["error"] or "")[:120],
        ]
        for r in rows
    ]
    return head, body


def named_table(rows: list[Row]) -> tuple[list[str], list[list[str]]] | None:
    """Each named point's name and its values of the keys the sweep varied (None: no named point)."""
    keys = varied_keys(rows)
    body = [[r["label"], settings(r, keys) or "the base options"] for r in rows if r["named"]]
    return (["point", "settings"], body) if body else None


def verdict(rows: list[Row]) -> str:
    """One sentence: the fastest point within the budget, or that none trained."""
    budget = budget_of(rows)
    best = best_point(rows, budget)
    within = f" within the {format_bytes(budget, 'GiB')} budget" if budget else ""
    if best is None:
        return f"No point trained{within}."
    return (
        f"Best configuration{within}: {best['label']} at {best['tokens_per_s']:.1f} tokens/s, "
        f"peak {format_bytes(best['peak_bytes'], 'GiB')}."
    )


def render_html(records: list[RunRecord], title: str, command: list[str] | None = None) -> str:
    rows = sweep_rows(records)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "oom", "failed")}
    named = named_table(rows)
    named_html = f'<h2>Named points</h2><div id="named-points">{html_table(*named)}</div>' if named else ""
    return html_page(
        title,
        f'<p id="verdict"><strong>{html.escape(verdict(rows))}</strong></p>'
        f"<p>{len(rows)} points: {counts['ok']} ok, {counts['oom']} out of memory, {counts['failed']} failed. "
        f"Varied: {html.escape(', '.join(varied_keys(rows)) or 'nothing')}.</p>"
        f'<h2>Points</h2><div id="points">{html_table(*table(rows))}</div>{named_html}'
        f"<h2>Charts</h2>{figures_html(charts(rows), CHART_TITLES)}",
        records,
        command,
    )


def render_markdown(records: list[RunRecord], title: str, command: list[str] | None = None) -> str:
    rows = sweep_rows(records)
    lines = [f"# {title}", "", verdict(rows), "", markdown_table(*table(rows)), ""]
    named = named_table(rows)
    if named:
        lines += ["## Named points", "", markdown_table(*named), ""]
    return "\n".join(lines + markdown_environment(records, command)) + "\n"
