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
    points:                      # named points: each its own set of options on top of base
      paged-fp16: {optimizer: paged_adamw, precision: fp16}
      adamw-bf16: {optimizer: adamw, precision: bf16}

`grid:`, `points:` or both (then every grid point and every named point runs). `points:` may also be
a list of `{name: NAME, options: {...}}` (or the options beside the name). A name is letters, digits,
'.', '_' or '-' (it names the point's run directory, points/<name>-<id>); a grid point is labelled by
its values (`method=lora batch_size=2`), a named point by its name.

A point that runs out of memory is recorded as `oom` (a result: it does not fit), a crash as `failed`
with its error, and the sweep goes on. A point's id is a hash of its resolved options, so re-running
the same sweep skips every point already in the store (a named point's id also covers its name, so a
renamed point runs again under its new name); `--retry-failed` runs failed ones again.

Where points run is the executor's business (`--executor`): `local` runs them as subprocesses here,
one per GPU at a time when several GPUs are visible; `ray` runs each as a Ray task with a GPU of an
existing cluster. Either way the point is the same `lorafit train` process and only this process
writes the store: a task returns its record (summary, metrics, error) rather than touching the store.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import queue
import re
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from lorafit.base.config import TrainConfig, coerce, dump_yaml, field_names, unknown_key
from lorafit.base.errors import UserError
from lorafit.run.rundir import RunDir
from lorafit.run.runner import lorafit_command, run_command
from lorafit.run.store import RunRecord, RunStore

GRID_KEYS = ("name", "steps", "base", "grid", "points", "memory_budget")
SET_BY_SWEEP = ("out", "max_steps")
# A point's name becomes part of a directory name, and has no '=' (grid points' labels are key=value).
POINT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class Point:
    id: str
    label: str
    values: dict[str, Any]  # the grid values of this point (a named point: the options it sets)
    config: TrainConfig
    name: str | None = None  # set for a named point (`points:`), whose label it is

    @property
    def stem(self) -> str:
        """The point's file and directory name under <out>/points: its id, after its name if it has one."""
        return f"{self.name}-{self.id}" if self.name else self.id


@dataclass
class Sweep:
    name: str
    steps: int
    points: list[Point]


def _point_id(cfg: TrainConfig, name: str | None = None) -> str:
    """A hash of the point's resolved options (a named point's: and its name), stable across runs, so
    a sweep run again finds its points in the store."""
    options: dict[str, Any] = {k: v for k, v in cfg.to_dict().items() if k != "out"}
    if name is not None:
        options = {"name": name, "options": options}
    return hashlib.sha1(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:12]


class DuplicateKeyError(yaml.YAMLError):
    """A key given twice in one YAML mapping (PyYAML would silently keep the last)."""

    def __init__(self, key: Any, line: int, first: int) -> None:
        super().__init__(f"'{key}' is given twice (first on line {first})")
        self.key, self.line, self.first = key, line, first


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys: two named points or methods under one name would
    otherwise collapse into one without a word."""


def _strict_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)  # merge keys (<<) first: they may repeat keys by design
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key, line = loader.construct_object(key_node, deep=True), key_node.start_mark.line + 1
        try:
            if key in seen:
                raise DuplicateKeyError(key, line, seen[key])
            seen[key] = line
        except TypeError:  # an unhashable key: construct_mapping says so
            break
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _strict_mapping)


def read_yaml(path: Path, what: str) -> Any:
    """A study file's YAML (a grid file, a compare study), with a key given twice refused; errors name
    the file and line."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot read {what}: {e.strerror}", file=source) from e
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: no arbitrary objects
    except DuplicateKeyError as e:
        raise UserError(str(e), file=source, line=e.line, field=str(e.key)) from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"invalid YAML: {e}", file=source, line=None if mark is None else mark.line + 1) from e


def _options(values: dict[str, Any], source: str, set_by_sweep: bool = False) -> dict[str, Any]:
    """Train options from a YAML mapping (`-` in keys read as `_`), each checked against TrainConfig;
    `set_by_sweep` refuses those the sweep sets itself."""
    options = {}
    for key, value in values.items():
        key = str(key).replace("-", "_")
        if set_by_sweep and key in SET_BY_SWEEP:
            raise UserError(f"'{key}' is set by the sweep (steps:, --out), not by a point", file=source, field=key)
        options[key] = coerce(key, value, source)  # an unknown key: unknown_key's did-you-mean
    return options


def load_grid(path: Path, out_dir: Path, memory_budget: str | None = None) -> Sweep:
    """Read and validate a grid file; every point's options are checked before anything runs."""
    source = str(path)
    raw = read_yaml(path, "grid")
    if not isinstance(raw, dict):
        raise UserError("a grid file is a mapping with base, grid and/or points, and steps", file=source)
    for key in raw:
        if key not in GRID_KEYS:
            raise UserError(f"unknown key '{key}'; a grid file has {', '.join(GRID_KEYS)}", file=source, field=key)
    steps = raw.get("steps", 3)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise UserError(f"steps must be an integer >= 1, got {steps!r}", file=source, field="steps")
    base = raw.get("base") or {}
    grid = raw.get("grid") or {}
    named = raw.get("points") or {}
    if not isinstance(base, dict) or not isinstance(grid, dict) or not (grid or named):
        raise UserError(
            "base must be a mapping, and grid a non-empty mapping of option: [values] or points a non-empty "
            "mapping of name: options (or both)",
            file=source,
        )
    base_values = _options(base, f"{source} (base)")
    budget = memory_budget or raw.get("memory_budget")
    make = _PointMaker(source, out_dir, base_values, steps, None if budget is None else str(budget))
    points = [make(" ".join(f"{k}={v}" for k, v in values.items()), values) for values in _grid(grid, source)]
    points += [make(name, options, name) for name, options in _named_points(named, source)]
    _refuse_same_point_twice(points, source)
    return Sweep(str(raw.get("name") or path.stem), steps, points)


