"""The adapter registry accepts what users hand it: a PEFT adapter directory, or a training run
directory (config.yaml + adapter/), as `lorafit merge` does; a full fine-tune's run is refused clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorafit.base.config import TrainConfig
from lorafit.run.rundir import RunDir
from lorafit.serving.registry import AdapterError, AdapterRegistry


def _adapter(path: Path) -> Path:
    """The files the registry checks before loading (it loads on first use, not at register)."""
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    save_file({"w": torch.zeros(1)}, str(path / "adapter_model.safetensors"))
    return path


def _run(path: Path, method: str, trained: bool = True) -> Path:
    path.mkdir(parents=True)
    run = RunDir(path)
    run.write_config(TrainConfig(model="random:tiny", method=method, out=str(path)))
    if trained:
        _adapter(run.weights_dir("lora"))
    return path


def test_a_run_directory_registers_its_adapter(tmp_path):
    run = _run(tmp_path / "runs" / "r1", "lora")
    registry = AdapterRegistry(None, [tmp_path / "runs"], max_resident=2)
    registry.register("r1", run)
    assert registry.paths["r1"] == (run / "adapter").resolve()


def test_a_plain_adapter_directory_still_registers(tmp_path):
    adapter = _adapter(tmp_path / "a1")
    registry = AdapterRegistry(None, [tmp_path], max_resident=2)
    registry.register("a1", adapter)
    assert registry.paths["a1"] == adapter.resolve()


@pytest.mark.parametrize(
    ("method", "trained", "message"),
    [("full", False, "full fine-tune"), ("lora", False, "did training finish")],
)
def test_a_run_without_an_adapter_is_a_clear_error(tmp_path, method, trained, message):
    run = _run(tmp_path / "r", method, trained)
    registry = AdapterRegistry(None, [tmp_path], max_resident=2)
    with pytest.raises(AdapterError, match=message) as info:
        registry.register("r", run)
    assert info.value.status == 400


def test_a_run_directory_outside_the_allowed_ones_is_refused(tmp_path):
    run = _run(tmp_path / "elsewhere" / "r", "lora")
    registry = AdapterRegistry(None, [tmp_path / "allowed"], max_resident=2)
    with pytest.raises(AdapterError) as info:
        registry.register("r", run)
    assert info.value.code == "forbidden_path"
