"""`lorafit train`: build the TrainConfig from --config and flags, then run `lorafit.training.loop.train`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from lorafit.base.config import TrainConfig, build_config
from lorafit.base.errors import UserError
from lorafit.cli.console import stderr_console
from lorafit.cli.options import ConfigFile, JsonOut, config_flags, given, print_json
from lorafit.run.rundir import RunDir


class RunInterrupted(UserError):
    exit_code = 130  # the shell's convention for a run stopped by SIGINT


def _resumed_config(resume: Path, config: Path | None, flags: dict[str, Any]) -> TrainConfig:
    """A resumed run continues with its own config.yaml; any other option would make it a different run."""
    overridden = list(given(flags))
    if config is not None or overridden:
        raise UserError(f"--resume continues with the run's own config.yaml; drop {overridden or ['--config']}")
    cfg = RunDir.open(resume).config()
    cfg.out = str(resume)
    return cfg


def _show_plan(cfg: TrainConfig, json_out: bool, nproc: int, resume: Path | None) -> None:
    """`--plan`: the plan the run would get (a resumed run's own, from plan.json), as the run decides it:
    per process under --nproc, exit code 4 where an explicit budget fits no plan."""
    from lorafit.base.device import device_type
    from lorafit.base.errors import EXIT_OUT_OF_MEMORY
    from lorafit.cli.console import print_plan
    from lorafit.measurement.plan import plan

    if resume is not None:
        memory_plan = RunDir(resume).read_plan()
        if memory_plan is None:
            raise UserError("this run has no memory plan (plan.json): it ran as configured", file=str(resume))
    else:
        if not cfg.plan_memory:
            stderr_console.print("--no-plan-memory: the run goes as configured; the plan it would otherwise get:")
        from lorafit.training.setup import load_data

        rows = load_data(cfg).plan_rows(cfg)  # as the run reads its data
        memory_plan = plan(cfg, device_type(cfg.device), processes=nproc, **rows)
    print_plan(stderr_console, memory_plan)
    if json_out:
        print_json(memory_plan.to_dict())
    if memory_plan.chosen is None and cfg.memory_budget is not None and resume is None:
        raise SystemExit(EXIT_OUT_OF_MEMORY)


@config_flags(TrainConfig)
def train_command(
    config: ConfigFile = None,
    json_out: JsonOut = False,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue this run directory from its newest checkpoint, with its own config.yaml."),
    ] = None,
    nproc: Annotated[
        int,
        typer.Option(
            help="Train with N processes on this machine (data parallel, one per GPU; gloo on CPU): launches "
            "torchrun. --batch-size is per process; the global batch is batch-size x grad-accum x N."
        ),
    ] = 1,
    plan: Annotated[
        bool,
        typer.Option(
            "--plan",
            help="Show the memory plan (checkpointing, micro-batch x accumulation, predicted peak against the budget, "
            "the alternatives and why they lost) and exit without training.",
        ),
    ] = False,
    **flags: Any,
) -> None:
    """Fine-tune a model (full, LoRA or QLoRA) and profile the run: tokens/s, memory, energy, FLOPs/MFU.

    Writes a run directory with config.yaml, metrics.jsonl, summary.json and the adapter (or model).
    Ctrl-C or SIGTERM finishes the step in progress and writes a checkpoint; --resume RUN_DIR continues.
    Several processes: --nproc N, or `torchrun --nproc-per-node N -m lorafit train ...`, or
    `accelerate launch -m lorafit train ...` (multi-node, FSDP: see docs/scale-out.md).
    """
    from lorafit.training import distributed

    cfg = _resumed_config(resume, config, flags) if resume is not None else build_config(config, flags)
    if plan:
        return _show_plan(cfg, json_out, nproc, resume)
    if nproc != 1 and not distributed.under_launcher():  # options checked above, once, before launching
        raise SystemExit(distributed.launch(nproc, sys.argv[1:], cpu=cfg.device == "cpu"))
    if nproc != 1 and int(os.environ.get("WORLD_SIZE", "1")) != nproc:
        raise UserError(f"--nproc {nproc}, but the launcher started {os.environ['WORLD_SIZE']} processes")
    from lorafit.cli.console import RichProgress, print_summary
    from lorafit.training.loop import train

    try:
        summary = train(cfg, RichProgress(stderr_console), resume=resume is not None)
    except KeyboardInterrupt as e:  # click would turn it into "Aborted!" and exit 1
        raise RunInterrupted(f"{e or 'interrupted'}; continue with: lorafit train --resume {cfg.out}") from None
    if not distributed.is_main_process():
        return
    print_summary(stderr_console, summary, memory_budget=cfg.memory_budget)
    if json_out:
        print_json(summary.to_dict())
