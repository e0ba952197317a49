"""A leaner LoRA branch for training: the same function peft computes, with less memory and fewer passes.

peft computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`. With dropout on, every adapted
projection draws its own fp32 mask of the input's size, keeps that mask *and* the dropped input
for backward, scales the full `tokens x out` output, and adds it (for 4-bit bases, after a
defensive clone). On SmolLM2-135M that is ~80 MB of saved tensors per layer at 2k tokens, and
Bernoulli sampling alone was 14% of a CPU step.

`LoraBranch` computes the same sum in one autograd node:
- the dropout mask comes from a per-call seed and is drawn again in backward, so nothing but the
  (shared) input is kept;
- on CPU at the usual small p, only the dropped positions are drawn: the gaps between them are
  geometric, so ~p*n random numbers stand for n Bernoulli draws, and zeroing them is a scatter of
  ~p*n writes (p = 0.05, SmolLM2's 576 -> 576 projection at 1768 tokens: forward + backward 3.0 ms
  over no dropout, against 7.3 ms for a dense mask drawn, compared and applied twice;
  bench/fused_dropout.py). The drop probability is exact;
- elsewhere (CUDA, or p >= SPARSE_BELOW on CPU) the mask is dense, drawn as 16-bit integers, four
  per 64-bit random word (5x cheaper than `bernoulli_`); p is rounded to a multiple of 1/65536 and
  the kept values are rescaled by the exact keep probability, so the branch stays unbiased;
- the scalings (LoRA's and dropout's) are applied to the rank-r intermediate, not the output;
- the base output takes the update in place of a separate add (`addmm`); for a frozen dense or 4-bit base
  the order is reversed, the update first and the base matmul accumulating onto it last, so that under
  non-reentrant checkpointing a layer's recompute skips the base matmul of its last projection
  (`frozen_linear`).

`install(model)` switches the forward of peft's LoRA linear layers (dense, 4-bit, 8-bit) to it;
whatever it does not cover (DoRA and other variants, several active adapters, merged or disabled
adapters, mixed-adapter batches, inference) goes through peft's own forward unchanged. Weights,
state dicts and saved adapters are peft's as before.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import Any

import torch

from lorafit.base import matmul
from lorafit.base.device import matmul_dtype

MASK_LEVELS = 65536  # drop probability resolution of dense masks: 16-bit uniform integers
# Below this p drawing the dropped positions is cheaper on CPU than a dense mask (bench/fused_dropout.py,
# 1768 tokens, 576 -> 576, forward + backward over p = 0: positions +3.0 ms at p = 0.05, +5.0 at 0.1,
# +10.5 at 0.3; a dense mask +7.3, +7.9, +11.7).
SPARSE_BELOW = 0.3


def dropped_mask(shape: torch.Size, p: float, seed: int, device: torch.device) -> tuple[torch.Tensor, float]:
    """Boolean mask of dropped elements (each dropped with probability ~p), reproducible from `seed`,
    and the exact keep probability the kept elements must be divided by."""
    threshold = round(p * MASK_LEVELS)
    n = math.prod(shape)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device, generator=generator)
    mask = words.view(torch.int16)[:n].view(shape) < (-(MASK_LEVELS // 2) + threshold)
    return mask, 1.0 - threshold / MASK_LEVELS


def dropped_positions(n: int, p: float, seed: int) -> torch.Tensor:
    """Sorted flat indices of the dropped elements among `n`, each dropped independently with probability
    exactly `p`, reproducible from `seed` (CPU).

    The gaps between successes of independent Bernoulli(p) trials are Geometric(p), drawn by inversion:
    gap = 1 + floor(ln(1 - U) / ln(1 - p)) with U ~ Uniform[0, 1) in float64, since
    P(gap > k) = P(1 - U <= (1 - p)^k) = (1 - p)^k (the inversion method; Devroye, Non-Uniform Random
    Variate Generation, 1986). Drawn in rounds of the expected count plus six standard deviations until
    they pass n."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    per_gap = 1.0 / math.log1p(-p)
    rounds, last = [], -1
    while last < n:
        expected = (n - last) * p
        u = torch.rand(int(expected + 6 * math.sqrt(expected) + 16), dtype=torch.float64, generator=generator)
        positions = torch.log1p(u.neg_()).mul_(per_gap).floor_().to(torch.int64).add_(1).cumsum_(0).add_(last)
        rounds.append(positions)
        last = int(positions[-1])
    positions = rounds[0] if len(rounds) == 1 else torch.cat(rounds)
    return positions[: int(torch.searchsorted(positions, n))]


