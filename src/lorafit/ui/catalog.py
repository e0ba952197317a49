"""Which runs the UI shows: the run store's and the run directories under the run roots, as typed entries.

A run is named by an id, never by a path: the store's id, or "d" + 12 hex digits of the SHA-1 of a run
directory's resolved path. A run that is both in the store and under a run root is shown once (the
store's record, with live metrics read from its directory). A damaged store or run directory does not
stop the scan: it becomes a `Problem` naming the file, and the other runs are still shown.

A run directory without summary.json is "running" while its metrics.jsonl or config.yaml changed in the
last ten minutes, "stopped" after that.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorafit.base.errors import UserError
from lorafit.run.evaluation import Evaluation
from lorafit.run.rundir import RunDir
from lorafit.run.store import RunRecord, RunStore
from lorafit.run.summary import Summary

LIVE_S = 600  # a run directory without summary.json that changed within this is running
MAX_DEPTH = 8  # how deep a run root is searched for run directories


@dataclass
class Problem:
    """A store or run directory the UI could not read, and why."""

    source: str
    message: str


@dataclass
class RunEntry:
    """One line of the Runs page (the API's RunEntry)."""

    id: str
    label: str
    kind: str  # train | eval
    method: str | None
    model: str | None
    status: str  # ok | oom | failed | interrupted | running | stopped
    group: str | None
    created: float
    run_dir: str | None
    tokens_per_s: float | None = None
    peak_memory_bytes: int | None = None
    mfu: float | None = None
    joules_per_token: float | None = None
    loss: float | None = None
    perplexity: float | None = None
    steps: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Run:
    """A run as found: its entry, its store record (None for a run directory only) and its directory."""

    entry: RunEntry
    record: RunRecord | None
    dir: RunDir | None
    summary: Summary | None
    config: dict[str, Any]
    evaluation: dict[str, Any] | None
    metrics: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Scan:
    runs: list[Run]
    problems: list[Problem]

    def find(self, run_id: str) -> Run | None:
        return next((r for r in self.runs if r.entry.id == run_id), None)


def dir_id(path: Path) -> str:
    return "d" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]


def is_run_dir(path: Path) -> bool:
    run = RunDir(path)
    return run.config_file.is_file() or run.summary_file.is_file() or run.eval_file.is_file()


def run_dirs(root: Path) -> Iterator[Path]:
    """The run directories of a run root: the root itself, or those below it (not inside another run,
    not in hidden directories, symbolic links not followed)."""
    if is_run_dir(root):
        yield root
        return
    for here, dirs, _ in os.walk(root):
        path = Path(here)
        if path != root and is_run_dir(path):
            dirs.clear()
            yield path
            continue
        depth = len(path.relative_to(root).parts)
        dirs[:] = [] if depth >= MAX_DEPTH else sorted(d for d in dirs if not d.startswith("."))


def live_status(run: RunDir, now: float | None = None) -> str:
    """running or stopped, for a run directory that has no summary.json (yet)."""
    files = [f for f in (run.metrics_file, run.config_file) if f.is_file()]
    latest = max((f.stat().st_mtime for f in files), default=0.0)
    return "running" if (now or time.time()) - latest < LIVE_S else "stopped"


def dir_status(run: RunDir, summary: Summary | None, now: float | None = None) -> str:
    """A run directory's status: its summary's once written, else running or stopped by the files' age;
    an evaluation alone (no config.yaml) is ok."""
    if summary is not None and summary.status != "running":
        return summary.status
    return live_status(run, now) if run.config_file.is_file() else "ok"


def created_at(run: RunDir) -> float:
    files = [f for f in (run.config_file, run.summary_file, run.eval_file) if f.is_file()]
    return min((f.stat().st_mtime for f in files), default=0.0)


def text_setting(config: dict[str, Any], name: str) -> str | None:
    """A text option of config.yaml (method, model), None when absent or not text."""
    value = config.get(name)
    return value if isinstance(value, str) else None


def make_entry(
    base: RunEntry, summary: Summary | None, config: dict[str, Any], evaluation: dict[str, Any] | None, rows: list
) -> RunEntry:
    """`base` (identity, status) filled with the figures: the summary's, else the live metrics rows'."""
    e = Evaluation.from_dict(evaluation)
    losses = [r["loss"] for r in rows if isinstance(r.get("loss"), (int, float))]
    memory = [r["memory_bytes"] for r in rows if isinstance(r.get("memory_bytes"), int)]
    speeds = [r["tokens_per_s"] for r in rows if isinstance(r.get("tokens_per_s"), (int, float))]
    steps = [r["step"] for r in rows if isinstance(r.get("step"), int)]
    s = summary
    return dataclasses.replace(
        base,
        method=(s.method if s else None) or text_setting(config, "method") or e.method,
        model=(s.model if s else None) or text_setting(config, "model") or e.model,
        tokens_per_s=s.timing.tokens_per_s if s else (speeds[-1] if speeds else None),
        peak_memory_bytes=s.peak_bytes if s else (max(memory) if memory else None),
        mfu=s.flops.mfu if s else None,
        joules_per_token=s.energy.j_per_token if s else None,
        loss=(s.losses.loss_last if s and s.losses.loss_last is not None else (losses[-1] if losses else None)),
        perplexity=e.perplexity.ppl,
        steps=max(steps) if steps else (s.steps if s else None),
    )


