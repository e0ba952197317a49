"""The memory breakdown's parts on a GPU, with the device faked: the runtime is what the process holds
outside PyTorch's allocator, and paged optimizer state (CUDA managed memory, not in the peak) is reported
apart instead of being subtracted from a peak that does not contain it."""

from __future__ import annotations

import torch

from lorafit.measurement.figures import PeakMemory
from lorafit.training.summarize import gradient_bytes, memory_breakdown

MiB = 2**20


def model_and_adamw() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    model[0].weight.requires_grad_(False)  # frozen, as a base is
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.randn(4, 64)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_gpu_runtime_is_the_memory_outside_the_allocator():
    model, optimizer = model_and_adamw()
    peak = PeakMemory(kind="cuda", peak_bytes=100 * MiB, outside_allocator_bytes=30 * MiB)
    grads = gradient_bytes(model.parameters())
    parts = memory_breakdown(model, optimizer, peak, None, grads, paged=False)
    assert parts.runtime == 30 * MiB
    assert grads == 4 * (64 + 64 * 8 + 8)  # only the trained tensors have .grad
    assert parts.grads == grads and parts.paged_optimizer_state is None
    assert parts.optimizer_state > 2 * parts.trainable  # two fp32 moments (+ step counts)
    assert parts.activations_workspace == 100 * MiB - 30 * MiB - parts.weights - parts.trainable - grads - (
        parts.optimizer_state
    )


def test_paged_optimizer_state_is_not_subtracted_from_the_peak():
    model, optimizer = model_and_adamw()
    peak = PeakMemory(kind="cuda", peak_bytes=100 * MiB, outside_allocator_bytes=30 * MiB)
    unpaged = memory_breakdown(model, optimizer, peak, None, 0, paged=False)
    paged = memory_breakdown(model, optimizer, peak, None, 0, paged=True)
    assert paged.optimizer_state == 0 and paged.paged_optimizer_state == unpaged.optimizer_state > 0
    # the state was never in the peak, so the remainder is larger by exactly that much
    assert paged.activations_workspace == unpaged.activations_workspace + unpaged.optimizer_state
    assert "paged_optimizer_state" not in dict(paged.items())  # not one of the parts that add up to the peak
