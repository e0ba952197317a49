"""Everything the training loop needs, built before its first step: set-up, then preparation.

`setup(cfg)` loads the tokenizer, the data and the model, applies the method (full, LoRA, QLoRA:
what is trainable and how the base is stored) and starts Accelerate. `prepare(setup, run)` plans the
steps and builds what the loop drives: the loss module as Accelerate wraps it (DDP or FSDP under
several processes), the optimizer and the learning-rate schedule.

Three models, three names:
- `hf_model`: the transformers model (the base, with LoRA layers injected for LoRA/QLoRA);
- `peft_model`: what was set up for training and what checkpoints and the final save hold: the peft
  model around `hf_model` for LoRA/QLoRA, `hf_model` itself for full fine-tuning;
- `wrapped_loss`: the `LossModule` over `peft_model` as Accelerate prepared it (DDP/FSDP-wrapped
  under several processes): what the loop calls forward and backward on.
"""

from __future__ import annotations

import math
import random
import shutil
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from lorafit.adapters import attention, checkpointing
from lorafit.adapters import methods as adapters
from lorafit.base.config import TrainConfig
from lorafit.base.device import DTYPES, device_type, resolve_precision
from lorafit.base.errors import UserError
from lorafit.base.quiet import quiet_libraries
from lorafit.base.units import parse_bytes
from lorafit.inputs import data, models
from lorafit.measurement import flops
from lorafit.measurement.device_memory import DeviceMemory, allocator_cap
from lorafit.measurement.plan import MemoryPlan
from lorafit.run.rundir import RunDir
from lorafit.training.distributed import Ranks
from lorafit.training.loss import LossModule, supports_fused_loss

Row = list[int]  # indices of the samples packed into one row of a micro-batch
MicroBatch = list[Row]  # the rows of one forward/backward
Step = list[MicroBatch]  # the micro-batches of one optimizer step, all ranks (dealt round-robin)
StepPlan = list[Step]  # every optimizer step of the run, in order


