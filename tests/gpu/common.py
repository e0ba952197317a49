"""What the tests under tests/gpu share: the skip reason without CUDA, and `record`, which leaves what a
test measured (tolerances used, deviations seen) for bench/gpu_check.py's report."""

from __future__ import annotations

import json
import os
from pathlib import Path

NO_CUDA = "needs a CUDA GPU (torch.cuda.is_available() is False); bench/gpu_check.py runs these on one"


def record(name: str, result: dict) -> None:
    """Write `result` to $LORAFIT_GPU_CHECK_OUT/<name>.result.json when gpu_check.py asked for it."""
    out = os.environ.get("LORAFIT_GPU_CHECK_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.result.json").write_text(json.dumps(result, indent=1, default=str))
