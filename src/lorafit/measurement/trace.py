"""A PyTorch profiler trace of a few micro-steps (--profile-trace), written as Chrome trace JSON.

Traced steps run slower under the profiler, so the meter leaves them out of its timings.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


class Tracer:
    """Records a PyTorch profiler trace of `steps` micro-steps into a Chrome trace JSON file."""

    def __init__(self, path: Path, device: torch.device, steps: int) -> None:
        self.path = path
        self.steps = steps
        self.recorded = 0
        self._device = device
        self._prof: Any = None

    def begin(self) -> None:
        if self._prof is None and self.recorded == 0:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU]
            if self._device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self._prof = profile(activities=activities, record_shapes=True)
            self._prof.__enter__()

    def end(self) -> None:
        if self._prof is None:
            return
        self.recorded += 1
        if self.recorded == self.steps:
            self.close()

    def close(self) -> None:
        """Stop and write the trace (also when the run had fewer steps than asked for)."""
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            self._prof.export_chrome_trace(str(self.path))
            self._prof = None

    @property
    def active(self) -> bool:
        return self._prof is not None


def peak_allocated(run: Callable[[], Any]) -> int:
    """The most CPU memory `run()` held at once beyond what it started with: the running total of the profiler's
    memory events, which see allocations inside ops too (what a function's buffers and temporaries cost)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = [e["args"] for e in json.loads(path.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    if not events:
        return 0
    start = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - start
