"""The meter's typed figures on CPU: warm-up left out of the timings, energy null with a reason,
peak memory as RSS, and one rank's figures combined into the run's."""

from __future__ import annotations

import time

import pytest
import torch

from lorafit.measurement.figures import Energy, PeakMemory, Timing
from lorafit.measurement.meter import Meter, combine_ranks, rank_measurements


def metered(steps: int, warmup: int = 1) -> Meter:
    meter = Meter(torch.device("cpu"), warmup_steps=warmup)
    meter.start()
    for i in range(steps):
        meter.begin_step()
        time.sleep(0.001)
        meter.end_step(tokens=10 + i, loss_tokens=5, optimizer_step=i + 1)
    return meter


def test_summary_times_the_steps_after_warmup_and_counts_all_for_train_s():
    meter = metered(4, warmup=1)
    timing, energy = meter.summary()
    assert isinstance(timing, Timing) and isinstance(energy, Energy)
    assert (timing.timed_steps, timing.warmup_steps, timing.traced_steps) == (3, 1, 0)
    assert timing.tokens == 11 + 12 + 13 and timing.loss_tokens == 15
    assert timing.tokens_per_s == pytest.approx(timing.tokens / timing.timed_s)
    assert timing.train_s == pytest.approx(sum(s.seconds for s in meter.steps))
    assert timing.train_tokens_per_s == pytest.approx(46 / timing.train_s)
    assert timing.step_time_s is not None and timing.step_time_s.p50 > 0
    assert energy.energy_j is None and energy.energy_unavailable_reason  # null with the reason, never a guess


def test_too_few_steps_to_skip_warmup_are_all_timed():
    timing, _ = metered(1, warmup=2).summary()
    assert timing.timed_steps == 1 and timing.warmup_steps == 0


def test_cpu_peak_memory_is_rss_of_the_training_window():
    peak = metered(2).peak_memory()
    assert isinstance(peak, PeakMemory) and peak.kind == "cpu_rss"
    assert peak.peak_bytes > 0 and peak.process_peak_bytes >= peak.peak_bytes
    assert peak.max_allocated_bytes is None and peak.rank0_peak_bytes is None  # keys summary.json leaves out


def test_one_rank_combined_is_its_own_figures():
    meter = metered(3)
    timing, energy = meter.summary()
    mine = rank_measurements(meter, 0, timing, energy, peak_bytes=123, peak_flops_per_s=1e9)
    assert mine.rank == 0 and mine.train_tokens == 10 + 11 + 12 and mine.peak_bytes == 123
    run = combine_ranks([mine], timing)
    assert run.timing == timing and run.peak_flops_per_s == 1e9
    assert run.energy.energy_j is None and run.energy.energy_unavailable_reason == energy.energy_unavailable_reason
