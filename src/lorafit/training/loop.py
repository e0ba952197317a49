"""The training loop: one loop for full, LoRA and QLoRA, on Accelerate, measured by a `Meter`.

`train(cfg)` opens the run directory, sets up model and data (`setup`) and calls `fit`, which reads
top to bottom: each optimizer step runs this rank's micro-steps (forward and backward), all ranks
agree on the step's totals, the optimizer steps, the step is logged, and a checkpoint is written
when due or when a signal asked the run to stop. Then the adapter (or model) is saved and the
run's `Summary` is written to summary.json and returned.
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from lorafit.base import matmul
from lorafit.base.config import TrainConfig
from lorafit.base.device import DTYPES, device_type, precision_hint
from lorafit.base.errors import MemoryBudgetExceeded, UserError, is_out_of_memory
from lorafit.base.units import format_budget, format_bytes
from lorafit.inputs import data
from lorafit.measurement import flops
from lorafit.measurement import plan as planning
from lorafit.measurement.meter import Meter, StepRecord
from lorafit.measurement.trace import Tracer
from lorafit.run.rundir import MetricsLog, RunDir
from lorafit.run.summary import Summary
from lorafit.training import checkpoint, distributed, trackers
from lorafit.training.distributed import Ranks
from lorafit.training.setup import Loaded, MicroBatch, Prepared, Setup, Step, load_data, plan_steps, prepare, setup
from lorafit.training.signals import Interrupted, NonFiniteLoss, StopRequest
from lorafit.training.summarize import Trained, gradient_bytes, summarize

__all__ = ["NoProgress", "NonFiniteLoss", "Progress", "fit", "plan_steps", "setup", "train"]


class Progress(Protocol):
    """What the loop reports to a display; the CLI plugs in a rich progress bar."""

    def start(self, total_steps: int, info: dict[str, Any]) -> None: ...
    def step(self, row: dict[str, Any]) -> None: ...
    def finish(self) -> None: ...


class NoProgress:
    def start(self, total_steps: int, info: dict[str, Any]) -> None:
        pass

    def step(self, row: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


# ---------------------------------------------------------------- the run


def train(cfg: TrainConfig, progress: Progress | None = None, resume: bool = False) -> Summary:
    """Run one fine-tune as `cfg` says and return its summary (also written to the run directory).

    resume=True continues the run in cfg.out from its newest checkpoint (same config). Under a
    launcher (torchrun, `accelerate launch`, `--nproc`) every process calls this and gets the run's
    summary; rank 0 alone writes the run directory and shows progress."""
    ranks = distributed.start(cpu=device_type(cfg.device) == "cpu")
    trackers.require(cfg.report_to)  # a missing extra fails here, before the data and the model load
    progress = progress if progress is not None and ranks.main else NoProgress()
    loaded = load_data(cfg) if cfg.plan_memory and not resume and ranks.main else None
    memory_plan = None if resume else ranks.broadcast(plan_memory(cfg, ranks.world, loaded) if ranks.main else None)
    run, resume_from = open_run(cfg, ranks, resume)
    memory_plan = follow_plan(cfg, run.read_plan() if resume else memory_plan)
    cfg.out = str(run.path)
    started_at = time.perf_counter()
    set_up = setup(cfg, loaded)
    set_up.memory_plan = memory_plan
    log = None
    if ranks.main:
        run.write_config(cfg)
        if memory_plan is not None and not resume:
            run.write_plan(memory_plan)
        log = trackers.tracked(run, cfg)  # metrics.jsonl, and beside it the trackers of --report-to
    try:
        with StopRequest() as stop:
            return trackers.finished(log, fit(set_up, run, progress, log, started_at, resume_from, stop))
    except BaseException as e:  # keep a run record of what happened, then let the error through
        if ranks.main:
            run.write_summary(trackers.finished(log, Summary.cut_short(ending(e), str(run.path), repr(e))))
        raise
    finally:
        if log is not None:
            log.close()
        progress.finish()


def plan_memory(cfg: TrainConfig, processes: int = 1, loaded: Loaded | None = None) -> planning.MemoryPlan | None:
    """The memory plan for `cfg` (None with --no-plan-memory, or for a model the estimator cannot read,
    said in a warning), its peaks estimated at the longest row of the `loaded` data and its micro-step
    costs weighed at the rows' typical length.
    Nothing predicted to fit an explicit --memory-budget is refused here, before the model is loaded:
    exit code 4, as a run that passes its budget."""
    if not cfg.plan_memory:
        return None
    rows = loaded.plan_rows(cfg) if loaded is not None else {}
    try:
        memory_plan = planning.plan(cfg, device_type(cfg.device), processes=processes, **rows)
    except UserError as e:
        warnings.warn(f"no memory plan ({e}); the run goes as configured", UserWarning, stacklevel=2)
        return None
    if memory_plan.chosen is None and cfg.memory_budget is not None:
        raise MemoryBudgetExceeded(memory_plan.describe())
    return memory_plan


def follow_plan(cfg: TrainConfig, memory_plan: planning.MemoryPlan | None) -> planning.MemoryPlan | None:
    """Shape `cfg` in place as the plan says (the caller's cfg is the run's), or resolve what no plan
    decided; returns the plan."""
    planned = planning.apply(cfg, memory_plan) if memory_plan is not None else planning.resolved(cfg)
    for name in planning.PLANNED:
        setattr(cfg, name, getattr(planned, name))
    return memory_plan


def open_run(cfg: TrainConfig, ranks: Ranks, resume: bool) -> tuple[RunDir, Path | None]:
    """The run directory, and the checkpoint to resume from (None: from step 0)."""
    if not resume:  # rank 0 names and creates the directory (a default name has the time in it); all use it
        made = RunDir.create(cfg.out, cfg.method) if ranks.main else None
        return RunDir(ranks.broadcast(None if made is None else str(made.path))), None
    run = RunDir(cfg.out or "")
    previous = run.summary()
    if previous is not None and previous.ok:
        raise UserError("this run finished; nothing to resume", file=str(run.summary_file))
    start = checkpoint.latest(run.path)  # None: stopped before its first checkpoint, so from step 0
    if ranks.main:
        run.truncate_metrics(checkpoint.step_of(start) if start else 0)
    return run, start


def ending(e: BaseException) -> str:
    """The status a run that raised `e` ends with."""
    return "interrupted" if isinstance(e, KeyboardInterrupt) else "oom" if is_out_of_memory(e) else "failed"


# ---------------------------------------------------------------- the loop


@dataclass
class LoopState:
    """What changes as the loop runs; a checkpoint keeps it (with the weights, optimizer and RNGs)."""

    step: int = 0  # the last optimizer step done
    losses: list[tuple[float, int]] = field(default_factory=list)  # (loss, loss tokens) per step that updated
    model_flops: float = 0.0  # analytic FLOPs of the steps this process timed, all ranks (MFU)
    hw_flops: float = 0.0  # the same counting activation recomputation (HFU)
    # every step this process ran, all ranks: the timed window when the meter had to time them all
    process_flops: float = 0.0
    process_hw_flops: float = 0.0
    # every step of the run, all ranks, across resumes (a checkpoint keeps them): FLOPs per token and per
    # step; None after resuming from a checkpoint of a lorafit that did not keep them
    total_flops: float | None = 0.0
    total_tokens: int | None = 0
    grad_bytes: int = 0  # the gradients' bytes at the last update
    skipped: list[int] = field(default_factory=list)  # steps dropped for a non-finite loss (--skip-nonfinite)
    resumed_from_step: int = 0


def time_before_measuring(setup: Setup) -> None:
    """Time what the run's figures need timed before the peak-memory window opens: the device's peak FLOP/s
    for MFU (up to three 2048 x 2048 fp32 matrices on a CPU, through both libraries) and, on a CPU, which
    library multiplies lorafit's products (`base.matmul`). Their operands are not the run's: timed at the
    end, they were a tiny model's peak RSS (a full fine-tune at batch 1 then read more activations than at 8)."""
    flops.peak_flops(setup.device, DTYPES[setup.precision])
    if setup.device.type == "cpu":
        matmul.cpu_backend()