def from_record(record: RunRecord, directory: RunDir | None) -> Run:
    """A store run; its metrics are read live from its directory when that still exists."""
    rows = directory.metrics() if directory is not None and directory.metrics_file.is_file() else record.metrics
    kind = "eval" if record.kind == "eval" else "train"  # a sweep point is a training run
    base = RunEntry(record.id, record.label, kind, None, None, record.status, record.group_name, record.created,
                    record.run_dir)  # fmt: skip
    entry = make_entry(base, record.summary, record.config, record.eval, rows)
    return Run(entry, record, directory, record.summary, record.config, record.eval, rows)


Parts = tuple[Summary | None, dict[str, Any] | None, dict[str, Any], list[dict[str, Any]]]


def signature(run: RunDir) -> tuple:
    """What changes when a run directory's files do: each file's modification time and size."""
    out = []
    for f in (run.config_file, run.summary_file, run.eval_file, run.metrics_file):
        try:
            st = f.stat()
            out.append((st.st_mtime_ns, st.st_size))
        except FileNotFoundError:
            out.append(None)
    return tuple(out)


def read_parts(run: RunDir) -> Parts:
    return run.summary(), run.evaluation(), run.config_dict(), run.metrics()


def from_dir(path: Path, root: Path, now: float, parts: Parts | None = None) -> Run:
    """A run directory's run; a UserError (or YAML error) when one of its files is damaged."""
    run = RunDir(path)
    summary, evaluation, config, rows = parts or read_parts(run)
    status = dir_status(run, summary, now)
    kind = "train" if summary is not None or run.config_file.is_file() else "eval"
    label = path.name if path == root else path.relative_to(root).as_posix()
    base = RunEntry(dir_id(path), label, kind, None, None, status, None, created_at(run), str(path))
    return Run(make_entry(base, summary, config, evaluation, rows), None, run, summary, config, evaluation, rows)


def problem(e: UserError, where: Path) -> Problem:
    """The file a UserError names (else `where`) and its message, with the line when it has one."""
    line = f" (line {e.line})" if e.line is not None else ""
    return Problem(e.file or str(where), e.message + line)


def store_records(store: Path | None) -> tuple[list[RunRecord], list[Problem]]:
    if store is None:
        return [], []
    if not store.is_file():
        return [], [Problem(str(store), "run store not found")]
    try:
        with RunStore(store) as db:
            return db.runs(), []
    except UserError as e:
        return [], [problem(e, store)]
    except sqlite3.Error as e:
        return [], [Problem(str(store), f"cannot read the run store: {e}")]


def resolved(path: str | None) -> Path | None:
    return None if not path else Path(path).resolve()


@dataclass
class Catalog:
    """The sources the UI was started with: a store (or none) and run roots."""

    store: Path | None
    roots: list[Path]
    # run directories read before, by path: (signature, parts), so a scan reads only what changed
    cache: dict[Path, tuple[tuple, Parts]] = field(default_factory=dict, repr=False)

    def sources(self) -> dict[str, Any]:
        return {"store": None if self.store is None else str(self.store), "roots": [str(r) for r in self.roots]}

    def scan(self) -> Scan:
        """Every run, the store's first (in creation order), then each run directory not in the store."""
        now = time.time()
        records, problems = store_records(self.store)
        runs, seen = [], set()
        for record in records:
            where = resolved(record.run_dir)
            directory = RunDir(where) if where is not None and where.is_dir() else None  # the store names it
            runs.append(from_record(record, directory))
            seen.add(where)
        for root in self.roots:
            if not root.is_dir():
                problems.append(Problem(str(root), "run root not found"))
                continue
            for path in run_dirs(root):
                if path.resolve() in seen:
                    continue
                seen.add(path.resolve())
                try:
                    runs.append(from_dir(path, root, now, self._parts(RunDir(path))))
                except UserError as e:
                    problems.append(problem(e, path))
                except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
                    problems.append(Problem(str(path), f"cannot read the run directory: {e}"))
        return Scan(runs, problems)

    def _parts(self, run: RunDir) -> Parts:
        """The directory's files, read again only when one changed."""
        sig = signature(run)
        cached = self.cache.get(run.path)
        if cached is None or cached[0] != sig:
            cached = (sig, read_parts(run))
            self.cache[run.path] = cached
        return cached[1]