@dataclass
class Setup:
    """The model, data and accelerator of a run, built once from its config."""

    cfg: TrainConfig
    accelerator: Any  # accelerate.Accelerator
    precision: str  # fp32 | bf16 | fp16, as resolved for the device
    peft_model: Any  # peft model (LoRA, QLoRA) or the HF model itself (full): see the module docstring
    tokenizer: Any
    samples: list[data.Sample]
    stats: data.DataStats
    ranks: Ranks
    budget_outside_bytes: int | None = None  # --memory-budget on a GPU: what the cap left to non-PyTorch use
    recompute_fraction: float = 0.0  # decoder layers checkpointed / all (recomputed in backward: HFU)
    memory_plan: MemoryPlan | None = None  # how the run was shaped to fit its budget, when planned
    padding_free: bool = False  # micro-batches may be laid in one row: the model attends within each sample

    @property
    def hf_model(self) -> Any:
        """The transformers model under the peft wrapper (the same object for full fine-tuning)."""
        model = self.peft_model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def make_accelerator(cfg: TrainConfig) -> tuple[Any, str, int | None]:
    """An Accelerator for cfg's device, the precision the run computes in there, and under a GPU
    --memory-budget the bytes this process holds outside PyTorch's allocator (`cap_gpu_memory`)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    kind = device_type(cfg.device)
    if cfg.offload_activations and kind != "cuda":
        raise UserError(
            "--offload-activations moves checkpointed activations from a GPU to host memory; this run is on the "
            "CPU, where they already are: drop it",
            field="offload_activations",
        )
    precision = resolve_precision(cfg.precision, kind)
    # Frozen bases are already stored in the compute dtype; autocast covers full fine-tuning and
    # the fp32 adapters (fp16 adds loss scaling).
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    # Accelerate keeps one AcceleratorState per process and refuses a second Accelerator with another
    # precision; each lorafit run is independent (e.g. compare trains several in one process), so start
    # from a clean one. The process-group state (PartialState) is kept for multi-process launches.
    if hasattr(AcceleratorState, "_reset_state"):
        AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=kind == "cpu", mixed_precision=mixed)
    outside = cap_gpu_memory(cfg, accelerator.device) if cfg.memory_budget is not None and kind == "cuda" else None
    return accelerator, precision, outside


def load_cuda_libraries(device: torch.device) -> None:
    """A first matmul: creates the CUDA context and loads cuBLAS, so what they hold can be measured."""
    probe = torch.ones(8, 8, device=device)
    probe @ probe
    torch.cuda.synchronize(device)


def cap_gpu_memory(cfg: TrainConfig, device: torch.device) -> int:
    """Emulate a card of --memory-budget bytes on a larger one: PyTorch's allocator may reserve the budget
    less what this process already holds outside it (CUDA context, libraries), measured now; returns that
    outside part. The meter checks the device-level peak against the whole budget after every micro-step
    (what grows outside the allocator later counts too). Paged optimizer state is CUDA managed memory,
    outside any cap: say so."""
    budget = parse_bytes(cfg.memory_budget, "memory_budget")
    load_cuda_libraries(device)
    outside = DeviceMemory.open(device).outside_at_start
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(allocator_cap(budget, outside, total), device)
    if cfg.optimizer.startswith("paged"):
        warnings.warn(
            f"--optimizer {cfg.optimizer} keeps its state in CUDA managed memory, outside the --memory-budget "
            "cap: a card of the budget's size would page it to host memory, which a larger card cannot emulate, "
            "so this run's peak and speed do not show whether it fits that card",
            UserWarning,
            stacklevel=2,
        )
    return outside


@dataclass
class Loaded:
    """The tokenizer and the tokenized data: loaded once, before the memory plan (which reads the rows'
    typical length) or by `setup`."""

    tokenizer: Any
    samples: list[data.Sample]
    stats: data.DataStats

    def row_tokens(self, cfg: TrainConfig) -> float:
        """Tokens in a typical row of a micro-batch: packed rows are full; otherwise the mean sample."""
        if cfg.packing or not self.samples:
            return float(cfg.max_length)
        return sum(len(s.input_ids) for s in self.samples) / len(self.samples)

    def longest_row(self, cfg: TrainConfig) -> int:
        """Tokens in the longest row any micro-batch pads to: the longest sample (already cut at max_length),
        which its micro-batch's other rows are padded to; packed rows are all max_length."""
        if cfg.packing or not self.samples:
            return cfg.max_length
        return max(len(s.input_ids) for s in self.samples)

    def plan_rows(self, cfg: TrainConfig) -> dict[str, float]:
        """What the memory plan reads of the data: `plan(..., **loaded.plan_rows(cfg))`."""
        return {"row_tokens": self.row_tokens(cfg), "longest_row": self.longest_row(cfg)}


def load_data(cfg: TrainConfig) -> Loaded:
    quiet_libraries()
    tokenizer = models.load_tokenizer(models.tokenizer_source(cfg.model))
    samples, stats = data.build_samples(
        cfg.data, tokenizer, cfg.max_length, cfg.data_format, cfg.train_on_prompt, cfg.max_samples,
        split=cfg.data_split, fields=data.Fields.of(cfg),
    )  # fmt: skip
    return Loaded(tokenizer, samples, stats)


def setup(cfg: TrainConfig, loaded: Loaded | None = None) -> Setup:
    """Load the tokenizer, data (unless `loaded`) and model as `cfg` says and set up its method for training."""
    quiet_libraries()
    seed_everything(cfg.seed)
    accelerator, precision, outside = make_accelerator(cfg)
    source = models.resolve(cfg.model)
    loaded = loaded or load_data(cfg)
    tokenizer, samples, stats = loaded.tokenizer, loaded.samples, loaded.stats
    hf_model = models.load_model(
        source,
        adapters.base_dtype(cfg.method, precision),
        adapters.quantization_config(cfg, DTYPES[precision]),
        cfg.attention,
    )
    # attention within each sample of a row (before peft wraps the model), so micro-batches need no padding
    padding_free = cfg.padding_free and attention.install(hf_model)
    peft_model = adapters.apply_method(hf_model, cfg)
    recompute = checkpointing.restrict(peft_model, cfg)
    ranks = Ranks.of(accelerator.state)
    if ranks.rank:  # same initial weights on every rank (above), then each rank its own dropout stream
        seed_everything(cfg.seed + ranks.rank)
    return Setup(
        cfg, accelerator, precision, peft_model, tokenizer, samples, stats, ranks, outside, recompute,
        padding_free=padding_free,
    )  # fmt: skip


