"""The training loop: one loop for full, LoRA and QLoRA, on Accelerate, measured by a `Meter`.

`train(cfg)` loads the model and data, sets up the method, trains, saves the adapter (or model)
and writes the run directory; it returns the summary that also lands in summary.json.
"""

from __future__ import annotations

import json
import math
import platform
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from lorafit.adapters import methods as adapters
from lorafit.base.allocator import active_allocator
from lorafit.base.config import TrainConfig, dump_yaml, parse_bytes
from lorafit.base.errors import MemoryBudgetExceeded, UserError, is_out_of_memory
from lorafit.base.quiet import quiet_libraries
from lorafit.inputs import data, models
from lorafit.measurement import flops
from lorafit.measurement.meter import Meter, Tracer, combine_ranks, rank_measurements
from lorafit.run.rundir import (
    MetricsLog,
    default_run_dir,
    prepare_run_dir,
    read_metrics,
    write_json_atomic,
    write_text_atomic,
)
from lorafit.training import checkpoint, distributed
from lorafit.training.distributed import Ranks
from lorafit.training.loss import LossModule, supports_fused_loss

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


class NonFiniteLoss(UserError):
    exit_code = 3


class Interrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM arrived: the step in progress finished and a checkpoint was written."""


class StopRequest:
    """SIGINT/SIGTERM set a flag the loop reads between optimizer steps; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@dataclass
class Setup:
    """Everything the loop needs, built once."""

    cfg: TrainConfig
    accelerator: Any
    precision: str
    model: Any
    tokenizer: Any
    samples: list[data.Sample]
    stats: data.DataStats
    ranks: Ranks


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def wants_cpu(cfg: TrainConfig) -> bool:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda asked for, but no CUDA GPU is visible", field="device")
    return cfg.device == "cpu" or not torch.cuda.is_available()


def _accelerator(cfg: TrainConfig) -> tuple[Any, str]:
    from accelerate import Accelerator

    want_cpu = wants_cpu(cfg)
    device_type = "cpu" if want_cpu else "cuda"
    bf16_ok = device_type == "cuda" and torch.cuda.is_bf16_supported()
    precision = cfg.resolved_precision(device_type, bf16_ok)
    # Frozen bases are already stored in the compute dtype; autocast covers full fine-tuning and
    # the fp32 adapters (fp16 adds loss scaling).
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    # Accelerate keeps one AcceleratorState per process and refuses a second Accelerator with another
    # precision; each lorafit run is independent (e.g. compare trains several in one process), so start
    # from a clean one. The process-group state (PartialState) is kept for multi-process launches.
    from accelerate.state import AcceleratorState

    if hasattr(AcceleratorState, "_reset_state"):
        AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=want_cpu, mixed_precision=mixed)
    if cfg.memory_budget is not None and device_type == "cuda":
        total = torch.cuda.get_device_properties(accelerator.device).total_memory
        budget = parse_bytes(cfg.memory_budget, "memory_budget")
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), accelerator.device)
    return accelerator, precision


def setup(cfg: TrainConfig) -> Setup:
    quiet_libraries()
    seed_everything(cfg.seed)
    accelerator, precision = _accelerator(cfg)
    source = models.resolve(cfg.model)
    tokenizer = models.load_tokenizer(source)
    samples, stats = data.build_samples(
        cfg.data, tokenizer, cfg.max_length, cfg.data_format, cfg.train_on_prompt, cfg.max_samples
    )
    model = models.load_model(
        source,
        adapters.base_dtype(cfg.method, precision),
        adapters.quantization_config(cfg, COMPUTE_DTYPES[precision]),
        cfg.attention,
    )
    model = adapters.apply_method(model, cfg)
    ranks = Ranks.of(accelerator.state)
    if ranks.rank:  # same initial weights on every rank (above), then each rank its own dropout stream
        seed_everything(cfg.seed + ranks.rank)
    return Setup(cfg, accelerator, precision, model, tokenizer, samples, stats, ranks)


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    kw = {"lr": cfg.learning_rate, "weight_decay": cfg.weight_decay}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, fused=device.type == "cuda", **kw)
    import bitsandbytes as bnb

    cls = {
        "paged_adamw": bnb.optim.PagedAdamW,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "adamw_8bit": bnb.optim.AdamW8bit,
    }[cfg.optimizer]
    return cls(params, **kw)


