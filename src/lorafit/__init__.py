"""lorafit: fine-tune language models with LoRA, QLoRA or full fine-tuning, and measure what each choice costs."""

from lorafit.base.config import TrainConfig, build_config

__version__ = "0.1.0"
__all__ = ["TrainConfig", "build_config", "train"]


def train(cfg: TrainConfig, progress=None) -> dict:
    """Run one fine-tune; see `lorafit.training.train`."""
    from lorafit.training.loop import train as _train

    return _train(cfg, progress)
