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
