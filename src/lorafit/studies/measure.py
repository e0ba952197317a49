"""`lorafit estimate --measure`: the estimate checked against short real runs, each in its own process.

Two optimizer steps per try: the optimizer state exists from the first update on, so the second step
sees the whole of what a long run holds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from lorafit.base.config import TrainConfig
from lorafit.measurement.estimate import STEP, largest_fitting
from lorafit.studies.sweep import Point, run_point


def measure(cfg: TrainConfig, work_dir: Path, steps: int = 2) -> dict[str, Any]:
    """Train `steps` optimizer steps of cfg in a subprocess: its status, error, peak and memory parts. The
    point runs as given: no memory plan reshapes it."""
    trial = dataclasses.replace(cfg, max_steps=steps, profile_warmup_steps=0, plan_memory=False)
    point_id = f"b{cfg.batch_size}-l{cfg.max_length}"
    trial.out = str(work_dir / point_id)
    work_dir.mkdir(parents=True, exist_ok=True)
    record = run_point(Point(point_id, point_id, {}, trial), work_dir)
    measured = record.summary if record.status == "ok" else None
    breakdown = measured.memory.memory_breakdown if measured else None
    return {
        "status": record.status,
        "error": record.error,
        "peak_bytes": measured.peak_bytes if measured else None,
        "memory_breakdown": dict(breakdown.items()) if breakdown else None,
    }


def measure_max(cfg: TrainConfig, what: str, budget: int, work_dir: Path, start: int | None) -> tuple[int | None, int]:
    """Largest batch or length that really trains within the budget (short runs under
    --memory-budget), searched from the estimate's answer. Returns (value, runs made)."""
    key = "batch_size" if what == "batch" else "max_length"
    runs = 0

    def fits(value: int) -> bool:
        nonlocal runs
        runs += 1
        trial = dataclasses.replace(cfg, **{key: value}, memory_budget=str(budget))
        return measure(trial, work_dir)["status"] == "ok"

    return largest_fitting(fits, start or STEP[what], STEP[what]), runs
