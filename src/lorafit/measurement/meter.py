"""Measurement of a training run: step time, real tokens, peak memory, energy.

The `Meter` has one interface whatever the machine offers, so the training loop never branches
on it: timers skip warm-up steps and synchronize the device; energy comes from NVML's total-energy
counter on GPUs, RAPL on CPUs where readable, and is otherwise null with the reason.
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

RAPL = Path("/sys/class/powercap/intel-rapl:0/energy_uj")


# ---------------------------------------------------------------- host memory


def _status_kib(key: str) -> int | None:
    try:
        m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """High-water RSS (since the last reset) of this process."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark (Linux >= 4.0) so the peak covers training, not loading."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- energy


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


# ---------------------------------------------------------------- profiler trace


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


# ---------------------------------------------------------------- the meter


@dataclass
class StepRecord:
    step: int
    seconds: float
    tokens: int
    loss_tokens: int
    timed: bool
    memory_bytes: int


@dataclass
class Meter:
    """Times micro-steps, counts real tokens, tracks peak memory and energy over the timed window."""

    device: torch.device
    warmup_steps: int = 1
    tracer: Tracer | None = None
    steps: list[StepRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.energy = EnergyCounter(self.device)
        self._energy_start: float | None = None
        self._energy_end: float | None = None
        self._window_start: float | None = None
        self._window_end: float | None = None
        self._t0 = 0.0
        self.peak_reset = False
        self.process_peak_before_bytes = peak_rss_bytes() if self.device.type == "cpu" else 0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        """Call once after the model is loaded: the peak-memory window opens here."""
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.process_peak_before_bytes = peak_rss_bytes()
            self.peak_reset = reset_peak_rss()
        self.start_bytes = rss_bytes() if self.device.type == "cpu" else torch.cuda.memory_allocated(self.device)

    @property
    def timing(self) -> bool:
        """Whether the micro-step begun last counts in the timings (known before it ends)."""
        return len(self.steps) >= self.untimed_steps

    @property
    def untimed_steps(self) -> int:
        """Warm-up steps, then traced steps (the profiler slows them): neither counts in the timings."""
        return self.warmup_steps + (self.tracer.steps if self.tracer else 0)

    def begin_step(self) -> None:
        self.sync()
        if self.tracer and len(self.steps) >= self.warmup_steps and len(self.steps) < self.untimed_steps:
            self.tracer.begin()
        self._t0 = time.perf_counter()
        if len(self.steps) == self.untimed_steps:
            self._window_start = self._t0
            self._energy_start = self.energy.read()

    def end_step(self, tokens: int, loss_tokens: int) -> StepRecord:
        self.sync()
        now = time.perf_counter()
        if self.tracer and self.tracer.active:
            self.tracer.end()
        timed = self.timing
        if timed:
            self._window_end = now
            self._energy_end = self.energy.read()
        record = StepRecord(len(self.steps) + 1, now - self._t0, tokens, loss_tokens, timed, self.current_memory())
        self.steps.append(record)
        return record

    def current_memory(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return peak_rss_bytes()

    def peak_memory(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            return {
                "kind": "cuda",
                "max_allocated_bytes": torch.cuda.max_memory_allocated(self.device),
                "max_reserved_bytes": torch.cuda.max_memory_reserved(self.device),
                "peak_bytes": torch.cuda.max_memory_allocated(self.device),
            }
        peak = peak_rss_bytes()
        return {
            "kind": "cpu_rss",
            "peak_bytes": peak,
            "window": "training (high-water mark reset after loading)" if self.peak_reset else "whole process",
            "process_peak_bytes": max(peak, self.process_peak_before_bytes),
        }

    def summary(self) -> dict[str, Any]:
        """Throughput, step time and energy over the timed (post-warm-up) steps."""
        if self.tracer:
            self.tracer.close()
        timed = [s for s in self.steps if s.timed]
        if not timed:  # too few steps to skip warm-up: time them all and say so
            timed = self.steps
        tokens = sum(s.tokens for s in timed)
        seconds = sum(s.seconds for s in timed)
        times = [s.seconds for s in timed]
        out: dict[str, Any] = {
            "timed_steps": len(timed),
            "warmup_steps": len(self.steps) - len(timed),
            "traced_steps": self.tracer.recorded if self.tracer else 0,
            "trace": str(self.tracer.path) if self.tracer and self.tracer.path.exists() else None,
            "tokens": tokens,
            "loss_tokens": sum(s.loss_tokens for s in timed),
            "timed_s": seconds,
            "tokens_per_s": tokens / seconds if seconds > 0 else None,
            "step_time_s": {"mean": statistics.fmean(times), "p50": statistics.median(times)} if times else None,
        }
        out.update(self._energy(tokens))
        return out

    def _energy(self, tokens: int) -> dict[str, Any]:
        none = {"energy_j": None, "j_per_token": None, "avg_power_w": None}
        if self.energy.source is None:
            return {**none, "energy_unavailable_reason": self.energy.reason}
        if self._energy_start is None or self._energy_end is None or self._window_start is None:
            return {**none, "energy_unavailable_reason": "no timed steps"}
        window = (self._window_end or 0.0) - self._window_start
        if window < 1.0:
            return {
                **none,
                "energy_unavailable_reason": f"timed window {window:.2f} s is shorter than the "
                "counter's ~1 s resolution",
            }
        joules = self._energy_end - self._energy_start
        return {
            "energy_j": joules,
            "j_per_token": joules / tokens if tokens else None,
            "avg_power_w": joules / window,
            "energy_source": self.energy.source,
        }


# ---------------------------------------------------------------- many processes


RANK_FIGURES = (
    "tokens", "loss_tokens", "timed_s", "tokens_per_s", "train_s", "energy_j", "energy_source",
    "energy_unavailable_reason", "avg_power_w", "peak_flops_per_s",
)  # fmt: skip


def rank_measurements(meter: Meter, timing: dict[str, Any], peak_bytes: int) -> dict[str, Any]:
    """What one rank contributes to a multi-process run's summary (see `combine_ranks`): its own
    figures from `timing` (`Meter.summary()` plus train_s and peak_flops_per_s) and its peak."""
    import socket

    return {
        "host": socket.gethostname(),
        "device": str(meter.device),
        **{key: timing.get(key) for key in RANK_FIGURES},
        "train_tokens": sum(s.tokens for s in meter.steps),
        "peak_bytes": peak_bytes,
    }


def _energy_meter_key(r: dict[str, Any]) -> tuple[str, ...]:
    """One energy counter: a GPU (NVML, per device), or a host's CPU package (RAPL, shared by all the
    host's processes, so counted once)."""
    if r["energy_source"] == "rapl":
        return (r["host"], "rapl")
    return (r["host"], str(r["energy_source"]), r["device"])


def combine_ranks(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Global figures of a multi-process run from every rank's `rank_measurements`.

    Ranks run in lockstep (gradients are reduced every step), so the run takes as long as its slowest
    rank: tokens and energy add up over ranks, time is the slowest rank's. Energy counts each counter
    once (all processes of a host read the same RAPL package counter). The peak FLOP/s of MFU is the
    sum of the ranks' peaks (each measured or looked up for its own device and threads)."""
    timed_s = max(r["timed_s"] for r in per_rank)
    train_s = max(r["train_s"] for r in per_rank)
    tokens = sum(r["tokens"] for r in per_rank)
    out: dict[str, Any] = {
        "tokens": tokens,
        "loss_tokens": sum(r["loss_tokens"] for r in per_rank),
        "timed_s": timed_s,
        "tokens_per_s": tokens / timed_s if timed_s > 0 else None,
        "train_s": train_s,
        "train_tokens_per_s": sum(r["train_tokens"] for r in per_rank) / train_s if train_s else None,
        "peak_flops_per_s": sum(r["peak_flops_per_s"] for r in per_rank),
    }
    missing = [r for r in per_rank if r["energy_j"] is None]
    if missing:
        reason = missing[0]["energy_unavailable_reason"]
        out.update(energy_j=None, j_per_token=None, avg_power_w=None, energy_unavailable_reason=reason)
    else:
        counters = {_energy_meter_key(r): r for r in per_rank}
        joules = sum(r["energy_j"] for r in counters.values())
        out.update(
            energy_j=joules,
            j_per_token=joules / tokens if tokens else None,
            avg_power_w=sum(r["avg_power_w"] for r in counters.values()),
            energy_source=per_rank[0]["energy_source"],
            energy_counters=len(counters),
        )
    return out
