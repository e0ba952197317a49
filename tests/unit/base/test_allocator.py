"""The allocator lorafit runs on: mimalloc from the install, with the settings that make its memory
lean and its first steps predictable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lorafit.base.allocator import SETTINGS, find_mimalloc


def _status_under_mimalloc() -> str:
    library = find_mimalloc()
    if library is None:
        pytest.skip("cmeel-mimalloc is not installed")
    env = {"LD_PRELOAD": library, **SETTINGS["mimalloc"]}
    code = "import torch; x = torch.ones(2**26); print(open('/proc/self/status').read())"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return proc.stdout


@pytest.mark.skipif(
    "THP_enabled" not in (Path("/proc/self/status").read_text() if Path("/proc/self/status").exists() else ""),
    reason="the kernel does not report THP_enabled",
)
def test_mimalloc_runs_without_transparent_huge_pages():
    # with them, a freshly touched GiB of activations waited 0.3-1.2 s on the kernel's compaction (4 KiB pages:
    # 0.2 s), a tenth of an 8-step LoRA run's time, and changed from run to run
    status = dict(line.split(":\t", 1) for line in _status_under_mimalloc().splitlines() if ":\t" in line)
    assert status["THP_enabled"].strip() == "0"