@dataclass
class Dropped:
    """Which elements of a flattened (N, in) input dropout zeroes: sorted flat `positions` (few) or a
    boolean `mask` (many), and the keep probability the kept ones are divided by."""

    keep: float
    positions: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    @staticmethod
    def draw(shape: torch.Size, p: float, seed: int, device: torch.device) -> Dropped:
        """The same elements for the same (shape, p, seed, device): backward and a checkpointed layer's
        recompute draw them again instead of keeping them."""
        if device.type == "cpu" and p < SPARSE_BELOW:
            return Dropped(1.0 - p, positions=dropped_positions(math.prod(shape), p, seed))
        mask, keep = dropped_mask(shape, p, seed, device)
        return Dropped(keep, mask=mask)

    def zero_(self, t: torch.Tensor) -> torch.Tensor:
        """`t` (contiguous, the input's shape) with the dropped elements set to 0, in place."""
        if self.positions is not None:
            t.view(-1).index_fill_(0, self.positions, 0)
            return t
        return t.masked_fill_(self.mask, 0)


class LoraBranch(torch.autograd.Function):
    """`result + (dropout(x) @ A^T) @ B^T * scaling`, saving only x, A, B and the rank-r intermediate.

    `result` is the base layer's output (N..., out), which takes the sum in place where it can
    (`_add_update`), or None where the caller adds the base matmul (`frozen_linear`) and its bias afterwards;
    then the update comes back as a new (N, out) tensor in the compute dtype."""

    @staticmethod
    def forward(ctx: Any, x, result, weight_a, weight_b, scaling: float, p: float, seed: int):  # noqa: ANN001
        dtype = matmul_dtype(x.device, weight_a.dtype)
        with torch.autocast(x.device.type, enabled=False):
            flat = x.reshape(-1, x.shape[-1]).to(dtype)
            scale = scaling
            if p > 0:
                dropped = Dropped.draw(flat.shape, p, seed, flat.device)
                flat = dropped.zero_(flat.clone())
                scale = scaling / dropped.keep
            a, b = weight_a.to(dtype), weight_b.to(dtype)
            low = matmul.linear(flat, a).mul_(scale)  # (N, r)
            out = _add_update(ctx, result, low, b, dtype)
        ctx.save_for_backward(x, weight_a, weight_b, low)
        ctx.scale, ctx.p, ctx.seed, ctx.dtype = scale, p, seed, dtype
        if out is result:
            return out
        shape = (*x.shape[:-1], b.shape[0])
        # a (N, out) sum is returned as is, not as a view of itself: frozen_linear then adds in place
        out = out if out.shape == shape else out.view(shape)
        return out.to(result.dtype if result is not None else dtype)

    @staticmethod
    def backward(ctx: Any, grad):  # noqa: ANN001
        x, weight_a, weight_b, low = ctx.saved_tensors
        dtype = ctx.dtype
        with torch.autocast(x.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1]).to(dtype)
            a, b = weight_a.to(dtype), weight_b.to(dtype)
            # the weights' gradients contract over the token count, which varies by micro-step: on the BLAS
            # (through oneDNN each new count is a new shape it keeps memory for: base.matmul)
            grad_b = g.t() @ low if ctx.needs_input_grad[3] else None
            grad_low = matmul.matmul(g, b).mul_(ctx.scale)  # (N, r)
            flat = x.reshape(-1, x.shape[-1]).to(dtype)
            dropped = None
            if ctx.p > 0:
                dropped = Dropped.draw(flat.shape, ctx.p, ctx.seed, flat.device)
                flat = dropped.zero_(flat.clone())
            grad_a = grad_low.t() @ flat if ctx.needs_input_grad[2] else None
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = matmul.matmul(grad_low, a)
                if dropped is not None:
                    dropped.zero_(grad_x)
                grad_x = grad_x.view(x.shape).to(x.dtype)
        grad_result = grad if ctx.needs_input_grad[1] else None
        return (
            grad_x,
            grad_result,
            None if grad_a is None else grad_a.to(weight_a.dtype),
            None if grad_b is None else grad_b.to(weight_b.dtype),
            None,
            None,
            None,
        )


