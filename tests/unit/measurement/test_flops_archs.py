"""Training FLOPs on Phi-3 (fused qkv_proj and gate_up_proj) and Mistral: the analytic count against
torch's FlopCounterMode on the shipped configs shrunk to tiny sizes, and the shape the memory plan derives
from config.json alone against the one counted on the loaded model. Attention runs on SDPA's math backend,
which the counter sees (as in test_flops.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lorafit.adapters import checkpointing
from lorafit.adapters import methods as adapters
from lorafit.base.config import TrainConfig
from lorafit.inputs import data, models
from lorafit.measurement import estimate, flops, plan
from tests.helpers import counted_flops, run_samples


@pytest.mark.parametrize("arch", ["phi-3-mini", "mistral-7b"])
@pytest.mark.parametrize(
    "options",
    [
        {"method": "lora"},
        {"method": "full"},
        {"method": "lora", "gradient_checkpointing": True},
        {"method": "lora", "gradient_checkpointing": True, "checkpoint_layers": 1},
        {"method": "lora", "target_modules": "attention"},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_training_flops_equal_the_counter(shrunk_dirs, arch, options):
    """A LoRA (or full) step on every sample: blocks, attention, the head on loss tokens; with checkpointing
    the recomputed forward. LoRA on Phi-3's qkv_proj counts r·(d + q + k + v) adapter parameters."""
    if options.get("target_modules") == "attention":  # LoRA on q, k and v only: o_proj and the MLP bare
        options = {
            **options,
            "target_modules": ["qkv_proj"] if arch == "phi-3-mini" else ["q_proj", "k_proj", "v_proj"],
        }
    cfg = TrainConfig(model=shrunk_dirs[arch], lora_dropout=0.0, **options)
    source = models.resolve(cfg.model)
    tokenizer = models.load_tokenizer(source)
    model = adapters.apply_method(models.load_model(source, torch.float32), cfg).train()
    fraction = checkpointing.restrict(model, cfg)
    samples, _ = data.build_samples("alpaca", tokenizer, 128, max_samples=3)
    seen = counted_flops(lambda: run_samples(model, tokenizer, samples))
    batch = data.collate([[s] for s in samples], tokenizer.pad_token_id, packed=False)
    shape = flops.model_shape(model)
    full = cfg.method == "full"
    assert flops.training_flops(shape, full, batch.sample_lengths, batch.loss_tokens, recompute=fraction) == seen
    if arch == "phi-3-mini" and not full:
        r, d, q, kv, f = cfg.lora_r, 64, 64, 32, 96
        per_layer = r * (d + q + 2 * kv)
        if cfg.target_modules != ["qkv_proj"]:
            per_layer += r * (q + d) + r * (d + 2 * f) + r * (f + d)
        assert shape.n_lora == 2 * per_layer


@pytest.mark.parametrize("arch", ["phi-3-mini", "mistral-7b"])
@pytest.mark.parametrize("targets", [None, "attention"])
def test_the_plans_shape_from_config_equals_the_models(shrunk_dirs, arch, targets):
    """What the memory plan weighs step times with (from config.json alone) is what the loaded model counts."""
    cfg = TrainConfig(model=shrunk_dirs[arch])
    if targets:
        cfg.target_modules = ["qkv_proj"] if arch == "phi-3-mini" else ["q_proj", "k_proj", "v_proj"]
    model = adapters.apply_method(models.load_model(models.resolve(cfg.model), torch.float32), cfg)
    from_config = plan.model_shape(estimate.arch_from_config(estimate.model_config(cfg.model)), cfg)
    assert dataclasses.replace(from_config, first_inputs_grad=False) == flops.model_shape(model)