def plan_steps(
    cfg: TrainConfig, samples: list[data.Sample], base_seed: int, world: int = 1
) -> list[list[list[list[int]]]]:
    """Optimizer steps -> micro-batches -> rows -> sample indices, over all epochs (or --max-steps).

    With `world` processes a step has grad_accum x world micro-batches, dealt round-robin to the
    ranks, so the global batch is batch_size x grad_accum x world and the plan (hence the data order)
    is the same for any process count. A last step with fewer micro-batches than ranks is dropped."""
    per_step = cfg.grad_accum * world
    micro: list[list[list[int]]] = []
    epoch = 0
    while True:
        micro += data.plan_epoch(
            samples, cfg.batch_size, cfg.packing, cfg.max_length, cfg.group_by_length, base_seed + epoch
        )
        epoch += 1
        enough = len(micro) >= cfg.max_steps * per_step if cfg.max_steps else epoch >= cfg.epochs
        if enough:
            break
    steps = [micro[i : i + per_step] for i in range(0, len(micro), per_step)]
    steps = [step for step in steps if len(step) >= world]
    return steps[: cfg.max_steps] if cfg.max_steps else steps


def train(cfg: TrainConfig, progress: Progress | None = None, resume: bool = False) -> dict[str, Any]:
    """Run one fine-tune as `cfg` says and return its summary (also written to the run directory).

    resume=True continues the run in cfg.out from its newest checkpoint (same config). Under a
    launcher (torchrun, `accelerate launch`, `--nproc`) every process calls this; rank 0 alone writes
    the run directory and shows progress, and the others return {"status": "ok", "rank": r}."""
    ranks = distributed.start(cpu=wants_cpu(cfg))
    progress = progress if progress is not None and ranks.main else NoProgress()
    if resume:
        run_dir = Path(cfg.out or "")
        previous = run_dir / "summary.json"
        if previous.is_file() and json.loads(previous.read_text(encoding="utf-8")).get("status") == "ok":
            raise UserError("this run finished; nothing to resume", file=str(previous))
        start = checkpoint.latest(run_dir)  # None: stopped before its first checkpoint, so from step 0
        if ranks.main:
            _truncate_metrics(run_dir / "metrics.jsonl", int(start.name.split("-")[1]) if start else 0)
    else:  # rank 0 names and creates the directory (a default name has the time in it); all use it
        made = prepare_run_dir(Path(cfg.out) if cfg.out else default_run_dir(cfg.method)) if ranks.main else None
        run_dir = Path(ranks.broadcast(None if made is None else str(made)))
        start = None
    cfg.out = str(run_dir)
    wall0 = time.perf_counter()
    s = setup(cfg)
    log = None
    if ranks.main:
        dump_yaml(cfg, run_dir / "config.yaml")
        log = MetricsLog(run_dir / "metrics.jsonl")
    summary: dict[str, Any] = {"status": "running", "run_dir": str(run_dir)}
    try:
        with StopRequest() as stop:
            summary = fit(s, run_dir, log, progress, wall0, resume_from=start, stop=stop)
    except BaseException as e:  # keep a run record of what happened, then let the error through
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "oom" if is_out_of_memory(e) else "failed"
        if ranks.main:
            write_json_atomic(run_dir / "summary.json", {**summary, "status": status, "error": repr(e)})
        raise
    finally:
        if log is not None:
            log.close()
        progress.finish()
    return summary


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the metrics rows up to the checkpoint; the steps after it run again."""
    if path.is_file():
        kept = [row for row in read_metrics(path) if row["step"] <= last_step]
        write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))


@dataclass
class StepTotals:
    """What all ranks agree on at the end of a step's last backward, before the update."""

    loss: float  # mean over the step's micro-batches, all ranks
    tokens: int
    loss_tokens: int
    model_flops: float
    hw_flops: float
    nonfinite: bool  # some rank saw a NaN/inf loss: every rank skips (or stops at) this step
    stop: bool  # some rank got SIGINT/SIGTERM: every rank checkpoints and stops after this step

    @classmethod
    def agree(cls, ranks: Ranks, device: torch.device, *local: float) -> StepTotals:
        total = ranks.gather(list(local), device).sum(dim=0).tolist()
        loss, tokens, loss_tokens, model_flops, hw_flops, nonfinite, stop = total
        return cls(loss, int(tokens), int(loss_tokens), model_flops, hw_flops, nonfinite > 0, stop > 0)


