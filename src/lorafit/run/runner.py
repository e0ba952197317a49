"""The one way lorafit runs itself in a subprocess, and how it says the process ended.

compare, sweep, estimate --measure and bench-serve start `python -m lorafit ...` in child processes,
so each run's peak memory is its own and an out-of-memory kill is a result, not a crash. The child's
exit code says how it ended (see `lorafit.base.errors`): 0 ok, 4 out of memory (or SIGKILL, which the
kernel's out-of-memory killer sends), anything else failed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafit.base.errors import exit_status


def lorafit_command(*args: str) -> list[str]:
    """argv that runs `lorafit ARGS` with this interpreter (the venv's lorafit, whatever PATH says)."""
    return [sys.executable, "-m", "lorafit", *args]


@dataclass
class Finished:
    """How a lorafit subprocess ended."""

    returncode: int
    status: str  # ok | oom | failed
    error: str | None  # None when ok
    result: Any = None  # with --json: what it printed on its last stdout line

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def describe_failure(returncode: int, last_line: str) -> tuple[str, str]:
    """(status, error) of a lorafit process that did not exit 0, from its code and its last output line."""
    status = exit_status(returncode)
    if returncode == -signal.SIGKILL:
        return status, "killed by SIGKILL (the kernel's out-of-memory killer, or a user)"
    if returncode < 0:
        return status, f"killed by signal {signal.Signals(-returncode).name}"
    if status == "oom":
        return status, last_line if last_line.startswith("out of memory") else f"out of memory: {last_line}"
    return status, f"exit {returncode}: {last_line}"


def run_lorafit(
    args: list[str], log_file: Path | None = None, env: dict[str, str] | None = None, json_result: bool = True
) -> Finished:
    """Run `lorafit ARGS [--json]` and wait; never raises for a run that failed.

    Its stderr (progress, tables, errors) goes to `log_file`, or to ours; with `json_result` its last
    stdout line is parsed into `Finished.result`. `env` is added to this process's environment."""
    return run_command(lorafit_command(*args, *(["--json"] if json_result else [])), log_file, env, json_result)


def run_command(
    command: list[str], log_file: Path | None = None, env: dict[str, str] | None = None, json_result: bool = False
) -> Finished:
    """`run_lorafit` for a ready argv (a sweep point's `lorafit train --config FILE`)."""
    stdout = subprocess.PIPE if json_result else subprocess.DEVNULL
    full_env = {**os.environ, **env} if env else None
    lines: list[str] = []
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("w", encoding="utf-8") as log:
            proc = subprocess.run(command, stdout=stdout, stderr=log, env=full_env, text=True)
        lines = log_file.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    else:
        proc = subprocess.run(command, stdout=stdout, env=full_env, text=True)
    if proc.returncode == 0:
        result = json.loads(proc.stdout.strip().splitlines()[-1]) if json_result else None
        return Finished(0, "ok", None, result)
    last = lines[-1] if lines else f"{' '.join(command[2:4])} printed nothing to its log"
    status, error = describe_failure(proc.returncode, last)
    return Finished(proc.returncode, status, error)
