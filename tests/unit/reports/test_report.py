"""The report shows the stored numbers, and every chart, in a file that stands alone."""

from __future__ import annotations

import base64
import json
import re

import pytest

from lorafit.reports import write_report
from lorafit.reports.page import markdown_table, num
from lorafit.run.store import RunRecord
from lorafit.run.summary import Summary
from tests.helpers import TableReader

GIB = 2**30


def _records() -> list[RunRecord]:
    base = RunRecord(
        "base",
        "eval",
        "ok",
        {},
        eval={
            "method": "base",
            "size": {"disk_bytes": 538e6, "disk_adapter_bytes": 0, "memory_bytes": 538e6, "compression_vs_fp16": 0.5},
            "perplexity": {
                "ppl": 13.6357,
                "text": "wikitext2 test",
                "tokens_scored": 8191,
                "text_tokens": 312144,
                "max_length": 1024,
                "stride": 512,
            },
            "generation": {"decode_tokens_per_s": 12.89, "ttft_s": 0.134},
            "settings": {"ppl": "wikitext2"},
        },
    )
    lora = RunRecord(
        "lora",
        "train",
        "ok",
        {"method": "lora"},
        summary=Summary.from_dict(
            {
                "schema_version": 2,
                "status": "ok",
                "method": "lora",
                "precision": "fp32",
                "trainable_params": 4_884_480,
                "trainable_pct": 3.504,
                "flops_per_token": 6.2e8,
                # grad_accum 4: 8 timed micro-steps of 1.1e12 FLOPs and 1.2775 s; an optimizer step is 4 of them
                "flops_per_step": 4 * 1.1e12,
                "model_flops": 8 * 1.1e12,
                "timed_steps": 8,
                "mfu": 0.4321,
                "step_time_s": {"mean": 5.11, "p50": 5.0},
                "micro_step_time_s": {"mean": 1.2775, "p50": 1.25},
                "tokens_per_s": 123.456,
                "peak_memory": {"peak_bytes": int(2.5 * GIB), "kind": "cpu_rss"},
                "memory_breakdown": {"runtime": 8e8, "weights": 5.4e8, "activations_workspace": 1.2e9},
                "j_per_token": None,
                "energy_unavailable_reason": "no RAPL here",
                "data": {"file": "alpaca.jsonl", "format": "alpaca", "template": "alpaca"},
                "device": {"type": "cpu", "name": "Test CPU", "threads": 2},
                "versions": {"torch": "2.13"},
            }
        ),
        eval={
            "method": "lora",
            "size": {
                "disk_bytes": 557e6,
                "disk_adapter_bytes": 19.5e6,
                "memory_bytes": 557e6,
                "compression_vs_fp16": 0.49,
            },
            "perplexity": {"ppl": 12.3456},
            "generation": {"decode_tokens_per_s": 10.5, "ttft_s": 0.2},
        },
        metrics=[{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}],
    )
    return [base, lora]


def test_table_shows_the_stored_numbers(tmp_path):
    html_path, md_path = write_report(_records(), tmp_path, "t", command=["lorafit", "compare"])
    reader = TableReader()
    reader.feed(html_path.read_text())
    head, *rows = reader.tables[0]
    cells = {row[0]: dict(zip(head, row, strict=True)) for row in rows}
    lora = cells["lora"]
    assert float(lora["train tokens/s"]) == pytest.approx(123.456, abs=0.05)
    assert float(lora["MFU"].rstrip("%")) == pytest.approx(43.21, abs=0.05)
    assert float(lora["peak memory"].split()[0]) == pytest.approx(2.5, abs=0.005)
    # "step" is the optimizer step (4 micro-steps here), never the micro-step
    assert lora["FLOPs / step"] == f"{4 * 1.1e12 / 1e12:.3g} TFLOP"
    assert float(lora["time / step"].split()[0]) == pytest.approx(5.11, abs=0.005)
    before, after = (float(x) for x in lora["perplexity"].split(" → "))
    assert (before, after) == (pytest.approx(13.6357, abs=0.005), pytest.approx(12.3456, abs=0.005))
    assert lora["size on disk"] == f"{557e6 / 2**20:.2f} MiB"  # binary units, labelled so
    assert lora["trainable params"] == "4.88M" and lora["J / token"] == "—"
    assert cells["base"]["perplexity"] == "13.64" and cells["base"]["MFU"] == "—"
    assert "J/token not measured: no RAPL here" in html_path.read_text()
    assert "perplexity: wikitext2 test, 8,191 of 312,144 tokens scored, window 1024, stride 512" in md_path.read_text()
    # the Markdown table carries the same cells
    md = md_path.read_text()
    assert "| " + " | ".join(rows[1]) + " |" in md


