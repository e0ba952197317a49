"""Keep library chatter (shard progress bars, optional-kernel notices, deprecation notes) off the user's screen.

lorafit draws its own progress and reports what matters in summary.json; set LORAFIT_VERBOSE=1 to
see the libraries' own messages again.

The loudest one: on CPUs with AVX512-BF16, importing bitsandbytes looks for the optional `kernels`
package and, when it is missing, logs "Failed to load CPU gemm_4bit_forward from kernels-community"
as a *warning* through `logging` (bitsandbytes/backends/cpu/ops.py) and falls back by itself. With no
logging configured, Python's last-resort handler prints every warning to stderr, so each command that
imported transformers or peft showed it. `demote_library_logs` turns such records into DEBUG records
of the same logger before any library is imported: they stay visible to a program that logs at DEBUG,
and never reach a terminal that did not ask for them.
"""

from __future__ import annotations

import logging
import os
import warnings

# Libraries whose warnings are notices about optional speed-ups or their own fallbacks, not about the run.
NOISY_LOGGERS = ("bitsandbytes",)


def verbose() -> bool:
    return bool(os.environ.get("LORAFIT_VERBOSE"))


class _DemoteToDebug(logging.Handler):
    """Re-emit a library's records at DEBUG through the root logger (instead of propagating them as they are)."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:  # errors still reach the user
            logging.getLogger().handle(record)
            return
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        root = logging.getLogger()
        if root.isEnabledFor(logging.DEBUG):
            root.handle(record)


def demote_library_logs() -> None:
    """Log the noisy libraries' warnings at DEBUG; call before importing them. Idempotent; a no-op with
    LORAFIT_VERBOSE=1. Cheap: it imports none of the libraries."""
    if verbose():
        return
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(h, _DemoteToDebug) for h in logger.handlers):
            logger.addHandler(_DemoteToDebug())
        logger.propagate = False


def quiet_libraries() -> None:
    """Everything `demote_library_logs` does, plus transformers' logging and progress bars and the
    warnings the libraries raise on every run."""
    if verbose():
        return
    demote_library_logs()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*[Pp]aged optimizers are not supported on CPU.*")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
