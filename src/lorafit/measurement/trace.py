"""A PyTorch profiler trace of a few micro-steps (--profile-trace), written as Chrome trace JSON.

Traced steps run slower under the profiler, so the meter leaves them out of its timings.
"""

from __future__ import annotations

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
