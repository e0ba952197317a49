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

from lorafit import adapters, checkpoint, data, flops, models
from lorafit.allocator import active_allocator
from lorafit.config import TrainConfig, dump_yaml, parse_bytes
from lorafit.errors import MemoryBudgetExceeded, UserError, is_out_of_memory
from lorafit.loss import causal_lm_loss, supports_fused_loss
from lorafit.profile import Meter, Tracer
from lorafit.quiet import quiet_libraries
from lorafit.rundir import (
    MetricsLog,
    default_run_dir,
    prepare_run_dir,
    read_metrics,
    write_json_atomic,
    write_text_atomic,
)

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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _accelerator(cfg: TrainConfig) -> tuple[Any, str]:
    from accelerate import Accelerator

    want_cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda asked for, but no CUDA GPU is visible", field="device")
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
    return Setup(cfg, accelerator, precision, model, tokenizer, samples, stats)


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


def plan_steps(cfg: TrainConfig, samples: list[data.Sample], base_seed: int) -> list[list[list[list[int]]]]:
    """Optimizer steps -> micro-batches -> rows -> sample indices, over all epochs (or --max-steps)."""
    micro: list[list[list[int]]] = []
    epoch = 0
    while True:
        micro += data.plan_epoch(
            samples, cfg.batch_size, cfg.packing, cfg.max_length, cfg.group_by_length, base_seed + epoch
        )
        epoch += 1
        enough = len(micro) >= cfg.max_steps * cfg.grad_accum if cfg.max_steps else epoch >= cfg.epochs
        if enough:
            break
    steps = [micro[i : i + cfg.grad_accum] for i in range(0, len(micro), cfg.grad_accum)]
    return steps[: cfg.max_steps] if cfg.max_steps else steps


