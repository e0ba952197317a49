"""Shared fixtures: a fixed seed and fp32 default dtype for every test; the tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorafit.base.config import TrainConfig
from lorafit.base.quiet import quiet_libraries
from lorafit.inputs import models

quiet_libraries()


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="session")
def tiny_source() -> models.ModelSource:
    return models.resolve("random:tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_source):
    return models.load_tokenizer(tiny_source)


@pytest.fixture
def tiny_model(tiny_source):
    return models.load_model(tiny_source, torch.float32)


@pytest.fixture
def tiny_cfg(tmp_path):
    """A fast training config on the tiny model; tests override what they study."""

    def make(**kw) -> TrainConfig:
        base = dict(
            model="random:tiny",
            data="alpaca",
            max_samples=8,
            batch_size=4,
            max_length=128,
            out=str(tmp_path / "run"),
            profile_warmup_steps=1,
        )
        base.update(kw)
        return TrainConfig(**base)

    return make


def metrics_rows(run_dir: str | Path) -> list[dict]:
    """The per-step rows a run wrote to metrics.jsonl."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
