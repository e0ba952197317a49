"""`lorafit sweep` and `lorafit runs` end to end on the tiny random model: every point its own process,
OOM and crashed points recorded, re-runs skip what is stored, --retry-failed runs failures again."""

from __future__ import annotations

import csv
import io
import json
import sys

import pytest

from lorafit.run.store import RunStore
from lorafit.studies import sweep as sweep_module
from tests.helpers import lorafit


def grid_file(tmp_path, extra_grid: str = "") -> str:
    path = tmp_path / "grid.yaml"
    path.write_text(
        "name: tiny\nsteps: 2\n"
        "base:\n  model: random:tiny\n  max_samples: 8\n  max_length: 64\n  profile_warmup_steps: 0\n"
        f"grid:\n  batch_size: [2]\n  memory_budget: [64GB, 1MB]\n{extra_grid}"
    )
    return str(path)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    missing = tmp / "missing.jsonl"
    grid = grid_file(tmp, f"  data: [alpaca, {missing}]\n")
    out = tmp / "out"
    proc = lorafit("sweep", grid, "--out", str(out), "--parallel", "2", "--json")
    return tmp, grid, out, proc


def test_sweep_records_ok_oom_and_failed_points(swept):
    _, _, out, proc = swept
    assert proc.returncode == 0, proc.stderr
    rows = {r["label"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])}
    by_status = {label: r["status"] for label, r in rows.items()}
    assert by_status == {
        "batch_size=2 memory_budget=64GB data=alpaca": "ok",
        "batch_size=2 memory_budget=1MB data=alpaca": "oom",
        f"batch_size=2 memory_budget=64GB data={out.parent / 'missing.jsonl'}": "failed",
        f"batch_size=2 memory_budget=1MB data={out.parent / 'missing.jsonl'}": "failed",
    }
    ok = rows["batch_size=2 memory_budget=64GB data=alpaca"]
    assert ok["summary"]["steps"] == 2 and ok["summary"]["tokens_per_s"] > 0
    assert len(ok["metrics"]) == 2 and ok["error"] is None
    oom = rows["batch_size=2 memory_budget=1MB data=alpaca"]
    assert "memory-budget 1MB" in oom["error"] and oom["summary"]["status"] == "oom"
    failed = [r for r in rows.values() if r["status"] == "failed"]
    assert all("missing.jsonl" in r["error"] and r["error"].startswith("exit 2:") for r in failed)
    with RunStore(out / "runs.sqlite") as store:  # the store holds exactly what the sweep printed
        stored = {r.label: r for r in store.runs(group_name="tiny")}
    assert {label: r.status for label, r in stored.items()} == by_status
    assert stored[ok["label"]].summary.to_dict() == ok["summary"]
    for r in rows.values():  # each point has its log and its resolved config
        assert (out / "points" / f"{r['id']}.log").is_file()
        assert (out / "points" / f"{r['id']}.yaml").is_file()


def test_rerun_skips_stored_points_and_retry_failed_reruns_only_failures(swept):
    _, grid, out, first = swept
    before = {r["id"]: r["created"] for r in json.loads(first.stdout.strip().splitlines()[-1])}
    again = lorafit("sweep", grid, "--out", str(out), "--parallel", "2", "--json")
    assert again.returncode == 0, again.stderr
    rows = json.loads(again.stdout.strip().splitlines()[-1])
    assert {r["id"]: r["created"] for r in rows} == before  # nothing ran again
    assert again.stderr.count("ok (stored)") == 1 and again.stderr.count("oom (stored)") == 1
    retried = lorafit("sweep", grid, "--out", str(out), "--parallel", "2", "--retry-failed", "--json")
    assert retried.returncode == 0, retried.stderr
    rows = json.loads(retried.stdout.strip().splitlines()[-1])
    changed = {r["id"] for r in rows if r["created"] != before[r["id"]]}
    assert changed == {r["id"] for r in rows if r["status"] == "failed"} and len(changed) == 2


