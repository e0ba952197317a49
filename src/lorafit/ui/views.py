"""What the pages show, as JSON: a run's detail, the comparison of runs and the sweeps.

The comparison and the sweeps are the reports' own sections and charts (`reports.compare.sections`,
`reports.sweep`, `reports.sweep_points`, the charts of `reports.charts` and `reports.sweep_charts`),
drawn as SVG instead of PNG; nothing here recomputes a figure the reports show.

Drawing them takes matplotlib seconds, so each answer is kept (the last DRAWN_KEPT) under what it was
drawn from: the runs' records as read now (store rows, or the run directories' files) and, for a sweep,
the entries the page lists. Asking again with nothing changed answers at once; any change to a run's
files or store row makes a new key, and so a new drawing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorafit.base.errors import UserError
from lorafit.reports import sweep, sweep_charts
from lorafit.reports.charts import CHART_TITLES, CHARTS
from lorafit.reports.compare import label_apart, sections
from lorafit.reports.page import svg
from lorafit.reports.sweep_points import best_point, budget_of, is_named, pareto_front, sweep_rows, varied_keys
from lorafit.run.evaluation import Evaluation
from lorafit.run.store import RunRecord, record_from_run_dir
from lorafit.ui.catalog import Run, Scan, dir_status


class NotFound(LookupError):
    """An id (run, sweep, report) the UI does not know: 404."""


DRAWN_KEPT = 16  # answers with charts kept; each is a few hundred KB of SVG
_drawn: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
_drawn_lock = threading.Lock()


def fingerprint(records: list[RunRecord], entries: list[dict[str, Any]] | None = None) -> str:
    """What an answer is drawn from, in a few bytes: every field of the records but the id and creation
    time `record_from_run_dir` makes up on each read (a store record's are in its entry), and the entries."""
    state = [
        {k: v for k, v in vars(r).items() if k not in ("id", "created", "summary")}
        | {"summary": r.summary.to_dict() if r.summary else None}
        for r in records
    ]
    text = json.dumps([state, entries or []], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def drawn(key: tuple, draw: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The answer kept under `key`, else `draw()`'s (kept; the least recently asked goes beyond DRAWN_KEPT)."""
    with _drawn_lock:
        if key in _drawn:
            _drawn.move_to_end(key)
            return _drawn[key]
    answer = draw()
    with _drawn_lock:
        _drawn[key] = answer
        while len(_drawn) > DRAWN_KEPT:
            _drawn.popitem(last=False)
    return answer


def status_of(run: Run) -> str:
    """The run's status now: a run directory without summary.json may have started or stopped since the scan."""
    if run.record is None and run.dir is not None:
        return dir_status(run.dir, run.dir.summary())
    return run.entry.status


def get_run(scan: Scan, run_id: str) -> Run:
    run = scan.find(run_id)
    if run is None:
        raise NotFound(f"no run with id {run_id!r}")
    return run


def detail(run: Run) -> dict[str, Any]:
    """Everything the run page shows: the entry, summary, settings, memory breakdown, eval, adapter, plan, rows."""
    s = run.summary
    breakdown = s.memory.memory_breakdown if s else None
    plan = run.dir.read_plan() if run.dir is not None else None
    if plan is None and s is not None:
        plan = s.memory_plan
    return {
        "run": run.entry.to_dict(),
        "summary": s.to_dict() if s else None,
        "config": run.config,
        "memory_breakdown": [{"part": p, "bytes": b} for p, b in breakdown.items()] if breakdown else [],
        "eval": dataclasses.asdict(Evaluation.from_dict(run.evaluation)) if run.evaluation else None,
        "adapter": _weights(run),
        "plan": plan.to_dict() if plan else None,
        "metrics": run.metrics,
    }


def _weights(run: Run) -> str | None:
    """adapter/ (LoRA, QLoRA) or model/ (full) of the run, when it exists."""
    if run.dir is None:
        return None
    weights = run.dir.weights_dir(run.entry.method or "lora")
    return str(weights) if weights.is_dir() else None


def metrics_after(run: Run, after: int) -> dict[str, Any]:
    """The polling fallback of the live stream: rows past step `after`, the status, and whether it is over."""
    rows = run.dir.metrics() if run.dir is not None else run.metrics
    status = status_of(run)
    return {"rows": [r for r in rows if r.get("step", 0) > after], "status": status, "done": status != "running"}


# ---------------------------------------------------------------- compare


def report_records(scan: Scan, ids: list[str]) -> list[RunRecord]:
    """The runs as `lorafit report` reads them: store records as stored, run directories through
    `record_from_run_dir`; runs of the same label get their directory's name added, as there."""
    if not ids:
        raise UserError("select at least one run", field="ids")
    records = []
    for run_id in ids:
        run = get_run(scan, run_id)
        if run.record is not None:
            records.append(dataclasses.replace(run.record))
        else:
            assert run.dir is not None
            records.append(record_from_run_dir(run.dir.path))
    return label_apart(records)


def _table(head: list[str], body: list[list[str]], note: str | None = None) -> dict[str, Any]:
    return {"head": head, "body": body} if note is None else {"head": head, "body": body, "note": note}


def compare(records: list[RunRecord], baseline: str | None) -> dict[str, Any]:
    """The comparison report's tables and charts for `records`, the charts as SVG (drawn again only when
    a record changed)."""
    return drawn(("compare", baseline, fingerprint(records)), lambda: _compare(records, baseline))


def _compare(records: list[RunRecord], baseline: str | None) -> dict[str, Any]:
    s = sections(records, baseline)
    rows = s["rows"]
    return {
        "labels": [r["label"] for r in rows],
        "table": _table(*s["table"]),
        "improvement": _table(*s["improvement"]),
        "settings": _table(*s["settings"]),
        "breakdown": _table(*s["breakdown"]),
        "notes": s["notes"],
        "charts": {name: svg(chart(rows)) for name, (_, chart) in CHARTS.items()},
        "titles": dict(CHART_TITLES),
    }


def write_compare_report(records: list[RunRecord], reports_dir: Path, baseline: str | None) -> Path:
    """report.html and report.md, as `lorafit report` writes them, in a new `<time>-compare` directory."""
    from lorafit.reports import write_report

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out, n = reports_dir / f"{stamp}-compare", 1
    while out.exists():
        n += 1
        out = reports_dir / f"{stamp}-compare-{n}"
    command = ["lorafit", "report", *(r.run_dir or r.id for r in records)]
    write_report(records, out, "lorafit report", command, baseline=baseline)
    return out


# ---------------------------------------------------------------- sweeps


def sweep_groups(scan: Scan) -> dict[str, list[Run]]:
    """{sweep name: its points}: the store's groups of sweep points, in creation order."""
    groups: dict[str, list[Run]] = {}
    for run in scan.runs:
        if run.record is not None and run.record.kind == "sweep" and run.record.group_name:
            groups.setdefault(run.record.group_name, []).append(run)
    return groups


def sweeps(scan: Scan) -> dict[str, Any]:
    out = []
    for name, points in sweep_groups(scan).items():
        status = [p.entry.status for p in points]
        counts = {s: status.count(s) for s in ("ok", "oom", "failed")}
        out.append({"name": name, "points": len(points), **counts, "created": min(p.entry.created for p in points)})
    return {"sweeps": out}


def sweep_detail(scan: Scan, name: str) -> dict[str, Any]:
    """A sweep's table, points (with the keys it varied, and whether on the Pareto front), best point
    within the budget, verdict and charts: the sweep report's, charts as SVG."""
    points = sweep_groups(scan).get(name)
    if not points:
        raise NotFound(f"no sweep named {name!r}")
    records = [p.record for p in points if p.record is not None]
    key = ("sweep", name, fingerprint(records, [p.entry.to_dict() for p in points]))
    return drawn(key, lambda: _sweep_detail(points, records, name))


def _sweep_detail(points: list[Run], records: list[RunRecord], name: str) -> dict[str, Any]:
    rows = sweep_rows(records)
    keys, budget = varied_keys(rows), budget_of(rows)
    front = {r["id"] for r in pareto_front(rows)}
    best = best_point(rows, budget)
    entries = {p.entry.id: p.entry for p in points}
    head, body = sweep.table(rows)
    charts = sweep_charts.charts(rows, render=svg)
    return {
        "name": name,
        "table": _table(head, body),
        "points": [
            {
                **entries[r["id"]].to_dict(),
                "point": r["label"] if is_named(r["label"]) else None,
                "settings": {k: r["config"].get(k) for k in keys},
                "pareto": r["id"] in front,
            }
            for r in rows
        ],
        "best": entries[best["id"]].to_dict() if best else None,
        "budget_bytes": budget,
        "verdict": sweep.verdict(rows),
        "charts": charts,
        "titles": {k: sweep_charts.CHART_TITLES.get(k, k) for k in charts},
    }
