"""The lean SwiGLU keeps gate and up for backward, not silu(gate), and gives bit-for-bit the same gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorafit.adapters import methods as adapters
from lorafit.adapters import swiglu
from lorafit.base.config import TrainConfig
from lorafit.inputs import data, models
from tests.helpers import saved_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_equals_autograd_bit_for_bit(dtype):
    gate = torch.randn(3, 7, 40, dtype=dtype, requires_grad=True)
    up = torch.randn(3, 7, 40, dtype=dtype, requires_grad=True)
    grad = torch.randn(3, 7, 40, dtype=dtype)
    expected = F.silu(gate) * up
    expected_grads = torch.autograd.grad(expected, (gate, up), grad)
    out = swiglu.SiluMul.apply(gate, up)
    grads = torch.autograd.grad(out, (gate, up), grad)
    assert torch.equal(out, expected)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected_grads, strict=True))


def saved_bytes_and_grads(model, batch) -> tuple[int, torch.Tensor, dict[str, torch.Tensor]]:
    """Bytes autograd saves (`tests.helpers.saved_bytes`), the loss and the gradients."""
    model.zero_grad(set_to_none=True)
    saved, loss = saved_bytes(model, batch.model_inputs(torch.device("cpu")), batch.labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return saved, loss.detach(), grads


def unpatched(model) -> None:
    for module in model.modules():
        if module.__dict__.get("forward") is not None and module.forward.__func__ in (
            swiglu._gated_forward,
            swiglu._fused_gated_forward,
        ):
            del module.forward


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_mlp_keeps_one_intermediate_less_with_the_same_gradients(tiny_source, tiny_tokenizer, method):
    """Same loss and gradients exactly, and the saved activations shrink by exactly one
    tokens x intermediate tensor per layer (silu(gate) of every MLP)."""
    cfg = TrainConfig(method=method, lora_dropout=0.0)
    model = adapters.apply_method(models.load_model(tiny_source, torch.float32), cfg).train()
    samples, _ = data.build_samples("alpaca", tiny_tokenizer, max_length=64, max_samples=4)
    batch = data.collate([[s] for s in samples], tiny_tokenizer.pad_token_id, packed=False)
    lean_bytes, lean_loss, lean_grads = saved_bytes_and_grads(model, batch)
    unpatched(model)
    plain_bytes, plain_loss, plain_grads = saved_bytes_and_grads(model, batch)
    config = model.config if method == "full" else model.get_base_model().config
    silu_outputs = config.num_hidden_layers * batch.input_ids.numel() * config.intermediate_size * 4
    assert plain_bytes - lean_bytes == silu_outputs
    assert torch.equal(lean_loss, plain_loss)
    assert lean_grads.keys() == plain_grads.keys()
    assert all(torch.equal(lean_grads[n], plain_grads[n]) for n in plain_grads)


def test_install_covers_llama_and_phi3_mlps_and_leaves_others(shrunk_dirs):
    phi3 = models.load_model(models.resolve(shrunk_dirs["phi-3-mini"]), torch.float32)
    mistral = models.load_model(models.resolve(shrunk_dirs["mistral-7b"]), torch.float32)
    assert swiglu.install(phi3) == phi3.config.num_hidden_layers
    assert swiglu.install(mistral) == mistral.config.num_hidden_layers
    gelu = torch.nn.Module()
    gelu.gate_proj, gelu.up_proj, gelu.down_proj = (torch.nn.Linear(4, 4) for _ in range(3))
    gelu.act_fn = torch.nn.GELU()
    assert swiglu.install(gelu) == 0
