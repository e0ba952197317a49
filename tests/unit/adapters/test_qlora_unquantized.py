"""QLoRA's unquantized weights (embeddings, output layer, norms): compute dtype by default, fp32 on request.

bitsandbytes quantizes only the decoder's linear projections; what it leaves dense is kept in the compute
dtype unless `fp32_unquantized` asks for peft's fp32 cast (`prepare_model_for_kbit_training`)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lorafit.adapters import methods as adapters
from lorafit.base.config import TrainConfig
from lorafit.inputs import models
from lorafit.run.rundir import RunDir
from lorafit.training.loop import fit, setup


def is_4bit(p: torch.Tensor) -> bool:
    return p.__class__.__name__ == "Params4bit"


def load_qlora_base(precision: str = "bf16") -> tuple[object, TrainConfig]:
    """The tiny random model as QLoRA loads it: 4-bit projections, the rest in the compute dtype."""
    cfg = TrainConfig(model="random:tiny", method="qlora", precision=precision)
    dtype = adapters.base_dtype("qlora", precision)
    model = models.load_model(models.resolve("random:tiny"), dtype, adapters.quantization_config(cfg, dtype))
    return model, cfg


def base_params(model) -> dict[str, torch.Tensor]:
    """The base model's parameters by name as loaded (peft's wrapper prefixes are stripped)."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        out[name] = p
    return out


def prepared(fp32_unquantized: bool, **kw) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], object]:
    """(weights as loaded, base weights after apply_method, the peft model)."""
    model, cfg = load_qlora_base()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(model="random:tiny", method="qlora", precision="bf16", fp32_unquantized=fp32_unquantized, **kw)
    peft_model = adapters.apply_method(model, cfg)
    return before, base_params(peft_model), peft_model


def test_off_keeps_unquantized_weights_in_the_compute_dtype():
    before, after, _ = prepared(False)
    dense = [n for n, p in after.items() if not is_4bit(p)]
    # the tiny model has untied embeddings: embed_tokens, lm_head, 2 x 2 block norms + the final norm
    assert "model.embed_tokens.weight" in dense and "lm_head.weight" in dense and len(dense) == 2 + 5
    for n in dense:
        assert after[n].dtype == torch.bfloat16, n
        assert torch.equal(after[n], before[n]), n


def test_on_casts_unquantized_weights_to_fp32_exactly():
    before, after, _ = prepared(True)
    dense = [n for n, p in after.items() if not is_4bit(p)]
    assert len(dense) == 7
    for n in dense:
        assert after[n].dtype == torch.float32, n
        # bf16 -> fp32 is exact: the same values, wider
        assert torch.equal(after[n], before[n].float()), n


@pytest.mark.parametrize("fp32_unquantized", [False, True])
def test_4bit_weights_are_untouched_and_only_lora_trains(fp32_unquantized):
    before, after, peft_model = prepared(fp32_unquantized)
    packed = [n for n, p in after.items() if is_4bit(p)]
    assert len(packed) == 2 * 7
    for n in packed:
        assert after[n].dtype == torch.uint8 and torch.equal(after[n], before[n]), n
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_on_matches_peft_prepare_model_for_kbit_training():
    """With the flag on, every parameter has the dtype and frozen state peft's preparation gives it."""
    from peft import prepare_model_for_kbit_training

    ref_model, _ = load_qlora_base()
    ref = prepare_model_for_kbit_training(ref_model, use_gradient_checkpointing=False)
    model, _ = load_qlora_base()
    cfg = TrainConfig(model="random:tiny", method="qlora", precision="bf16", fp32_unquantized=True)
    ours = adapters.prepare_kbit_base(model, cfg)
    got = {n: (p.dtype, p.requires_grad) for n, p in ours.named_parameters()}
    want = {n: (p.dtype, p.requires_grad) for n, p in ref.named_parameters()}
    assert got == want


def test_off_saves_two_bytes_per_unquantized_element():
    _, after_off, off = prepared(False)
    _, _, on = prepared(True)
    dense_elements = sum(p.numel() for p in after_off.values() if not is_4bit(p))
    saved = adapters.stored_weight_bytes(on) - adapters.stored_weight_bytes(off)
    assert saved == 2 * dense_elements  # fp32 (4 bytes) vs bf16 (2 bytes)


@pytest.mark.parametrize("gradient_checkpointing", [None, True])
def test_checkpointing_follows_the_config_and_none_means_off(gradient_checkpointing):
    _, _, peft_model = prepared(False, gradient_checkpointing=gradient_checkpointing)
    assert peft_model.base_model.model.model.gradient_checkpointing is bool(gradient_checkpointing)


def train(tmp_path: Path, **kw):
    cfg = TrainConfig(
        model="random:tiny",
        data="alpaca",
        method="qlora",
        precision="bf16",
        max_samples=8,
        batch_size=2,
        max_length=64,
        max_steps=2,
        learning_rate=1e-2,
        plan_memory=False,
        profile_warmup_steps=1,
        out=str(tmp_path / "run"),
        **kw,
    )
    Path(cfg.out).mkdir(parents=True)
    s = setup(cfg)
    lora_before = {n: p.detach().clone() for n, p in s.peft_model.named_parameters() if p.requires_grad}
    summary = fit(s, RunDir(cfg.out))
    return s, lora_before, summary


@pytest.mark.parametrize(
    ("fp32_unquantized", "gradient_checkpointing", "dense_dtype"),
    [(False, False, torch.bfloat16), (True, False, torch.float32), (False, True, torch.bfloat16)],
)
def test_qlora_trains_both_ways(tmp_path, fp32_unquantized, gradient_checkpointing, dense_dtype):
    s, lora_before, summary = train(
        tmp_path, fp32_unquantized=fp32_unquantized, gradient_checkpointing=gradient_checkpointing
    )
    assert summary.status == "ok"
    assert math.isfinite(summary.losses.loss_first) and math.isfinite(summary.losses.loss_last)
    dense = [p for p in base_params(s.peft_model).values() if not is_4bit(p)]
    assert dense and all(p.dtype == dense_dtype for p in dense)
    # every layer's adapters learned, the first block's too (gradients reach it under checkpointing)
    changed = {
        n
        for n, p in s.peft_model.named_parameters()
        if n in lora_before and "lora_B" in n and not torch.equal(p, lora_before[n])
    }
    assert any(".layers.0." in n for n in changed) and any(".layers.1." in n for n in changed)
