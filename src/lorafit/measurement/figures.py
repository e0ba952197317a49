"""The typed figures a measurement produces: timing, energy, peak memory and its parts, FLOPs, one rank's share.

They are parts of the run record (`lorafit.run.summary.Summary`) and keep summary.json's key names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lorafit.base.jsonable import optional_key


@dataclass
class StepTime:
    """Seconds per step (an optimizer step, or a micro-step where named so) over the timed steps."""

    mean: float
    p50: float


@dataclass
class Timing:
    """Throughput over the timed micro-steps (after warm-up and traced steps) and over all steps.

    A step is an optimizer step, as the studies and every trainer count it: `step_time_s` is the time of
    one whole optimizer step (its `grad_accum` micro-steps and the update), over the optimizer steps
    whose micro-steps were all timed; `micro_step_time_s` is one micro-batch's forward and backward."""

    timed_steps: int | None = None
    warmup_steps: int | None = None
    traced_steps: int | None = None
    trace: str | None = None  # the profiler trace file, when --profile-trace recorded one
    tokens: int | None = None  # real (non-padding) tokens in the timed steps, all processes
    loss_tokens: int | None = None
    timed_s: float | None = None
    tokens_per_s: float | None = None
    step_time_s: StepTime | None = None  # per optimizer step
    micro_step_time_s: StepTime | None = optional_key()
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
    """The peak of the training window, the figure that must fit: on a GPU the device-level peak of this
    process (NVML, or the allocator's reserved peak plus the memory outside it), on a CPU the RSS.

    On a GPU the allocator's allocated and reserved peaks are kept beside it; `outside_allocator_bytes`
    is what the process holds outside PyTorch's allocator (CUDA context, library workspaces, managed
    memory), and `device_peak_source` says how the device-level peak was measured."""

    kind: str  # cuda | cpu_rss
    max_allocated_bytes: int | None = optional_key()
    max_reserved_bytes: int | None = optional_key()
    peak_bytes: int = 0  # several processes: the largest rank's
    device_peak_source: str | None = optional_key()
    outside_allocator_bytes: int | None = optional_key()
    budget_bytes: int | None = optional_key()  # --memory-budget
    # GPU: what the process held outside PyTorch's allocator when the cap was set; the allocator got the rest
    budget_outside_bytes: int | None = optional_key()
    window: str | None = optional_key()
    process_peak_bytes: int | None = optional_key()
    rank0_peak_bytes: int | None = optional_key()
    per_rank_peak_bytes: list[int] | None = optional_key()


@dataclass
class MemoryBreakdown:
    """Parts of the peak (see `training.summarize.memory_breakdown`); they add up to it. Paged optimizer
    state (bitsandbytes, CUDA managed memory) is not in the peak: it is kept apart, outside the sum."""

    runtime: int = 0
    weights: int = 0
    trainable: int = 0
    grads: int = 0
    optimizer_state: int = 0
    activations_workspace: int = 0
    paged_optimizer_state: int | None = optional_key()

    def items(self) -> list[tuple[str, int]]:
        """The parts that add up to the peak."""
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "paged_optimizer_state"]


@dataclass
class Memory:
    peak_memory: PeakMemory | None = None
    memory_breakdown: MemoryBreakdown | None = None


@dataclass
class Flops:
    """Analytic FLOPs (measurement.flops) over a peak FLOP/s.

    `flops_per_token` and `flops_per_step` cover every step of the run, all processes, across resumes
    (`total_model_flops` over `total_tokens` real tokens, or over the optimizer steps taken), so a
    resumed run reports what the uninterrupted one does. `model_flops` covers the timed steps only: it
    is what `achieved_flops_per_s`, MFU and HFU divide by the timed seconds."""

    flops_per_token: float | None = None
    flops_per_step: float | None = optional_key()
    total_model_flops: float | None = optional_key()
    total_tokens: int | None = optional_key()
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
