"""How a run stops early: a signal between steps (checkpoint, then `Interrupted`) or a non-finite loss.

SIGINT/SIGTERM never cut a step in half: `StopRequest` only sets a flag, every rank agrees on it at
the end of the step (`loop.StepTotals`), and the loop writes a checkpoint before it raises
`Interrupted`, so `lorafit train --resume` continues exactly where the run stopped.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from lorafit.base.errors import UserError


class NonFiniteLoss(UserError):
    """The loss became NaN or inf (and --skip-nonfinite was off, or every step was non-finite)."""

    exit_code = 3


class Interrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM arrived: the step in progress finished and a checkpoint was written."""


class StopRequest:
    """SIGINT/SIGTERM set a flag the loop reads between optimizer steps; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
