"""Many processes, one run: which process this is, what all of them agree on, and the `--nproc` launcher.

lorafit neither starts nor connects processes itself. torchrun or `accelerate launch` start them and
set RANK, WORLD_SIZE and MASTER_ADDR; Accelerate joins the process group (NCCL on GPUs, gloo on CPUs)
and wraps the model in DDP or FSDP. What the training loop needs on top is small and lives here:
rank 0 alone writes the run directory; every step, one all-gather lets all ranks agree on the global
loss and token counts and on whether to skip a non-finite step or stop for a signal (so no rank waits
forever in a collective the others left); per-rank measurements are gathered once for the summary.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
from dataclasses import dataclass
from typing import Any

import torch

from lorafit.base import matmul
from lorafit.base.device import shared_threads
from lorafit.base.errors import UserError
from lorafit.measurement.figures import RankFigures
from lorafit.run.summary import Processes

LAUNCH_ENV = "WORLD_SIZE"  # set by torchrun, `accelerate launch` and our own --nproc


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run; a single-process run is rank 0 of 1 and skips every collective."""

    rank: int = 0
    world: int = 1
    kind: str = "NO"  # Accelerate's DistributedType: NO, MULTI_CPU, MULTI_GPU, FSDP, ...
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def of(cls, state: Any) -> Ranks:
        """From an Accelerate `PartialState`/`AcceleratorState`."""
        kind = state.distributed_type
        return cls(
            rank=state.process_index,
            world=state.num_processes,
            kind=getattr(kind, "value", str(kind)),
            backend=state.backend,
        )

    def gather(self, values: list[float], device: torch.device) -> torch.Tensor:
        """(world, len(values)) float64: every rank's values, on every rank, in one collective."""
        if self.world == 1:
            return torch.tensor([values], dtype=torch.float64)
        mine = torch.tensor(values, dtype=torch.float64, device=device)
        out = [torch.empty_like(mine) for _ in range(self.world)]
        torch.distributed.all_gather(out, mine)
        return torch.stack(out).cpu()

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def processes(self, per_rank: list[RankFigures] | None = None) -> Processes:
        """What summary.json records of the processes (with every rank's own figures when several)."""
        return Processes(self.world, self.kind, self.backend, launched_by(), per_rank)


def start(cpu: bool) -> Ranks:
    """Join the process group the launcher set up (a no-op for a single process); call before any
    collective, e.g. to agree on the run directory."""
    from accelerate import PartialState

    return Ranks.of(PartialState(cpu=cpu))


def launched_by() -> str:
    """Who started this process: our `--nproc`, `accelerate launch`, torchrun, or nobody (single)."""
    if os.environ.get("LORAFIT_NPROC"):
        return "lorafit --nproc"
    if int(os.environ.get(LAUNCH_ENV, "1")) <= 1:
        return "single process"
    if any(k.startswith("ACCELERATE_") and k != "ACCELERATE_TORCH_DEVICE" for k in os.environ):
        return "accelerate launch"
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return "torchrun"
    return "launcher"


def is_main_process() -> bool:
    """Rank 0, or not launched at all: the process that prints results (before or after the run)."""
    return int(os.environ.get("RANK", "0")) == 0


def rank_prefix() -> str:
    """'[rank N] ' for messages of a launched process other than rank 0."""
    return "" if is_main_process() else f"\\[rank {os.environ['RANK']}] "  # escaped for rich markup


def under_launcher() -> bool:
    return LAUNCH_ENV in os.environ


def strip_nproc(argv: list[str]) -> list[str]:
    """`argv` without `--nproc N` / `--nproc=N`: what each launched process runs."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def launch(nproc: int, argv: list[str], cpu: bool = False) -> int:
    """Run `python -m lorafit <argv>` in `nproc` processes on this machine through torchrun's elastic
    agent (what `torchrun --standalone` runs, here in this process), and return the exit status of
    the run: the lowest failing rank's (130 interrupted, 4 out of memory, 2 bad input), else 0.

    Ctrl-C or SIGTERM reach the ranks, which finish their step and write a checkpoint (the agent
    waits 30 s before it kills them); the ranks' own messages say what happened, not the agent's
    traceback."""
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {nproc}", field="nproc")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() and not cpu else 0
    if 0 < gpus < nproc:
        raise UserError(
            f"--nproc {nproc} needs {nproc} GPUs (one per process) and {gpus} are visible; "
            "use fewer processes, or --device cpu",
            field="nproc",
        )
    os.environ.update(launch_env(nproc, cpu=cpu or gpus == 0))
    for name in list(logging.root.manager.loggerDict):  # the ranks say what happened; the agent's logs repeat it
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port
        max_restarts=0,
        monitor_interval=0.1,
    )
    args = ["-m", "lorafit", *strip_nproc(argv)]
    print(f"launching {nproc} processes: python {shlex.join(args)}", file=sys.stderr, flush=True)
    try:
        elastic_launch(config, sys.executable)(*args)
    except ChildFailedError as e:  # the first rank that exited with an error; else one the agent killed
        exited = [f.exitcode for _, f in sorted(e.failures.items()) if f.exitcode > 0]
        code = exited[0] if exited else min(f.exitcode for f in e.failures.values())
        return 128 - code if code < 0 else code  # killed by signal N: the shell's 128 + N
    except SignalException as e:  # the ranks got it too, checkpointed and stopped: resumable, as one process
        return 130 if e.sigval in (signal.SIGINT, signal.SIGTERM) else 128 + int(e.sigval)
    return 0


def launch_env(nproc: int, cpu: bool = False) -> dict[str, str]:
    """The environment of the launched processes: the cores shared among them unless the user set
    OMP_NUM_THREADS (torchrun would give each one thread, which starves a CPU run); on a CPU, the library of
    lorafit's fp32 products chosen here, once (`base.matmul`: `auto` times both, and ranks timing it each
    could choose differently)."""
    env = {"LORAFIT_NPROC": str(nproc), **shared_threads(nproc)}
    if cpu:
        env["LORAFIT_CPU_MATMUL"] = matmul.cpu_backend()
    return env
