"""The sweep report on synthetic store rows: Pareto front, best point within the budget, charts, table."""

from __future__ import annotations

import pytest

from lorafit.reports import write_report
from lorafit.reports.sweep_points import best_point, pareto_front, sweep_rows, varied_keys
from lorafit.run.store import RunRecord
from lorafit.run.summary import Summary
from tests.helpers import TableReader

GIB = 2**30


def point(batch: int, length: int, optimizer: str, status: str, tps: float | None, peak_gib: float | None):
    config = {"batch_size": batch, "max_length": length, "optimizer": optimizer, "memory_budget": "4GiB", "out": "x"}
    summary = None
    if tps is not None:
        summary = Summary.from_dict(
            {
                "status": status,
                "tokens_per_s": tps,
                "peak_memory": {"peak_bytes": int(peak_gib * GIB), "kind": "cuda"},
                "j_per_token": None,
                "energy_unavailable_reason": "no NVML",
                "mfu": tps / 1000,
                "loss_mean": 2.0 + batch / 100,
            }
        )
    label = f"batch_size={batch} max_length={length} optimizer={optimizer}"
    return RunRecord(label, "sweep", status, config, summary=summary, error=None if status == "ok" else "boom")


RECORDS = [
    point(1, 256, "adamw", "ok", 100.0, 1.0),
    point(2, 256, "adamw", "ok", 180.0, 1.5),
    point(4, 256, "adamw", "ok", 170.0, 2.5),  # slower and bigger than batch 2: off the front
    point(1, 512, "adamw", "ok", 150.0, 1.2),
    point(2, 512, "adamw", "ok", 260.0, 3.5),
    point(4, 512, "adamw", "oom", None, None),
    point(1, 256, "adamw_8bit", "ok", 95.0, 0.9),
    point(2, 512, "adamw_8bit", "ok", 300.0, 5.0),  # fastest, but over the 4 GiB budget
    point(4, 512, "adamw_8bit", "failed", None, None),
]


def test_pareto_front_and_best_within_budget():
    rows = sweep_rows(RECORDS)
    front = [tuple(r["config"][k] for k in ("batch_size", "max_length", "optimizer")) for r in pareto_front(rows)]
    assert front == [
        (1, 256, "adamw_8bit"),
        (1, 256, "adamw"),
        (1, 512, "adamw"),
        (2, 256, "adamw"),
        (2, 512, "adamw"),
        (2, 512, "adamw_8bit"),
    ]
    best = best_point(rows, 4 * GIB)
    assert best["label"] == "batch_size=2 max_length=512 optimizer=adamw"
    assert best_point(rows, None)["label"] == "batch_size=2 max_length=512 optimizer=adamw_8bit"
    assert best_point(rows, GIB // 2) is None
    assert varied_keys(rows) == ["batch_size", "max_length", "optimizer"]


def test_sweep_report_has_every_chart_the_table_and_the_verdict(tmp_path):
    html_path, md_path = write_report(RECORDS, tmp_path, "sweep t")
    text = html_path.read_text()
    for chart in ("tokens_vs_batch", "memory_vs_length", "j_per_token", "pareto", "choice_optimizer"):
        assert f'data-chart="{chart}" src="data:image/png;base64,' in text
    assert "Best configuration within the 4.00 GiB budget: batch_size=2 max_length=512 optimizer=adamw at 260.0" in text
    reader = TableReader()
    reader.feed(text)
    head, *body = reader.tables[0]
    cells = {row[0]: dict(zip(head, row, strict=True)) for row in body}
    assert len(cells) == len(RECORDS)
    for r in RECORDS:  # table numbers are the stored ones
        row = cells[r.label]
        assert row["status"] == r.status
        if r.summary:
            assert float(row["tokens/s"]) == r.summary.timing.tokens_per_s
            assert row["peak memory"] == f"{r.summary.peak_bytes / GIB:.2f} GiB"
            assert float(row["MFU"].rstrip("%")) == pytest.approx(r.summary.timing.tokens_per_s / 10, abs=0.05)
            assert row["mean loss"] == f"{r.summary.losses.loss_mean:.4f}" and row["J/token"] == "n/a"
        else:
            assert row["tokens/s"] in ("", "n/a") and row["error"] == "boom"
    md = md_path.read_text()
    assert "Best configuration within the 4.00 GiB budget: batch_size=2 max_length=512 optimizer=adamw" in md
    assert "| batch_size=2 max_length=256 optimizer=adamw | ok | 180.0 | 1.50 GiB | n/a | 18.0% | 2.0200 |  |" in md


def test_a_point_that_did_not_finish_shows_no_figures_even_with_a_summary():
    interrupted = point(2, 256, "adamw", "interrupted", 180.0, 1.5)
    (row,) = sweep_rows([interrupted])
    assert (row["tokens_per_s"], row["peak_bytes"], row["mfu"], row["loss_mean"]) == (None, None, None, None)
    assert row["energy_note"] == "no NVML"


def test_sweep_points_mixed_with_other_runs_get_the_comparison_report(tmp_path):
    train = RunRecord("lora", "train", "ok", {}, summary=Summary.from_dict({"status": "ok", "tokens_per_s": 42.0}))
    html_path, _ = write_report([*RECORDS[:2], train], tmp_path, "mixed", command=[])
    text = html_path.read_text()
    assert '<div id="comparison">' in text and 'id="verdict"' not in text
    sweep_path, _ = write_report(RECORDS[:2], tmp_path / "sweep", "sweep", command=[])
    assert 'id="verdict"' in sweep_path.read_text()
