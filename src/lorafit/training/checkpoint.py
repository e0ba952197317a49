"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is `checkpoints/step-NNNNNNNN/` in the run directory:
- `trainable.safetensors`: the parameters that train (LoRA matrices, or the whole model for full);
- `state.pt`: optimizer and scheduler state, the RNG states of every process (torch CPU and CUDA,
  Python), the process count, the step reached, the per-step losses and FLOP counters so far; loaded
  with `weights_only=True`, so it can hold tensors and plain containers only, never code.
It is written into a temporary directory and renamed into place, so a crash leaves either the whole
checkpoint or none; the newest `keep` are kept. The data order needs no state: the step plan is a
pure function of the seed, and a resumed run skips the steps already done.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lorafit.base.errors import UserError
from lorafit.run.rundir import RunDir
from lorafit.training.distributed import Ranks

DIR = RunDir.CHECKPOINTS


@dataclass
class Resumed:
    step: int
    losses: list[tuple[float, int]]
    # the FLOPs and real tokens of every step so far; None from a checkpoint that did not keep them
    total_flops: float | None
    total_tokens: int | None


def _trainable(model: Any) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save(
    run_dir: Path,
    step: int,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    losses: list[tuple[float, int]],
    totals: tuple[float | None, int | None],
    keep: int,
    rng: list[dict[str, Any]] | None = None,
) -> Path:
    """Write the checkpoint of `step` (rank 0 only); `rng` holds every rank's `rng_state()`, in rank order."""
    rng = rng or [rng_state()]
    root = run_dir / DIR
    root.mkdir(exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in _trainable(model).items()}
    save_file(tensors, tmp / "trainable.safetensors")
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "losses": [[float(loss), int(tokens)] for loss, tokens in losses],
        "totals": {"flops": totals[0], "tokens": totals[1]},
        "rng": rng,
        "world_size": len(rng),
    }
    torch.save(state, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def rng_state() -> dict[str, Any]:
    """This process's random state: dropout masks and any sampling continue exactly after a resume."""
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [version, list(internal), gauss],
    }


# A param group's kernel choice. torch's load_state_dict takes it from the saved groups; this run's stays, so a
# checkpoint saved with another (CPU runs before lorafit asked for the fused AdamW there) resumes on the kernel
# this build picks, not on the per-tensor loop and its temporaries, which the memory estimate no longer counts
KERNEL_FLAGS = ("fused", "foreach")


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """The optimizer's state and hyperparameters from a checkpoint, keeping the kernel it was built with."""
    built = [{k: group[k] for k in KERNEL_FLAGS if k in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, flags in zip(optimizer.param_groups, built, strict=True):
        group.update(flags)


def step_of(checkpoint_dir: Path) -> int:
    """The optimizer step a checkpoint directory (step-00000012) holds."""
    return int(checkpoint_dir.name.split("-")[1])


def latest(run_dir: Path) -> Path | None:
    done = sorted(p for p in (run_dir / DIR).glob("step-*") if (p / "state.pt").is_file())
    return done[-1] if done else None


def load(path: Path, model: Any, optimizer: Any, scheduler: Any, ranks: Ranks | None = None) -> Resumed:
    """Put a checkpoint's state into a freshly set-up run; the RNGs continue where they stopped.
    A run resumes with the process count it was checkpointed with (the data each rank sees and
    every rank's random stream depend on it)."""
    ranks = ranks or Ranks()
    try:
        tensors = load_file(path / "trainable.safetensors")
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged checkpoint: say which, do not guess
        raise UserError(f"cannot read checkpoint: {e}", file=str(path)) from e
    saved_world = state.get("world_size", 1)
    if saved_world != ranks.world:
        raise UserError(
            f"this run was checkpointed with {saved_world} process(es) and is resumed with {ranks.world}; "
            f"resume with the same count ({'--nproc ' + str(saved_world) if saved_world > 1 else 'no launcher'})",
            file=str(path),
        )
    params = _trainable(model)
    if set(tensors) != set(params):
        raise UserError("checkpoint does not match this run's trainable parameters", file=str(path))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(p.device))
    load_optimizer_state(optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"][ranks.rank]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    losses = [(float(a), int(b)) for a, b in state["losses"]]
    totals = state.get("totals", {})  # older checkpoints kept only the timed window's FLOPs
    return Resumed(int(state["step"]), losses, totals.get("flops"), totals.get("tokens"))
