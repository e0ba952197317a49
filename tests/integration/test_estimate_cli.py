"""`lorafit estimate` from the command line: JSON, --find-max, --measure, and its errors."""

from __future__ import annotations

import json

from tests.helpers import lorafit


def last_json(proc) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_estimate_find_max_on_an_8b_shape_without_its_weights():
    result = last_json(
        lorafit(
            "estimate",
            "--model",
            "random:llama-3-8b",
            "--method",
            "qlora",
            "--device",
            "cuda",
            "--max-length",
            "1024",
            "--budget",
            "24GB",
            "--find-max",
            "batch",
            "--json",
        )
    )
    best = result["find_max"]["estimated"]
    est = result["estimate"]
    assert best >= 1 and est["batch_size"] == best and est["total"] <= 24e9
    # GPU: the peak is device-level; no GPU here to measure the CUDA context, so it is assumed, and said so
    assert est["parts"]["runtime"] == 512 * 2**20
    assert any("assumed 512 MiB" in note for note in est["notes"])
    assert est["trainable_params"] == 41_943_040  # r=16 on all 7 projections of 32 layers


def test_estimate_measure_puts_the_real_run_next_to_the_estimate(tmp_path):
    result = last_json(
        lorafit(
            "estimate",
            "--model",
            "random:tiny",
            "--data",
            "wikitext2",
            "--max-samples",
            "4",
            "--batch-size",
            "2",
            "--max-length",
            "64",
            "--measure",
            "--json",
        )
    )
    measured = result["measured"]
    assert measured["status"] == "ok"
    parts = result["estimate"]["parts"]
    for part in ("weights", "trainable", "grads", "optimizer_state"):  # exact on both sides
        assert parts[part] == measured["memory_breakdown"][part], part
    assert measured["peak_bytes"] > 0


def test_estimate_errors():
    no_budget = lorafit("estimate", "--model", "random:tiny", "--find-max", "batch")
    assert no_budget.returncode == 2 and "--find-max needs --budget" in no_budget.stderr
    bad = lorafit("estimate", "--model", "random:tiny", "--budget", "8GB", "--find-max", "rank")
    assert bad.returncode == 2 and "'batch' or 'length'" in bad.stderr
    size = lorafit("estimate", "--model", "random:tiny", "--budget", "lots")
    assert size.returncode == 2 and "size like 8GB" in size.stderr
