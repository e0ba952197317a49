"""Sizes the command line prints (issue 17, item 3): memory in binary units labelled KiB/MiB/GiB, a
budget as the user typed it with its binary value ("8GB (7.45 GiB)"), and bytes in CSV as plain
integers in a column whose name carries the unit."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from lorafit.base.config import TrainConfig
from lorafit.cli.main import app
from lorafit.measurement.figures import MemoryBreakdown, PeakMemory
from lorafit.run.summary import Summary

BENCH = Path(__file__).resolve().parents[3] / "docs" / "benchmarks" / "2026-11-23-cpu-compare-smollm2" / "lora"
EIGHT_GB = 8 * 10**9
EIGHT_GB_IN_GIB = f"{EIGHT_GB / 2**30:.2f} GiB"  # 7.45 GiB: what "8GB" holds in binary units
# a figure printed with a decimal-looking label: "7.45 GB", "512 MB"; lorafit prints memory in KiB/MiB/GiB
DECIMAL_LABEL = re.compile(r"\d (?:KB|MB|GB|TB)\b")


def recorded(print_fn, *args, **kwargs) -> str:
    console = Console(record=True, width=240)
    print_fn(console, *args, **kwargs)
    return console.export_text()


@pytest.fixture
def summary_8gb() -> Summary:
    """A real run record whose peak is 8·10⁹ bytes, with parts of 512 MiB and 1.5 GiB."""
    s = Summary.from_dict(json.loads((BENCH / "summary.json").read_text()))
    peak = dataclasses.replace(s.memory.peak_memory, peak_bytes=EIGHT_GB, process_peak_bytes=EIGHT_GB)
    parts = MemoryBreakdown(weights=512 * 2**20, activations_workspace=3 * 2**29)
    return dataclasses.replace(s, memory=dataclasses.replace(s.memory, peak_memory=peak, memory_breakdown=parts))


# ---------------------------------------------------------------- train's summary and progress


def test_run_summary_prints_memory_in_binary_units(summary_8gb):
    from lorafit.cli.console import print_summary

    text = recorded(print_summary, summary_8gb)
    assert f"{EIGHT_GB_IN_GIB} (cpu_rss" in text
    assert "7.45 GB" not in text and not DECIMAL_LABEL.search(text), text
    assert "weights 512.00 MiB" in text and "activations_workspace 1.50 GiB" in text


def test_run_summary_shows_the_memory_budget_as_typed(summary_8gb):
    from lorafit.cli.console import print_summary

    text = recorded(print_summary, summary_8gb, memory_budget="8GB")
    assert re.search(rf"memory budget\s*│?\s*8GB \({re.escape(EIGHT_GB_IN_GIB)}\)", text), text
    assert "memory budget" not in recorded(print_summary, summary_8gb)  # no budget, no row


def test_run_summary_shows_each_rank_peak_in_binary_units(summary_8gb):
    from lorafit.cli.console import print_summary

    peak = PeakMemory(kind="cuda", peak_bytes=EIGHT_GB, per_rank_peak_bytes=[EIGHT_GB, 6 * 2**30])
    s = dataclasses.replace(summary_8gb, memory=dataclasses.replace(summary_8gb.memory, peak_memory=peak))
    assert f"max of ranks {EIGHT_GB_IN_GIB}, 6.00 GiB" in recorded(print_summary, s)


def test_progress_shows_memory_in_binary_units():
    from lorafit.cli.console import RichProgress

    progress = RichProgress(Console(record=True, width=200))
    progress.start(2, {"samples": 4, "device": "cpu", "precision": "fp32"})
    try:
        progress.step({"loss": 1.0, "tokens_per_s": 10.0, "memory_bytes": EIGHT_GB})
        assert progress._bar.tasks[0].fields["mem"] == EIGHT_GB_IN_GIB
    finally:
        progress.finish()


# ---------------------------------------------------------------- estimate


def estimate_result(budget: str | None, budget_bytes: int | None) -> dict:
    from lorafit.measurement.estimate import estimate

    est = estimate(TrainConfig(model="random:tiny", batch_size=2, max_length=64), "cuda").to_dict()
    result = {"device": "cuda", "budget_bytes": budget_bytes, "estimate": est}
    return result if budget is None else {**result, "budget": budget}


def test_estimate_shows_the_budget_as_typed_with_its_binary_value():
    from lorafit.base.units import format_bytes
    from lorafit.cli.console import print_estimate

    result = estimate_result("8GB", EIGHT_GB)
    text = recorded(print_estimate, result)
    total = format_bytes(result["estimate"]["total"])
    assert f"budget 8GB ({EIGHT_GB_IN_GIB}): fits (estimate {total})" in text
    assert not DECIMAL_LABEL.search(text), text
    for part, value in result["estimate"]["parts"].items():  # the table's cells, part by part
        assert re.search(rf"{part}\s*│\s*{re.escape(format_bytes(value))}", text), part


def test_estimate_says_what_does_not_fit():
    from lorafit.cli.console import print_estimate

    result = estimate_result("1KB", 1000)
    assert result["estimate"]["total"] > 1000
    text = recorded(print_estimate, result)
    assert "budget 1KB (1000 B): does not fit" in text


def test_estimate_without_the_typed_budget_prints_its_bytes_in_binary_units():
    from lorafit.cli.console import print_estimate

    text = recorded(print_estimate, estimate_result(None, EIGHT_GB))
    assert f"budget {EIGHT_GB_IN_GIB}: fits" in text and "7.45 GB" not in text


def test_estimate_notes_label_sizes_in_binary_units(monkeypatch):
    from lorafit.cli.console import print_estimate
    from lorafit.measurement.estimate import estimate

    cfg = TrainConfig(model="random:tiny", method="qlora", batch_size=2, max_length=64)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CUDA context: assumed, in a note
    est = estimate(cfg, "cuda").to_dict()
    text = recorded(print_estimate, {"device": "cuda", "budget_bytes": None, "estimate": est})
    assert re.search(r"CUDA context and libraries assumed \d+ (?:KiB|MiB|GiB)", text), text
    assert not DECIMAL_LABEL.search(text), text


# ---------------------------------------------------------------- eval and merge


def test_eval_prints_sizes_in_binary_units():
    from lorafit.cli.console import print_eval

    size = {
        "total_params": 10,
        "adapter_params": 2,
        "disk_bytes": 3 * 2**29,
        "disk_base_bytes": 2**30,
        "disk_adapter_bytes": 2**29,
        "memory_bytes": EIGHT_GB,
        "compression_vs_fp16": 1.0,
    }
    e = {"label": "x", "model": "m", "adapter": None, "size": size, "device": "cpu"}
    text = recorded(print_eval, e)
    assert "1.50 GiB to ship (base 1.00 GiB, adapter 512.00 MiB)" in text
    assert f"{EIGHT_GB_IN_GIB} of weights" in text and not DECIMAL_LABEL.search(text)


def test_merge_prints_disk_sizes_in_binary_units(monkeypatch, tmp_path):
    import lorafit.studies.merge as merge

    result = {"method": "lora", "base_model": "m", "dtype": "fp32", "disk_bytes_before": EIGHT_GB}
    result["disk_bytes_after"] = 3 * 2**29
    monkeypatch.setattr(merge, "merge", lambda *args: result)
    out = CliRunner().invoke(app, ["merge", str(tmp_path), "--out", str(tmp_path / "m")], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert f"on disk {EIGHT_GB_IN_GIB} (base + adapter) -> 1.50 GiB" in " ".join(out.output.split())


# ---------------------------------------------------------------- runs list and export


@pytest.fixture
def store(tmp_path, summary_8gb):
    """Two runs: one capped at --memory-budget 8GB, one without a budget."""
    from lorafit.run.store import RunRecord, RunStore

    capped = RunRecord("capped", "train", "ok", {"memory_budget": "8GB"}, summary=summary_8gb, group_name="g")
    free = RunRecord("free", "train", "ok", {}, summary=summary_8gb, group_name="g")
    with RunStore(tmp_path / "runs.sqlite") as db:
        db.put(capped)
        db.put(free)
    return tmp_path / "runs.sqlite"


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "240"})
    assert result.exit_code == 0, result.output
    return result.output


def test_runs_list_shows_peaks_in_gib_and_the_budget_as_typed(store):
    text = invoke("runs", "list", "--store", str(store))
    lines = {line.split("│")[4].strip(): line for line in text.splitlines() if line.count("│") > 5}
    assert EIGHT_GB_IN_GIB in lines["capped"] and EIGHT_GB_IN_GIB in lines["free"]
    assert f"8GB ({EIGHT_GB_IN_GIB})" in lines["capped"] and "8GB" not in lines["free"]
    assert not DECIMAL_LABEL.search(text), text


def test_runs_csv_has_bytes_as_integers_in_byte_columns(store):
    rows = list(csv.DictReader(io.StringIO(invoke("runs", "export", "--store", str(store), "--csv"))))
    by_label = {r["label"]: r for r in rows}
    assert by_label["capped"]["peak_bytes"] == str(EIGHT_GB) == by_label["free"]["peak_bytes"]
    assert by_label["capped"]["memory_budget_bytes"] == str(EIGHT_GB)
    assert by_label["free"]["memory_budget_bytes"] == ""
    byte_columns = [c for c in rows[0] if "bytes" in c or "memory" in c or "budget" in c]
    assert byte_columns == ["peak_bytes", "memory_budget_bytes"]
    for row in rows:  # no formatted size anywhere: integers, or empty where unknown
        assert not re.search(r"[KMGT]i?B\b", ",".join(row.values())), row