def fit(
    s: Setup,
    run_dir: Path,
    log: MetricsLog | None = None,
    progress: Progress | None = None,
    wall0: float | None = None,
    resume_from: Path | None = None,
    stop: StopRequest | None = None,
) -> dict[str, Any]:
    """Train a set-up model, save it into `run_dir` and write summary.json; returns the summary."""
    cfg, acc, ranks = s.cfg, s.accelerator, s.ranks
    progress = progress or NoProgress()
    wall0 = time.perf_counter() if wall0 is None else wall0
    device = acc.device
    params = [p for p in s.model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params, device)
    steps = plan_steps(cfg, s.samples, cfg.seed, ranks.world)
    if not steps:
        raise UserError(
            f"the data make fewer micro-batches than the {ranks.world} processes; use more samples or a "
            "smaller --batch-size",
            field="max_samples",
        )
    from transformers import get_scheduler

    scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=len(steps)
    )
    check_disk_space(run_dir, params, cfg)
    fsdp = ranks.kind == "FSDP"
    if fsdp and (cfg.save_every or resume_from is not None):
        raise UserError(
            "checkpoints (--save-every, --resume) are not supported under FSDP yet: they need the sharded "
            "optimizer state gathered; use DDP (--nproc, torchrun) for runs that checkpoint",
            field="save_every",
        )
    base = s.model.get_base_model() if hasattr(s.model, "get_base_model") else s.model
    fused = cfg.chunked_loss and supports_fused_loss(base)
    shape = flops.model_shape(s.model)
    loss_module = LossModule(s.model, fused)
    if ranks.world > 1 and not fsdp:
        # Every rank loaded the same frozen weights from the same files, and buffers (rotary tables) are
        # computed alike: DDP need not broadcast them (for a 135M fp32 base, 0.5 GB through gloo and its
        # staging copies at start). Trainable weights are still synced from rank 0.
        loss_module._ddp_params_and_buffers_to_ignore = [  # read by DistributedDataParallel
            *(n for n, p in loss_module.named_parameters() if not p.requires_grad),
            *(n for n, _ in loss_module.named_buffers()),
        ]
    model, optimizer = acc.prepare(loss_module, optimizer)
    net = acc.unwrap_model(model).model  # the (peft) model: what checkpoints and the final save hold
    clip_params = list(model.parameters()) if fsdp else params  # FSDP clips through its own module
    losses: list[tuple[float, int]] = []  # (loss, loss tokens) per optimizer step
    model_flops = hw_flops = 0.0
    done = 0
    if resume_from is not None:
        state = checkpoint.load(resume_from, net, optimizer, scheduler, ranks)
        done, losses, model_flops, hw_flops = state.step, state.losses, state.model_flops, state.hw_flops
    pad_id = s.tokenizer.pad_token_id
    additive_mask = base.dtype if cfg.attention == "eager" else None
    tracer = (
        Tracer(run_dir / "trace.json.gz", device, cfg.profile_trace_steps) if cfg.profile_trace and ranks.main else None
    )
    meter = Meter(device, cfg.profile_warmup_steps, tracer)
    info = {"samples": s.stats.samples, "device": device.type, "precision": s.precision, "processes": ranks.world}
    progress.start(len(steps), info)
    model.train()
    meter.start()
    budget = parse_bytes(cfg.memory_budget, "memory_budget") if cfg.memory_budget and device.type == "cpu" else None

    skipped: list[int] = []  # steps dropped for a non-finite loss (--skip-nonfinite)

    def save_checkpoint(step: int) -> Path | None:
        if fsdp:
            return None
        rng = ranks.gather_objects(checkpoint.rng_state())  # every rank's, so each resumes its own stream
        states = (net, optimizer, scheduler, losses, (model_flops, hw_flops))
        where = checkpoint.save(run_dir, step, *states, keep=cfg.keep_checkpoints, rng=rng) if ranks.main else None
        ranks.barrier()  # no rank exits (and no launcher tears the group down) before the checkpoint is whole
        return ranks.broadcast(where)

    for step_index, micro_batches in enumerate(steps, start=1):
        if step_index <= done:  # resumed: these steps are in the checkpoint
            continue
        mine = micro_batches[ranks.rank :: ranks.world]
        # DDP averages gradients over ranks: scaled so, every micro-batch of the step weighs 1/len
        scale = ranks.world / len(micro_batches)
        step_loss = step_model_flops = step_hw_flops = step_seconds = 0.0
        step_tokens = step_loss_tokens = 0
        nonfinite = False
        for k, rows in enumerate(mine):
            batch = data.collate([[s.samples[i] for i in row] for row in rows], pad_id, cfg.packing)
            meter.begin_step()
            last = k == len(mine) - 1
            with acc.no_sync(model) if not last else nullcontext(), acc.autocast():
                inputs = batch.model_inputs(device, additive_mask)
                loss = model(inputs, batch.labels.to(device))
                acc.backward(loss * scale)
            # read after queuing backward (no extra host-device sync); the update waits for all ranks'
            # verdict, so a non-finite loss leaves the weights as they were after the last good step
            value = float(loss.detach())
            nonfinite = nonfinite or not math.isfinite(value)
            step_loss += value / len(micro_batches)
            step_tokens += batch.tokens
            step_loss_tokens += batch.loss_tokens
            if meter.timing:
                counted = (shape, cfg.method == "full", batch.sample_lengths, batch.loss_tokens)
                step_model_flops += flops.training_flops(*counted)
                step_hw_flops += flops.training_flops(*counted, recompute=cfg.gradient_checkpointing)
            grad_norm = None
            if last:
                wants_stop = stop is not None and stop.signal is not None
                totals = StepTotals.agree(
                    ranks, device, step_loss, step_tokens, step_loss_tokens, step_model_flops, step_hw_flops,
                    nonfinite, wants_stop,
                )  # fmt: skip
                if totals.nonfinite and not cfg.skip_nonfinite:
                    raise NonFiniteLoss(
                        f"loss is {totals.loss} at step {step_index}; lower --learning-rate or check the data"
                    )
                if not totals.nonfinite:
                    if cfg.max_grad_norm > 0:
                        grad_norm = float(acc.clip_grad_norm_(clip_params, cfg.max_grad_norm))
                    optimizer.step()
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)  # a skipped step's gradients go; weights stay as they were
            record = meter.end_step(batch.tokens, batch.loss_tokens)
            if budget is not None and record.memory_bytes > budget:
                raise MemoryBudgetExceeded(
                    f"peak RSS {record.memory_bytes / 2**30:.2f} GiB passed --memory-budget {cfg.memory_budget} "
                    f"at step {step_index}"
                )
            step_seconds += record.seconds
        model_flops += totals.model_flops
        hw_flops += totals.hw_flops
        if totals.nonfinite:
            skipped.append(step_index)
            if log is not None:
                log.write({"step": step_index, "skipped": "non-finite loss"})
        else:
            losses.append((totals.loss, totals.loss_tokens))
            row = {
                "step": step_index,
                "loss": totals.loss,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "tokens": totals.tokens,
                "loss_tokens": totals.loss_tokens,
                "step_time_s": step_seconds,
                "tokens_per_s": totals.tokens / step_seconds if step_seconds else None,
                "memory_bytes": record.memory_bytes,
            }
            if log is not None:
                log.write(row)
            progress.step(row)
        if totals.stop:
            where = save_checkpoint(step_index)
            raise Interrupted(f"stopped by signal after step {step_index}; checkpoint {where or 'none (FSDP)'}")
        if cfg.save_every and step_index % cfg.save_every == 0 and step_index < len(steps):
            save_checkpoint(step_index)
    if not losses:
        raise NonFiniteLoss(f"the loss was non-finite at every step ({len(skipped)}); nothing was learned")
    # FSDP holds shards: every rank takes part in gathering the full state dict, rank 0 writes it
    full_state = {k.removeprefix("model."): v for k, v in acc.get_state_dict(model).items()} if fsdp else None
    saved = _save(net, s.tokenizer, run_dir, cfg.method, full_state) if ranks.main else ""
    summary = _summarize(s, net, meter, optimizer, losses, model_flops, hw_flops, wall0, fused, saved)
    summary["resumed_from_step"] = done or None  # timings cover the steps this process ran
    summary["nonfinite_skipped_steps"] = skipped
    if ranks.main:
        write_json_atomic(run_dir / "summary.json", summary)
    ranks.barrier()
    return summary if ranks.main else {"status": "ok", "rank": ranks.rank}


