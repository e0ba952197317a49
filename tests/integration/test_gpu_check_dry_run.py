"""bench/gpu_check.py without a GPU: --dry-run plans every part of the GPU check (commands and time boxes)
within the eight minutes the issue allows; and tests/gpu is skipped on a machine without CUDA, saying why."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.gpu.common import NO_CUDA

ROOT = Path(__file__).resolve().parents[2]
PARTS = ["setup", "models", "smollm2", "qwen", "reference", "budget", "serve", "tests"]


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/gpu_check.py", *args], cwd=ROOT, capture_output=True, text=True)


def test_the_plan_has_every_part_boxed_and_fits_in_eight_minutes():
    proc = gpu_check("--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert [p["name"] for p in plan["parts"]] == PARTS
    for part in plan["parts"]:
        assert part["commands"], part["name"]
        assert 0 < part["estimate_s"] < part["box_s"], part["name"]  # a box leaves room over its estimate
    assert plan["total_box_s"] == sum(p["box_s"] for p in plan["parts"])
    assert plan["total_box_s"] <= 8 * 60 and plan["within_limit"]
    shell = {p["name"]: "\n".join(c["shell"] for c in p["commands"]) for p in plan["parts"]}
    for method in ("lora", "qlora"):  # the grid at 4 x 1024
        for optimizer in ("adamw", "paged_adamw", "adamw_8bit"):
            assert f"--method {method} --optimizer {optimizer}" in shell["qwen"]
    assert shell["qwen"].count("--batch-size 4 --max-length 1024") == 6
    assert "tests/gpu/test_golden_losses.py" in shell["smollm2"]
    assert "seed_stack.py" in shell["reference"] and "--precision fp32" in shell["reference"]
    assert "--plan" in shell["budget"] and "--memory-budget 8GB" in shell["budget"]
    assert "--adapters 4" in shell["serve"] and "--baseline set-adapter" in shell["serve"]
    assert "tests/gpu" in shell["tests"]


def test_a_subset_of_parts_and_the_text_plan():
    proc = gpu_check("--dry-run", "--parts", "serve,setup", "--box-scale", "2")
    assert proc.returncode == 0, proc.stderr
    heads = re.findall(r"^\[(\w+)\] .*: box (\d+) s", proc.stdout, flags=re.M)
    plan = json.loads(gpu_check("--dry-run", "--json").stdout)
    boxes = {p["name"]: p["box_s"] for p in plan["parts"]}
    assert [(name, float(box)) for name, box in heads] == [("setup", 2 * boxes["setup"]), ("serve", 2 * boxes["serve"])]
    assert f"total: {2 * (boxes['setup'] + boxes['serve']):g} s in time boxes" in proc.stdout


def test_an_unknown_part_is_refused():
    proc = gpu_check("--dry-run", "--parts", "setup,warp-drive")
    assert proc.returncode != 0 and "unknown part(s) warp-drive" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: tests/gpu run here")
def test_gpu_tests_are_skipped_without_cuda_with_the_reason():
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/gpu", "-p", "no:cacheprovider", "-q", "-rs"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    skipped = re.search(r"\b(\d+) skipped\b", proc.stdout)
    assert skipped and int(skipped.group(1)) >= 10, proc.stdout[-2000:]
    assert not re.search(r"\b\d+ (passed|failed|errors?)\b", proc.stdout), proc.stdout[-2000:]
    assert NO_CUDA in proc.stdout


def selftest(tmp_path: Path, mode: str) -> tuple[dict, float]:
    """A real run of the check's hidden `selftest` part (three tiny commands, box 8 s x 3): its report."""
    env = {**os.environ, "LORAFIT_GPU_CHECK_SELFTEST": mode}
    argv = ["bench/gpu_check.py", "--parts", "selftest", "--box-scale", "3", "--out-dir", str(tmp_path / "out")]
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, *argv, "--work", str(tmp_path / "work")], cwd=ROOT, env=env, capture_output=True, text=True
    )
    took = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr  # not every part ok
    (report_file,) = (tmp_path / "out").glob("*-gpu-check-*.json")
    assert (tmp_path / "out" / report_file.name.replace(".json", ".md")).is_file()
    return json.loads(report_file.read_text())["parts"][0], took


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").is_dir() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def test_a_failing_and_a_hanging_command_are_recorded_and_the_hang_stopped_in_its_box(tmp_path):
    part, took = selftest(tmp_path, "1")
    assert took < 24 + 5 and part["status"] == "timeout"
    commands = part["commands"]
    assert commands["answers"]["ok"] and part["figures"] == {"answer": 42}  # what finished is kept
    assert commands["fails"]["rc"] == 1 and "ValueError: planted" in commands["fails"]["error"]
    assert commands["fails"]["error"].startswith("Traceback (most recent call last)")
    assert commands["hangs"]["timed_out"] and commands["hangs"]["rc"] is None
    assert commands["hangs"]["wall_s"] < 18  # stopped at its own limit (4 s x 3), before the part's box (24 s)
    assert not pid_alive(int((tmp_path / "work" / "selftest" / "hang.pid").read_text()))


def test_a_part_that_hangs_itself_is_stopped_at_its_box(tmp_path):
    part, took = selftest(tmp_path, "stuck")
    assert took < 24 + 5
    assert part["status"] == "timeout" and "time box" in part["error"]["message"]
    assert set(part["commands"]) == {"answers", "fails", "hangs"}  # recorded before the part hung