def fit(
    setup: Setup,
    run: RunDir,
    progress: Progress | None = None,
    log: MetricsLog | trackers.Tracked | None = None,
    started_at: float | None = None,
    resume_from: Path | None = None,
    stop: StopRequest | None = None,
) -> Summary:
    """Train a set-up model, save it into `run` and write summary.json; returns the summary."""
    started_at = time.perf_counter() if started_at is None else started_at
    progress = progress or NoProgress()
    prep = prepare(setup, run, resuming=resume_from is not None)
    state = LoopState()
    if resume_from is not None:
        state = resume(prep, resume_from)
    meter = make_meter(prep)
    progress.start(len(prep.plan), run_info(setup))
    prep.wrapped_loss.train()
    time_before_measuring(setup)
    meter.start()
    for step, micro_batches in enumerate(prep.plan, start=1):
        if step <= state.step:  # resumed: these steps are in the checkpoint
            continue
        outcome = run_step(prep, meter, step, micro_batches, stop)
        log_step(prep, state, step, outcome, log, progress)
        if outcome.totals.stop:
            where = save_checkpoint(prep, state)
            raise Interrupted(f"stopped by signal after step {step}; checkpoint {where or 'none (FSDP)'}")
        if setup.cfg.save_every and step % setup.cfg.save_every == 0 and step < len(prep.plan):
            save_checkpoint(prep, state)
    if not state.losses:
        raise NonFiniteLoss(f"the loss was non-finite at every step ({len(state.skipped)}); nothing was learned")
    saved = save_trained(prep)
    summary = summarize(trained(prep, meter, state, saved), started_at)
    if setup.ranks.main:
        run.write_summary(summary)
    setup.ranks.barrier()
    return summary


