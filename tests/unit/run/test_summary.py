"""The run record: summary.json round-trips through `Summary` exactly, and a run directory through `RunDir`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafit.base.errors import UserError
from lorafit.run.rundir import RunDir
from lorafit.run.runner import describe_failure, run_command
from lorafit.run.summary import Summary

ROOT = Path(__file__).resolve().parents[3]
COMMITTED = sorted((ROOT / "docs" / "benchmarks").rglob("summary.json"))


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_summaries_round_trip_key_for_key(path):
    text = path.read_text()
    summary = Summary.from_dict(json.loads(text))
    assert json.dumps(summary.to_dict(), indent=2) + "\n" == text  # same keys, order and values
    assert summary.timing.tokens_per_s == json.loads(text)["tokens_per_s"]
    assert summary.peak_bytes == json.loads(text)["peak_memory"]["peak_bytes"]


def test_there_are_committed_summaries_to_check():
    assert len(COMMITTED) >= 3


def test_parts_are_typed_and_optional_keys_stay_out():
    data = json.loads(COMMITTED[0].read_text())
    summary = Summary.from_dict(data)
    # a version-1 record's step_time_s was the micro-step's: read as such, no optimizer-step time invented
    assert "schema_version" not in data and summary.schema_version == 1
    assert summary.timing.micro_step_time_s.p50 == data["step_time_s"]["p50"]
    assert summary.timing.step_time_s is None
    assert dict(summary.memory.memory_breakdown.items()) == data["memory_breakdown"]
    assert summary.environment.device.threads == data["device"]["threads"]
    assert summary.energy.energy_source is None and "energy_source" not in summary.to_dict()
    assert "processes" not in summary.to_dict()  # an older record without the key keeps it out


def test_a_record_cut_short_holds_status_run_dir_and_error():
    assert Summary.cut_short("oom", "runs/x", "OutOfMemoryError()").to_dict() == {
        "schema_version": 3,
        "status": "oom",
        "run_dir": "runs/x",
        "error": "OutOfMemoryError()",
    }


def test_unknown_keys_and_newer_schemas_are_named(tmp_path):
    with pytest.raises(UserError, match="unknown summary key.*'tokens_per_sec'"):
        Summary.from_dict({"status": "ok", "tokens_per_sec": 1.0})
    with pytest.raises(UserError, match="schema v4 is newer than v3"):
        Summary.from_dict({"status": "ok", "schema_version": 4})
    run = RunDir(tmp_path)
    run.summary_file.write_text('{"status": "ok",\n "tokens": }')
    with pytest.raises(UserError, match=r"summary.json:2: invalid JSON"):
        run.summary()


def test_run_dir_writes_and_reads_a_run(tmp_path):
    from lorafit.base.config import TrainConfig

    run = RunDir.create(tmp_path / "r", "lora")
    run.write_config(TrainConfig(method="lora", lora_r=4))
    with run.metrics_log() as log:
        for step in (1, 2, 3):
            log.write({"step": step, "loss": 1.0 / step})
    run.truncate_metrics(2)
    assert [row["step"] for row in RunDir.open(run.path).metrics()] == [1, 2]
    assert run.config().lora_r == 4 and run.summary() is None
    run.write_summary(Summary.cut_short("failed", str(run.path), "boom"))
    assert run.summary().status == "failed"
    with pytest.raises(UserError, match="already holds a run"):
        RunDir.create(run.path, "lora")
    with pytest.raises(UserError, match="did training finish"):
        run.trained_weights()
    with pytest.raises(UserError, match="not a run directory"):
        RunDir.open(tmp_path)


def test_runner_classifies_how_a_process_ended(tmp_path):
    import sys

    log = tmp_path / "p.log"
    crashed = run_command([sys.executable, "-c", "import sys; sys.exit('boom')"], log)
    assert (crashed.status, crashed.returncode, crashed.error) == ("failed", 1, "exit 1: boom")
    oom = run_command(
        [sys.executable, "-c", "import sys; print('out of memory: 9 GB', file=sys.stderr); sys.exit(4)"], log
    )
    assert (oom.status, oom.error) == ("oom", "out of memory: 9 GB")
    fine = run_command([sys.executable, "-c", "print('{\"a\": 1}')"], json_result=True)
    assert fine.ok and fine.result == {"a": 1}
    assert describe_failure(-9, "")[0] == "oom"


def test_a_version_2_record_round_trips_without_a_memory_plan():
    record = {"schema_version": 2, "status": "ok", "run_dir": "runs/x", "steps": 3}
    summary = Summary.from_dict(record)
    assert summary.memory_plan is None and summary.schema_version == 2
    assert summary.to_dict() == record


def test_the_memory_plan_round_trips_typed():
    from lorafit.measurement.plan import MemoryPlan, PlanCandidate

    chosen = PlanCandidate("selective", 3, 2, 2, 1_500_000_000, 1.05, True)
    lost = PlanCandidate("none", 0, 4, 1, 3_000_000_000, 1.0, False, "over budget")
    plan = MemoryPlan(2_000_000_000, "--memory-budget 2GB", 0.1, "cpu", "planner", chosen, [lost])
    record = Summary.from_dict({"status": "ok", "schema_version": 3, "memory_plan": plan.to_dict()}).to_dict()
    back = Summary.from_dict(json.loads(json.dumps(record)))
    assert back.memory_plan == plan
    assert back.memory_plan.chosen.checkpoint_layers == 3 and back.memory_plan.alternatives[0].why_not == "over budget"
