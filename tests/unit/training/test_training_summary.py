"""A short training in process: `fit` returns the typed run record and writes it as summary.json with
the keys, in the order, of schema v2 (v1's keys in their places, and the new ones)."""

from __future__ import annotations

import json

from lorafit.run.rundir import RunDir
from lorafit.run.summary import Summary
from lorafit.training.distributed import Ranks
from lorafit.training.loop import LoopState, StepSums, StepTotals, fit
from lorafit.training.setup import setup

SUMMARY_KEYS = [
    "schema_version", "status", "run_dir", "model", "method", "precision", "optimizer", "optimizer_paged", "steps",
    "processes", "global_batch_size", "timed_steps", "warmup_steps", "traced_steps", "trace", "tokens",
    "loss_tokens", "timed_s", "tokens_per_s", "step_time_s", "micro_step_time_s", "energy_j", "j_per_token",
    "avg_power_w", "energy_unavailable_reason", "train_s", "train_tokens_per_s", "peak_memory", "memory_breakdown",
    "flops_per_token", "flops_per_step", "total_model_flops", "total_tokens", "model_flops",
    "achieved_flops_per_s", "peak_flops_per_s", "peak_flops_source", "mfu", "hfu", "trainable_params",
    "total_params", "trainable_pct", "loss_first", "loss_last", "loss_mean", "loss_token_mean", "loss_path", "data",
    "saved", "wall_s", "device", "distributed", "allocator", "versions", "resumed_from_step",
    "nonfinite_skipped_steps",
]  # fmt: skip


def test_fit_returns_the_typed_summary_it_writes(tiny_cfg):
    cfg = tiny_cfg(method="lora", max_samples=8, batch_size=2, max_steps=3)
    run = RunDir.create(cfg.out, cfg.method)
    summary = fit(setup(cfg), run)
    assert isinstance(summary, Summary) and summary.ok and summary.steps == 3
    written = json.loads(run.summary_file.read_text())
    assert list(written) == SUMMARY_KEYS
    assert list(written["peak_memory"]) == ["kind", "peak_bytes", "window", "process_peak_bytes"]
    assert list(written["distributed"]) == ["num_processes", "kind", "backend", "launcher"]
    assert list(written["memory_breakdown"]) == [
        "runtime", "weights", "trainable", "grads", "optimizer_state", "activations_workspace",
    ]  # fmt: skip
    assert written == summary.to_dict()
    assert sum(size for _, size in summary.memory.memory_breakdown.items()) == summary.peak_bytes
    assert summary.params.trainable_params > 0 and summary.saved == str(run.weights_dir("lora"))


def test_one_process_agrees_with_itself():
    sums = StepSums(loss=2.5, tokens=10, loss_tokens=4, model_flops=1e6, hw_flops=2e6, all_flops=3e6, nonfinite=False)
    totals = StepTotals.agree(Ranks(), None, sums, stop=True)
    assert (totals.loss, totals.tokens, totals.loss_tokens) == (2.5, 10, 4)
    assert (totals.model_flops, totals.hw_flops, totals.all_flops) == (1e6, 2e6, 3e6)
    assert not totals.nonfinite and totals.stop
    assert LoopState().step == 0


def test_the_run_header_suggests_bf16_for_an_auto_run_on_a_cpu_with_bf16_units(monkeypatch):
    from types import SimpleNamespace

    import torch

    from lorafit.base.config import TrainConfig
    from lorafit.training.loop import run_info

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)

    def header(precision: str) -> dict:
        cfg = TrainConfig(model="random:tiny", precision=precision)
        ranks = SimpleNamespace(world=1)
        run = SimpleNamespace(cfg=cfg, stats=SimpleNamespace(samples=3), device=torch.device("cpu"),
                              precision="fp32", ranks=ranks, memory_plan=None)  # fmt: skip
        return run_info(run)

    assert "AVX512-BF16" in header("auto")["hint"]
    assert "hint" not in header("fp32")
