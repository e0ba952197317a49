"""The SQLite run store: round trip, filters, schema version, bad files."""

from __future__ import annotations

import os
import sqlite3
import time

import pytest

from lorafit.base.errors import UserError
from lorafit.run.store import SCHEMA_VERSION, RunRecord, RunStore
from lorafit.run.summary import Summary


def test_round_trip_and_filters(tmp_path):
    path = tmp_path / "runs.sqlite"
    with RunStore(path) as store:
        a = RunRecord(
            "lora",
            "train",
            "ok",
            {"lr": 2e-4},
            summary=Summary.from_dict({"status": "ok", "tokens_per_s": 12.5}),
            group_name="g1",
            metrics=[{"step": 1, "loss": 2.0}],
        )
        b = RunRecord("qlora", "train", "oom", {"lr": 2e-4}, error="CUDA out of memory", group_name="g1")
        c = RunRecord("base", "eval", "ok", {}, eval={"perplexity": {"ppl": 9.5}}, group_name="g2")
        for r in (a, b, c):
            store.put(r)
    with RunStore(path) as store:  # reopened: everything persisted
        assert [r.label for r in store.runs()] == ["lora", "qlora", "base"]
        assert [r.label for r in store.runs(group_name="g1", status="oom")] == ["qlora"]
        got = store.runs(label="lora")[0]
        assert got.summary.timing.tokens_per_s == 12.5 and got.summary.to_dict() == {
            "status": "ok",
            "tokens_per_s": 12.5,
        }
        assert got.metrics == [{"step": 1, "loss": 2.0}]
        assert got.config == {"lr": 2e-4} and got.id == a.id
        a.status = "failed"
        store.put(a)  # same id replaces
        assert [r.status for r in store.runs(label="lora")] == ["failed"]
        with pytest.raises(UserError, match="cannot filter"):
            store.runs(config="x")
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_newer_schema_and_garbage_are_refused(tmp_path):
    newer = tmp_path / "newer.sqlite"
    db = sqlite3.connect(newer)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(UserError, match="newer"):
        RunStore(newer)
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(UserError, match="not a lorafit run store"):
        RunStore(garbage)


def test_opening_an_existing_store_writes_nothing(tmp_path):
    """Readers (`lorafit ui` scans the store on every page, `lorafit runs`, report) open it while a sweep may
    be writing: opening must not write the schema again, or each reader rewrites the file and queues behind
    the writer's lock."""
    path = tmp_path / "runs.sqlite"
    with RunStore(path) as store:
        store.put(RunRecord("a", "train", "ok", {"method": "lora"}))
    before = os.stat(path).st_mtime_ns
    time.sleep(0.02)
    with RunStore(path) as store:
        assert [r.label for r in store.runs()] == ["a"]
    assert os.stat(path).st_mtime_ns == before
