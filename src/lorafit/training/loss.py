"""Causal-LM loss that never materializes the full (tokens x vocab) logits.

The standard path computes fp32 logits for every position, padding and masked prompt included,
then a cross-entropy over them: with a 49k-152k vocabulary that tensor (and its gradient) is the
largest allocation of a LoRA step. Here only positions that carry loss are sent through the output
layer, in chunks, and each chunk's gradient is computed in the forward pass (the approach of
Liger-Kernel's fused linear cross-entropy), so at most one chunk of logits exists at a time and
nothing is recomputed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lorafit.base import matmul
from lorafit.base.device import matmul_dtype
from lorafit.inputs.data import IGNORE
from lorafit.measurement.estimate import LOSS_CHUNK, WEIGHT_GRAD_SLICE


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, y_i) with grads for h (and W when it trains) computed chunk by chunk.

    Every chunk's logits go into one fp32 buffer (and, computing in bf16/fp16, one half-precision buffer
    for the product and then the probabilities; training the output layer in bf16/fp16, one (V, d) buffer for
    its gradient's product), allocated once for the call: fresh ones per chunk were
    each new memory, which an allocator keeping freed pages (mimalloc without purge) left resident, 2.3x a
    chunk's logits in RSS (SmolLM2-135M, 4,096 tokens: 345 MB for 144 MB of buffers in bf16; Qwen2.5-0.5B,
    1,024 tokens: 910 for 445). The products compute in autocast's dtype when autocast is on (as the plain
    `h @ W.T` did under it), else in the hidden states' dtype."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int
    ) -> torch.Tensor:
        # hidden (N, d), weight (V, d), targets (N,)
        dtype = matmul_dtype(hidden.device, hidden.dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = min(chunk, hidden.shape[0])
        logits_buffer = torch.empty((rows, weight.shape[0]), dtype=torch.float32, device=hidden.device)
        half_buffer = None if dtype == torch.float32 else torch.empty_like(logits_buffer, dtype=dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            weight_buffer = torch.empty_like(w) if grad_weight is not None and half_buffer is not None else None
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start : start + chunk].to(dtype)
                y = targets[start : start + chunk]
                logits = logits_buffer[: len(h)]
                if half_buffer is None:
                    matmul.linear_into(logits, h, w)
                else:
                    logits.copy_(torch.mm(h, w.T, out=half_buffer[: len(h)]))
                total += _softmax_in_place(logits, y)
                # d loss / d logits = softmax - onehot
                logits[torch.arange(y.shape[0], device=y.device), y] -= 1.0
                probs = logits if half_buffer is None else half_buffer[: len(h)].copy_(logits)
                grad_hidden[start : start + chunk] = matmul.matmul(probs, w)
                if grad_weight is not None:
                    _accumulate_weight_grad(grad_weight, probs, h, weight_buffer)
        ctx.save_for_backward(grad_hidden, grad_weight if grad_weight is not None else torch.empty(0))
        ctx.weight_dtype = weight.dtype
        ctx.has_weight_grad = grad_weight is not None
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_out.to(grad_hidden.dtype)
        gw = (grad_weight * grad_out).to(ctx.weight_dtype) if ctx.has_weight_grad else None
        return gh, gw, None, None


def _accumulate_weight_grad(
    grad_weight: torch.Tensor, probs: torch.Tensor, h: torch.Tensor, buffer: torch.Tensor | None
) -> None:
    """grad_weight (V, d, fp32) += probs^T @ h, without a new (V, d) tensor per chunk: in fp32 the matmul
    accumulates in place; in half precision the product goes to `buffer` (allocated once per call) and is
    added in fp32, WEIGHT_GRAD_SLICE elements at a time, since adding a bf16 tensor to an fp32 one copies it
    to fp32 first (on CPU). A fresh product per chunk (and its fp32 copy) was as large as the output layer."""
    if buffer is None:
        grad_weight.addmm_(probs.T, h)
        return
    torch.mm(probs.T, h, out=buffer)
    rows = max(1, WEIGHT_GRAD_SLICE // buffer.shape[1])
    for total, part in zip(grad_weight.split(rows), buffer.split(rows), strict=True):
        total.add_(part)


def _softmax_in_place(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Turn fp32 logits (n, V) into their softmax in place (one buffer, few passes: the vocab-wide
    element-wise work is a large share of the loss's time on CPU); returns the summed cross-entropy
    sum_i log(sum_j exp(z_ij)) - z_i,y_i."""
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    top = logits.amax(dim=-1, keepdim=True)
    probs = logits.sub_(top).exp_()
    norm = probs.sum(dim=-1, keepdim=True)
    probs.div_(norm)
    return (top.squeeze(1) + norm.squeeze(1).log() - target_logit).sum()


def fused_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = LOSS_CHUNK
) -> tuple[torch.Tensor, int]:
    """Mean next-token loss over positions whose shifted label is not IGNORE, and their count.

    hidden: (B, T, d) final hidden states; weight: (V, d) output layer; labels: (B, T).
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE
    h = hidden[:, :-1][keep]  # (N, d)
    y = targets[keep]  # (N,)
    n = int(y.numel())
    if n == 0:
        return hidden.sum() * 0.0, 0
    total = _FusedLinearCrossEntropy.apply(h, weight, y, chunk)
    return total / n, n


def reference_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The standard path: full logits, shift, mean over non-ignored positions."""
    targets = labels[:, 1:]
    n = int((targets != IGNORE).sum())
    loss = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return loss / max(n, 1), n


def supports_fused_loss(model: Any) -> bool:
    """The fused path needs a plain bias-free output layer and no logit post-processing."""
    head = model.get_output_embeddings()
    cfg = model.config
    return (
        isinstance(head, torch.nn.Linear)
        and head.bias is None
        and not getattr(cfg, "final_logit_softcapping", None)
        and getattr(cfg, "logit_scale", None) in (None, 1.0)
    )


def causal_lm_loss(model: Any, inputs: dict[str, torch.Tensor], labels: torch.Tensor, fused: bool) -> torch.Tensor:
    """Loss of a causal LM on one batch. `model` is the transformers model (peft's base model when wrapped)."""
    if not fused:
        logits = model(**inputs).logits
        return reference_cross_entropy(logits, labels)[0]
    hidden = model.get_decoder()(**inputs).last_hidden_state  # (B, T, d)
    return fused_linear_cross_entropy(hidden, model.get_output_embeddings().weight, labels)[0]


class LossModule(torch.nn.Module):
    """The model and its loss as one module, so DDP/FSDP wrap the whole forward: DDP reduces gradients
    only for forwards that go through its wrapper, and the fused loss calls the decoder directly."""

    def __init__(self, model: Any, fused: bool) -> None:
        super().__init__()
        self.model = model
        self.fused = fused
        # Accelerate places (or refuses to move) quantized models by these flags: keep its choice the
        # same as for the bare model
        for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "hf_device_map"):
            if getattr(model, flag, None):
                setattr(self, flag, getattr(model, flag))

    def forward(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return causal_lm_loss(base, inputs, labels, self.fused)
