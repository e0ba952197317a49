"""Shared fixtures: a fixed seed and fp32 default dtype for every test; the tiny random model."""

from __future__ import annotations

import os

# The suite runs two workers on two cores, each torch process with two OpenMP threads. By default an
# idle OpenMP thread spins waiting for work, so two busy processes take each other's cores: two
# SmolLM2 QLoRA trainings side by side took 373 s instead of 62 s. Passive threads sleep instead
# (62 s; one process alone ~5% slower, so lorafit itself keeps the default). Set before torch loads
# OpenMP; the subprocesses the tests start inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model

from lorafit.base.config import TrainConfig
from lorafit.base.quiet import quiet_libraries
from lorafit.inputs import models
from tests.helpers import SHRUNK

quiet_libraries()


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def cpu_matmul(monkeypatch):
    """Set LORAFIT_CPU_MATMUL for this test: `cpu_matmul("onednn")`. The choice is cached per process
    (`base.matmul.cpu_backend`), so the cache is cleared on setting and again at teardown, pass or fail;
    oneDNN is skipped where this torch build has none."""
    from lorafit.base import matmul

    def choose(backend: str) -> None:
        if backend == "onednn" and not matmul.onednn_available():
            pytest.skip("this torch build has no oneDNN")
        monkeypatch.setenv("LORAFIT_CPU_MATMUL", backend)
        matmul.cpu_backend.cache_clear()

    yield choose
    matmul.cpu_backend.cache_clear()


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


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A LoRA adapter for the tiny model (hidden 64), saved the way lorafit saves them."""
    model = models.load_model(models.resolve("random:tiny"), torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    out = tmp_path_factory.mktemp("adapter") / "a"
    peft_model.save_pretrained(out)
    return out


@pytest.fixture
def loads(monkeypatch):
    """Every (dtype, quantization config) `models.load_model` is called with; the call is still made."""
    from lorafit.inputs import models

    calls = []
    real = models.load_model

    def spy(source, dtype, quantization_config=None, *args, **kwargs):
        calls.append((dtype, quantization_config))
        return real(source, dtype, quantization_config, *args, **kwargs)

    monkeypatch.setattr(models, "load_model", spy)
    return calls


@pytest.fixture(scope="session")
def shrunk_dirs(tmp_path_factory) -> dict[str, str]:
    """Model directories of phi-3-mini and mistral-7b shrunk to SHRUNK, random weights."""
    root = tmp_path_factory.mktemp("archs")
    return {
        arch: str(models.write_random_model({**models.arch_config(arch), **SHRUNK}, root / arch))
        for arch in ("phi-3-mini", "mistral-7b")
    }