def _add_update(ctx: Any, result: torch.Tensor | None, low: torch.Tensor, b: torch.Tensor, dtype: torch.dtype):
    """`result + low @ b^T`: onto the base output in place where it is contiguous in the compute dtype (marked
    dirty, no copy of it into a new buffer: that copy and the fresh pages it writes were 4% of a CPU step),
    else into a new (N, out) tensor (None: the update alone)."""
    if result is None:
        return matmul.linear(low, b)
    in_place = result.dtype == dtype and result.is_contiguous()
    if in_place and not (result.is_leaf and result.requires_grad):
        matmul.linear_onto(result.view(-1, b.shape[0]), low, b)
        ctx.mark_dirty(result)
        return result
    return torch.addmm(result.reshape(-1, b.shape[0]).to(dtype), low, b.t())


def _dropout_p(module: torch.nn.Module) -> float | None:
    """p of peft's dropout module (Identity is 0); None for anything else."""
    if isinstance(module, torch.nn.Identity):
        return 0.0
    if type(module) is torch.nn.Dropout:
        return float(module.p)
    return None


def _fast_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft LoRA layer forward through `LoraBranch` where it is plain training LoRA, else peft's own."""
    active = self.active_adapters
    name = active[0] if len(active) == 1 else None
    plain = (
        self.training
        and name is not None
        and name in self.lora_A
        and not self.disable_adapters
        and not self.merged
        and not args
        and not kwargs
        and name not in getattr(self, "lora_variant", {})
        and not getattr(self, "use_dora", {}).get(name, False)
        and self.lora_B[name].bias is None
        and isinstance(self.lora_A[name], torch.nn.Linear)
        and _dropout_p(self.lora_dropout[name]) is not None
    )
    if not plain:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    weight_a, weight_b = self.lora_A[name].weight, self.lora_B[name].weight
    p = _dropout_p(self.lora_dropout[name]) or 0.0
    seed = int(torch.randint(2**62, (1,))) if p > 0 else 0  # from the global CPU generator: reproducible
    scaling = float(self.scaling[name])
    accumulate = _frozen_matmul_onto(base, x, weight_a)
    if accumulate is None:
        return LoraBranch.apply(x, base(x), weight_a, weight_b, scaling, p, seed)
    flat = x.reshape(-1, x.shape[-1])
    update = accumulate(LoraBranch.apply(flat, None, weight_a, weight_b, scaling, p, seed), flat, base.weight)
    if base.bias is not None:  # last too: the same in every row, it would round the same small update away in all
        update = update.add_(base.bias)
    return update.view(*x.shape[:-1], update.shape[-1])


def _frozen_matmul_onto(base: torch.nn.Module, x: torch.Tensor, weight_a: torch.Tensor) -> Any:
    """How the base's frozen matmul accumulates onto the update, last (`frozen_linear` for a dense weight,
    `Frozen4bitMatmul` for a bitsandbytes 4-bit one), or None where the base must run first as it is."""
    if _frozen_dense(base, x, weight_a):
        return frozen_linear
    if _frozen_4bit(base, x, weight_a):
        return Frozen4bitMatmul.apply
    return None