def test_every_chart_is_embedded_as_png(tmp_path):
    html_path, _ = write_report(_records(), tmp_path, "t", command=[])
    text = html_path.read_text()
    reader = TableReader()
    reader.feed(text)
    assert set(reader.charts) == {"six_panel", "radar", "memory_breakdown", "loss_curves"}
    for src in reader.charts.values():
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'src="(?!data:)', text)  # nothing loaded from elsewhere: the file stands alone


def test_memory_breakdown_and_environment_come_from_the_summary(tmp_path):
    html_path, md_path = write_report(_records(), tmp_path, "t", command=["lorafit", "compare", "--x"])
    reader = TableReader()
    reader.feed(html_path.read_text())
    head, *rows = reader.tables[3]  # the peak memory breakdown (after comparison, improvement, settings)
    assert [row[0] for row in rows] == ["lora"]
    lora = dict(zip(head, rows[0], strict=True))
    assert lora["peak (kind)"] == "2.50 GiB (cpu_rss)"
    parts = (lora["runtime"], lora["weights"], lora["activations workspace"])
    assert parts == tuple(f"{n / 2**20:.1f} MiB" for n in (8e8, 5.4e8, 1.2e9))
    assert lora["grads"] == "0.0 MiB"  # a part the record lacks is zero
    env = json.loads(md_path.read_text().split("```json\n", 1)[1].split("\n```", 1)[0])
    assert env["device"] == {"type": "cpu", "name": "Test CPU", "threads": 2}
    assert (env["precision"], env["versions"], env["data"]) == ("fp32", {"torch": "2.13"}, "alpaca.jsonl")
    assert env["command"] == "lorafit compare --x" and env["eval_settings"] == {"ppl": "wikitext2"}


def test_evaluation_only_runs_have_no_training_figures(tmp_path):
    base = _records()[0]
    _, md_path = write_report([base], tmp_path, "t", command=[])
    md = md_path.read_text()
    head, row = (  # the comparison table's header and row (the first of each)
        [c.strip() for c in next(line for line in md.splitlines() if line.startswith(start)).strip("|").split("|")]
        for start in ("| run |", "| base |")
    )
    cells = dict(zip(head, row, strict=True))
    assert cells["size on disk"] == f"{538e6 / 2**20:.2f} MiB" and cells["perplexity"] == "13.64"
    training = head[head.index("FLOPs / step") : head.index("perplexity")]  # FLOPs / step ... J / token
    assert len(training) == 8 and all(cells[c] == "—" for c in training)
    # an eval.json of before generation kept its total time: no inference time is made up from decode speed
    assert (cells["inference time"], cells["generation tokens/s"]) == ("—", "—")
    env = json.loads(md.split("```json\n", 1)[1].split("\n```", 1)[0])
    assert set(env["device"]) == {"platform"} and env["precision"] is None


@pytest.mark.parametrize(
    ("value", "fmt", "scale", "shown"),
    [(None, "{:.1f}", 1.0, "n/a"), (float("nan"), "{:.1f}", 1.0, "n/a"), (2.5 * GIB, "{:.2f} GiB", GIB, "2.50 GiB")],
)
def test_numbers_missing_or_scaled(value, fmt, scale, shown):
    assert num(value, fmt, scale) == shown


def test_a_pipe_in_a_cell_cannot_split_the_markdown_row():
    assert markdown_table(["a", "b"], [["x|y", "1"]]).splitlines() == ["| a | b |", "|---|---|", "| x/y | 1 |"]


def test_a_version_1_record_shows_no_micro_step_figure_under_step(tmp_path):
    """v1 summaries timed micro-batches under `step_time_s`: no optimizer-step figure can be shown."""
    v1 = RunRecord(
        "old",
        "train",
        "ok",
        {"method": "lora", "grad_accum": 4},
        summary=Summary.from_dict(
            {
                "status": "ok",
                "method": "lora",
                "model_flops": 8 * 1.1e12,
                "timed_steps": 8,
                "step_time_s": {"mean": 1.2775, "p50": 1.25},
                "tokens_per_s": 100.0,
            }
        ),
    )
    html_path, md_path = write_report([v1], tmp_path, "t", command=[])
    reader = TableReader()
    reader.feed(html_path.read_text())
    head, row = reader.tables[0]
    cells = dict(zip(head, row, strict=True))
    assert (cells["FLOPs / step"], cells["time / step"]) == ("—", "—")
    assert (
        "time / step and FLOPs / step not shown for old: its summary (schema v1) timed micro-batches"
        in md_path.read_text()
    )
