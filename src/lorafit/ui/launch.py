"""Launch: `lorafit train` started from the page, as a subprocess writing under the first run root.

The options are TrainConfig's, checked by `build_config` before anything starts (a bad one is a 422
naming it); the model and the data must be built in or lie under a run root or the working directory,
as for "will it fit?". `out` is chosen here (`<first run root>/<time>-<method>`), so the new run shows
in the catalog, live, as soon as training writes its config.yaml; `report_to` is not offered (trackers
reach the network). The child's log goes to `<reports dir>/launches/<run name>.log`.
"""

from __future__ import annotations

import dataclasses
import subprocess
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from lorafit.base.config import TrainConfig, build_config, field_names, to_flags, unknown_key
from lorafit.base.errors import UserError
from lorafit.inputs.sources import BUILTIN_NAMES
from lorafit.run.runner import lorafit_command
from lorafit.ui.catalog import dir_id
from lorafit.ui.fit import allowed_path, check_model

NOT_OFFERED = ("out", "report_to")


class LaunchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    command: Literal["train"]
    args: dict[str, Any] = {}


def launch_config(args: dict[str, Any], roots: list[Path], allowed: list[Path]) -> TrainConfig:
    """The run's TrainConfig, checked, with its `out` under the first run root."""
    for name in args:
        if name not in field_names(TrainConfig):
            raise unknown_key(name, "args")
        if name in NOT_OFFERED:
            raise UserError(f"{name} cannot be set from the page", field=name)
    if not roots:
        raise UserError("start lorafit ui with --runs DIR: launched runs are written under it", field="command")
    cfg = build_config(None, args)
    check_model(cfg.model, allowed)
    if cfg.data not in BUILTIN_NAMES and allowed_path(cfg.data, allowed) is None:
        raise UserError(
            f"data must be {', '.join(BUILTIN_NAMES)} or a file under a run root or the working directory",
            field="data",
        )
    out, n = roots[0] / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.method}", 1
    while out.exists():
        n += 1
        out = out.with_name(f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.method}-{n}")
    return dataclasses.replace(cfg, out=str(out))


def start(cfg: TrainConfig, log_dir: Path) -> tuple[subprocess.Popen, dict[str, Any]]:
    """Start `lorafit train` for `cfg`; returns the process and the answer: the run's id, its directory, the
    process id and the log (the page shows it: a run that fails before writing config.yaml says why there)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out = Path(str(cfg.out))
    log_file = log_dir / f"{out.name}.log"
    with log_file.open("w", encoding="utf-8") as log:
        process = subprocess.Popen(lorafit_command("train", *to_flags(cfg)), stdout=subprocess.DEVNULL, stderr=log)
    return process, {"id": dir_id(out), "run_dir": str(out), "pid": process.pid, "log": str(log_file.resolve())}