def make_meter(prep: Prepared) -> Meter:
    cfg, device = prep.setup.cfg, prep.setup.device
    trace = cfg.profile_trace and prep.setup.ranks.main
    tracer = Tracer(prep.run.path / "trace.json.gz", device, cfg.profile_trace_steps) if trace else None
    return Meter(device, cfg.profile_warmup_steps, tracer)


def run_info(s: Setup) -> dict[str, Any]:
    """What the progress display shows before the first step."""
    info = {"samples": s.stats.samples, "device": s.device.type, "precision": s.precision, "processes": s.ranks.world}
    if s.memory_plan is not None:
        info["plan"] = s.memory_plan.describe()
    hint = precision_hint(s.cfg.precision, s.device.type)
    return {**info, "hint": hint} if hint is not None else info


def resume(prep: Prepared, checkpoint_dir: Path) -> LoopState:
    """Put the checkpoint's weights, optimizer, schedule and RNGs in place; the loop state it kept."""
    saved = checkpoint.load(checkpoint_dir, prep.setup.peft_model, prep.optimizer, prep.scheduler, prep.setup.ranks)
    return LoopState(
        saved.step, saved.losses, total_flops=saved.total_flops, total_tokens=saved.total_tokens,
        resumed_from_step=saved.step,
    )  # fmt: skip


def trained(prep: Prepared, meter: Meter, state: LoopState, saved: str) -> Trained:
    return Trained(
        setup=prep.setup,
        optimizer=prep.optimizer,
        meter=meter,
        losses=state.losses,
        model_flops=state.model_flops,
        hw_flops=state.hw_flops,
        process_flops=(state.process_flops, state.process_hw_flops),
        total_flops=state.total_flops,
        total_tokens=state.total_tokens,
        steps_taken=state.step,
        grad_bytes=state.grad_bytes,
        fused_loss=prep.fused_loss,
        saved=saved,
        resumed_from_step=state.resumed_from_step,
        nonfinite_skipped_steps=state.skipped,
    )


# ---------------------------------------------------------------- one optimizer step


@dataclass
class StepSums:
    """This rank's sums over the micro-steps of the step in progress."""

    loss: float = 0.0  # mean over the step's loss tokens (this rank's share of it)
    tokens: int = 0
    loss_tokens: int = 0
    model_flops: float = 0.0  # of the timed micro-steps
    hw_flops: float = 0.0
    all_flops: float = 0.0  # of every micro-step
    all_hw_flops: float = 0.0
    nonfinite: bool = False
    seconds: float = 0.0


@dataclass
class StepTotals:
    """What all ranks agree on at the end of a step's last backward, before the update."""

    loss: float  # mean over the step's loss tokens, all ranks
    tokens: int
    loss_tokens: int
    model_flops: float
    hw_flops: float
    all_flops: float
    all_hw_flops: float
    nonfinite: bool  # some rank saw a NaN/inf loss: every rank skips (or stops at) this step
    stop: bool  # some rank got SIGINT/SIGTERM: every rank checkpoints and stops after this step

    @classmethod
    def agree(cls, ranks: Ranks, device: torch.device, sums: StepSums, stop: bool) -> StepTotals:
        local = [
            sums.loss, sums.tokens, sums.loss_tokens, sums.model_flops, sums.hw_flops, sums.all_flops,
            sums.all_hw_flops, sums.nonfinite, stop,
        ]  # fmt: skip
        total = ranks.gather([float(x) for x in local], device).sum(dim=0).tolist()
        loss, tokens, loss_tokens, model_flops, hw_flops, all_flops, all_hw_flops, nonfinite, stopping = total
        flop_counts = (model_flops, hw_flops, all_flops, all_hw_flops)
        return cls(loss, int(tokens), int(loss_tokens), *flop_counts, nonfinite > 0, stopping > 0)


