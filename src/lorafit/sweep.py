"""`lorafit sweep`: a grid of training runs, each in its own process, every point a row in the run store.

A grid file:

    name: cpu-smollm2            # the store group (default: the file's stem)
    steps: 3                     # optimizer steps per point (warm-up included)
    base:                        # train options shared by every point
      model: smollm2-135m
      max_samples: 32
    grid:                        # train options to vary: every combination is a point
      method: [lora, qlora]
      batch_size: [1, 2, 4]

A point that runs out of memory is recorded as `oom` (a result: it does not fit), a crash as `failed`
with its error, and the sweep goes on. A point's id is a hash of its resolved options, so re-running
the same sweep skips every point already in the store; `--retry-failed` runs failed ones again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lorafit.config import TrainConfig, coerce, dump_yaml, unknown_key
from lorafit.errors import UserError, exit_status
from lorafit.rundir import read_metrics
from lorafit.store import RunRecord, RunStore

GRID_KEYS = ("name", "steps", "base", "grid", "memory_budget")


@dataclass
class Point:
    id: str
    label: str
    values: dict[str, Any]  # the grid values of this point
    config: TrainConfig


@dataclass
class Sweep:
    name: str
    steps: int
    points: list[Point]


def _point_id(cfg: TrainConfig) -> str:
    options = {k: v for k, v in cfg.to_dict().items() if k != "out"}
    return hashlib.sha1(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:12]


def load_grid(path: Path, out_dir: Path, memory_budget: str | None = None) -> Sweep:
    """Read and validate a grid file; every point's options are checked before anything runs."""
    source = str(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read grid: {e.strerror}", file=source) from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"invalid YAML: {e}", file=source, line=None if mark is None else mark.line + 1) from e
    if not isinstance(raw, dict):
        raise UserError("a grid file is a mapping with base, grid and steps", file=source)
    for key in raw:
        if key not in GRID_KEYS:
            raise UserError(f"unknown key '{key}'; a grid file has {', '.join(GRID_KEYS)}", file=source, field=key)
    steps = raw.get("steps", 3)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise UserError(f"steps must be an integer >= 1, got {steps!r}", file=source, field="steps")
    base = raw.get("base") or {}
    grid = raw.get("grid") or {}
    if not isinstance(base, dict) or not isinstance(grid, dict) or not grid:
        raise UserError("base must be a mapping and grid a non-empty mapping of option: [values]", file=source)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    base_values = {}
    for key, value in base.items():
        key = key.replace("-", "_")
        if key not in names:
            raise unknown_key(key, f"{source} (base)")
        base_values[key] = coerce(key, value, f"{source} (base)")
    axes: list[tuple[str, list[Any]]] = []
    for key, values in grid.items():
        key = key.replace("-", "_")
        if key not in names:
            raise unknown_key(key, f"{source} (grid)")
        if key in ("out", "max_steps"):
            raise UserError(f"'{key}' is set by the sweep, not the grid", file=source, field=key)
        values = values if isinstance(values, list) else [values]
        axes.append((key, [coerce(key, v, f"{source} (grid)") for v in values]))
    budget = memory_budget or raw.get("memory_budget")
    name = str(raw.get("name") or path.stem)
    points = []
    for combo in itertools.product(*(values for _, values in axes)):
        values = dict(zip((k for k, _ in axes), combo, strict=True))
        options = {**base_values, **values, "max_steps": steps}
        if budget is not None:
            options["memory_budget"] = str(budget)
        label = " ".join(f"{k}={v}" for k, v in values.items())
        try:
            cfg = TrainConfig(**options)
        except UserError as e:
            raise UserError(f"point {label}: {e.message}", file=source, field=e.field) from e
        point_id = _point_id(cfg)
        cfg.out = str(out_dir / "points" / point_id)
        points.append(Point(point_id, label, values, cfg))
    return Sweep(name, steps, points)


def point_command(config_file: Path) -> list[str]:
    """The process that trains one point: `lorafit train` with the point's resolved config."""
    return [sys.executable, "-m", "lorafit", "train", "--config", str(config_file), "--json"]


def _failure(returncode: int, log_tail: str) -> tuple[str, str]:
    """(status, error) of a point whose process did not exit 0."""
    status = exit_status(returncode)
    if returncode == -signal.SIGKILL:
        return status, "killed by SIGKILL (the kernel's out-of-memory killer, or a user)"
    if returncode < 0:
        return status, f"killed by signal {signal.Signals(-returncode).name}"
    if status == "oom":
        return status, log_tail if log_tail.startswith("out of memory") else f"out of memory: {log_tail}"
    return status, f"exit {returncode}: {log_tail}"


def run_point(point: Point, log_dir: Path) -> RunRecord:
    """Train one point in a subprocess (its output goes to points/<id>.log); never raises for a bad run."""
    cfg_file = log_dir / f"{point.id}.yaml"
    log_file = log_dir / f"{point.id}.log"
    dump_yaml(point.config, cfg_file)
    started = time.time()
    with log_file.open("w", encoding="utf-8") as log:
        proc = subprocess.run(point_command(cfg_file), stdout=subprocess.DEVNULL, stderr=log)
    record = RunRecord(point.label, "sweep", "ok", point.config.to_dict(), id=point.id, run_dir=point.config.out)
    record.created = started
    summary_file = Path(point.config.out) / "summary.json"  # written atomically: whole or absent
    if summary_file.is_file():  # on failure: what the run recorded before it stopped
        record.summary = json.loads(summary_file.read_text(encoding="utf-8"))
    if proc.returncode != 0:
        tail = log_file.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        record.status, record.error = _failure(proc.returncode, tail[-1] if tail else "no output")
    elif record.summary is None:
        record.status, record.error = "failed", f"exited 0 without {summary_file}"
    record.metrics = read_metrics(Path(point.config.out) / "metrics.jsonl")
    return record


def run_sweep(
    sweep: Sweep,
    store: RunStore,
    out_dir: Path,
    parallel: int = 1,
    retry_failed: bool = False,
    on_update: Callable[[dict[str, str], dict[str, RunRecord]], None] | None = None,
) -> dict[str, RunRecord]:
    """Run the points not yet in the store; returns {point id: record} for every point of the sweep.

    Only this (main) thread writes to the store. Ctrl-C stops launching points; finished rows stay.
    """
    log_dir = out_dir / "points"
    log_dir.mkdir(parents=True, exist_ok=True)
    known = {r.id: r for r in store.runs(group_name=sweep.name)}
    results: dict[str, RunRecord] = {}
    state: dict[str, str] = {}
    todo = []
    for p in sweep.points:
        old = known.get(p.id)
        if old is not None and (old.status in ("ok", "oom") or not retry_failed):
            results[p.id] = old
            state[p.id] = f"{old.status} (stored)"
        else:
            todo.append(p)
            state[p.id] = "waiting"
    if on_update:
        on_update(state, results)
    by_id = {p.id: p for p in todo}
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        running: dict[Future, str] = {}
        queue = list(todo)
        while queue or running:
            while queue and len(running) < parallel:
                p = queue.pop(0)
                running[pool.submit(run_point, p, log_dir)] = p.id
                state[p.id] = "running"
            if on_update:
                on_update(state, results)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                point_id = running.pop(future)
                record = future.result()
                record.group_name = sweep.name
                record.label = by_id[point_id].label
                store.put(record)
                results[point_id] = record
                state[point_id] = record.status
    if on_update:
        on_update(state, results)
    return results