def test_runs_list_show_and_export(swept):
    _, _, out, _ = swept
    store = str(out / "runs.sqlite")
    listed = lorafit("runs", "list", "--store", store, "--status", "oom", columns=200)
    assert listed.returncode == 0, listed.stderr
    assert "memory_budget=1MB data=alpaca" in listed.stdout and "64GB data=alpaca" not in listed.stdout
    exported = lorafit("runs", "export", "--store", store, "--csv")
    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    with RunStore(out / "runs.sqlite") as db:
        records = {r.id: r for r in db.runs()}
    assert {r["id"] for r in rows} == set(records)
    for row in rows:  # the CSV numbers are the stored ones
        summary = records[row["id"]].summary
        assert row["status"] == records[row["id"]].status
        if records[row["id"]].status == "ok":
            assert float(row["tokens_per_s"]) == summary.timing.tokens_per_s
            assert int(row["peak_bytes"]) == summary.peak_bytes
    as_json = json.loads(lorafit("runs", "export", "--store", store, "--json", "--group", "tiny").stdout)
    assert {r["id"] for r in as_json} == set(records)
    one = next(iter(records))
    shown = json.loads(lorafit("runs", "show", one, "--store", store).stdout)
    assert shown["id"] == one and shown["config"] == records[one].config
    missing = lorafit("runs", "show", "nope", "--store", store)
    assert missing.returncode == 2 and "no run with id 'nope'" in missing.stderr + missing.stdout
    no_store = lorafit("runs", "list", "--store", str(out / "none.sqlite"))
    assert no_store.returncode == 2 and "run store not found" in no_store.stderr + no_store.stdout


KILLED = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
RAISES = "raise RuntimeError('boom in the point')"


def test_points_that_crash_or_are_killed_are_recorded_and_the_sweep_finishes(tmp_path, monkeypatch):
    grid = tmp_path / "g.yaml"
    grid.write_text("name: crash\ngrid:\n  lora_r: [4, 8, 16]\n")
    sweep = sweep_module.load_grid(grid, tmp_path / "out")
    behaviour = {4: KILLED, 8: RAISES, 16: "print('fine')"}
    by_cfg = {p.id: behaviour[p.config.lora_r] for p in sweep.points}

    def command(config_file):
        return [sys.executable, "-c", by_cfg[config_file.stem]]

    monkeypatch.setattr(sweep_module, "point_command", command)
    with RunStore(tmp_path / "runs.sqlite") as store:
        results = sweep_module.run_sweep(sweep, store, tmp_path / "out", parallel=2)
        stored = {r.id: r for r in store.runs(group_name="crash")}
    status = {p.config.lora_r: results[p.id].status for p in sweep.points}
    assert status == {4: "oom", 8: "failed", 16: "failed"}
    errors = {p.config.lora_r: results[p.id].error for p in sweep.points}
    assert "SIGKILL" in errors[4]
    assert errors[8] == "exit 1: RuntimeError: boom in the point"
    assert "without" in errors[16] and "summary.json" in errors[16]  # exit 0 but no run record
    assert {i: r.status for i, r in stored.items()} == {p.id: results[p.id].status for p in sweep.points}


def test_ray_executor_runs_points_as_tasks_into_the_same_store(tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'lorafit[ray]'): Ray executor untested")
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "name: ray\nsteps: 2\n"
        "base:\n  model: random:tiny\n  max_samples: 8\n  max_length: 64\n  profile_warmup_steps: 0\n"
        "grid:\n  batch_size: [1, 2]\n"
    )
    out = tmp_path / "out"
    proc = lorafit("sweep", str(grid), "--out", str(out), "--executor", "ray", "--json")  # a local Ray instance
    assert proc.returncode == 0, proc.stderr
    assert "executor ray: 1 node(s)" in proc.stderr and "0 GPU per point" in proc.stderr  # no GPU here
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(r["label"] for r in rows) == ["batch_size=1", "batch_size=2"]
    assert all(r["status"] == "ok" and r["summary"]["steps"] == 2 and len(r["metrics"]) == 2 for r in rows)
    assert {r["summary"]["data"]["samples"] for r in rows} == {8}
    with RunStore(out / "runs.sqlite") as store:  # the driver wrote what the tasks returned
        stored = {r.id: r for r in store.runs(group_name="ray")}
    assert {i: r.summary.to_dict() for i, r in stored.items()} == {r["id"]: r["summary"] for r in rows}
    again = lorafit("sweep", str(grid), "--out", str(out), "--json")  # the local executor sees the same store
    assert again.returncode == 0 and again.stderr.count("ok (stored)") == 2
