"""Two processes (gloo, this CPU) train like one: with the same global batch and seed, 2 processes
give the single-process loss curve and final weights within fp32 tolerance, for LoRA, QLoRA and
full, whether `lorafit --nproc`, torchrun or `accelerate launch` starts them; rank 0 alone writes;
a 2-process run stopped by SIGTERM resumes with 2 processes to the bit-identical result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafit.base.errors import UserError
from lorafit.training import checkpoint
from lorafit.training.distributed import Ranks
from tests.helpers import lorafit

COMMON = ["--model", "random:tiny", "--max-length", "128", "--lora-dropout", "0", "--batch-size", "2"]


# the three ways to start N processes; each must give the single-process result
LAUNCHERS = {
    "lorafit --nproc": [sys.executable, "-m", "lorafit", "train", "--nproc", "2"],
    "torchrun": [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "lorafit", "train",
    ],
    # --multi_gpu is accelerate's DDP launcher; on a machine without GPUs its processes use gloo on CPU
    "accelerate launch": [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2", "--num_machines=1",
        "--mixed_precision=no", "--dynamo_backend=no", "-m", "lorafit", "train",
    ],
}  # fmt: skip


def train(out: Path, *args: str, launcher: str | None = None) -> dict:
    """Train and return summary.json; launched by `launcher` (one of LAUNCHERS) or as one process."""
    start = LAUNCHERS[launcher] if launcher else [sys.executable, "-m", "lorafit", "train"]
    proc = subprocess.run([*start, *COMMON, *args, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads((out / "summary.json").read_text())


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path, method: str) -> dict[str, torch.Tensor]:
    name = "model/model.safetensors" if method == "full" else "adapter/adapter_model.safetensors"
    return load_file(run / name)


@pytest.mark.parametrize(
    ("method", "samples", "grad_accum", "launcher"),
    [
        ("lora", "22", 2, "lorafit --nproc"),  # 11 micro-batches: steps of 4, 4, 3; the last splits 2 + 1
        ("qlora", "8", 1, "torchrun"),
        ("full", "8", 1, "accelerate launch"),
    ],
)
def test_two_processes_match_one(tmp_path, method, samples, grad_accum, launcher):
    args = ["--method", method, "--max-samples", samples]
    one = train(tmp_path / "one", *args, "--grad-accum", str(2 * grad_accum))
    two = train(tmp_path / "two", *args, "--grad-accum", str(grad_accum), launcher=launcher)
    print(f"{method}: 1 process {one['tokens_per_s']:.0f} tokens/s, 2 processes {two['tokens_per_s']:.0f} tokens/s")

    assert one["global_batch_size"] == two["global_batch_size"] == 4 * grad_accum
    single, double = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [r["step"] for r in double] == list(range(1, len(single) + 1))  # rank 0 alone wrote, once a step
    assert [r["tokens"] for r in double] == [r["tokens"] for r in single]  # same data in every step
    for a, b in zip(single, double):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
    expected, got = weights(tmp_path / "one", method), weights(tmp_path / "two", method)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)

    dist = two["distributed"]
    assert two["processes"] == dist["num_processes"] == 2 and one["processes"] == 1
    assert (dist["kind"], dist["backend"], dist["launcher"]) == ("MULTI_CPU", "gloo", launcher)
    ranks = dist["per_rank"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert two["tokens"] == sum(r["tokens"] for r in ranks) > 0  # global over the timed steps
    assert two["timed_s"] == max(r["timed_s"] for r in ranks)
    assert two["tokens_per_s"] == pytest.approx(two["tokens"] / two["timed_s"])
    assert two["peak_memory"]["peak_bytes"] == max(r["peak_bytes"] for r in ranks)
    assert two["peak_memory"]["per_rank_peak_bytes"] == [r["peak_bytes"] for r in ranks]
    assert two["peak_flops_per_s"] == pytest.approx(sum(r["peak_flops_per_s"] for r in ranks))
    assert two["mfu"] == pytest.approx(two["model_flops"] / two["timed_s"] / two["peak_flops_per_s"])
    assert one["tokens_per_s"] > 0 and two["tokens_per_s"] > 0
    if two["energy_j"] is None:  # no RAPL here: null with the reason, never a guess
        assert two["energy_unavailable_reason"]


def test_two_process_run_stopped_by_sigterm_resumes_bitwise(tmp_path):
    args = [
        "train",
        "--model",
        "random:tiny",
        "--max-samples",
        "24",
        "--batch-size",
        "2",
        "--max-length",
        "128",
        "--max-steps",
        "5",
        "--lora-dropout",
        "0.1",
        "--profile-warmup-steps",
        "0",
        "--nproc",
        "2",
    ]  # fmt: skip  (dropout on: each rank's random stream must resume where it stopped)
    reference = lorafit(*args, "--out", str(tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr

    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorafit", *args, "--out", str(run)], stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").is_file() or len(rows(run)) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGTERM)  # the launcher: it passes the signal to both ranks
    assert proc.wait(timeout=120) == 130
    err = proc.stderr.read()
    assert err.count("continue with: lorafit train --resume") == 1  # rank 0 says it, once
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    stopped_at = rows(run)[-1]["step"]
    assert (run / "checkpoints" / f"step-{stopped_at:08d}").is_dir()

    with pytest.raises(UserError, match=r"checkpointed with 2 process\(es\) .* \(--nproc 2\)"):
        checkpoint.load(checkpoint.latest(run), None, None, None, Ranks(world=1))  # before touching anything
    resumed = lorafit("train", "--resume", str(run), "--nproc", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert [r["step"] for r in rows(run)] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in rows(run)] == [r["loss"] for r in rows(tmp_path / "ref")]
    for name, tensor in weights(tmp_path / "ref", "lora").items():
        assert torch.equal(weights(run, "lora")[name], tensor), name


def test_bad_process_count_is_refused_before_launching():
    bad = lorafit("train", "--model", "random:tiny", "--nproc", "0")
    assert bad.returncode == 2 and "--nproc must be >= 1" in bad.stderr
