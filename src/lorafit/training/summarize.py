"""The run record of a finished training: one typed `Summary` from the meter, the losses and the set-up.

With several processes the timings, tokens, memory, energy and peak FLOP/s are the whole run's
(`meter.combine_ranks`) and each rank's own figures are listed under `distributed.per_rank`. Every
rank builds the summary (it gathers every rank's figures); rank 0 alone writes it.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from dataclasses import dataclass
from typing import Any

import torch

from lorafit.adapters import methods as adapters
from lorafit.base import matmul
from lorafit.base.allocator import active_allocator
from lorafit.base.device import DTYPES
from lorafit.base.units import parse_bytes
from lorafit.measurement import flops
from lorafit.measurement.figures import Flops, Memory, MemoryBreakdown, PeakMemory
from lorafit.measurement.meter import Meter, RunFigures, combine_ranks, rank_measurements
from lorafit.run.summary import DeviceInfo, Environment, Losses, Parameters, Summary
from lorafit.training.setup import Setup


@dataclass
class Trained:
    """What the loop hands over for the summary once its last step is done."""

    setup: Setup
    optimizer: Any
    meter: Meter
    losses: list[tuple[float, int]]  # (loss, loss tokens) per optimizer step that updated the weights
    model_flops: float  # analytic FLOPs of the steps this process timed, all ranks
    hw_flops: float  # the same with activation recomputation (gradient checkpointing)
    process_flops: tuple[float, float]  # (model, hw) FLOPs of every step this process ran, all ranks
    total_flops: float | None  # every step of the run, all ranks, across resumes (None: not known)
    total_tokens: int | None  # their real tokens
    steps_taken: int  # optimizer steps of the run, skipped ones included
    grad_bytes: int  # the gradients' bytes at the last update (their .grad tensors)
    fused_loss: bool
    saved: str  # the adapter/ or model/ directory ("" on ranks other than 0)
    resumed_from_step: int  # 0: not resumed
    nonfinite_skipped_steps: list[int]


def summarize(trained: Trained, started_at: float) -> Summary:
    """The run's summary; `started_at` is the perf_counter() time the run started."""
    s, meter = trained.setup, trained.meter
    cfg, device, ranks = s.cfg, s.device, s.ranks
    timing, energy = meter.summary()
    peak, peak_source = flops.peak_flops(device, DTYPES[s.precision])
    peak_memory = meter.peak_memory()
    processes = ranks.processes()
    figures = RunFigures(timing, energy, peak)
    if ranks.world > 1:
        mine = rank_measurements(meter, ranks.rank, timing, energy, peak_memory.peak_bytes, peak)
        per_rank = ranks.gather_objects(mine)
        figures = combine_ranks(per_rank, timing)
        peak_memory = dataclasses.replace(
            peak_memory,
            rank0_peak_bytes=peak_memory.peak_bytes,
            peak_bytes=max(r.peak_bytes for r in per_rank),  # the rank that must fit
            per_rank_peak_bytes=[r.peak_bytes for r in per_rank],
        )
        processes = ranks.processes(per_rank)
        peak_source = f"sum over {ranks.world} processes of: {peak_source}"
    trainable, total = adapters.count_params(s.peft_model)
    paged = cfg.optimizer.startswith("paged") and device.type == "cuda"  # bitsandbytes pages only on CUDA
    # of rank 0's peak (every rank holds the same model and state under DDP)
    breakdown = memory_breakdown(
        s.peft_model, trained.optimizer, peak_memory, meter.start_bytes if device.type == "cpu" else None,
        trained.grad_bytes, paged,
    )  # fmt: skip
    if cfg.memory_budget is not None:
        budget = parse_bytes(cfg.memory_budget, "memory_budget")
        peak_memory = dataclasses.replace(peak_memory, budget_bytes=budget, budget_outside_bytes=s.budget_outside_bytes)
    return Summary(
        status="ok",
        run_dir=cfg.out,
        model=cfg.model,
        method=cfg.method,
        precision=s.precision,
        optimizer=cfg.optimizer,
        optimizer_paged=paged,
        steps=len(trained.losses),
        processes=ranks.world,
        global_batch_size=cfg.batch_size * cfg.grad_accum * ranks.world,
        timing=figures.timing,
        energy=figures.energy,
        memory=Memory(peak_memory, breakdown),
        flops=flop_figures(trained, figures, peak_source),
        params=Parameters(trainable, total, 100.0 * trainable / total),
        losses=loss_figures(trained.losses, trained.fused_loss),
        data=s.stats,
        saved=trained.saved,
        wall_s=time.perf_counter() - started_at,
        environment=Environment(describe_device(device), processes, active_allocator(), versions()),
        resumed_from_step=trained.resumed_from_step or None,  # timings cover the steps this process ran
        nonfinite_skipped_steps=trained.nonfinite_skipped_steps,
        memory_plan=s.memory_plan,
    )


