"""Reports: the comparison report and the sweep report, on one shared page (`reports.page`).

`write_report` is the one entry point (`lorafit compare`, `lorafit report`): it picks the sweep
report when every record is a sweep point, the comparison report otherwise. It lives here, above
both reports, so that neither report imports the other.
"""

from __future__ import annotations

from pathlib import Path

from lorafit.reports import compare, sweep
from lorafit.reports.page import write_documents
from lorafit.run.store import RunRecord


def write_report(
    records: list[RunRecord],
    out_dir: str | Path,
    title: str = "lorafit comparison",
    command: list[str] | None = None,
    baseline: str | None = None,
) -> tuple[Path, Path]:
    """Write the report (self-contained report.html and report.md) into `out_dir`; returns their paths.

    A set of sweep points gets the sweep report; any other set of runs, the comparison report, with its
    improvement figures against `baseline` (a run label or a method; default: the first training run)."""
    if records and all(r.kind == "sweep" for r in records):
        html_text = sweep.render_html(records, title, command)
        return write_documents(out_dir, html_text, sweep.render_markdown(records, title, command))
    html_text = compare.render_html(records, title, command, baseline=baseline)
    return write_documents(out_dir, html_text, compare.render_markdown(records, title, command, baseline=baseline))