# torch's one-kernel AdamW (CPU since torch 2.4). Elsewhere torch's default: per-tensor foreach kernels on GPUs;
# on CPU, without foreach kernels, a Python loop over tensors whose `exp_avg_sq.sqrt() / c` holds two temporaries
# of the largest (2 x 545 MB on Qwen2.5-0.5B) and took 5.7x the fused step's time there (bench/optimizer_step.py)
FUSED_ADAMW = ("cuda", "cpu")


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    kw = {"lr": cfg.learning_rate, "weight_decay": cfg.weight_decay}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, fused=device.type in FUSED_ADAMW, **kw)
    import bitsandbytes as bnb

    cls = {
        "paged_adamw": bnb.optim.PagedAdamW,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "adamw_8bit": bnb.optim.AdamW8bit,
    }[cfg.optimizer]
    return cls(params, **kw)


def plan_steps(cfg: TrainConfig, samples: list[data.Sample], base_seed: int, world: int = 1) -> StepPlan:
    """Optimizer steps -> micro-batches -> rows -> sample indices, over all epochs (or --max-steps).

    Each epoch is planned in global batches (batch_size x grad_accum x world rows, grouped by length and
    shuffled as whole batches), each then cut into micro-batches of batch_size rows: a step holds the same
    samples however it is split, so the memory plan's micro-batch (and the process count) changes
    neither the data order nor, with the loop's loss-token weighting, the updates. With `world`
    processes the micro-batches are dealt round-robin to the ranks. A last step with fewer micro-batches
    than ranks is dropped."""
    per_step = cfg.grad_accum * world
    steps: StepPlan = []
    epoch = 0
    while True:
        batches = data.plan_epoch(
            samples, cfg.batch_size * per_step, cfg.packing, cfg.max_length, cfg.group_by_length, base_seed + epoch
        )
        steps += [[rows[i : i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)] for rows in batches]
        epoch += 1
        enough = len(steps) >= cfg.max_steps if cfg.max_steps else epoch >= cfg.epochs
        if enough:
            break
    steps = [step for step in steps if len(step) >= world]
    return steps[: cfg.max_steps] if cfg.max_steps else steps


def disk_needed(params: list[torch.nn.Parameter], cfg: TrainConfig) -> int:
    """Bytes the run will write: the final adapter (or model), and the checkpoints kept (weights plus
    two optimizer moments each; one is written on SIGINT/SIGTERM even without --save-every)."""
    weights = sum(p.numel() * p.element_size() for p in params)
    checkpoints = cfg.keep_checkpoints if cfg.save_every else 1
    return weights + checkpoints * 3 * weights + 16 * 2**20  # + tokenizer, config, metrics, summary


def check_disk_space(run: RunDir, params: list[torch.nn.Parameter], cfg: TrainConfig) -> None:
    """Refuse to start a run whose outputs cannot fit on the disk of its run directory."""
    need, free = disk_needed(params, cfg), shutil.disk_usage(run.path).free
    if free < need:
        raise UserError(
            f"not enough disk space: the run writes about {need / 2**20:.0f} MiB (adapter or model and "
            f"checkpoints) and {free / 2**20:.0f} MiB are free",
            file=str(run.path),
        )


# ---------------------------------------------------------------- preparation


