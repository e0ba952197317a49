"""GPU training gives the losses of lorafit's CPU fp32 run of the same batches: LoRA, QLoRA and full
fine-tuning in bf16, and LoRA in fp16 with loss scaling, on random:smollm2-135m (tests/gpu/golden.py
holds the flags, the tolerance and why). Each case is `lorafit train` on the GPU, all four at once."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest

from tests.gpu.common import record
from tests.gpu.golden import (
    CASES,
    GOLDEN_FILE,
    RELATIVE_TOLERANCE,
    cpu_references,
    model_fingerprint,
    start,
    stopping,
    train_command,
    train_flags,
)

TIMEOUT_S = float(os.environ.get("LORAFIT_GPU_TEST_TIMEOUT", "300"))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def references(work: Path) -> tuple[dict[str, list[float]], str]:
    """Each method's CPU fp32 losses: the committed ones where this machine has the weights and flags they
    were made with, else computed here on the CPU (the GPU runs are already going meanwhile)."""
    golden = json.loads(GOLDEN_FILE.read_text())
    methods = sorted(golden["references"])
    same_flags = all(golden["references"][m]["flags"] == train_flags(m) for m in methods)
    if same_flags and model_fingerprint() == golden["weights_fingerprint"]:
        return {m: golden["references"][m]["losses"] for m in methods}, f"committed ({GOLDEN_FILE.name})"
    why = "flags changed since" if not same_flags else "this machine's random weights differ from those of"
    return cpu_references(methods, work, TIMEOUT_S), f"recomputed on this machine's CPU ({why} {GOLDEN_FILE.name})"


def aligned(rows: list[dict], reference: list[float]) -> tuple[list[tuple[float, float]], list[int]]:
    """(GPU loss, CPU loss) per step, and the steps whose update fp16 loss scaling skipped (non-finite
    gradient norm): such a step leaves the weights as they were, so from the next step on the run is one
    update behind the reference and is compared with the reference's step before."""
    pairs, skipped = [], []
    for row in rows:
        pairs.append((row["loss"], reference[len(pairs) - len(skipped)]))
        if row.get("grad_norm") is not None and not math.isfinite(row["grad_norm"]):
            skipped.append(row["step"])
    return pairs, skipped


def compare(case: str, run_dir: Path, reference: list[float]) -> dict:
    method, precision = CASES[case]
    rows = [r for r in metrics(run_dir) if "loss" in r]
    pairs, skipped = aligned(rows, reference)
    relative = [abs(g - c) / c for g, c in pairs]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "method": method,
        "precision": summary.get("precision"),
        "losses": [g for g, _ in pairs],
        "reference": [c for _, c in pairs],
        "relative_diff": relative,
        "worst_relative_diff": max(relative) if relative else None,
        "scaler_skipped_steps": skipped,
        "tolerance": RELATIVE_TOLERANCE,
        "tokens_per_s": summary.get("tokens_per_s"),
        "peak_bytes": (summary.get("peak_memory") or {}).get("peak_bytes"),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    work = tmp_path_factory.mktemp("golden")
    model_fingerprint()  # materialize the model once, before four processes want it
    procs = {}
    for case, (method, precision) in CASES.items():
        procs[case] = start(train_command(method, "cuda", precision, work / case), work / f"{case}.log")
    results = {}
    with stopping(list(procs.values())):
        refs, source = references(work)
        deadline = time.monotonic() + TIMEOUT_S
        for case, proc in procs.items():
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            if code != 0:
                results[case] = {"error": f"exit {code}:\n" + (work / f"{case}.log").read_text()[-4000:]}
                continue
            results[case] = compare(case, work / case, refs[CASES[case][0]])
    record("golden", {"reference_source": source, "cases": results, "table": table(results)})
    return results


def table(results: dict[str, dict]) -> dict:
    rows = []
    for case, r in results.items():
        if "error" in r:
            rows.append([case, "failed", "-", "-", "-"])
            continue
        curve = f"{r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}"
        ref = f"{r['reference'][0]:.3f} -> {r['reference'][-1]:.3f}"
        rows.append([case, curve, ref, f"{r['worst_relative_diff']:.2%}", str(r["scaler_skipped_steps"] or "-")])
    return {"columns": ["case", "GPU loss", "CPU fp32 loss", "worst step diff", "scaler-skipped"], "rows": rows}


@pytest.mark.parametrize("case", list(CASES))
def test_gpu_losses_equal_cpu_fp32_within_tolerance(runs, case):
    result = runs[case]
    assert "error" not in result, result.get("error")
    assert len(result["losses"]) == 8
    worst = max(range(len(result["relative_diff"])), key=result["relative_diff"].__getitem__)
    assert result["worst_relative_diff"] <= RELATIVE_TOLERANCE, (
        f"step {worst + 1}: GPU {result['losses'][worst]:.4f} vs CPU fp32 {result['reference'][worst]:.4f}"
    )


@pytest.mark.parametrize("case", list(CASES))
def test_gpu_loss_falls_as_on_cpu(runs, case):
    """The loss falls by at least half what the CPU run's fell over the same steps (a run that skips or
    zeroes its updates stays flat); bf16 never skips a step: only fp16 has a loss scaler."""
    result = runs[case]
    assert "error" not in result, result.get("error")
    gpu, cpu = result["losses"], result["reference"]
    assert gpu[-1] < gpu[0] - 0.5 * (cpu[0] - cpu[-1]), (
        f"GPU {gpu[0]:.4f} -> {gpu[-1]:.4f}, CPU {cpu[0]:.4f} -> {cpu[-1]:.4f}"
    )
    if CASES[case][1] == "bf16":
        assert not result["scaler_skipped_steps"]
    assert result["precision"] == CASES[case][1]