@dataclass
class StepOutcome:
    totals: StepTotals
    grad_norm: float | None  # None: not clipped, or the step was skipped
    lr: float  # the learning rate of this step's update
    grad_bytes: int  # the gradients' bytes before the update
    seconds: float  # this rank's micro-steps
    memory_bytes: int  # peak so far, read at the step's end


def run_step(prep: Prepared, meter: Meter, step: int, micro_batches: Step, stop: StopRequest | None) -> StepOutcome:
    """One optimizer step: this rank's micro-steps, then all ranks agree on the totals and update."""
    ranks, device = prep.setup.ranks, prep.setup.device
    batches = [collate(prep.setup, rows) for rows in micro_batches]  # all ranks': the step's loss tokens
    step_loss_tokens = sum(b.loss_tokens for b in batches)
    mine = batches[ranks.rank :: ranks.world]
    sums, grad_norm, grad_bytes = StepSums(), None, 0
    lr = prep.optimizer.param_groups[0]["lr"]  # what this step's update uses (the schedule moves after it)
    for k, batch in enumerate(mine):
        meter.begin_step()
        last = k == len(mine) - 1
        weight = batch.loss_tokens / step_loss_tokens if step_loss_tokens else 1 / len(batches)
        micro_step(prep, meter, sums, batch, last, weight)
        if last:
            totals = StepTotals.agree(ranks, device, sums, stop is not None and stop.requested)
            grad_bytes = gradient_bytes(prep.clip_params)
            grad_norm = optimizer_step(prep, totals, step)
        record = meter.end_step(batch.tokens, batch.loss_tokens, step)
        check_memory_budget(prep, record, step)
        sums.seconds += record.seconds
    return StepOutcome(totals, grad_norm, lr, grad_bytes, sums.seconds, record.memory_bytes)


def collate(s: Setup, rows: MicroBatch) -> data.Batch:
    samples = [[s.samples[i] for i in row] for row in rows]
    return data.collate(samples, s.tokenizer.pad_token_id, s.cfg.packing, flatten=s.padding_free)


def micro_step(prep: Prepared, meter: Meter, sums: StepSums, batch: data.Batch, last: bool, weight: float) -> None:
    """Forward and backward of one of the step's micro-batches (all ranks); gradients are reduced over
    ranks on this rank's last one only.

    The step's loss is the mean over all its loss tokens, as one batch of them would give: each
    micro-batch's token mean weighs `weight` = its loss tokens / the step's (all ranks), so how the step
    is split (micro-batch size, processes) does not change the update (transformers does the same with
    `num_items_in_batch`). DDP averages gradients over ranks, hence x world."""
    acc, cfg, device = prep.setup.accelerator, prep.setup.cfg, prep.setup.device
    scale = prep.setup.ranks.world * weight
    with acc.no_sync(prep.wrapped_loss) if not last else nullcontext(), acc.autocast():
        inputs = batch.model_inputs(device, prep.additive_mask)
        loss = prep.wrapped_loss(inputs, batch.labels.to(device))
        acc.backward(loss * scale)
    # read after queuing backward (no extra host-device sync); the update waits for all ranks'
    # verdict, so a non-finite loss leaves the weights as they were after the last good step
    value = float(loss.detach())
    sums.nonfinite = sums.nonfinite or not math.isfinite(value)
    sums.loss += value * weight
    sums.tokens += batch.tokens
    sums.loss_tokens += batch.loss_tokens
    counted = (prep.flop_shape, cfg.method == "full", batch.sample_lengths, batch.loss_tokens)
    model_flops = flops.training_flops(*counted)
    hw_flops = flops.training_flops(*counted, recompute=prep.setup.recompute_fraction)
    sums.all_flops += model_flops
    sums.all_hw_flops += hw_flops
    if meter.timing:
        sums.model_flops += model_flops
        sums.hw_flops += hw_flops