def _grid(grid: dict[str, Any], source: str) -> list[dict[str, Any]]:
    """Every combination of the grid's values, as {option: value} in the file's order (none: no grid)."""
    axes: list[tuple[str, list[Any]]] = []
    for key, values in grid.items():
        key = str(key).replace("-", "_")
        if key not in field_names():
            raise unknown_key(key, f"{source} (grid)")
        values = values if isinstance(values, list) else [values]
        axes.append((key, [_options({key: v}, f"{source} (grid)", set_by_sweep=True)[key] for v in values]))
    if not axes:
        return []
    return [dict(zip((k for k, _ in axes), combo, strict=True)) for combo in itertools.product(*(v for _, v in axes))]


def _named_points(spec: Any, source: str) -> list[tuple[str, dict[str, Any]]]:
    """(name, checked options) of each named point: `points:` as a mapping name -> options, or a list of
    {name: NAME, options: {...}} or {name: NAME, option: value, ...}."""
    if isinstance(spec, dict):
        written = list(spec.items())  # a name given twice: read_yaml refused it already
    elif isinstance(spec, list):
        written = [_list_point(item, i, source) for i, item in enumerate(spec)]
    else:
        raise UserError(
            f"points must be a mapping of name: options, or a list of {{name, options}}; got {spec!r}",
            file=source,
            field="points",
        )
    seen: set[str] = set()
    points = []
    for raw_name, options in written:
        name = _point_name(raw_name, source)
        where = f"{source} (points.{name})"
        if name in seen:
            raise UserError(f"point name '{name}' is used twice", file=source, field="points")
        seen.add(name)
        if options is None or options == {}:
            raise UserError(f"point '{name}' sets no options; give it at least one (or drop it)", file=where)
        if not isinstance(options, dict):
            raise UserError(f"point '{name}' must be a mapping of option: value, got {options!r}", file=where)
        points.append((name, _options(options, where, set_by_sweep=True)))
    return points


def _list_point(item: Any, index: int, source: str) -> tuple[Any, Any]:
    """(name, options) of one item of a `points:` list."""
    if not isinstance(item, dict) or "name" not in item:
        raise UserError(f"points[{index}] must be a mapping with a name, got {item!r}", file=source, field="points")
    rest = {k: v for k, v in item.items() if k != "name"}
    if "options" not in rest:
        return item["name"], rest
    if len(rest) > 1:
        raise UserError(
            f"points[{index}] gives options both under options: and beside its name; use one",
            file=source,
            field="points",
        )
    return item["name"], rest["options"]


def _point_name(name: Any, source: str) -> str:
    """A point's name as text, checked: it is the point's label and part of its directory name."""
    text = str(name) if isinstance(name, (str, int)) and not isinstance(name, bool) else None
    if text is None or not POINT_NAME.fullmatch(text):
        raise UserError(
            f"point name {name!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit "
            "(it names the point's run directory)",
            file=source,
            field="points",
        )
    return text


@dataclass
class _PointMaker:
    """Builds a Point from its options: base, then the point's own, then what the sweep sets."""

    source: str
    out_dir: Path
    base: dict[str, Any]
    steps: int
    budget: str | None

    def __call__(self, label: str, values: dict[str, Any], name: str | None = None) -> Point:
        # a point runs as written (a memory plan would change what is swept) unless the grid asks for one
        options = {"plan_memory": False, **self.base, **values, "max_steps": self.steps}
        if self.budget is not None:
            options["memory_budget"] = self.budget
        try:
            cfg = TrainConfig(**options)
        except UserError as e:
            what = f"point '{name}'" if name else f"point {label}"
            raise UserError(f"{what}: {e.message}", file=self.source, field=e.field) from e
        point = Point(_point_id(cfg, name), label, values, cfg, name)
        cfg.out = str(self.out_dir / "points" / point.stem)
        return point


def _refuse_same_point_twice(points: list[Point], source: str) -> None:
    """Two points with one id would share a run directory and a store row: the grid lists a value twice,
    or a point name repeats."""
    first: dict[str, Point] = {}
    for p in points:
        other = first.setdefault(p.id, p)
        if other is not p:
            raise UserError(f"points '{other.label}' and '{p.label}' are the same point", file=source)


def point_command(config_file: Path) -> list[str]:
    """The process that trains one point: `lorafit train` with the point's resolved config."""
    return lorafit_command("train", "--config", str(config_file), "--json")


def run_point(point: Point, log_dir: Path, env: dict[str, str] | None = None) -> RunRecord:
    """Train one point in a subprocess (its output goes to points/<id>.log); never raises for a bad run.
    `env` is added to this process's environment (e.g. CUDA_VISIBLE_DEVICES)."""
    log_dir.mkdir(parents=True, exist_ok=True)  # on a Ray worker node without a shared disk too
    cfg_file = log_dir / f"{point.stem}.yaml"
    dump_yaml(point.config, cfg_file)
    started = time.time()
    finished = run_command(point_command(cfg_file), log_dir / f"{point.stem}.log", env)
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
        from lorafit.base.device import shared_threads  # imports torch: not at the CLI's start

        threads = shared_threads(self.slots) if self.slots > 1 else {}  # points at once share the cores
        if not self.pinned:
            return run_point(point, log_dir, threads)
        gpu = self._free.get()
        try:
            return run_point(point, log_dir, {"CUDA_VISIBLE_DEVICES": gpu, **threads})
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
