"""The figures a run reports mean what docs/metrics.md says: a step is an optimizer step, FLOPs per
token cover the whole run (across a resume: see test_resume.py), MFU covers the steps timed, warm-up
is honoured with every schedule, and the memory parts are measured, not derived from each other."""

from __future__ import annotations

import json
import statistics

import pytest

from lorafit.training import loop as train
from tests.helpers import lorafit, metrics_rows


def test_step_time_is_the_optimizer_steps(tiny_cfg):
    """With --grad-accum 4 a step is 4 micro-batches and the update: summary.json's step time is
    metrics.jsonl's, and the micro-step time is about a quarter of it."""
    summary = train.train(tiny_cfg(max_samples=24, batch_size=2, grad_accum=4, profile_warmup_steps=0))
    rows = metrics_rows(summary.run_dir)
    assert len(rows) == 3
    per_step = [r["step_time_s"] for r in rows]
    assert summary.timing.step_time_s.p50 == statistics.median(per_step)
    assert summary.timing.step_time_s.mean == pytest.approx(statistics.fmean(per_step))
    micro = summary.timing.micro_step_time_s
    assert micro is not None and 2.5 < summary.timing.step_time_s.mean / micro.mean < 6
    assert summary.flops.flops_per_step == pytest.approx(summary.flops.total_model_flops / 3)
    assert summary.flops.total_tokens == sum(r["tokens"] for r in rows)


def test_step_time_leaves_out_warmup_micro_steps(tiny_cfg):
    """Warm-up is counted in micro-steps: an optimizer step with any untimed micro-step is left out."""
    summary = train.train(tiny_cfg(max_samples=24, batch_size=2, grad_accum=4, profile_warmup_steps=2))
    rows = metrics_rows(summary.run_dir)
    assert summary.timing.timed_steps == 10  # micro-steps
    assert summary.timing.step_time_s.p50 == statistics.median(r["step_time_s"] for r in rows[1:])


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_warmup_is_honoured_with_every_schedule(tiny_cfg, schedule):
    """Linear warm-up from 0 over the first steps, then the schedule: the lr of step k's update (metrics.jsonl,
    steps from 1) is peak·(k-1)/warm-up, as transformers' `get_*_schedule_with_warmup` give it."""
    peak = 1e-3
    cfg = tiny_cfg(max_samples=24, batch_size=4, lr_scheduler=schedule, warmup_steps=3, learning_rate=peak)
    lrs = [r["lr"] for r in metrics_rows(train.train(cfg).run_dir)]
    assert lrs[:4] == pytest.approx([0.0, peak / 3, 2 * peak / 3, peak])
    if schedule == "constant":
        assert lrs[4:] == pytest.approx([peak] * 2)
    else:
        assert lrs[3] > lrs[4] > lrs[5] > 0  # then it decays


def test_warmup_ratio_is_a_fraction_of_the_steps_rounded_up(tiny_cfg):
    """--warmup-ratio 0.3 of 6 steps: ceil(1.8) = 2 steps, as transformers' TrainingArguments rounds."""
    cfg = tiny_cfg(max_samples=24, batch_size=4, lr_scheduler="constant", warmup_ratio=0.3, learning_rate=1e-3)
    lrs = [r["lr"] for r in metrics_rows(train.train(cfg).run_dir)]
    assert lrs == pytest.approx([0.0, 5e-4, 1e-3, 1e-3, 1e-3, 1e-3])


def test_memory_parts_are_measured_and_activations_grow_with_the_batch(tmp_path):
    """In fresh processes (as users run them): gradients are the .grad tensors of the last update, optimizer
    state its tensors, and the remainder (activations and workspace) grows with the batch while every
    other part stays the same."""

    def breakdown(batch: int) -> tuple[dict, dict]:
        out = tmp_path / f"b{batch}"
        proc = lorafit(
            "train", "--model", "random:tiny", "--method", "full", "--max-samples", "16", "--packing",
            "--batch-size", str(batch), "--max-length", "512", "--max-steps", "2", "--out", str(out), "--json",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        return summary["memory_breakdown"], summary

    small, summary = breakdown(1)
    large, _ = breakdown(8)
    assert all(v >= 0 for v in small.values()), small
    assert small["grads"] == 4 * summary["trainable_params"]  # fp32 gradients of every trained weight
    # AdamW: two fp32 moments per trainable weight, plus a scalar step count per parameter tensor
    assert 0 <= small["optimizer_state"] - 2 * small["trainable"] < 1024
    for part in ("weights", "trainable", "grads", "optimizer_state"):
        assert large[part] == small[part], part
    assert large["activations_workspace"] > small["activations_workspace"]


def test_a_run_too_short_for_warmup_times_and_counts_the_same_steps(tiny_cfg):
    """With one micro-step and one warm-up step, the meter times the one step: its FLOPs count too, so
    achieved FLOP/s, MFU and HFU are figures, not 0 or null."""
    summary = train.train(tiny_cfg(max_samples=4, batch_size=4, profile_warmup_steps=1))
    fl = summary.flops
    assert summary.timing.timed_steps == 1 and summary.timing.warmup_steps == 0
    assert fl.model_flops == fl.total_model_flops > 0
    assert fl.mfu == pytest.approx(fl.model_flops / summary.timing.timed_s / fl.peak_flops_per_s)
    assert fl.hfu == pytest.approx(fl.mfu)  # no checkpointing: the hardware does the model's FLOPs
