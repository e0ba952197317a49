"""The SQLite run store: one row per run (training, evaluation, sweep point), queryable afterwards.

stdlib sqlite3, one file, schema versioned with `PRAGMA user_version`. Each write is its own
transaction, so an interrupted process leaves every finished row intact. JSON columns hold the
run's config, summary, evaluation and per-step metrics, so a report needs nothing but the store.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafit.base.errors import UserError
from lorafit.run.rundir import RunDir
from lorafit.run.summary import Summary

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    label TEXT NOT NULL,
    kind TEXT NOT NULL,            -- train | eval
    status TEXT NOT NULL,          -- ok | oom | failed | interrupted
    group_name TEXT,               -- the compare or sweep it belongs to
    run_dir TEXT,
    config TEXT NOT NULL,          -- JSON
    summary TEXT,                  -- JSON: summary.json of a training run
    eval TEXT,                     -- JSON: eval.json
    metrics TEXT,                  -- JSON list: metrics.jsonl rows
    error TEXT
);
CREATE INDEX IF NOT EXISTS runs_group ON runs (group_name);
"""
JSON_COLUMNS = ("config", "summary", "eval", "metrics")


@dataclass
class RunRecord:
    """One row of the store."""

    label: str
    kind: str
    status: str
    config: dict[str, Any]
    summary: Summary | None = None
    eval: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    group_name: str | None = None
    run_dir: str | None = None
    error: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    created: float = field(default_factory=time.time)


class RunStore:
    """A run store file; `with RunStore(path) as store:` closes it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=30)
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as e:
            raise UserError(f"not a lorafit run store: {e}", file=str(self.path)) from e
        if version > SCHEMA_VERSION:
            raise UserError(
                f"run store schema v{version} is newer than this lorafit (v{SCHEMA_VERSION}); upgrade lorafit",
                file=str(self.path),
            )
        if version < SCHEMA_VERSION:  # a new file: an existing store is opened without writing a byte
            with self.db:
                self.db.executescript(SCHEMA)
                self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.db.close()

    def put(self, record: RunRecord) -> str:
        """Insert or replace a run; returns its id."""
        row = {k: getattr(record, k) for k in RunRecord.__dataclass_fields__}
        if record.summary is not None:
            row["summary"] = record.summary.to_dict()
        for k in JSON_COLUMNS:
            row[k] = None if row[k] is None else json.dumps(row[k], default=str)
        columns = ", ".join(row)
        with self.db:
            self.db.execute(
                f"INSERT OR REPLACE INTO runs ({columns}) VALUES ({', '.join('?' * len(row))})", tuple(row.values())
            )
        return record.id

    def runs(self, group_name: str | None = None, **equal: str) -> list[RunRecord]:
        """Runs in creation order, optionally of one group and with columns equal to the given values."""
        where, args = [], []
        if group_name is not None:
            where.append("group_name = ?")
            args.append(group_name)
        for column, value in equal.items():
            if column not in ("label", "kind", "status", "id"):
                raise UserError(f"cannot filter on '{column}'; use label, kind, status or id", field="filter")
            where.append(f"{column} = ?")
            args.append(value)
        sql = "SELECT * FROM runs" + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY created"
        cursor = self.db.execute(sql, args)
        names = [d[0] for d in cursor.description]
        out = []
        for values in cursor.fetchall():
            row = dict(zip(names, values, strict=True))
            for k in JSON_COLUMNS:
                row[k] = None if row[k] is None else json.loads(row[k])
            row["metrics"] = row["metrics"] or []
            if row["summary"] is not None:
                row["summary"] = Summary.from_dict(row["summary"], where=f"{self.path}, run {row['id']}")
            out.append(RunRecord(**row))
        return out


def record_from_run_dir(path: str | Path) -> RunRecord:
    """A RunRecord read from a run directory (summary.json, eval.json, metrics.jsonl, config.yaml)."""
    run = RunDir(path)
    summary, evaluation = run.summary(), run.evaluation()
    if summary is None and evaluation is None:
        raise UserError("not a run directory: no summary.json or eval.json", file=str(run.path))
    method = (summary.method if summary else None) or (evaluation or {}).get("method") or run.path.name
    if summary is None and evaluation and evaluation.get("label"):
        # an evaluation alone is labelled as eval named it: the 4-bit base is "base-nf4", not its method "base"
        method = str(evaluation["label"])
    status = summary.status if summary else "ok"
    kind = "train" if summary else "eval"
    return RunRecord(method, kind, status, run.config_dict(), summary, evaluation, run.metrics(), run_dir=str(run.path))
