"""Measurement of a training run: step time, real tokens, peak memory, energy.

The `Meter` has one interface whatever the machine offers, so the training loop never branches
on it: timers skip warm-up steps and synchronize the device; energy comes from NVML's total-energy
counter on GPUs, RAPL on CPUs where readable, and is otherwise null with the reason (`energy`);
peak memory is the process's device-level peak on a GPU (`device_memory`: the allocator's reserved
peak plus what it holds outside the allocator) and its RSS high-water mark on a CPU (`host_memory`).
With several processes, each rank's own figures (`RankFigures`) are combined into the run's by
`combine_ranks`.
"""

from __future__ import annotations

import dataclasses
import socket
import statistics
import time
from dataclasses import dataclass, field

import torch

from lorafit.measurement.device_memory import DeviceMemory
from lorafit.measurement.energy import EnergyCounter
from lorafit.measurement.figures import Energy, PeakMemory, RankFigures, StepTime, Timing
from lorafit.measurement.host_memory import peak_rss_bytes, reset_peak_rss, rss_bytes
from lorafit.measurement.trace import Tracer

# ---------------------------------------------------------------- the meter


@dataclass
class StepRecord:
    step: int  # the micro-step's number, from 1
    optimizer_step: int  # the optimizer step it belongs to
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
        self.device_memory: DeviceMemory | None = None  # CUDA: memory outside the allocator, sampled
        self.process_peak_before_bytes = peak_rss_bytes() if self.device.type == "cpu" else 0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        """Call once after the model is loaded: the peak-memory window opens here."""
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.device_memory = DeviceMemory.open(self.device)
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

    def end_step(self, tokens: int, loss_tokens: int, optimizer_step: int) -> StepRecord:
        self.sync()
        now = time.perf_counter()
        if self.tracer and self.tracer.active:
            self.tracer.end()
        timed = self.timing
        if timed:
            self._window_end = now
            self._energy_end = self.energy.read()
        if self.device_memory is not None:
            self.device_memory.sample()
        seconds, memory = now - self._t0, self.current_memory()
        record = StepRecord(len(self.steps) + 1, optimizer_step, seconds, tokens, loss_tokens, timed, memory)
        self.steps.append(record)
        return record

    def current_memory(self) -> int:
        """The peak so far of the memory that must fit: device-level on a GPU, RSS on a CPU."""
        if self.device_memory is not None:
            return self.device_memory.peak_bytes()
        return peak_rss_bytes()

    def peak_memory(self) -> PeakMemory:
        if self.device_memory is not None:
            return PeakMemory(
                kind="cuda",
                max_allocated_bytes=torch.cuda.max_memory_allocated(self.device),
                max_reserved_bytes=torch.cuda.max_memory_reserved(self.device),
                peak_bytes=self.device_memory.peak_bytes(),
                device_peak_source=self.device_memory.source,
                outside_allocator_bytes=self.device_memory.outside_max,
            )
        peak = peak_rss_bytes()
        return PeakMemory(
            kind="cpu_rss",
            peak_bytes=peak,
            window="training (high-water mark reset after loading)" if self.peak_reset else "whole process",
            process_peak_bytes=max(peak, self.process_peak_before_bytes),
        )

    @property
    def train_tokens(self) -> int:
        """Real tokens of every micro-step, warm-up included."""
        return sum(s.tokens for s in self.steps)

    def summary(self) -> tuple[Timing, Energy]:
        """Throughput and step time over the timed (post-warm-up) steps and over all steps, and the
        energy of the timed window."""
        if self.tracer:
            self.tracer.close()
        timed = [s for s in self.steps if s.timed]
        if not timed:  # too few steps to skip warm-up: time them all and say so
            timed = self.steps
        tokens = sum(s.tokens for s in timed)
        seconds = sum(s.seconds for s in timed)
        train_s = sum(s.seconds for s in self.steps)
        timing = Timing(
            timed_steps=len(timed),
            warmup_steps=len(self.steps) - len(timed),
            traced_steps=self.tracer.recorded if self.tracer else 0,
            trace=str(self.tracer.path) if self.tracer and self.tracer.path.exists() else None,
            tokens=tokens,
            loss_tokens=sum(s.loss_tokens for s in timed),
            timed_s=seconds,
            tokens_per_s=tokens / seconds if seconds > 0 else None,
            step_time_s=step_time(optimizer_step_seconds(self.steps, timed)),
            micro_step_time_s=step_time([s.seconds for s in timed]),
            train_s=train_s,
            train_tokens_per_s=self.train_tokens / train_s if train_s else None,
        )
        return timing, self._energy(tokens)

    def _energy(self, tokens: int) -> Energy:
        if self.energy.source is None:
            return Energy(energy_unavailable_reason=self.energy.reason)
        if self._energy_start is None or self._energy_end is None or self._window_start is None:
            return Energy(energy_unavailable_reason="no timed steps")
        window = (self._window_end or 0.0) - self._window_start
        if window < 1.0:
            reason = f"timed window {window:.2f} s is shorter than the counter's ~1 s resolution"
            return Energy(energy_unavailable_reason=reason)
        joules = self._energy_end - self._energy_start
        return Energy(
            energy_j=joules,
            j_per_token=joules / tokens if tokens else None,
            avg_power_w=joules / window,
            energy_source=self.energy.source,
        )