def train(cfg: TrainConfig, progress: Progress | None = None, resume: bool = False) -> dict[str, Any]:
    """Run one fine-tune as `cfg` says and return its summary (also written to the run directory).

    resume=True continues the run in cfg.out from its newest checkpoint (same config)."""
    progress = progress or NoProgress()
    if resume:
        run_dir = Path(cfg.out or "")
        previous = run_dir / "summary.json"
        if previous.is_file() and json.loads(previous.read_text(encoding="utf-8")).get("status") == "ok":
            raise UserError("this run finished; nothing to resume", file=str(previous))
        start = checkpoint.latest(run_dir)  # None: stopped before its first checkpoint, so from step 0
        _truncate_metrics(run_dir / "metrics.jsonl", int(start.name.split("-")[1]) if start else 0)
    else:
        run_dir = prepare_run_dir(Path(cfg.out) if cfg.out else default_run_dir(cfg.method))
        start = None
    cfg.out = str(run_dir)
    wall0 = time.perf_counter()
    s = setup(cfg)
    dump_yaml(cfg, run_dir / "config.yaml")
    log = MetricsLog(run_dir / "metrics.jsonl")
    summary: dict[str, Any] = {"status": "running", "run_dir": str(run_dir)}
    try:
        with StopRequest() as stop:
            summary = fit(s, run_dir, log, progress, wall0, resume_from=start, stop=stop)
    except BaseException as e:  # keep a run record of what happened, then let the error through
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "oom" if is_out_of_memory(e) else "failed"
        write_json_atomic(run_dir / "summary.json", {**summary, "status": status, "error": repr(e)})
        raise
    finally:
        log.close()
        progress.finish()
    return summary


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the metrics rows up to the checkpoint; the steps after it run again."""
    if path.is_file():
        kept = [row for row in read_metrics(path) if row["step"] <= last_step]
        write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))


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
    cfg, acc = s.cfg, s.accelerator
    progress = progress or NoProgress()
    wall0 = time.perf_counter() if wall0 is None else wall0
    device = acc.device
    params = [p for p in s.model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params, device)
    steps = plan_steps(cfg, s.samples, cfg.seed)
    from transformers import get_scheduler

    scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=len(steps)
    )
    check_disk_space(run_dir, params, cfg)
    model, optimizer = acc.prepare(s.model, optimizer)
    losses: list[tuple[float, int]] = []  # (loss, loss tokens) per optimizer step
    model_flops = hw_flops = 0.0
    done = 0
    if resume_from is not None:
        state = checkpoint.load(resume_from, acc.unwrap_model(model), optimizer, scheduler)
        done, losses, model_flops, hw_flops = state.step, state.losses, state.model_flops, state.hw_flops
    base = acc.unwrap_model(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    fused = cfg.chunked_loss and supports_fused_loss(base)
    shape = flops.model_shape(acc.unwrap_model(model))
    pad_id = s.tokenizer.pad_token_id
    additive_mask = base.dtype if cfg.attention == "eager" else None
    tracer = Tracer(run_dir / "trace.json.gz", device, cfg.profile_trace_steps) if cfg.profile_trace else None
    meter = Meter(device, cfg.profile_warmup_steps, tracer)
    progress.start(len(steps), {"samples": s.stats.samples, "device": device.type, "precision": s.precision})
    model.train()
    meter.start()
    budget = parse_bytes(cfg.memory_budget, "memory_budget") if cfg.memory_budget and device.type == "cpu" else None

    skipped: list[int] = []  # steps dropped for a non-finite loss (--skip-nonfinite)

    def save_checkpoint(step: int) -> Path:
        states = (acc.unwrap_model(model), optimizer, scheduler, losses, (model_flops, hw_flops))
        return checkpoint.save(run_dir, step, *states, keep=cfg.keep_checkpoints)

    for step_index, micro_batches in enumerate(steps, start=1):
        if step_index <= done:  # resumed: these steps are in the checkpoint
            continue
        step_loss = 0.0
        step_tokens = step_loss_tokens = 0
        step_seconds = 0.0
        for k, rows in enumerate(micro_batches):
            batch = data.collate([[s.samples[i] for i in row] for row in rows], pad_id, cfg.packing)
            meter.begin_step()
            last = k == len(micro_batches) - 1
            with acc.no_sync(model) if not last else nullcontext(), acc.autocast():
                inputs = batch.model_inputs(device, additive_mask)
                loss = causal_lm_loss(base, inputs, batch.labels.to(device), fused)
                acc.backward(loss / len(micro_batches))
            # read after queuing backward (no extra host-device sync), checked before any update, so a
            # non-finite loss leaves the weights as they were after the last good step
            value = float(loss.detach())
            if not math.isfinite(value):
                if not cfg.skip_nonfinite:
                    raise NonFiniteLoss(
                        f"loss is {value} at step {step_index}; lower --learning-rate or check the data"
                    )
                optimizer.zero_grad(set_to_none=True)  # drop this step's gradients; weights stay as they were
                skipped.append(step_index)
                meter.end_step(batch.tokens, batch.loss_tokens)
                break
            grad_norm = None
            if last:
                if cfg.max_grad_norm > 0:
                    grad_norm = float(acc.clip_grad_norm_(params, cfg.max_grad_norm))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            record = meter.end_step(batch.tokens, batch.loss_tokens)
            if budget is not None and record.memory_bytes > budget:
                raise MemoryBudgetExceeded(
                    f"peak RSS {record.memory_bytes / 2**30:.2f} GiB passed --memory-budget {cfg.memory_budget} "
                    f"at step {step_index}"
                )
            if record.timed:
                counted = (shape, cfg.method == "full", batch.sample_lengths, batch.loss_tokens)
                model_flops += flops.training_flops(*counted)
                hw_flops += flops.training_flops(*counted, recompute=cfg.gradient_checkpointing)
            step_loss += value / len(micro_batches)
            step_tokens += batch.tokens
            step_loss_tokens += batch.loss_tokens
            step_seconds += record.seconds
        if skipped and skipped[-1] == step_index:
            if log is not None:
                log.write({"step": step_index, "skipped": "non-finite loss"})
            continue
        losses.append((step_loss, step_loss_tokens))
        row = {
            "step": step_index,
            "loss": step_loss,
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "tokens": step_tokens,
            "loss_tokens": step_loss_tokens,
            "step_time_s": step_seconds,
            "tokens_per_s": step_tokens / step_seconds if step_seconds else None,
            "memory_bytes": record.memory_bytes,
        }
        if log is not None:
            log.write(row)
        progress.step(row)
        if stop is not None and stop.signal is not None:
            where = save_checkpoint(step_index)
            raise Interrupted(f"stopped by signal {stop.signal} after step {step_index}; checkpoint {where}")
        if cfg.save_every and step_index % cfg.save_every == 0 and step_index < len(steps):
            save_checkpoint(step_index)
    if not losses:
        raise NonFiniteLoss(f"the loss was non-finite at every step ({len(skipped)}); nothing was learned")
    saved = _save(acc.unwrap_model(model), s.tokenizer, run_dir, cfg.method)
    summary = _summarize(s, meter, optimizer, losses, model_flops, hw_flops, wall0, fused, saved)
    summary["resumed_from_step"] = done or None  # timings cover the steps this process ran
    summary["nonfinite_skipped_steps"] = skipped
    write_json_atomic(run_dir / "summary.json", summary)
    return summary


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


def _save(model: Any, tokenizer: Any, run_dir: Path, method: str) -> str:
    """PEFT adapter (adapter_config.json + adapter_model.safetensors) or, for full, the whole model."""
    target = run_dir / ("model" if method == "full" else "adapter")
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return str(target)


def _summarize(
    s: Setup,
    meter: Meter,
    optimizer: Any,
    losses: list[tuple[float, int]],
    model_flops: float,
    hw_flops: float,
    wall0: float,
    fused: bool,
    saved: str,
) -> dict[str, Any]:
    cfg, device = s.cfg, s.accelerator.device
    model = s.accelerator.unwrap_model(s.model)
    trainable, total = adapters.count_params(model)
    timing = meter.summary()
    peak, peak_source = flops.peak_flops(device, COMPUTE_DTYPES[s.precision])
    train_s = sum(r.seconds for r in meter.steps)
    step_losses = [loss for loss, _ in losses]
    achieved = model_flops / timing["timed_s"] if timing["timed_s"] else None
    memory = meter.peak_memory()
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
        **timing,
        "train_s": train_s,
        "train_tokens_per_s": sum(r.tokens for r in meter.steps) / train_s if train_s else None,
        "peak_memory": memory,
        "memory_breakdown": memory_breakdown(
            model, optimizer, memory["peak_bytes"], meter.start_bytes if device.type == "cpu" else None
        ),
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
