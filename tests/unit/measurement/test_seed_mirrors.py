"""bench/seed_mirrors.py (the reference studies mirrored by the estimator and analytic counts) on a few
cells, so the script that writes docs/benchmarks/seed-mirrors.md keeps running and its findings keep
holding: one cell of the RTX 4060 grid, the guide's trainable count, the QLoRA report's own counts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from lorafit.measurement import estimate as est

SCRIPT = Path(__file__).resolve().parents[3] / "bench" / "seed_mirrors.py"


@pytest.fixture(scope="module")
def mirrors() -> ModuleType:
    spec = importlib.util.spec_from_file_location("seed_mirrors", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["seed_mirrors"] = module  # dataclasses and typing look modules up by name
    spec.loader.exec_module(module)
    return module


def test_help_names_the_page_option(mirrors: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        mirrors.main(["--help"])
    assert stop.value.code == 0
    assert "--md" in capsys.readouterr().out


def test_one_rtx4060_cell_and_the_precision_finding(mirrors: ModuleType) -> None:
    """A cell of the study's grid, read from the example sweep: bigger batches need more, checkpointing
    less; LoRA's peak is the same in fp16 and bf16 (the page's answer to the study's bf16 explanation),
    QLoRA's is larger in fp16 (fp32 unquantized weights)."""
    grid = mirrors.rtx4060_grid()
    assert {"method", "batch_size", "max_length", "optimizer", "precision"} <= set(grid["grid"])
    config = est.model_config(grid["base"]["model"])
    budget = 8 * 10**9

    def cell(method: str, precision: str, batch: int) -> dict:
        return mirrors.rtx4060_cell(
            grid["base"], config, budget, method=method, optimizer="adamw", precision=precision,
            max_length=2048, batch_size=batch,
        )  # fmt: skip

    one, two = cell("lora", "fp16", 1), cell("lora", "fp16", 2)
    assert two["peak_bytes"] > one["peak_bytes"] > one["peak_checkpointed_bytes"]
    assert one["fits"] == (one["peak_bytes"] <= budget)
    assert one["fits_checkpointed"]  # the study's 2048 tokens fit 8 GB with checkpointing
    assert cell("lora", "bf16", 1)["peak_bytes"] == one["peak_bytes"]
    assert cell("qlora", "fp16", 1)["peak_bytes"] > cell("qlora", "bf16", 1)["peak_bytes"]


def test_guide_trainable_count_is_all_seven_projections(mirrors: ModuleType) -> None:
    """r=64 on q, k, v, o, gate, up, down of Llama-3-8B, counted here from its shapes; and 33.5M (the
    guide's figure) is q and v alone at full key/value width."""
    c = est.model_config("random:llama-3-8b")
    d, f, layers, r = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], 64
    kv = c["num_key_value_heads"] * c["head_dim"]
    by_hand = layers * r * (2 * (d + d) + 2 * (d + kv) + 3 * (d + f))
    g = mirrors.guide()
    assert g["rows"]["lora"]["trainable_params"] == g["rows"]["qlora"]["trainable_params"] == by_hand
    assert g["qv_no_gqa_r64"] == layers * 2 * r * (d + d)
    assert abs(g["qv_no_gqa_r64"] - 33.5e6) < 0.1e6
    assert g["rows"]["lora"]["max_batch"]["24GB"]["plain"] == 1  # the guide's own answer for LoRA
    assert g["fp16_weights_bytes"] < 17e9  # ~16 GB, not the prose's 32 GB


def test_qlora_report_counts_and_flops(mirrors: ModuleType) -> None:
    """The report's own parameter counts (Tables 6 and 12) from TinyLlama's shapes, and QLoRA's FLOPs per
    step near 4/6 of full fine-tuning's (frozen base: no weight gradients), not the report's 26%."""
    q = mirrors.qlora_report()
    assert q["total_params"] == 1_100_048_384
    assert q["trainable_params"] == 12_615_680
    assert round(q["fp16_bytes"] / 2**20, 2) == 2098.18
    ratio = q["flops"]["qlora"]["optimizer_step"] / q["flops"]["full"]["optimizer_step"]
    assert 0.6 < ratio < 0.75
    assert q["base_4bit_bytes"] > q["fp16_bytes"] / 4  # embeddings, head and constants are not 4-bit
