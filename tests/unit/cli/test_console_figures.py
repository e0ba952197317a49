"""The run summary's step and memory rows: a step is an optimizer step, and a GPU peak shows the
device-level figure with the allocator's beside it."""

from __future__ import annotations

from lorafit.cli.console import _peak_memory, _step_time
from lorafit.measurement.figures import PeakMemory, StepTime, Timing

GiB = 2**30


def test_step_time_is_per_optimizer_step_with_the_micro_step_beside_it():
    text = _step_time(Timing(step_time_s=StepTime(2.0, 1.9), micro_step_time_s=StepTime(0.5, 0.49)))
    assert text == "mean 2.000 s, p50 1.900 s per optimizer step; 0.500 s per micro-step"


def test_a_record_without_optimizer_step_times_never_shows_the_micro_step_as_a_step():
    text = _step_time(Timing(micro_step_time_s=StepTime(0.5, 0.49)))  # a version-1 record
    assert text.startswith("n/a") and "0.500 s per micro-step" in text


def test_gpu_peak_is_device_level_with_the_allocators_beside_it():
    peak = PeakMemory(kind="cuda", peak_bytes=4 * GiB, max_allocated_bytes=2 * GiB, max_reserved_bytes=3 * GiB)
    assert _peak_memory(peak) == "4.00 GiB (cuda); allocator 2.00 GiB allocated, 3.00 GiB reserved"


def test_the_progress_header_shows_the_plan_and_the_precision_hint():
    from rich.console import Console

    from lorafit.cli.console import RichProgress

    console = Console(record=True, width=300)
    progress = RichProgress(console)
    progress.start(
        2, {"samples": 4, "device": "cpu", "precision": "fp32", "plan": "no checkpointing", "hint": "try bf16"}
    )
    progress.finish()
    text = console.export_text()
    assert "memory plan: no checkpointing" in text and "hint: try bf16" in text