def disk_needed(params: list[torch.nn.Parameter], cfg: TrainConfig) -> int:
    """Bytes the run will write: the final adapter (or model), and the checkpoints kept (weights plus
    two optimizer moments each; one is written on SIGINT/SIGTERM even without --save-every)."""
    weights = sum(p.numel() * p.element_size() for p in params)
    checkpoints = cfg.keep_checkpoints if cfg.save_every else 1
    return weights + checkpoints * 3 * weights + 16 * 2**20  # + tokenizer, config, metrics, summary


def check_disk_space(run_dir: Path, params: list[torch.nn.Parameter], cfg: TrainConfig) -> None:
    """Refuse to start a run whose outputs cannot fit on the disk of its run directory."""
    import shutil

    need, free = disk_needed(params, cfg), shutil.disk_usage(run_dir).free
    if free < need:
        raise UserError(
            f"not enough disk space: the run writes about {need / 2**20:.0f} MiB (adapter or model and "
            f"checkpoints) and {free / 2**20:.0f} MiB are free",
            file=str(run_dir),
        )


def _save(model: Any, tokenizer: Any, run_dir: Path, method: str, state_dict: dict[str, Any] | None = None) -> str:
    """PEFT adapter (adapter_config.json + adapter_model.safetensors) or, for full, the whole model;
    `state_dict` is the gathered full one under FSDP (peft keeps only the adapter's part of it)."""
    target = run_dir / ("model" if method == "full" else "adapter")
    model.save_pretrained(target, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(target)
    return str(target)


def _summarize(
    s: Setup,
    model: Any,
    meter: Meter,
    optimizer: Any,
    losses: list[tuple[float, int]],
    model_flops: float,
    hw_flops: float,
    wall0: float,
    fused: bool,
    saved: str,
) -> dict[str, Any]:
    """The run's summary; with several processes the timings, tokens, memory, energy and peak FLOP/s
    are the whole run's (`profile.combine_ranks`) and each rank's own figures are listed under
    `distributed.per_rank`. Every rank calls this (it gathers); rank 0 writes it."""
    cfg, device, ranks = s.cfg, s.accelerator.device, s.ranks
    trainable, total = adapters.count_params(model)
    timing = meter.summary()
    peak, peak_source = flops.peak_flops(device, COMPUTE_DTYPES[s.precision])
    train_s = sum(r.seconds for r in meter.steps)
    timing["train_s"] = train_s
    timing["train_tokens_per_s"] = sum(r.tokens for r in meter.steps) / train_s if train_s else None
    timing["peak_flops_per_s"] = peak
    memory = meter.peak_memory()
    distributed_info = None
    if ranks.world > 1:
        per_rank = ranks.gather_objects(rank_measurements(meter, timing, memory["peak_bytes"]))
        timing.update(combine_ranks(per_rank))
        memory["rank0_peak_bytes"] = memory["peak_bytes"]
        memory["peak_bytes"] = max(r["peak_bytes"] for r in per_rank)  # the rank that must fit
        memory["per_rank_peak_bytes"] = [r["peak_bytes"] for r in per_rank]
        distributed_info = {**ranks.describe(), "per_rank": [{"rank": i, **r} for i, r in enumerate(per_rank)]}
        peak_source = f"sum over {ranks.world} processes of: {peak_source}"
    step_losses = [loss for loss, _ in losses]
    achieved = model_flops / timing["timed_s"] if timing["timed_s"] else None
    peak = timing.pop("peak_flops_per_s")
    summary = {
        "status": "ok",
        "run_dir": cfg.out,
        "model": cfg.model,
        "method": cfg.method,
        "precision": s.precision,
        "optimizer": cfg.optimizer,
        # bitsandbytes pages optimizer state only on CUDA; elsewhere paged_* run unpaged
        "optimizer_paged": cfg.optimizer.startswith("paged") and device.type == "cuda",
        "steps": len(losses),
        "processes": ranks.world,
        "global_batch_size": cfg.batch_size * cfg.grad_accum * ranks.world,
        **timing,
        "peak_memory": memory,
        # of rank 0's peak (every rank holds the same model and state under DDP)
        "memory_breakdown": memory_breakdown(
            model,
            optimizer,
            memory.get("rank0_peak_bytes", memory["peak_bytes"]),
            meter.start_bytes if device.type == "cpu" else None,
        ),  # fmt: skip
        "flops_per_token": model_flops / timing["tokens"] if timing["tokens"] else None,
        "model_flops": model_flops,
        "achieved_flops_per_s": achieved,
        "peak_flops_per_s": peak,
        "peak_flops_source": peak_source,
        "mfu": achieved / peak if achieved else None,
        "hfu": hw_flops / timing["timed_s"] / peak if timing["timed_s"] else None,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": 100.0 * trainable / total,
        "loss_first": step_losses[0],
        "loss_last": step_losses[-1],
        "loss_mean": sum(step_losses) / len(step_losses),
        # weighted by loss tokens: independent of how samples were grouped into batches
        "loss_token_mean": sum(lv * n for lv, n in losses) / max(sum(n for _, n in losses), 1),
        "loss_path": "fused_chunked" if fused else "full_logits",
        "data": vars(s.stats),
        "saved": saved,
        "wall_s": time.perf_counter() - wall0,
        "device": describe_device(device),
        "distributed": distributed_info or ranks.describe(),
        "allocator": active_allocator(),
        "versions": versions(),
    }
    return summary


def memory_breakdown(model: Any, optimizer: Any, peak: int, resident_at_start: int | None) -> dict[str, int]:
    """Parts of the peak: weights as stored, trainable params, their grads, optimizer state,
    activations+workspace (= peak - the rest) and, on CPU, the runtime: what was resident when
    training started besides the model (interpreter, libraries, tokenizer, data)."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    weights = adapters.stored_weight_bytes(model) - trainable
    # Weights mapped from a safetensors file become resident when first touched, so RSS at the start
    # can be below their size; the part not yet resident then lands in activations_workspace.
    runtime = 0 if resident_at_start is None else max(0, resident_at_start - weights - trainable)
    grads = trainable  # grads have their parameter's dtype
    state = sum(
        t.numel() * t.element_size()
        for st in optimizer.state.values()
        for t in st.values()
        if isinstance(t, torch.Tensor)
    )
    parts = {
        "runtime": runtime,
        "weights": weights,
        "trainable": trainable,
        "grads": grads,
        "optimizer_state": state,
    }
    parts["activations_workspace"] = peak - sum(parts.values())
    return parts


def describe_device(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(device),
            "count": torch.cuda.device_count(),
        }
    import os

    return {
        "type": "cpu",
        "name": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
    }


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("lorafit", "torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out
