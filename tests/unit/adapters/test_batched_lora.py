"""The stacked (gather + bmm) mixed-adapter forward equals peft's loop over adapters."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from lorafit.serving.registry import BASE
from tests.helpers import stacked_forward


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
        got, base_only, calls = stacked_forward(model, ids, names)
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    assert calls == 2 * 7  # every LoRA projection of both layers took the stacked path
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base_only, plain, rtol=1e-6, atol=1e-6)
    assert (got - base_only).abs().max() > 1e-3  # the adapters matter here
