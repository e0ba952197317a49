"""lorafit: fine-tune language models with LoRA, QLoRA or full fine-tuning, and measure what each choice costs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorafit.base.config import TrainConfig, build_config

if TYPE_CHECKING:
    from lorafit.run.summary import Summary
    from lorafit.training.loop import Progress

__version__ = "0.1.0"
__all__ = ["TrainConfig", "build_config", "train"]


def train(cfg: TrainConfig, progress: Progress | None = None, resume: bool = False) -> Summary:
    """Run one fine-tune and return its run record (also written to summary.json); see
    `lorafit.training.loop.train`."""
    from lorafit.training.loop import train as _train

    return _train(cfg, progress, resume=resume)