def optimizer_step(prep: Prepared, totals: StepTotals, step: int) -> float | None:
    """Update the weights from the step's gradients (clipped), unless some rank saw a non-finite loss;
    returns the gradient norm before clipping."""
    cfg = prep.setup.cfg
    if totals.nonfinite and not cfg.skip_nonfinite:
        raise NonFiniteLoss(f"loss is {totals.loss} at step {step}; lower --learning-rate or check the data")
    grad_norm = None
    if not totals.nonfinite:
        if cfg.max_grad_norm > 0:
            grad_norm = float(prep.setup.accelerator.clip_grad_norm_(prep.clip_params, cfg.max_grad_norm))
        prep.optimizer.step()
        prep.scheduler.step()
    prep.optimizer.zero_grad(set_to_none=True)  # a skipped step's gradients go; weights stay as they were
    return grad_norm


def check_memory_budget(prep: Prepared, record: StepRecord, step: int) -> None:
    """--memory-budget is checked against the peak that must fit after each micro-step: RSS on CPU, the
    device-level peak on a GPU (where the allocator's cap alone misses the memory outside it)."""
    budget = prep.memory_budget
    if budget is not None and record.memory_bytes > budget:
        kind = "RSS" if prep.setup.device.type == "cpu" else "device memory"
        raise MemoryBudgetExceeded(
            f"peak {kind} {format_bytes(record.memory_bytes)} passed --memory-budget "
            f"{format_budget(prep.setup.cfg.memory_budget)} at step {step}"
        )


def log_step(
    prep: Prepared,
    state: LoopState,
    step: int,
    outcome: StepOutcome,
    log: MetricsLog | trackers.Tracked | None,
    progress: Progress,
) -> None:
    """Count the step in the loop state and write its metrics row (or why it was skipped)."""
    totals = outcome.totals
    state.step = step
    state.model_flops += totals.model_flops
    state.hw_flops += totals.hw_flops
    state.process_flops += totals.all_flops
    state.process_hw_flops += totals.all_hw_flops
    state.grad_bytes = outcome.grad_bytes
    if state.total_flops is not None and state.total_tokens is not None:
        state.total_flops += totals.all_flops
        state.total_tokens += totals.tokens
    if totals.nonfinite:
        state.skipped.append(step)
        if log is not None:
            log.write({"step": step, "skipped": "non-finite loss"})
        return
    state.losses.append((totals.loss, totals.loss_tokens))
    row = {
        "step": step,
        "loss": totals.loss,
        "lr": outcome.lr,
        "grad_norm": outcome.grad_norm,
        "tokens": totals.tokens,
        "loss_tokens": totals.loss_tokens,
        "step_time_s": outcome.seconds,
        "tokens_per_s": totals.tokens / outcome.seconds if outcome.seconds else None,
        "memory_bytes": outcome.memory_bytes,
    }
    if log is not None:
        log.write(row)
    progress.step(row)


# ---------------------------------------------------------------- what the run keeps


def save_checkpoint(prep: Prepared, state: LoopState) -> Path | None:
    """Checkpoint the step just done (rank 0 writes; every rank's RNG state is in it); None under FSDP."""
    if prep.fsdp:
        return None
    ranks = prep.setup.ranks
    rng = ranks.gather_objects(checkpoint.rng_state())  # every rank's, so each resumes its own stream
    where = None
    if ranks.main:
        where = checkpoint.save(
            prep.run.path, state.step, prep.setup.peft_model, prep.optimizer, prep.scheduler, state.losses,
            (state.total_flops, state.total_tokens), keep=prep.setup.cfg.keep_checkpoints, rng=rng,
        )  # fmt: skip
    ranks.barrier()  # no rank exits (and no launcher tears the group down) before the checkpoint is whole
    return ranks.broadcast(where)


def save_trained(prep: Prepared) -> str:
    """Save the PEFT adapter (adapter_config.json + adapter_model.safetensors) or, for full, the whole
    model, with the tokenizer; returns the directory ("" on ranks other than 0)."""
    s = prep.setup
    # FSDP holds shards: every rank takes part in gathering the full state dict, rank 0 writes it
    # (peft keeps only the adapter's part of it)
    full_state = None
    if prep.fsdp:
        full_state = {k.removeprefix("model."): v for k, v in s.accelerator.get_state_dict(prep.wrapped_loss).items()}
    if not s.ranks.main:
        return ""
    target = prep.run.weights_dir(s.cfg.method)
    s.peft_model.save_pretrained(target, safe_serialization=True, state_dict=full_state)
    s.tokenizer.save_pretrained(target)
    return str(target)
