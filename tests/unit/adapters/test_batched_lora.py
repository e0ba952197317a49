"""The stacked (gather + bmm) mixed-adapter forward equals peft's loop over adapters."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from lorafit.adapters import batched as batched_lora
from lorafit.serving.registry import BASE, AdapterRegistry


def test_stacked_forward_equals_peft_mixed_batch(tiny_model):
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), adapter_name="x1"
    )
    # a second adapter with another rank and other targets, a third on everything
    model.add_adapter(
        "x2", LoraConfig(r=8, lora_alpha=32, target_modules=["k_proj", "down_proj"], init_lora_weights=False)
    )
    model.add_adapter("x3", LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    model.eval()
    names = ["x1", BASE, "x3", "x2", "x1"]
    ids = torch.randint(5, 4000, (len(names), 12))
    with torch.no_grad():
        expected = model(input_ids=ids, adapter_names=names).logits
        registry = AdapterRegistry(model, [Path("/")], max_resident=8)
        registry.resident.update({"x1": None, "x2": None, "x3": None})
        batched_lora.install(model, registry)
        calls = 0
        original = batched_lora._layer_stacks

        def counting(layer, stacks):
            nonlocal calls
            calls += 1
            return original(layer, stacks)

        batched_lora._layer_stacks = counting
        try:
            got = model(input_ids=ids, adapter_names=names).logits
        finally:
            batched_lora._layer_stacks = original
        base_only = model(input_ids=ids, adapter_names=[BASE] * len(names)).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    assert calls == 2 * 7  # every LoRA projection of both layers took the stacked path
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base_only, plain, rtol=1e-6, atol=1e-6)
    assert (got - base_only).abs().max() > 1e-3  # the adapters matter here
