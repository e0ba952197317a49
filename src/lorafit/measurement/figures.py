"""The typed figures a measurement produces: timing, energy, peak memory and its parts, FLOPs, one rank's share.

They are parts of the run record (`lorafit.run.summary.Summary`) and keep summary.json's key names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lorafit.base.jsonable import optional_key


@dataclass
class StepTime:
    """Seconds per micro-step over the timed steps."""

    mean: float
    p50: float


@dataclass
class Timing:
    """Throughput over the timed micro-steps (after warm-up and traced steps) and over all steps."""

    timed_steps: int | None = None
    warmup_steps: int | None = None
    traced_steps: int | None = None
    trace: str | None = None  # the profiler trace file, when --profile-trace recorded one
    tokens: int | None = None  # real (non-padding) tokens in the timed steps, all processes
    loss_tokens: int | None = None
    timed_s: float | None = None
    tokens_per_s: float | None = None
    step_time_s: StepTime | None = None
    train_s: float | None = None  # every step, warm-up included
    train_tokens_per_s: float | None = None


@dataclass
class Energy:
    """Joules over the timed window: NVML on GPUs, RAPL on CPUs; otherwise null with the reason."""

    energy_j: float | None = None
    j_per_token: float | None = None
    avg_power_w: float | None = None
    energy_unavailable_reason: str | None = optional_key()
    energy_source: str | None = optional_key()
    energy_counters: int | None = optional_key()  # several processes: counters summed (a host's RAPL once)


@dataclass
class PeakMemory:
    """The peak of the training window: allocated bytes on a GPU, RSS on a CPU."""

    kind: str  # cuda | cpu_rss
    max_allocated_bytes: int | None = optional_key()
    max_reserved_bytes: int | None = optional_key()
    peak_bytes: int = 0  # several processes: the largest rank's
    window: str | None = optional_key()
    process_peak_bytes: int | None = optional_key()
    rank0_peak_bytes: int | None = optional_key()
    per_rank_peak_bytes: list[int] | None = optional_key()


@dataclass
class MemoryBreakdown:
    """Parts of the peak (see `training.summarize.memory_breakdown`); they add up to it."""

    runtime: int = 0
    weights: int = 0
    trainable: int = 0
    grads: int = 0
    optimizer_state: int = 0
    activations_workspace: int = 0

    def items(self) -> list[tuple[str, int]]:
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]


@dataclass
class Memory:
    peak_memory: PeakMemory | None = None
    memory_breakdown: MemoryBreakdown | None = None


@dataclass
class Flops:
    """Analytic FLOPs of the timed steps over a peak FLOP/s (measurement.flops)."""

    flops_per_token: float | None = None
    model_flops: float | None = None
    achieved_flops_per_s: float | None = None
    peak_flops_per_s: float | None = None
    peak_flops_source: str | None = None
    mfu: float | None = None
    hfu: float | None = None


@dataclass
class RankFigures:
    """One process's own figures in a multi-process run (`measurement.meter.rank_measurements`)."""

    rank: int
    host: str
    device: str
    tokens: int
    loss_tokens: int
    timed_s: float
    tokens_per_s: float | None
    train_s: float
    energy_j: float | None
    energy_source: str | None
    energy_unavailable_reason: str | None
    avg_power_w: float | None
    peak_flops_per_s: float
    train_tokens: int
    peak_bytes: int
