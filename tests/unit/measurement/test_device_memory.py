"""Device-level GPU memory without a GPU: NVML and torch.cuda faked. The peak that must fit a card is the
allocator's reserved peak plus what the process holds outside it (CUDA context, libraries), not
`max_memory_allocated`; a --memory-budget leaves the allocator the budget less that outside part."""

from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch

from lorafit.base.config import TrainConfig
from lorafit.base.errors import MemoryBudgetExceeded
from lorafit.measurement import device_memory
from lorafit.measurement.device_memory import MEM_GET_INFO_SOURCE, NVML_SOURCE, DeviceMemory, allocator_cap
from lorafit.measurement.meter import Meter, StepRecord
from lorafit.training import setup
from lorafit.training.loop import check_memory_budget
from lorafit.training.setup import cap_gpu_memory

GiB = 2**30
CUDA = torch.device("cuda", 0)


class FakeGpu:
    """torch.cuda's memory calls and NVML's per-process figure, set by the test."""

    def __init__(self, monkeypatch, nvml: bool = True) -> None:
        self.reserved, self.max_reserved, self.max_allocated = 2 * GiB, 3 * GiB, int(2.5 * GiB)
        self.process = int(2.6 * GiB)  # NVML: reserved + 0.6 GiB of context and workspaces
        self.device_used = 4 * GiB  # mem_get_info: every process on the device
        self.fraction: float | None = None
        cuda = torch.cuda
        for name, fn in {
            "memory_reserved": lambda d=None: self.reserved,
            "max_memory_reserved": lambda d=None: self.max_reserved,
            "max_memory_allocated": lambda d=None: self.max_allocated,
            "memory_allocated": lambda d=None: self.max_allocated,
            "mem_get_info": lambda d=None: (80 * GiB - self.device_used, 80 * GiB),
            "reset_peak_memory_stats": lambda d=None: None,
            "synchronize": lambda d=None: None,
            "current_device": lambda: 0,
            "init": lambda: None,
            "get_device_properties": lambda d=None: types.SimpleNamespace(total_memory=80 * GiB),
            "set_per_process_memory_fraction": lambda f, d=None: setattr(self, "fraction", f),
        }.items():
            monkeypatch.setattr(cuda, name, fn)
        fake = types.ModuleType("pynvml")
        fake.nvmlInit = lambda: None
        fake.nvmlDeviceGetCount = lambda: 3
        fake.nvmlDeviceGetHandleByIndex = lambda i: i
        other = types.SimpleNamespace(pid=1, usedGpuMemory=GiB)  # another process, on every GPU
        fake.nvmlDeviceGetComputeRunningProcesses = lambda h: (
            [other]
            + ([types.SimpleNamespace(pid=device_memory.os.getpid(), usedGpuMemory=self.process)] if h == 2 else [])
        )  # this process is on NVML's GPU 2, CUDA's 0 (CUDA_VISIBLE_DEVICES=2)
        monkeypatch.setitem(sys.modules, "pynvml", fake if nvml else None)
        monkeypatch.setattr(setup, "load_cuda_libraries", lambda device: None)


def test_nvml_device_peak_is_reserved_peak_plus_memory_outside_the_allocator(monkeypatch):
    gpu = FakeGpu(monkeypatch)
    meter = DeviceMemory.open(CUDA)
    assert meter.source == NVML_SOURCE and meter.handle == 2  # found by its process, not CUDA's index
    assert meter.outside_at_start == int(0.6 * GiB)
    gpu.process = gpu.reserved + GiB  # a library took another 0.4 GiB mid-run (e.g. a cuBLAS workspace)
    meter.sample()
    gpu.process = gpu.reserved  # and gave it back: the peak keeps it
    meter.sample()
    assert meter.outside_max == GiB
    assert meter.peak_bytes() == 3 * GiB + GiB


def test_without_nvml_the_whole_device_is_counted_and_the_source_says_so(monkeypatch):
    FakeGpu(monkeypatch, nvml=False)
    meter = DeviceMemory.open(CUDA)
    assert meter.source == MEM_GET_INFO_SOURCE
    assert meter.outside_at_start == 4 * GiB - 2 * GiB  # device used - this process's reserved


def test_the_run_peak_on_a_gpu_is_device_level_not_the_allocators(monkeypatch):
    FakeGpu(monkeypatch)
    meter = Meter(CUDA, warmup_steps=0)
    meter.start()
    meter.begin_step()
    meter.end_step(tokens=10, loss_tokens=5, optimizer_step=1)
    peak = meter.peak_memory()
    assert peak.kind == "cuda" and peak.max_allocated_bytes == int(2.5 * GiB)
    assert peak.peak_bytes == 3 * GiB + int(0.6 * GiB)  # reserved peak + context, what must fit the card
    assert peak.outside_allocator_bytes == int(0.6 * GiB) and peak.device_peak_source == NVML_SOURCE
    assert meter.steps[-1].memory_bytes == peak.peak_bytes  # metrics.jsonl's memory_bytes is the same figure


def test_allocator_cap_leaves_room_for_what_is_outside_it():
    assert allocator_cap(8 * 10**9, GiB, 80 * GiB) == pytest.approx((8e9 - GiB) / (80 * GiB))
    assert allocator_cap(GiB, 2 * GiB, 80 * GiB) == 0.0  # the context alone passes the budget
    assert allocator_cap(100 * GiB, 0, 80 * GiB) == 1.0


def test_memory_budget_subtracts_the_context_and_warns_for_paged_optimizers(monkeypatch):
    gpu = FakeGpu(monkeypatch)
    cfg = TrainConfig(memory_budget="8GB", optimizer="paged_adamw")
    with pytest.warns(UserWarning, match="managed memory, outside the --memory-budget cap"):
        outside = cap_gpu_memory(cfg, CUDA)
    assert outside == int(0.6 * GiB)
    assert gpu.fraction == pytest.approx((8e9 - 0.6 * GiB) / (80 * GiB))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cap_gpu_memory(TrainConfig(memory_budget="8GB"), CUDA)  # unpaged: no warning


def test_a_gpu_run_past_its_budget_device_level_stops_as_out_of_memory():
    """The allocator's cap leaves out what grows outside it later: the device-level peak is checked too."""
    prep = types.SimpleNamespace(
        memory_budget=8 * 10**9, setup=types.SimpleNamespace(device=CUDA, cfg=TrainConfig(memory_budget="8GB"))
    )
    within = StepRecord(1, 1, 0.1, 10, 5, True, memory_bytes=8 * 10**9)
    check_memory_budget(prep, within, step=1)
    past = StepRecord(2, 2, 0.1, 10, 5, True, memory_bytes=8 * 10**9 + 1)
    with pytest.raises(
        MemoryBudgetExceeded, match=r"peak device memory 7.45 GiB passed --memory-budget 8GB \(7.45 GiB\)"
    ):
        check_memory_budget(prep, past, step=2)