class Frozen4bitMatmul(torch.autograd.Function):
    """`update += x @ dequantize(weight)^T` in place, for a frozen bitsandbytes 4-bit weight.

    The arithmetic of bitsandbytes' own training path (`MatMul4Bit`: the weight dequantized to the input's
    dtype, one matmul, and again in backward for the input gradient), with the product accumulated onto the
    LoRA update instead of written to a new buffer and added. The weight is a frozen module parameter, so it is
    held as a ctx attribute (as bitsandbytes does) and nothing goes through save_for_backward: a checkpointed
    layer's recompute, which stops once its saved tensors are back, then never runs the last projection's
    dequantization and matmul (`frozen_linear` explains the early stop)."""

    @staticmethod
    def forward(ctx: Any, update: torch.Tensor, x: torch.Tensor, weight: Any) -> torch.Tensor:
        from bitsandbytes.functional import dequantize_4bit

        ctx.weight = weight
        ctx.mark_dirty(update)
        return matmul.linear_onto(update, x, dequantize_4bit(weight.data, weight.quant_state).to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        from bitsandbytes.functional import dequantize_4bit

        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = matmul.matmul(grad, dequantize_4bit(ctx.weight.data, ctx.weight.quant_state).to(grad.dtype))
        return grad, grad_x, None


def _frozen_4bit(base: torch.nn.Module, x: torch.Tensor, weight_a: torch.Tensor) -> bool:
    """A bitsandbytes Linear4bit with a frozen weight and bias, in its standard layout, whose input is in the
    dtype the branch computes in (autocast's, else the adapter's) and in its compute dtype: its dequantized
    matmul can come last, onto the update.

    Last matters most in bf16/fp16. `base(x) + update` rounds the base output to half precision before the
    update is added, which then drops every update under half a step of that output (2^-8 relative in bf16):
    at the start of training most of them. On the update, the matmul sums both in fp32 and rounds once
    (SmolLM2 QLoRA in bf16 on CPU: 3-8% higher loss per step than fp32 the other way round, within 0.5% this
    way; `test_a_small_update_survives_bf16`)."""
    if not _is_4bit(base):
        return False
    state = getattr(base.weight, "quant_state", None)
    return (
        state is not None
        and not getattr(state, "packing_format_for_cpu", False)
        and getattr(base, "compute_dtype", None) in (None, x.dtype)
        and x.dtype == matmul_dtype(x.device, weight_a.dtype)
        and _frozen(base)
    )


def _frozen_dense(base: torch.nn.Module, x: torch.Tensor, weight_a: torch.Tensor) -> bool:
    """A plain nn.Linear whose weight and bias do not train (LoRA's base), in the adapter's and the input's
    dtype or under autocast: its matmul can come last, onto the update."""
    same_dtype = torch.is_autocast_enabled(x.device.type) or x.dtype == base.weight.dtype == weight_a.dtype
    return same_dtype and _plain_frozen(base)


def _plain_frozen(base: torch.nn.Module) -> bool:
    return type(base) is torch.nn.Linear and _frozen(base)


def _is_4bit(base: torch.nn.Module) -> bool:
    return type(base).__name__ == "Linear4bit"  # bitsandbytes', without importing it


def _frozen(base: torch.nn.Module) -> bool:
    """Weight and bias do not train and no hook sees the base's own forward (it may not run as a module)."""
    return (
        not base.weight.requires_grad
        and (base.bias is None or not base.bias.requires_grad)
        and not base._forward_hooks
        and not base._forward_pre_hooks
    )


def base_matmul_last(module: torch.nn.Module) -> bool:
    """Whether this LoRA layer's training forward runs its frozen base matmul last (`_frozen_matmul_onto`),
    which a checkpointed layer's recompute then skips where it is the layer's last op (the FLOPs count)."""
    installed = getattr(module.__dict__.get("forward"), "__func__", None) is _fast_forward
    base = module.get_base_layer()
    return installed and (_plain_frozen(base) or (_is_4bit(base) and _frozen(base)))


def frozen_linear(update: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`update + x @ weight^T` for a (N, out) update and (N, in) x: the frozen matmul accumulates onto the
    LoRA update in place (`addmm_`: no new buffer, no copy).

    Why last: non-reentrant checkpointing (torch.utils.checkpoint, early stop on by default) ends a layer's
    recompute as soon as every tensor its backward saved is back, and an op's saved inputs are packed
    before its kernel runs. A frozen matmul saves only its weight, and nothing reads its output in
    backward; as the layer's last op (down_proj in Llama-style MLPs) it is then never recomputed:
    a quarter of the recomputed matmul FLOPs of SmolLM2's layer.

    In fp32 on a CPU whose products go through oneDNN (`base.matmul`: where it is faster, or asked for),
    `FrozenLinear` does the same through oneDNN, forward and input gradient; elsewhere autograd's own `addmm_`."""
    if matmul.via_onednn(update, x, weight):
        return FrozenLinear.apply(update, x, weight)
    return update.addmm_(x, weight.t())


class FrozenLinear(torch.autograd.Function):
    """`update += x @ weight^T` in place for a frozen dense weight, both products through `base.matmul`.

    Like `Frozen4bitMatmul`, the weight is a frozen parameter held as a ctx attribute and nothing is saved,
    so a checkpointed layer's recompute still stops before it (`frozen_linear`)."""

    @staticmethod
    def forward(ctx: Any, update: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.weight = weight
        ctx.mark_dirty(update)
        return matmul.linear_onto(update, x, weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        grad_x = matmul.matmul(grad, ctx.weight) if ctx.needs_input_grad[1] else None
        return grad, grad_x, None


def install(model: torch.nn.Module) -> int:
    """Route the training forward of every peft LoRA linear layer in `model` through `LoraBranch`;
    returns how many layers were switched."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict):
            if not hasattr(module.get_base_layer(), "weight"):
                continue
            module.forward = types.MethodType(_fast_forward, module)
            count += 1
    return count
