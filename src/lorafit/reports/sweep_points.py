"""A sweep's points as rows of numbers, and what they say: which keys varied, the budget, the
Pareto front of tokens/s against peak memory, and the fastest point that fits.

The sweep report's table and charts (`reports.sweep`, `reports.sweep_charts`) only draw these.

A grid point is labelled by its values (`method=lora batch_size=2`); a named point (`points:` in the
grid file) by its name, which has no '=' (`studies.sweep` refuses one that does): that is how a row
knows it is named, and a named point is shown, grouped and drawn under its name.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from lorafit.base.units import parse_bytes
from lorafit.run.store import RunRecord
from lorafit.run.summary import Summary

Row = dict[str, Any]
IGNORED = ("out", "max_steps")  # differ per point by construction, or fixed by the sweep


def sweep_rows(records: list[RunRecord]) -> list[Row]:
    """One row per point with the numbers the charts and the table use (figures only for points that trained)."""
    rows = []
    for r in records:
        s = r.summary or Summary(status=r.status)
        ok = r.status == "ok"
        rows.append(
            {
                "id": r.id,
                "label": r.label,
                "named": is_named(r.label),
                "status": r.status,
                "config": r.config,
                "tokens_per_s": s.timing.tokens_per_s if ok else None,
                "peak_bytes": s.peak_bytes if ok else None,
                "j_per_token": s.energy.j_per_token if ok else None,
                "energy_note": s.energy.energy_unavailable_reason,
                "mfu": s.flops.mfu if ok else None,
                "loss_mean": s.losses.loss_mean if ok else None,
                "error": r.error,
            }
        )
    return rows


def is_named(label: str) -> bool:
    """A named point's label is its name; a grid point's is `key=value ...` (a grid has at least one key)."""
    return "=" not in label


def differing_keys(configs: list[dict[str, Any]], ignored: tuple[str, ...] = IGNORED) -> list[str]:
    """Keys whose value differs between the configs (a missing key counts as None), in config order.
    The comparison report can use it too: the settings its methods do not share."""
    keys: list[str] = []
    for config in configs:
        keys += [k for k in config if k not in keys and k not in ignored]
    return [k for k in keys if len({json.dumps(c.get(k), default=str) for c in configs}) > 1]


def varied_keys(rows: list[Row]) -> list[str]:
    """Config keys whose value differs between points, in config order."""
    return differing_keys([r["config"] for r in rows])


def settings(row: Row, keys: list[str]) -> str:
    """What sets a point apart: its values of the varied `keys`, as `key=value ...`."""
    return " ".join(f"{k}={row['config'].get(k)}" for k in keys)


def budget_of(rows: list[Row]) -> int | None:
    """The largest memory budget the points were given, in bytes (None: no budget)."""
    budgets = {r["config"].get("memory_budget") for r in rows} - {None}
    return max(parse_bytes(b, "memory_budget") for b in budgets) if budgets else None


def pareto_front(rows: list[Row]) -> list[Row]:
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


def best_point(rows: list[Row], budget: int | None) -> Row | None:
    """The fastest point that trained within the budget."""
    fitting = [r for r in pareto_front(rows) if budget is None or r["peak_bytes"] <= budget]
    return max(fitting, key=lambda r: r["tokens_per_s"]) if fitting else None


def series(rows: list[Row], axis: str, keys: list[str]) -> dict[str, list[Row]]:
    """Rows grouped by every varied key except `axis`, each group sorted along `axis`; a named point
    is a group of its own, under its name."""
    others = [k for k in keys if k != axis]
    groups: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        name = r["label"] if r["named"] else settings(r, others) or "all"
        groups[name].append(r)
    return {name: sorted(g, key=lambda r: r["config"].get(axis) or 0) for name, g in groups.items()}
