"""Errors meant for users: what went wrong, where (file, line, field), and how to fix it.

The CLI prints a `UserError` without a traceback and exits with code 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import signal


class UserError(Exception):
    """Bad input or an impossible option combination, described for the person who made it."""

    exit_code = 2

    def __init__(
        self, message: str, *, file: str | None = None, line: int | None = None, field: str | None = None
    ) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.field = field
        super().__init__(str(self))

    def __str__(self) -> str:
        where = []
        if self.file:
            where.append(f"{self.file}:{self.line}" if self.line is not None else self.file)
        if self.field:
            where.append(f"field '{self.field}'")
        return f"{', '.join(where)}: {self.message}" if where else self.message


class DataError(UserError):
    """A data file that cannot be loaded as asked (invalid JSON, missing field, empty text, ...)."""


EXIT_OUT_OF_MEMORY = 4  # the CLI's exit code when a run did not fit (sweeps and compare record it as "oom")


def exit_status(returncode: int) -> str:
    """How a `lorafit` subprocess ended: ok, oom (exit 4, or SIGKILL: what the kernel's out-of-memory
    killer sends; nothing else here kills with it) or failed."""
    if returncode == 0:
        return "ok"
    return "oom" if returncode in (EXIT_OUT_OF_MEMORY, -signal.SIGKILL) else "failed"


def is_out_of_memory(e: BaseException) -> bool:
    """A GPU OOM, or a host allocation that failed (PyTorch's CPU allocator raises RuntimeError)."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    return isinstance(e, RuntimeError) and ("out of memory" in str(e).lower() or "can't allocate memory" in str(e))


class MemoryBudgetExceeded(MemoryError):
    """The run's peak memory passed --memory-budget (on CPU, where nothing else enforces it)."""