def optimizer_step_seconds(records: list[StepRecord], timed: list[StepRecord]) -> list[float]:
    """Seconds of each optimizer step whose micro-steps are all among the `timed` ones: a step is its
    micro-steps and the update (timed inside its last micro-step), summed in order as metrics.jsonl's
    `step_time_s` is."""
    timed_micro = {r.step for r in timed}
    by_step: dict[int, list[StepRecord]] = {}
    for record in records:
        by_step.setdefault(record.optimizer_step, []).append(record)
    return [sum(r.seconds for r in micro) for micro in by_step.values() if all(r.step in timed_micro for r in micro)]


def step_time(seconds: list[float]) -> StepTime | None:
    return StepTime(statistics.fmean(seconds), statistics.median(seconds)) if seconds else None


# ---------------------------------------------------------------- many processes


def rank_measurements(
    meter: Meter, rank: int, timing: Timing, energy: Energy, peak_bytes: int, peak_flops_per_s: float
) -> RankFigures:
    """What one rank contributes to a multi-process run's summary (see `combine_ranks`): its own
    figures from `Meter.summary()`, its peak memory and the peak FLOP/s of its device."""
    return RankFigures(
        rank=rank,
        host=socket.gethostname(),
        device=str(meter.device),
        tokens=timing.tokens or 0,
        loss_tokens=timing.loss_tokens or 0,
        timed_s=timing.timed_s or 0.0,
        tokens_per_s=timing.tokens_per_s,
        train_s=timing.train_s or 0.0,
        energy_j=energy.energy_j,
        energy_source=energy.energy_source,
        energy_unavailable_reason=energy.energy_unavailable_reason,
        avg_power_w=energy.avg_power_w,
        peak_flops_per_s=peak_flops_per_s,
        train_tokens=meter.train_tokens,
        peak_bytes=peak_bytes,
    )


@dataclass
class RunFigures:
    """A multi-process run's timing, energy and peak FLOP/s, combined from every rank's."""

    timing: Timing
    energy: Energy
    peak_flops_per_s: float


def _energy_meter_key(r: RankFigures) -> tuple[str, ...]:
    """One energy counter: a GPU (NVML, per device), or a host's CPU package (RAPL, shared by all the
    host's processes, so counted once)."""
    if r.energy_source == "rapl":
        return (r.host, "rapl")
    return (r.host, str(r.energy_source), r.device)


def combine_ranks(per_rank: list[RankFigures], timing: Timing) -> RunFigures:
    """Global figures of a multi-process run from every rank's `rank_measurements`; `timing` (rank 0's)
    keeps its step counts, trace and step times.

    Ranks run in lockstep (gradients are reduced every step), so the run takes as long as its slowest
    rank: tokens and energy add up over ranks, time is the slowest rank's. Energy counts each counter
    once (all processes of a host read the same RAPL package counter). The peak FLOP/s of MFU is the
    sum of the ranks' peaks (each measured or looked up for its own device and threads)."""
    timed_s = max(r.timed_s for r in per_rank)
    train_s = max(r.train_s for r in per_rank)
    tokens = sum(r.tokens for r in per_rank)
    combined = dataclasses.replace(
        timing,
        tokens=tokens,
        loss_tokens=sum(r.loss_tokens for r in per_rank),
        timed_s=timed_s,
        tokens_per_s=tokens / timed_s if timed_s > 0 else None,
        train_s=train_s,
        train_tokens_per_s=sum(r.train_tokens for r in per_rank) / train_s if train_s else None,
    )
    peak_flops = sum(r.peak_flops_per_s for r in per_rank)
    missing = [r for r in per_rank if r.energy_j is None]
    if missing:
        # rank 0's energy_source stays as it was (summary.json has always kept it here)
        energy = Energy(
            energy_unavailable_reason=missing[0].energy_unavailable_reason, energy_source=per_rank[0].energy_source
        )
        return RunFigures(combined, energy, peak_flops)
    counters = {_energy_meter_key(r): r for r in per_rank}
    joules = sum(r.energy_j or 0.0 for r in counters.values())
    energy = Energy(
        energy_j=joules,
        j_per_token=joules / tokens if tokens else None,
        avg_power_w=sum(r.avg_power_w or 0.0 for r in counters.values()),
        energy_source=per_rank[0].energy_source,
        energy_counters=len(counters),
    )
    return RunFigures(combined, energy, peak_flops)
