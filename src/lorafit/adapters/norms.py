"""RMSNorm whose weight multiply lands in place: one new (tokens x hidden) buffer per norm, not two.

The Llama family's RMSNorm in transformers (Llama, Qwen2, Qwen3, Mistral, Phi-3: one forward) computes
`weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)`, writing the normalized input and then the product to
new memory. When the weight does not train (LoRA, QLoRA), backward needs only the weight from that product,
and nothing keeps the normalized input (the first product keeps x and the rsqrt), so the product may
overwrite it: the same values bit for bit, with one pass less into memory that is not in cache (on the
2-core CPU a fresh 4 MB output costs ~3x an in-place pass; the norms' weight products were 1.2% of a
LoRA step on SmolLM2, `bench/where_time_goes.py`). A training weight takes transformers' own expression.
"""

from __future__ import annotations

import types
from typing import Any

import torch

NORMS = frozenset({"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm", "Phi3RMSNorm"})


def rms_norm_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward, with `weight *` in place where the weight is frozen."""
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = (hidden_states * torch.rsqrt(variance + self.variance_epsilon)).to(input_dtype)
    if self.weight.requires_grad or self.weight.dtype != hidden_states.dtype:
        return self.weight * hidden_states
    return hidden_states.mul_(self.weight)


def install(model: torch.nn.Module) -> int:
    """Route the model's Llama-family RMSNorms through `rms_norm_forward`; returns how many."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in NORMS and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(rms_norm_forward, module)
            count += 1
    return count
