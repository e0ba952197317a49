"""Checkpoints and resume: a training process killed with SIGKILL at random steps and resumed ends
with the same adapter, bit for bit, as an uninterrupted run, and an unbroken metrics.jsonl; SIGTERM
finishes the step, writes a checkpoint and marks the run interrupted."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafit.training import checkpoint
from tests.helpers import lorafit

ARGS = [
    "--model", "random:tiny", "--max-samples", "32", "--batch-size", "4", "--max-length", "128",
    "--max-steps", "8", "--lora-dropout", "0.1", "--save-every", "1", "--profile-warmup-steps", "0",
]  # fmt: skip


def start(*args: str) -> subprocess.Popen:
    """`lorafit train ARGS` as a process the test can kill."""
    cmd = [sys.executable, "-m", "lorafit", "train", *args]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def wait_for_rows(proc: subprocess.Popen, run: Path, n: int) -> None:
    deadline = time.time() + 120
    while len(rows(run)) < n:
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.005)


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = lorafit("train", *ARGS, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def test_sigkill_at_random_steps_then_resume_is_bitwise_equal(reference, tmp_path):
    run = tmp_path / "run"
    kills = sorted(random.Random(os.getpid()).sample(range(1, 7), 2))  # two kills, at random steps
    print(f"SIGKILL after metrics rows {kills}")  # with -s: which steps this run tried
    proc = start(*ARGS, "--out", str(run))
    for i, at in enumerate(kills):
        wait_for_rows(proc, run, at)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc = start("--resume", str(run))  # from the last checkpoint, or from step 0 if none was written
        if i == len(kills) - 1:
            assert proc.wait() == 0, proc.stderr.read()
    assert [r["step"] for r in rows(run)] == list(range(1, 9)), kills  # unbroken, no duplicates
    assert [r["loss"] for r in rows(run)] == [r["loss"] for r in rows(reference)]
    expected, got = adapter(reference), adapter(run)
    assert set(got) == set(expected)
    for name in expected:  # bitwise: CPU fp32 kernels are deterministic here
        assert torch.equal(got[name], expected[name]), (name, kills)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["resumed_from_step"] >= kills[-1] - 1
    assert len(list((run / "checkpoints").glob("step-*"))) == 2  # --keep-checkpoints 2


def test_sigterm_finishes_the_step_checkpoints_and_marks_interrupted(reference, tmp_path):
    run = tmp_path / "run"
    args = list(ARGS)
    args[args.index("--save-every") + 1] = "0"  # no periodic checkpoints: the signal writes one
    proc = start(*args, "--out", str(run))
    wait_for_rows(proc, run, 2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 130
    err = proc.stderr.read()
    assert "lorafit train --resume" in err
    summary = json.loads((run / "summary.json").read_text())
    last = rows(run)[-1]["step"]
    assert summary["status"] == "interrupted"
    assert checkpoint.latest(run).name == f"step-{last:08d}"  # the step in progress was finished and saved
    resumed = lorafit("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    for name, tensor in adapter(reference).items():
        assert torch.equal(adapter(run)[name], tensor)
    assert_flops_of_the_whole_run(json.loads((run / "summary.json").read_text()), reference)


def assert_flops_of_the_whole_run(resumed: dict, reference: Path) -> None:
    """Same data, so the same FLOPs per token and per step as the uninterrupted run, exactly; MFU over
    the steps this process timed (their FLOPs over their seconds), not the restored count over them."""
    whole = json.loads((reference / "summary.json").read_text())
    assert resumed["resumed_from_step"] >= 2
    for key in ("flops_per_token", "flops_per_step", "total_model_flops", "total_tokens"):
        assert resumed[key] == whole[key], key
    assert 0 < resumed["model_flops"] < whole["total_model_flops"]  # the timed window: this process's steps
    assert resumed["model_flops"] / resumed["tokens"] == pytest.approx(whole["flops_per_token"], rel=0.25)
    assert resumed["mfu"] == pytest.approx(resumed["model_flops"] / resumed["timed_s"] / resumed["peak_flops_per_s"])


def test_resume_errors(reference, tmp_path):
    done = lorafit("train", "--resume", str(reference))
    assert done.returncode == 2 and "nothing to resume" in done.stderr
    flags = lorafit("train", "--resume", str(reference), "--lora-r", "4")
    assert flags.returncode == 2 and "own config.yaml" in flags.stderr
    nowhere = lorafit("train", "--resume", str(tmp_path))
    assert nowhere.returncode == 2 and "not a run directory" in nowhere.stderr


def test_resume_before_the_first_checkpoint_starts_over(reference, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text((reference / "config.yaml").read_text().replace(str(reference), str(run)))
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo')  # killed mid-write
    proc = lorafit("train", "--resume", str(run))
    assert proc.returncode == 0, proc.stderr
    assert [r["loss"] for r in rows(run)] == [r["loss"] for r in rows(reference)]
    for name, tensor in adapter(reference).items():
        assert torch.equal(adapter(run)[name], tensor)


def test_checkpoint_files_keep_and_damage(reference, tmp_path):
    ckpt = checkpoint.latest(reference)
    assert ckpt is not None and (ckpt / "trainable.safetensors").is_file()
    (reference / "checkpoints" / ".tmp-step-00000099").mkdir()  # a save cut short by a crash
    assert checkpoint.latest(reference) == ckpt
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "trainable.safetensors").write_bytes(b"not a safetensors file")
    (broken / "state.pt").write_bytes(b"junk")
    with pytest.raises(Exception, match="cannot read checkpoint"):
        checkpoint.load(broken, torch.nn.Linear(2, 2), None, None)
