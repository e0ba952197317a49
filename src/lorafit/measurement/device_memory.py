"""How much GPU memory this process holds on its device, beyond what PyTorch's allocator reports.

`torch.cuda.max_memory_allocated` counts only tensors; the device also holds the allocator's cached
blocks (`memory_reserved`), the CUDA context and library workspaces (cuBLAS, cuDNN), and memory other
libraries take directly (bitsandbytes' paged optimizer state is CUDA managed memory). What must fit on
a card is all of it. The device-level peak is

    peak = max reserved (allocator, exact) + largest memory seen outside the allocator

where "outside" = the process's device memory − the allocator's reserved bytes, sampled at the start
and after every micro-step. The process's device memory comes from NVML (per-process used memory,
`nvmlDeviceGetComputeRunningProcesses`) where readable, else from `torch.cuda.mem_get_info` (the whole
device's used memory: other processes on the same GPU are counted too, and the source says so).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

NVML_SOURCE = "nvml per-process used memory"
MEM_GET_INFO_SOURCE = "torch.cuda.mem_get_info (whole device: other processes included)"


def nvml_handle(device: torch.device) -> Any | None:
    """NVML's handle of the device this process uses, or None where NVML is not installed or not usable.
    NVML numbers GPUs physically while CUDA numbers the visible ones (CUDA_VISIBLE_DEVICES), so the
    device is the one whose process list holds this process, tried first at CUDA's index."""
    try:
        import pynvml

        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        count = pynvml.nvmlDeviceGetCount()
        for i in [index, *(i for i in range(count) if i != index)]:
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            if nvml_process_bytes(handle) is not None:
                return handle
        return None
    except Exception:  # ImportError, or NVML's own error types per driver
        return None


def nvml_process_bytes(handle: Any) -> int | None:
    """This process's used memory on the device (None where NVML does not report it, e.g. in containers
    that hide other PIDs or where usedGpuMemory is not available)."""
    import pynvml

    try:
        processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except Exception:
        return None
    for p in processes:
        if p.pid == os.getpid() and isinstance(p.usedGpuMemory, int):
            return int(p.usedGpuMemory)
    return None


def device_used_bytes(device: torch.device) -> int:
    free, total = torch.cuda.mem_get_info(device)
    return int(total - free)


@dataclass
class DeviceMemory:
    """Samples the memory a process holds outside PyTorch's allocator; see the module docstring."""

    device: torch.device
    handle: Any | None = None
    source: str = MEM_GET_INFO_SOURCE
    outside_at_start: int = 0
    outside_max: int = 0

    @classmethod
    def open(cls, device: torch.device) -> DeviceMemory:
        handle = nvml_handle(device)
        meter = cls(device, handle)
        if handle is not None:
            meter.source = NVML_SOURCE
        meter.outside_at_start = meter.outside_now()
        meter.outside_max = meter.outside_at_start
        return meter

    def process_bytes(self) -> int:
        """The process's device memory now (NVML), or the device's (mem_get_info)."""
        if self.handle is not None:
            used = nvml_process_bytes(self.handle)
            if used is not None:
                return used
        return device_used_bytes(self.device)

    def outside_now(self) -> int:
        return max(0, self.process_bytes() - torch.cuda.memory_reserved(self.device))

    def sample(self) -> None:
        self.outside_max = max(self.outside_max, self.outside_now())

    def peak_bytes(self) -> int:
        return torch.cuda.max_memory_reserved(self.device) + self.outside_max


def allocator_cap(budget: int, outside: int, total: int) -> float:
    """The fraction of the device PyTorch's allocator may reserve so that the whole process stays within
    `budget` bytes: the budget less what the process already holds outside the allocator (CUDA context,
    libraries), over the device's total (`torch.cuda.set_per_process_memory_fraction` takes a fraction)."""
    return max(0.0, min(1.0, (budget - outside) / total))
