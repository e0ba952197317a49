"""`lorafit bench-serve --quantize none,nf4`: the same load against a dense and a 4-bit base, each in its
own server process, with each server's memory next to its throughput (starts two servers)."""

from __future__ import annotations

import json

from tests.helpers import lorafit


def test_bench_serve_dense_and_4bit_side_by_side(tmp_path):
    out = tmp_path / "bench.json"
    proc = lorafit(
        "bench-serve",
        *("--model", "random:tiny", "--adapters", "2", "--requests", "4", "--concurrency", "2"),
        *("--prompt-words", "4", "--max-tokens", "3", "--rank", "4", "--quantize", "none,nf4"),
        *("--out", str(out), "--json"),
        columns=200,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == result
    assert result["quantize"] == ["none", "nf4"]
    dense, four = result["batched"], result["batched-nf4"]
    for run in (dense, four):
        assert run["requests"] == 4 and run["output_tokens"] == 4 * 3  # ignore_eos: exactly max-tokens each
        memory = run["memory"]
        assert min(memory[k] for k in ("rss_ready_bytes", "rss_warm_bytes", "peak_rss_bytes", "weight_bytes")) > 0
        assert memory["peak_rss_bytes"] >= memory["rss_bytes"]  # the high-water mark covers the end of the load
    # the projections are 4-bit in one server and fp32 in the other; the rest (embeddings) is the same
    assert four["memory"]["weight_bytes"] < dense["memory"]["weight_bytes"]
    ratios = result["vs_dense"]["nf4"]
    assert ratios["weight_bytes"] == four["memory"]["weight_bytes"] / dense["memory"]["weight_bytes"]
    assert ratios["output_tokens_per_s"] == four["output_tokens_per_s"] / dense["output_tokens_per_s"]
    assert "batched-nf4" in proc.stderr and "weights (as stored)" in proc.stderr
    assert "nf4 base vs dense (batched): weights" in proc.stderr
