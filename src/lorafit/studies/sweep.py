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

Where points run is the executor's business (`--executor`): `local` runs them as subprocesses here,
one per GPU at a time when several GPUs are visible; `ray` runs each as a Ray task with a GPU of an
existing cluster. Either way the point is the same `lorafit train` process and only this process
writes the store: a task returns its record (summary, metrics, error) rather than touching the store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import queue
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from lorafit.base.config import TrainConfig, coerce, dump_yaml, unknown_key
from lorafit.base.errors import UserError
from lorafit.run.rundir import RunDir
from lorafit.run.runner import lorafit_command, run_command
from lorafit.run.store import RunRecord, RunStore

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
        # a point runs as written (a memory plan would change what is swept) unless the grid asks for one
        options = {"plan_memory": False, **base_values, **values, "max_steps": steps}
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
    return lorafit_command("train", "--config", str(config_file), "--json")


def run_point(point: Point, log_dir: Path, env: dict[str, str] | None = None) -> RunRecord:
    """Train one point in a subprocess (its output goes to points/<id>.log); never raises for a bad run.
    `env` is added to this process's environment (e.g. CUDA_VISIBLE_DEVICES)."""
    log_dir.mkdir(parents=True, exist_ok=True)  # on a Ray worker node without a shared disk too
    cfg_file = log_dir / f"{point.id}.yaml"
    dump_yaml(point.config, cfg_file)
    started = time.time()
    finished = run_command(point_command(cfg_file), log_dir / f"{point.id}.log", env)
    run = RunDir(point.config.out)
    record = RunRecord(point.label, "sweep", finished.status, point.config.to_dict(), id=point.id, run_dir=str(run))
    record.created = started
    record.summary = run.summary()  # on failure: what the run recorded before it stopped
    record.error = finished.error
    if finished.ok and record.summary is None:
        record.status, record.error = "failed", f"exited 0 without {run.summary_file}"
    record.metrics = run.metrics()
    return record


def run_point_from(cwd: str, point: Point, log_dir: Path) -> RunRecord:
    """`run_point` from the submitting process's directory where it exists (a shared disk), so relative
    paths in the grid (data files, --out) mean the same on every node."""
    if Path(cwd).is_dir():
        os.chdir(cwd)
    return run_point(point, log_dir)


class Executor(Protocol):
    """Runs points somewhere; `slots` is how many to keep in flight."""

    slots: int

    def describe(self) -> str: ...
    def submit(self, point: Point, log_dir: Path) -> Future: ...
    def close(self) -> None: ...


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES values for its children."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


class LocalExecutor:
    """Points as subprocesses on this machine. With two or more GPUs, each point gets one GPU of its own
    (CUDA_VISIBLE_DEVICES) and as many run at once as there are GPUs; otherwise `parallel` at once."""

    def __init__(self, parallel: int = 1, gpus: list[str] | None = None) -> None:
        gpus = visible_gpus() if gpus is None else gpus
        self.pinned = gpus if len(gpus) > 1 else []  # one GPU or none: no pinning
        self.slots = len(self.pinned) or parallel
        self._free: queue.Queue[str] = queue.Queue()
        for gpu in self.pinned:
            self._free.put(gpu)
        self._pool = ThreadPoolExecutor(max_workers=self.slots)

    def describe(self) -> str:
        per_gpu = f", one per GPU ({', '.join(self.pinned)})" if self.pinned else ""
        return f"local: {self.slots} at a time{per_gpu}"

    def submit(self, point: Point, log_dir: Path) -> Future:
        return self._pool.submit(self._run, point, log_dir)

    def _run(self, point: Point, log_dir: Path) -> RunRecord:
        if not self.pinned:
            return run_point(point, log_dir)
        gpu = self._free.get()
        try:
            return run_point(point, log_dir, {"CUDA_VISIBLE_DEVICES": gpu})
        finally:
            self._free.put(gpu)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class RayExecutor:
    """Points as Ray tasks on a Ray cluster (`ray.init(address=...)`; none: RAY_ADDRESS or a new local
    instance). Each task asks for one GPU when the cluster has GPUs (Ray sets its CUDA_VISIBLE_DEVICES)
    and runs the point's `lorafit train` process on whichever node Ray picks; lorafit must be installed
    there. Ray queues what does not fit, so every point is submitted at once."""

    def __init__(self, address: str | None = None) -> None:
        try:
            import ray
        except ImportError as e:
            raise UserError("--executor ray needs Ray: pip install 'lorafit[ray]'", field="executor") from e
        self._ray = ray
        self._owns = not ray.is_initialized()
        if self._owns:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        gpus = ray.cluster_resources().get("GPU", 0)
        self.gpus_per_point = 1 if gpus else 0
        self._task = ray.remote(num_gpus=self.gpus_per_point, num_cpus=1, max_retries=0)(run_point_from)
        self.slots = 1_000_000  # Ray schedules by resources

    def describe(self) -> str:
        res = self._ray.cluster_resources()
        return (
            f"ray: {len(self._ray.nodes())} node(s), {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs; "
            f"{self.gpus_per_point:g} GPU per point"
        )

    def submit(self, point: Point, log_dir: Path) -> Future:
        return self._task.remote(os.getcwd(), point, log_dir).future()

    def close(self) -> None:
        if self._owns:
            self._ray.shutdown()


def make_executor(name: str, parallel: int = 1, ray_address: str | None = None) -> Executor:
    if name == "local":
        return LocalExecutor(parallel)
    if name == "ray":
        return RayExecutor(ray_address)
    raise UserError(f"unknown executor '{name}'; choose local or ray", field="executor")


def run_sweep(
    sweep: Sweep,
    store: RunStore,
    out_dir: Path,
    parallel: int = 1,
    retry_failed: bool = False,
    on_update: Callable[[dict[str, str], dict[str, RunRecord]], None] | None = None,
    executor: Executor | None = None,
) -> dict[str, RunRecord]:
    """Run the points not yet in the store; returns {point id: record} for every point of the sweep.

    Only this (main) thread writes to the store. Ctrl-C stops launching points; finished rows stay.
    `executor` defaults to a LocalExecutor with `parallel` slots (and is closed here only then).
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
    owned = executor is None
    executor = executor or LocalExecutor(parallel)
    try:
        running: dict[Future, str] = {}
        waiting = list(todo)
        while waiting or running:
            while waiting and len(running) < executor.slots:
                p = waiting.pop(0)
                running[executor.submit(p, log_dir)] = p.id
                state[p.id] = "running"
            if on_update:
                on_update(state, results)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                point_id = running.pop(future)
                try:
                    record = future.result()
                except Exception as e:  # the executor lost the point (a Ray worker or node died): a failure
                    cfg = by_id[point_id].config
                    record = RunRecord("", "sweep", "failed", cfg.to_dict(), id=point_id, run_dir=cfg.out)
                    record.error = f"executor: {type(e).__name__}: {e}"
                record.group_name = sweep.name
                record.label = by_id[point_id].label
                store.put(record)
                results[point_id] = record
                state[point_id] = record.status
    finally:
        if owned:
            executor.close()
    if on_update:
        on_update(state, results)
    return results
