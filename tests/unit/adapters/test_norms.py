"""The in-place RMSNorm gives transformers' values and gradients bit for bit, and saves no more."""

from __future__ import annotations

import importlib

import pytest
import torch

from lorafit.adapters import norms


@pytest.mark.parametrize("name", sorted(norms.NORMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_trains", [False, True])
def test_in_place_norm_equals_transformers_bit_for_bit(name, dtype, weight_trains):
    family = name.removesuffix("RMSNorm").lower()
    cls = getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), name)
    module = cls(48, eps=1e-5).to(dtype)
    module.weight.data.normal_(1, 0.3)
    module.weight.requires_grad_(weight_trains)
    x = torch.randn(3, 5, 48, dtype=dtype, requires_grad=True)
    grad = torch.randn(3, 5, 48, dtype=dtype)
    expected = module(x)
    expected_grads = torch.autograd.grad(expected, [x, *([module.weight] if weight_trains else [])], grad)
    assert norms.install(module) == 1
    out = module(x)
    grads = torch.autograd.grad(out, [x, *([module.weight] if weight_trains else [])], grad)
    assert out.dtype == expected.dtype and torch.equal(out, expected)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected_grads, strict=True))


def test_frozen_weight_product_is_written_over_the_normalized_input():
    """One (tokens x hidden) buffer less per norm: the output is the normalized input's storage."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    module = LlamaRMSNorm(48).requires_grad_(False)
    norms.install(module)
    created: list[int] = []

    class Allocations(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.numel() == 3 * 5 * 48 and not func._schema.is_mutable:
                created.append(out.untyped_storage().data_ptr())
            return out

    x = torch.randn(3, 5, 48, requires_grad=True)
    with Allocations():
        out = module(x)
    assert len(created) == 2  # x squared, x * rsqrt; not the product
    assert out.untyped_storage().data_ptr() == created[-1]
