"""tests/gpu: checks that need a CUDA GPU. Without one every test here is skipped, with NO_CUDA as the
reason; bench/gpu_check.py runs them on a GPU machine (docs/gpu.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.gpu.common import NO_CUDA

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    """Skip every test under tests/gpu on a machine without CUDA, whichever file it is in."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=NO_CUDA)
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(skip)
