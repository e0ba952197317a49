"""Finding runs for the UI: run directories under run roots, their live status, ids, and what is skipped."""

from __future__ import annotations

import hashlib
import json
import os
import time

from lorafit.base.config import TrainConfig
from lorafit.run.rundir import RunDir
from lorafit.run.store import RunRecord, RunStore
from lorafit.run.summary import Summary
from lorafit.ui.catalog import LIVE_S, Catalog, run_dirs


def training_dir(path, rows=(), age_s: float = 0.0) -> RunDir:
    """A run directory as training leaves it before its summary: config.yaml and metrics rows, `age_s` old."""
    run = RunDir(path)
    run.path.mkdir(parents=True)
    run.write_config(TrainConfig(model="random:tiny", method="qlora", out=str(path)))
    run.metrics_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    then = time.time() - age_s
    for f in (run.config_file, run.metrics_file):
        os.utime(f, (then, then))
    return run


def test_status_of_a_directory_without_summary_follows_its_last_write(tmp_path):
    rows = [{"step": 1, "loss": 3.0, "tokens_per_s": 10.0, "memory_bytes": 7}]
    rows.append({"step": 2, "loss": 2.0, "tokens_per_s": 12.0, "memory_bytes": 5})
    training_dir(tmp_path / "fresh", rows)
    training_dir(tmp_path / "old", rows, age_s=LIVE_S + 5)
    runs = {r.entry.label: r.entry for r in Catalog(None, [tmp_path]).scan().runs}
    fresh = runs["fresh"]
    assert (fresh.status, runs["old"].status) == ("running", "stopped")
    assert (fresh.steps, fresh.loss, fresh.tokens_per_s, fresh.peak_memory_bytes) == (2, 2.0, 12.0, 7)
    assert (fresh.method, fresh.model, fresh.kind) == ("qlora", "random:tiny", "train")
    assert fresh.id == "d" + hashlib.sha1(str((tmp_path / "fresh").resolve()).encode()).hexdigest()[:12]


def test_summary_wins_and_an_evaluation_alone_is_an_eval_run(tmp_path):
    run = training_dir(tmp_path / "r", [{"step": 1, "loss": 3.0}], age_s=LIVE_S + 5)
    run.write_summary(Summary.from_dict({"status": "oom", "method": "qlora", "loss_last": 9.0}))
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "eval.json").write_text(json.dumps({"method": "base", "perplexity": {"ppl": 20.5}}))
    runs = {r.entry.label: r.entry for r in Catalog(None, [tmp_path]).scan().runs}
    assert (runs["r"].status, runs["r"].loss) == ("oom", 9.0)
    assert (runs["base"].kind, runs["base"].status, runs["base"].perplexity) == ("eval", "ok", 20.5)


def test_search_stops_at_runs_and_skips_hidden_directories(tmp_path):
    outer = training_dir(tmp_path / "a")
    (outer.path / "checkpoints" / "step-1").mkdir(parents=True)
    (outer.path / "checkpoints" / "step-1" / "config.yaml").write_text("method: lora\n")
    training_dir(tmp_path / ".trash" / "b")
    training_dir(tmp_path / "x" / "y" / "c")
    assert list(run_dirs(tmp_path)) == [tmp_path / "a", tmp_path / "x" / "y" / "c"]
    assert list(run_dirs(tmp_path / "a")) == [tmp_path / "a"]  # a root that is a run


def test_a_run_in_the_store_and_under_a_root_is_listed_once_with_live_rows(tmp_path):
    run = training_dir(tmp_path / "runs" / "lora", [{"step": s, "loss": 1.0} for s in (1, 2, 3)])
    record = RunRecord("lora", "train", "ok", {}, summary=Summary.from_dict({"status": "ok"}), run_dir=str(run.path))
    with RunStore(tmp_path / "runs.sqlite") as db:
        db.put(record)
    catalog = Catalog(tmp_path / "runs.sqlite", [tmp_path / "runs", tmp_path / "runs" / "lora"])
    scan = catalog.scan()
    assert [(r.entry.id, r.entry.steps) for r in scan.runs] == [(record.id, 3)]
    with run.metrics_file.open("a") as f:  # a new row is seen by the next scan
        f.write(json.dumps({"step": 4, "loss": 0.5}) + "\n")
    assert catalog.scan().runs[0].entry.steps == 4


def test_a_missing_root_is_a_problem(tmp_path):
    scan = Catalog(None, [tmp_path / "gone"]).scan()
    assert scan.runs == [] and [(p.source, p.message) for p in scan.problems] == [
        (str(tmp_path / "gone"), "run root not found")
    ]
