"""A QLoRA adapter served on a dense base, or on a 4-bit base of another quant type, is named in one
warning (it runs, but not on the base it was trained with); on its own base, and for LoRA adapters or
bare adapter directories (which do not record their base), nothing is logged."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from lorafit.base.config import ServeConfig, TrainConfig
from lorafit.run.rundir import RunDir
from lorafit.serving.registry import AdapterRegistry
from lorafit.serving.server import build


def make_run(root: Path, name: str, adapter_dir: Path, **cfg) -> Path:
    """A finished training run as the trainer leaves it: config.yaml and adapter/."""
    run = RunDir.create(root / name, cfg.get("method", "lora"))
    run.write_config(TrainConfig(model="random:tiny", **cfg))
    shutil.copytree(adapter_dir, run.path / RunDir.ADAPTER)
    return run.path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, adapter_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    bare = root / "bare"
    shutil.copytree(adapter_dir, bare)
    broken = make_run(root, "broken", adapter_dir, method="qlora")
    (broken / RunDir.CONFIG).write_text("method: [qlora\n")  # not YAML: registered unchecked, no crash
    return {
        "broken": broken / RunDir.ADAPTER,  # its adapter/: the run itself no longer opens
        "q_fp4": make_run(root, "q_fp4", adapter_dir, method="qlora", quant_type="fp4"),
        "q_nf4": make_run(root, "q_nf4", adapter_dir, method="qlora", quant_type="nf4"),
        "lora": make_run(root, "lora", adapter_dir, method="lora"),
        "bare": bare,
    }


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "lorafit.serve" and r.levelno == logging.WARNING]


@pytest.mark.parametrize(
    "base, adapter, expected",
    [
        ("none", "q_fp4", "trained on a fp4 4-bit base and is served on a dense (16/32-bit) base"),
        ("nf4", "q_fp4", "trained on a fp4 4-bit base and is served on a nf4 4-bit base"),
        ("fp4", "q_nf4", "trained on a nf4 4-bit base and is served on a fp4 4-bit base"),
        ("none", "q_nf4", "trained on a nf4 4-bit base and is served on a dense"),
    ],
)
def test_qlora_adapter_on_another_base_is_named_once(runs, caplog, base, adapter, expected):
    registry = AdapterRegistry(None, [runs[adapter].parent], 8, base)
    with caplog.at_level(logging.WARNING, logger="lorafit.serve"):
        registry.register("tenant", runs[adapter])
        registry.register("tenant", runs[adapter] / RunDir.ADAPTER)  # the adapter/ inside the run: same adapter
        registry.register("tenant", runs[adapter])  # registered again (a run-time load): no second warning
    (message,) = warnings(caplog)
    assert "'tenant'" in message and expected in message
    assert message.endswith(f"serve it with --quantize {adapter[2:]}")


@pytest.mark.parametrize(
    "base, adapter",
    [("nf4", "q_nf4"), ("fp4", "q_fp4"), ("none", "lora"), ("nf4", "lora"), ("nf4", "bare"), ("none", "broken")],
)
def test_no_warning_on_the_base_it_was_trained_with(runs, caplog, base, adapter):
    registry = AdapterRegistry(None, [runs[adapter].parent], 8, base)
    with caplog.at_level(logging.WARNING, logger="lorafit.serve"):
        registry.register("tenant", runs[adapter])
    assert warnings(caplog) == []


def test_serve_warns_for_a_qlora_run_on_its_dense_base(runs, caplog):
    cfg = ServeConfig(model="random:tiny", device="cpu", adapter=[f"q={runs['q_nf4']}", f"plain={runs['lora']}"])
    with caplog.at_level(logging.WARNING, logger="lorafit.serve"):
        build(cfg)
    (message,) = warnings(caplog)
    assert message.startswith("adapter 'q' is a QLoRA adapter trained on a nf4 4-bit base")
