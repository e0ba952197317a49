"""Keep library chatter (shard progress bars, optional-kernel notices, deprecation notes) off the user's screen.

lorafit draws its own progress and reports what matters in summary.json; set LORAFIT_VERBOSE=1 to
see the libraries' own messages again.
"""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    if os.environ.get("LORAFIT_VERBOSE"):
        return
    # bitsandbytes logs at import that an optional CPU kernel package is missing; it falls back itself.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*[Pp]aged optimizers are not supported on CPU.*")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