def flop_figures(trained: Trained, figures: RunFigures, peak_source: str) -> Flops:
    """FLOPs per token and per optimizer step over the whole run; over the timed window, achieved FLOP/s
    against the peak: MFU = model FLOPs / timed s / peak, HFU the same counting recomputation
    (PaLM, Chowdhery et al. 2022, appendix B)."""
    timed_s, tokens, peak = figures.timing.timed_s, figures.timing.tokens, figures.peak_flops_per_s
    model_flops, hw_flops = trained.model_flops, trained.hw_flops
    if not figures.timing.warmup_steps:  # every step timed (also a run too short to leave out warm-up)
        model_flops, hw_flops = trained.process_flops
    achieved = model_flops / timed_s if timed_s else None
    total, total_tokens = trained.total_flops, trained.total_tokens
    if total is None or not total_tokens:  # resumed from a checkpoint without totals: the timed window's
        per_token = model_flops / tokens if tokens else None
    else:
        per_token = total / total_tokens
    return Flops(
        flops_per_token=per_token,
        flops_per_step=total / trained.steps_taken if total is not None and trained.steps_taken else None,
        total_model_flops=total,
        total_tokens=total_tokens,
        model_flops=model_flops,
        achieved_flops_per_s=achieved,
        peak_flops_per_s=peak,
        peak_flops_source=peak_source,
        mfu=achieved / peak if achieved else None,
        hfu=hw_flops / timed_s / peak if timed_s else None,
    )


def loss_figures(losses: list[tuple[float, int]], fused_loss: bool) -> Losses:
    step_losses = [loss for loss, _ in losses]
    return Losses(
        loss_first=step_losses[0],
        loss_last=step_losses[-1],
        loss_mean=sum(step_losses) / len(step_losses),
        # weighted by loss tokens: independent of how samples were grouped into batches
        loss_token_mean=sum(lv * n for lv, n in losses) / max(sum(n for _, n in losses), 1),
        loss_path="fused_chunked" if fused_loss else "full_logits",
    )


def memory_breakdown(
    peft_model: Any, optimizer: Any, peak: PeakMemory, resident_at_start: int | None, grad_bytes: int, paged: bool
) -> MemoryBreakdown:
    """Parts of the peak, each measured: weights as stored, trainable params, their gradients (the
    `.grad` tensors of the last step, `grad_bytes`), optimizer state (its tensors), the runtime, and
    activations+workspace = peak - the rest.

    The runtime is what the process held besides the model when training started: on CPU the RSS at the
    start less the weights (interpreter, libraries, tokenizer, data), on a GPU the memory outside PyTorch's
    allocator (CUDA context, library workspaces). Paged optimizer state lives in CUDA managed memory, not
    in the peak: it is reported apart (`paged_optimizer_state`) and not subtracted."""
    trainable = sum(p.numel() * p.element_size() for p in peft_model.parameters() if p.requires_grad)
    weights = adapters.stored_weight_bytes(peft_model) - trainable
    if peak.kind == "cuda":
        runtime = peak.outside_allocator_bytes or 0
    else:
        # Weights mapped from a safetensors file become resident when first touched, so RSS at the start
        # can be below their size; the part not yet resident then lands in activations_workspace.
        runtime = 0 if resident_at_start is None else max(0, resident_at_start - weights - trainable)
    state = optimizer_state_bytes(optimizer)
    parts = MemoryBreakdown(runtime, weights, trainable, grad_bytes, 0 if paged else state)
    if paged:
        parts.paged_optimizer_state = state
    peak_bytes = peak.peak_bytes if peak.rank0_peak_bytes is None else peak.rank0_peak_bytes
    parts.activations_workspace = peak_bytes - sum(size for _, size in parts.items())
    return parts


def optimizer_state_bytes(optimizer: Any) -> int:
    return sum(
        t.numel() * t.element_size()
        for st in optimizer.state.values()
        for t in st.values()
        if isinstance(t, torch.Tensor)
    )


def gradient_bytes(params: Any) -> int:
    """Bytes of the gradients the parameters hold now (read before the optimizer clears them)."""
    return sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)


def describe_device(device: torch.device) -> DeviceInfo:
    if device.type == "cuda":
        return DeviceInfo("cuda", torch.cuda.get_device_name(device), count=torch.cuda.device_count())
    name = platform.processor() or platform.machine()
    return DeviceInfo("cpu", name, threads=torch.get_num_threads(), cores=os.cpu_count(), matmul=matmul.cpu_backend())


def versions() -> dict[str, str]:
    """Versions of Python and the libraries that decide a run's numbers, for its record."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("lorafit", "torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out