@dataclass
class Prepared:
    """What the loop drives, built by `prepare` once the set-up is done; none of it changes while training."""

    setup: Setup
    run: RunDir
    plan: StepPlan
    wrapped_loss: Any  # LossModule over setup.peft_model, DDP/FSDP-wrapped by Accelerate
    optimizer: Any  # torch optimizer, wrapped by Accelerate
    scheduler: Any
    clip_params: list[torch.nn.Parameter]  # what gradient clipping sees (FSDP clips through its module)
    fused_loss: bool  # chunked loss without full logits (loss.fused_linear_cross_entropy)
    flop_shape: flops.ModelShape
    additive_mask: torch.dtype | None  # eager attention takes a float mask of the model's dtype
    fsdp: bool
    memory_budget: int | None  # bytes the run's peak may reach (--memory-budget): RSS on CPU, device-level on GPU


def warmup_steps(cfg: TrainConfig, steps: int) -> int:
    """Optimizer steps of linear warm-up: --warmup-steps, or --warmup-ratio of the run's steps rounded up
    (as transformers' `TrainingArguments.get_warmup_steps`: ceil(steps · ratio))."""
    return cfg.warmup_steps or math.ceil(steps * cfg.warmup_ratio)


def make_scheduler(cfg: TrainConfig, optimizer: Any, steps: int) -> Any:
    """The learning-rate schedule with its warm-up. transformers' `constant` schedule ignores warm-up
    silently, so `constant` is its `constant_with_warmup` (the same schedule when there is none). The
    lr of step k (from 0) in warm-up is peak·k/warm-up: the first update uses lr 0, as in transformers."""
    from transformers import get_scheduler

    name = "constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps(cfg, steps), num_training_steps=steps)


def prepare(setup: Setup, run: RunDir, resuming: bool = False) -> Prepared:
    """Plan the steps, check the disk, and build the optimizer, schedule and wrapped loss module."""
    cfg, ranks, device = setup.cfg, setup.ranks, setup.device
    params = [p for p in setup.peft_model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params, device)
    plan = plan_steps(cfg, setup.samples, cfg.seed, ranks.world)
    if not plan:
        raise UserError(
            f"the data make fewer micro-batches than the {ranks.world} processes; use more samples or a "
            "smaller --batch-size",
            field="max_samples",
        )
    scheduler = make_scheduler(cfg, optimizer, len(plan))
    check_disk_space(run, params, cfg)
    fsdp = ranks.kind == "FSDP"
    if fsdp and (cfg.save_every or resuming):
        raise UserError(
            "checkpoints (--save-every, --resume) are not supported under FSDP yet: they need the sharded "
            "optimizer state gathered; use DDP (--nproc, torchrun) for runs that checkpoint",
            field="save_every",
        )
    hf_model = setup.hf_model
    fused_loss = cfg.chunked_loss and supports_fused_loss(hf_model)
    flop_shape = flops.model_shape(setup.peft_model)
    loss_module = LossModule(setup.peft_model, fused_loss)
    if ranks.world > 1 and not fsdp:
        skip_frozen_broadcast(loss_module)
    wrapped_loss, optimizer = setup.accelerator.prepare(loss_module, optimizer)
    return Prepared(
        setup=setup,
        run=run,
        plan=plan,
        wrapped_loss=wrapped_loss,
        optimizer=optimizer,
        scheduler=scheduler,
        clip_params=list(wrapped_loss.parameters()) if fsdp else params,
        fused_loss=fused_loss,
        flop_shape=flop_shape,
        additive_mask=hf_model.dtype if cfg.attention == "eager" else None,
        fsdp=fsdp,
        memory_budget=parse_bytes(cfg.memory_budget, "memory_budget") if cfg.memory_budget else None,
    )


def skip_frozen_broadcast(loss_module: LossModule) -> None:
    """Every rank loaded the same frozen weights from the same files, and buffers (rotary tables) are
    computed alike: DDP need not broadcast them (for a 135M fp32 base, 0.5 GB through gloo and its
    staging copies at start). Trainable weights are still synced from rank 0."""
    loss_module._ddp_params_and_buffers_to_ignore = [  # read by DistributedDataParallel
        *(n for n, p in loss_module.named_parameters() if not p.requires_grad),
        *(n for n, _ in loss_module.named_buffers()),
    ]
