"""Cumulative energy counters: NVML's total-energy counter on GPUs, RAPL's CPU package counter on CPUs.

Both count joules since some origin; the meter reads them at the start and end of the timed window.
Where neither is readable the counter says why, and the run records null energy with that reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

RAPL = Path("/sys/class/powercap/intel-rapl:0/energy_uj")


class EnergyCounter:
    """Cumulative joules from NVML (all visible GPUs) or RAPL; `read()` is None when unavailable."""

    def __init__(self, device: torch.device) -> None:
        self.source: str | None = None
        self.reason: str | None = None
        self._handles: list[Any] = []
        if device.type == "cuda":
            self._init_nvml(device)
        elif RAPL.exists():
            try:
                int(RAPL.read_text())
                self.source = "rapl"
            except (OSError, ValueError) as e:
                self.reason = f"RAPL counter {RAPL} not readable: {e}"
        else:
            self.reason = "CPU run and no RAPL energy counter (/sys/class/powercap) on this machine"

    def _init_nvml(self, device: torch.device) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            self._handles = [handle]
            self.source = "nvml_total_energy"
        except ImportError:
            self.reason = "nvidia-ml-py not installed (pip install lorafit[gpu])"
        except Exception as e:  # NVML raises its own error types per driver
            self.reason = f"NVML energy counter unavailable: {e}"

    def read(self) -> float | None:
        if self.source == "nvml_total_energy":
            import pynvml

            return sum(pynvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles) / 1000.0
        if self.source == "rapl":
            return int(RAPL.read_text()) / 1e6
        return None
