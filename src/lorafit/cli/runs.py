"""`lorafit runs list|show|export`: query the SQLite run store (registered as the `runs` group in cli.main)."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from lorafit.base.errors import UserError
from lorafit.base.units import format_budget, format_bytes, parse_bytes

RUN_COLUMNS = (
    "id",
    "created",
    "group_name",
    "label",
    "kind",
    "status",
    "tokens_per_s",
    "peak_bytes",
    "mfu",
    "loss_mean",
    "j_per_token",
    "ppl",
    "error",
    "memory_budget_bytes",
)  # sizes as whole bytes, the unit in the column's name: a CSV reader does arithmetic on them


def record_json(r: Any) -> dict[str, Any]:
    """Every stored field of a RunRecord as JSON, the summary as summary.json writes it."""
    fields = {f.name: getattr(r, f.name) for f in dataclasses.fields(r)}
    return {**fields, "summary": None if r.summary is None else r.summary.to_dict()}


def _flat(r: Any) -> dict[str, Any]:
    """One row of key numbers per run (runs list, runs export --csv)."""
    s, e = r.summary, r.eval or {}
    return {
        "id": r.id,
        "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created)),
        "group_name": r.group_name,
        "label": r.label,
        "kind": r.kind,
        "status": r.status,
        "tokens_per_s": s.timing.tokens_per_s if s else None,
        "peak_bytes": s.peak_bytes if s else None,
        "mfu": s.flops.mfu if s else None,
        "loss_mean": s.losses.loss_mean if s else None,
        "j_per_token": s.energy.j_per_token if s else None,
        "ppl": (e.get("perplexity") or {}).get("ppl"),
        "error": r.error,
        "memory_budget_bytes": _budget_bytes(r),
    }


def _budget_text(r: Any) -> str | None:
    """The run's --memory-budget as the user gave it (config.yaml), None without one."""
    budget = (r.config or {}).get("memory_budget")
    return None if budget in (None, "") else str(budget)


def _budget_bytes(r: Any) -> int | None:
    budget = _budget_text(r)
    return None if budget is None else parse_bytes(budget, "memory_budget")


def _open_runs(store: Path, group: str | None, status: str | None) -> list[Any]:
    from lorafit.run.store import RunStore

    if not store.is_file():
        raise UserError("run store not found", file=str(store))
    with RunStore(store) as db:
        return db.runs(group_name=group, **({"status": status} if status else {}))


StoreOpt = Annotated[Path, typer.Option("--store", help="SQLite run store.")]
GroupOpt = Annotated[str | None, typer.Option(help="Only runs of this compare or sweep.")]
StatusOpt = Annotated[str | None, typer.Option(help="Only runs with this status (ok, oom, failed, interrupted).")]


def runs_list(store: StoreOpt = Path("runs.sqlite"), group: GroupOpt = None, status: StatusOpt = None) -> None:
    """One line per run: id, group, label, status, tokens/s, peak memory, memory budget."""
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for column in ("id", "created", "group", "label", "status", "tokens/s", "peak memory", "budget", "error"):
        table.add_column(column)
    for r in _open_runs(store, group, status):
        f = _flat(r)
        tps = "" if f["tokens_per_s"] is None else f"{f['tokens_per_s']:.1f}"
        table.add_row(
            f["id"],
            f["created"],
            f["group_name"] or "",
            f["label"],
            f["status"],
            tps,
            format_bytes(f["peak_bytes"], "GiB", missing=""),
            "" if _budget_text(r) is None else format_budget(_budget_text(r)),
            (f["error"] or "")[:60],
        )
    Console().print(table)


def runs_show(
    run_id: Annotated[str, typer.Argument(help="Run id (see runs list).")], store: StoreOpt = Path("runs.sqlite")
) -> None:
    """Everything stored for one run, as JSON."""
    matches = [r for r in _open_runs(store, None, None) if r.id == run_id]
    if not matches:
        raise UserError(f"no run with id {run_id!r}", file=str(store))
    sys.stdout.write(json.dumps(record_json(matches[0]), indent=2, default=str) + "\n")


def runs_export(
    store: StoreOpt = Path("runs.sqlite"),
    group: GroupOpt = None,
    status: StatusOpt = None,
    csv_out: Annotated[bool, typer.Option("--csv", help="CSV with one row per run (the default).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="JSON: every stored field of every run.")] = False,
    out: Annotated[Path | None, typer.Option(help="Write to this file instead of stdout.")] = None,
) -> None:
    """Export runs as CSV (key numbers per run) or JSON (everything stored)."""
    import csv
    import io

    if csv_out and json_out:
        raise UserError("give --csv or --json, not both")
    runs = _open_runs(store, group, status)
    if json_out:
        text = json.dumps([record_json(r) for r in runs], indent=2, default=str) + "\n"
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=RUN_COLUMNS)
        writer.writeheader()
        for r in runs:
            writer.writerow(_flat(r))
        text = buf.getvalue()
    if out is None:
        sys.stdout.write(text)
    else:
        from lorafit.run.rundir import write_text_atomic

        write_text_atomic(out, text)
