"""Which decoder layers recompute their activations in backward, and where their inputs wait.

transformers checkpoints every `GradientCheckpointingLayer` once `gradient_checkpointing_enable()` ran
(the switch is each layer's `gradient_checkpointing` attribute; the recompute goes through the layer's
`_gradient_checkpointing_func`). Two refinements, both chosen by the memory plan
(lorafit.measurement.plan):

- selective: checkpointing stays on only in the first k layers. In backward the later layers run first
  and free their activations, so the first layers' recompute happens when the least is held;
- offload (CUDA): a checkpointed layer's input, all it keeps, is copied to pinned host memory in the
  forward and back in its backward, as Unsloth's offloaded gradient checkpointing
  (`Unsloth_Offloaded_Gradient_Checkpointer`): the device then holds one layer's activations at a time.
"""

from __future__ import annotations

from typing import Any

import torch

from lorafit.base.config import TrainConfig
from lorafit.base.errors import UserError


def decoder_layers(model: Any) -> list[Any]:
    """The model's checkpointable layers, first to last."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def restrict(model: Any, cfg: TrainConfig) -> float:
    """Leave checkpointing on only in the first `cfg.checkpoint_layers` layers (offloading their inputs
    with --offload-activations); returns the fraction of layers that recompute (0.0 without
    checkpointing), which the HFU count needs."""
    if not cfg.gradient_checkpointing:
        return 0.0
    layers = decoder_layers(model)
    if not layers:  # checkpointing of another kind (the model's own): all of it, as far as lorafit knows
        if cfg.checkpoint_layers or cfg.offload_activations:
            raise UserError(
                "--checkpoint-layers and --offload-activations need decoder layers built on transformers' "
                "GradientCheckpointingLayer; this model has none",
                field="checkpoint_layers",
            )
        return 1.0
    if cfg.offload_activations:  # the offloaded layer's output needs a grad-requiring input to backpropagate
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.enable_input_require_grads()
    keep = len(layers) if cfg.checkpoint_layers is None else min(cfg.checkpoint_layers, len(layers))
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = layer.gradient_checkpointing and i < keep
        if layer.gradient_checkpointing and cfg.offload_activations:
            layer._gradient_checkpointing_func = offloaded_checkpoint
    return sum(bool(layer.gradient_checkpointing) for layer in layers) / len(layers)


def offloaded_checkpoint(function: Any, *args: Any) -> Any:
    """transformers' checkpoint hook: `function(hidden_states)` runs the layer (its other inputs bound)."""
    if len(args) != 1 or not isinstance(args[0], torch.Tensor):
        raise TypeError("offloaded checkpointing takes a layer called with its hidden states alone")
    return OffloadedCheckpoint.apply(function, args[0])


class OffloadedCheckpoint(torch.autograd.Function):
    """Run a layer without keeping its activations; keep its input in host memory; in backward bring the
    input back, rerun the layer with the forward's RNG and autocast state (same dropout, same dtypes)
    and backpropagate through it. Parameter gradients accumulate as in reentrant checkpointing."""

    @staticmethod
    def forward(ctx: Any, function: Any, hidden: torch.Tensor) -> torch.Tensor:
        ctx.function, ctx.device = function, hidden.device
        ctx.rng = torch.get_rng_state(), torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        kind = hidden.device.type
        ctx.autocast = kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)
        host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=hidden.is_cuda)
        ctx.host = host.copy_(hidden.detach(), non_blocking=hidden.is_cuda)
        with torch.no_grad():
            return function(hidden)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        hidden = ctx.host.to(ctx.device, non_blocking=True).requires_grad_(True)
        cpu_rng, cuda_rng = ctx.rng
        kind, autocast, dtype = ctx.autocast
        with torch.random.fork_rng(devices=[ctx.device] if cuda_rng is not None else []):
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, ctx.device)
            with torch.enable_grad(), torch.autocast(kind, dtype=dtype, enabled=autocast):
                out = ctx.function(hidden)
        torch.autograd.backward(out, grad)
        return None, hidden.grad
