"""The memory plan: how a run is shaped to fit its memory budget, chosen before the first step.

A run's peak is mostly its activations, and two knobs trade them for time without changing what is
learned (same global batch, same samples, same updates):

- checkpointing: a checkpointed decoder layer keeps only its input and recomputes the rest in
  backward. `none`, `selective` (the first k of L layers; the first are chosen because their
  recompute happens last in backward, when the later layers' activations are already freed) or
  `full`; on CUDA also `offload`: full checkpointing with the kept inputs in host memory (as Unsloth's
  offloaded gradient checkpointing);
- micro-batch x gradient accumulation: b' rows per forward and G / b' micro-batches per step, for
  every divisor b' of the requested global batch G = batch_size x grad_accum with b' <= batch_size.

Each candidate's peak is `lorafit.measurement.estimate` of it; it fits when peak x (1 + margin) <=
budget, the margin covering the estimator's error (its accuracy target is 10%). Its time, relative to
the run as configured without checkpointing, is

    relative_time = F(k) / F(0) + overhead_tokens / (b' x row_tokens) - overhead_tokens / (b x row_tokens)

with F(k) the hardware FLOPs of a step recomputing k layers' forward (`flops.training_flops`), b the
configured micro-batch, row_tokens the data's mean tokens per row (max_length for packed rows), and a
fixed cost per micro-step worth `overhead_tokens` tokens of compute (kernel launches, Python, the
loss; the figure per device is an assumption, below). The fastest fitting plan wins, larger
micro-batches first among equal times; offload only when no plan without it fits (its host copies
are not in the time model). Explicit --gradient-checkpointing
(on or off), --checkpoint-layers and --offload-activations fix the checkpointing; the micro-batch is
still planned.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafit.base.config import TrainConfig
from lorafit.base.errors import UserError
from lorafit.base.jsonable import from_json_object, to_json_object
from lorafit.base.units import format_bytes, parse_bytes
from lorafit.measurement import estimate as est
from lorafit.measurement.flops import ModelShape, first_attention_grads, training_flops

MARGIN = 0.10  # the estimator's error bound (bench/estimate_accuracy.py's target)
# A micro-step's fixed cost in tokens of compute. CPU: measured, QLoRA SmolLM2-135M, 4 x 1 vs 1 x 4 rows of
# 220 tokens, no checkpointing (docs/benchmarks/2026-12-02-cpu-memory-plan.md): 0.78 s per extra
# micro-step at 81.7 tokens/s = 64 tokens. CUDA: an assumption (more per step in launches, less compute
# per token), not measured yet.
OVERHEAD_TOKENS = {"cpu": 64, "cuda": 512}
PLANNED = ("gradient_checkpointing", "checkpoint_layers", "offload_activations", "batch_size", "grad_accum")


@dataclass
class PlanCandidate:
    """One way to run: checkpointing mode and layers, micro-batch and accumulation, predicted cost."""

    checkpointing: str  # none | selective | full | offload
    checkpoint_layers: int  # decoder layers recomputed in backward (0 for none)
    batch_size: int
    grad_accum: int
    predicted_peak_bytes: int
    relative_time: float  # predicted step time / the configured micro-batch's without checkpointing
    fits: bool
    why_not: str | None = None  # why it was not chosen; None for the chosen plan

    def mode(self) -> str:
        """The checkpointing in a few words: none, selective k/L, full, offload."""
        return f"selective {self.checkpoint_layers}" if self.checkpointing == "selective" else self.checkpointing

    def describe(self) -> str:
        mode = {
            "none": "no checkpointing",
            "selective": f"checkpointing the first {self.checkpoint_layers} layers",
            "full": "full checkpointing",
            "offload": "full checkpointing, inputs offloaded to host",
        }[self.checkpointing]
        return f"{mode}, micro-batch {self.batch_size} x {self.grad_accum}"


@dataclass
class MemoryPlan:
    """The plan a run was given (summary.json's `memory_plan`) and the alternatives it beat."""

    budget_bytes: int
    budget_source: str  # "--memory-budget 8GB", "available RAM", "device memory"
    margin: float
    device: str
    decided_by: str  # "planner", or the explicit option that fixed the checkpointing
    chosen: PlanCandidate | None  # None: nothing is predicted to fit
    alternatives: list[PlanCandidate] = field(default_factory=list)
    peak_row_tokens: int | None = None  # the rows the peaks were estimated at: the data's longest (None: unknown)

    def describe(self) -> str:
        budget = f"{format_bytes(self.budget_bytes)} ({self.budget_source})"
        if self.chosen is None:
            leanest = min(self.alternatives, key=lambda c: c.predicted_peak_bytes)
            return (
                f"no plan is predicted to fit {budget}: the leanest, {leanest.describe()}, needs "
                f"{format_bytes(leanest.predicted_peak_bytes)} + {self.margin:.0%} margin"
            )
        c = self.chosen
        return (
            f"{c.describe()}: predicted peak {format_bytes(c.predicted_peak_bytes)} of {budget}, "
            f"time x{c.relative_time:.2f} (chosen by {self.decided_by})"
        )

    def to_dict(self) -> dict[str, Any]:
        return to_json_object(self)


def model_shape(arch: est.Arch, cfg: TrainConfig) -> ModelShape:
    """The FLOPs formulas' shape of `cfg`'s model, from its config (what `flops.model_shape` counts on the
    loaded model): base matmuls in the blocks, the head, LoRA matrices, layer 0's q/k/v (+ LoRA A) and which
    of its attention gradients LoRA needs."""
    linears = arch.linears()
    targets = {name for name, _, _ in est.lora_targets(arch, cfg)}
    r = cfg.lora_r
    n_lora = arch.layers * sum(r * (i + o) for name, i, o in linears if name in targets)
    n_first = sum(i * o + (r * i if name in targets else 0) for name, i, o in linears if name[0] in "qkv")
    down = next(i * o for name, i, o in linears if name == "down_proj")
    # the recompute skips down_proj's frozen matmul, bare or LoRA-wrapped with the fused branch (dense or 4-bit)
    last_skipped = "down_proj" not in targets or (cfg.fused_lora and cfg.method in ("lora", "qlora"))
    n_last = arch.layers * down if last_skipped else 0
    return ModelShape(
        n_body=arch.layers * arch.linear_params(),
        n_head=arch.vocab * arch.hidden,
        n_lora=n_lora,
        layers=arch.layers,
        hidden=arch.hidden,
        n_first=n_first,
        n_last=n_last,
        first_inputs_grad=cfg.method == "full",
        first_attention_grads=first_attention_grads(targets),
    )


def relative_time(
    arch: est.Arch, cfg: TrainConfig, layers: int, batch: int, device: str, row_tokens: float | None = None
) -> float:
    """Predicted step time of recomputing `layers` layers at micro-batch `batch` of rows of `row_tokens`
    tokens (default max_length), relative to the configured run without checkpointing (see the module
    docstring)."""
    row = row_tokens or cfg.max_length
    shape = model_shape(arch, cfg)
    full, lengths = cfg.method == "full", [cfg.max_length]
    plain = training_flops(shape, full, lengths, cfg.max_length - 1)
    cost = training_flops(shape, full, lengths, cfg.max_length - 1, recompute=layers / arch.layers)
    overhead = OVERHEAD_TOKENS["cuda" if device != "cpu" else "cpu"]
    return cost / plain + overhead / (batch * row) - overhead / (cfg.batch_size * row)


def shaped(cfg: TrainConfig, mode: str, layers: int, batch: int) -> TrainConfig:
    """`cfg` run with this checkpointing (`layers` recomputed) and micro-batch, keeping the global batch."""
    global_batch = cfg.batch_size * cfg.grad_accum
    return dataclasses.replace(
        cfg,
        gradient_checkpointing=mode != "none",
        checkpoint_layers=layers if mode in ("selective", "offload") else None,
        offload_activations=mode == "offload",
        batch_size=batch,
        grad_accum=global_batch // batch,
    )


def micro_batches(cfg: TrainConfig) -> list[int]:
    """Micro-batch sizes that keep the global batch exactly: divisors of it, up to the configured one."""
    global_batch = cfg.batch_size * cfg.grad_accum
    return [b for b in range(cfg.batch_size, 0, -1) if global_batch % b == 0]


def fixed_modes(cfg: TrainConfig, layers: int) -> tuple[list[tuple[str, int]] | None, str]:
    """The checkpointing the user fixed ((mode, layers) choices and which option), or None for the planner's."""
    if cfg.offload_activations:
        return [("offload", min(cfg.checkpoint_layers or layers, layers))], "--offload-activations"
    if cfg.checkpoint_layers is not None:
        k = min(cfg.checkpoint_layers, layers)
        return [("selective" if k < layers else "full", k)], "--checkpoint-layers"
    if cfg.gradient_checkpointing is not None:
        choice = ("full", layers) if cfg.gradient_checkpointing else ("none", 0)
        return [choice], "--gradient-checkpointing" if cfg.gradient_checkpointing else "--no-gradient-checkpointing"
    return None, "planner"


def candidates(
    cfg: TrainConfig,
    arch: est.Arch,
    device: str,
    budget: int,
    predict: Any,
    margin: float = MARGIN,
    row_tokens: float | None = None,
) -> tuple[list[PlanCandidate], str]:
    """Every plan considered (per micro-batch: none, the fewest selective layers that fit, full, and on
    CUDA offload) and what decided the checkpointing; `predict(cfg) -> bytes` is the estimator."""
    fixed, decided_by = fixed_modes(cfg, arch.layers)
    out = []
    for batch in micro_batches(cfg):

        def make(mode: str, k: int, b: int = batch) -> PlanCandidate:
            peak = predict(shaped(cfg, mode, k, b))
            fits = peak * (1 + margin) <= budget
            return PlanCandidate(mode, k, b, cfg.batch_size * cfg.grad_accum // b, peak,
                                 relative_time(arch, cfg, k, b, device, row_tokens), fits)  # fmt: skip

        if fixed is not None:
            out += [make(mode, k) for mode, k in fixed]
            continue
        out.append(make("none", 0))
        selective = fewest_selective(make, arch.layers) if arch.layers > 1 else None
        out += [selective] if selective is not None else []
        out.append(make("full", arch.layers))
        if device != "cpu":
            out.append(make("offload", arch.layers))
    return out, decided_by


def fewest_selective(make: Any, layers: int) -> PlanCandidate | None:
    """The selective plan with the fewest checkpointed layers that fits (peaks fall as layers grow), or
    None when even all but one do not (full checkpointing is then the leaner try)."""
    low, high = 1, layers - 1
    while low < high:
        mid = (low + high) // 2
        if make("selective", mid).fits:
            high = mid
        else:
            low = mid + 1
    best = make("selective", low)
    return best if best.fits else None


def choose(found: list[PlanCandidate]) -> PlanCandidate | None:
    """The fastest fitting plan (ties: the larger micro-batch); offload only when nothing else fits, since
    its host copies (2 x layers x tokens x hidden per step, on the compute stream) are not in its time;
    reasons for the rest."""
    fitting = [c for c in found if c.fits and c.checkpointing != "offload"] or [c for c in found if c.fits]
    best = min(fitting, key=lambda c: (round(c.relative_time, 6), c.checkpointing == "offload", -c.batch_size),
               default=None)  # fmt: skip
    for c in found:
        if c is best:
            continue
        if not c.fits:
            c.why_not = "over budget"
        elif best is not None:
            c.why_not = "offload: only when nothing else fits" if c.checkpointing == "offload" else "slower"
    return best


def available_ram(processes: int = 1) -> int:
    """This process's share of the memory the kernel says new allocations can take without swapping
    (MemAvailable, split between the run's processes on this machine), plus what it already holds (the
    estimate counts the process's own resident size as its runtime)."""
    import psutil

    from lorafit.measurement.host_memory import rss_bytes

    available = psutil.virtual_memory().available
    room = cgroup_room()
    return min(available, room if room is not None else available) // processes + rss_bytes()


def cgroup_room(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """What this process's cgroup (v2: a container's or a job's memory limit) still lets it take:
    memory.max - memory.current, or None where there is no limit. MemAvailable does not see such limits."""
    try:
        limit = (root / "memory.max").read_text().strip()
        current = int((root / "memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - current)


def default_budget(device: str, processes: int = 1) -> tuple[int, str]:
    """The budget when --memory-budget is not given: the GPU's memory (one GPU per process), or this
    process's share of the RAM available now."""
    if device == "cpu":
        return available_ram(processes), "available RAM" if processes == 1 else f"available RAM / {processes} processes"
    import torch

    return torch.cuda.get_device_properties(torch.device(device)).total_memory, "device memory"


def plan(cfg: TrainConfig, device: str, config: dict[str, Any] | None = None, runtime: int | None = None,
         budget: tuple[int, str] | None = None, processes: int = 1,
         row_tokens: float | None = None, longest_row: int | None = None) -> MemoryPlan:  # fmt: skip
    """Choose `cfg`'s plan on `device` ('cpu' or 'cuda') from its model's config, weighing micro-step costs
    at rows of `row_tokens` tokens (the data's typical row; max_length when unknown). Peaks are the
    estimator's at micro-batches of `longest_row`-token rows: the data's longest row, which the micro-batch
    holding it pads to (the worst micro-batch of the run); max_length when the data is not known."""
    if cfg.offload_activations and device == "cpu":
        raise UserError(
            "--offload-activations moves checkpointed activations from a GPU to host memory; on the CPU they "
            "already are there: drop it",
            field="offload_activations",
        )
    config = config if config is not None else est.model_config(cfg.model)
    arch = est.arch_from_config(config)
    if runtime is None:
        runtime, _ = est.runtime_bytes(device)
    if budget is None:
        if cfg.memory_budget is not None:
            budget = parse_bytes(cfg.memory_budget, "memory_budget"), f"--memory-budget {cfg.memory_budget}"
        else:
            budget = default_budget(device, processes)
    peak_length = min(longest_row or cfg.max_length, cfg.max_length)

    def predict(c: TrainConfig) -> int:
        return est.estimate(dataclasses.replace(c, max_length=peak_length), device, config, runtime).total

    found, decided_by = candidates(cfg, arch, device, budget[0], predict, row_tokens=row_tokens)
    chosen = choose(found)
    others = [c for c in found if c is not chosen]
    return MemoryPlan(budget[0], budget[1], MARGIN, device, decided_by, chosen, others, peak_length)


def apply(cfg: TrainConfig, memory_plan: MemoryPlan) -> TrainConfig:
    """`cfg` shaped as the plan chose: its leanest alternative when nothing fits (the run's own budget
    check, or the device, then says how far off it is)."""
    c = memory_plan.chosen or min(memory_plan.alternatives, key=lambda x: x.predicted_peak_bytes)
    return shaped(cfg, c.checkpointing, c.checkpoint_layers, c.batch_size)


def resolved(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with nothing left for a planner: unset checkpointing means off (--checkpoint-layers and
    --offload-activations already set it on in TrainConfig)."""
    return dataclasses.replace(cfg, gradient_checkpointing=bool(cfg.gradient_checkpointing))


def read(path: Path) -> MemoryPlan | None:
    """A plan written next to a run (plan.json), or None."""
    import json

    if not path.is_file():
        return None
    return from_json_object(MemoryPlan, json.loads(path.read_text()), str(path))
