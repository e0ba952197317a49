"""Mixed-adapter batches in two batched matmuls per layer instead of a loop over adapters.

peft's `_mixed_batch_forward` runs, in every LoRA layer, one slice + two matmuls + one index-add per
distinct adapter in the batch: with 8 adapters and 210 adapted projections that is ~7,000 small ops
per decoded token, and they dominate a CPU step. Here each layer keeps the A and B matrices of all
resident adapters stacked (B pre-multiplied by its scaling, ranks zero-padded to the largest, row 0
all zeros for the base model), gathers each batch row's pair by index and applies them with two
`bmm`s, the approach of Punica's BGMV and S-LoRA. The stacks are rebuilt when the set of resident
adapters changes (the registry's version). Layers with DoRA or other variants keep peft's path.

The base layer is only called, never looked into, so the branch works the same over a dense
`nn.Linear` and over a bitsandbytes `Linear4bit` (a 4-bit serving base: `lorafit serve --quantize`),
which peft wraps in its own class (`peft.tuners.lora.bnb.Linear4bit`, not a `lora.Linear`). The
update is computed in the LoRA weights' dtype (fp32 as peft loads them) and cast to the base layer's
output dtype before it is added, as peft's 4-bit forward does.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


class ResidentAdapters(Protocol):
    """What the stacks follow: the adapters loaded now, a version bumped on every change, and hooks
    called after one (the server's `AdapterRegistry`)."""

    version: int
    resident: Iterable[str]
    on_change: list[Callable[[], None]]


class Stacks:
    """Which adapter is which row of every layer's stacks, for the registry's current version."""

    def __init__(self, registry: ResidentAdapters) -> None:
        self.registry = registry
        self.version = -1
        self.rows: dict[str, int] = {}
        self._index_cache: dict[tuple[str, ...], torch.Tensor] = {}

    def refresh(self) -> None:
        if self.version != self.registry.version:
            self.rows = {name: i + 1 for i, name in enumerate(self.registry.resident)}
            self._index_cache.clear()
            self.version = self.registry.version

    def index(self, names: list[str], device: torch.device) -> torch.Tensor:
        key = tuple(names)
        cached = self._index_cache.get(key)
        if cached is None:
            rows = [0 if n == BASE else self.rows[n] for n in names]
            cached = self._index_cache[key] = torch.tensor(rows, dtype=torch.long, device=device)
            if len(self._index_cache) > 256:
                self._index_cache.pop(next(iter(self._index_cache)))
        return cached


def _layer_stacks(layer: Any, stacks: Stacks) -> tuple[torch.Tensor, torch.Tensor]:
    cached = getattr(layer, "_lorafit_stacks", None)
    if cached is not None and cached[0] == stacks.version:
        return cached[1], cached[2]
    weight = layer.base_layer.weight
    names = [n for n in stacks.rows if n in layer.lora_A]
    rank = max((layer.lora_A[n].weight.shape[0] for n in names), default=1)
    n_rows = len(stacks.rows) + 1
    a = torch.zeros(n_rows, rank, layer.in_features, dtype=torch.float32, device=weight.device)
    b = torch.zeros(n_rows, layer.out_features, rank, dtype=torch.float32, device=weight.device)
    for name in names:
        row, r = stacks.rows[name], layer.lora_A[name].weight.shape[0]
        a[row, :r] = layer.lora_A[name].weight.float()
        b[row, :, :r] = layer.lora_B[name].weight.float() * layer.scaling[name]
    dtype = layer.lora_A[names[0]].weight.dtype if names else torch.float32
    a, b = a.to(dtype), b.to(dtype)
    layer._lorafit_stacks = (stacks.version, a, b)
    return a, b


def _forward(layer: Any, stacks: Stacks, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    names = kwargs.pop("adapter_names", None)
    if names is None or getattr(layer, "lora_variant", None) or layer.merged:
        if names is not None:
            kwargs["adapter_names"] = names
        return layer._lorafit_peft_forward(x, *args, **kwargs)
    result = layer.base_layer(x, *args, **kwargs)
    if all(n == BASE for n in names):
        return result
    a, b = _layer_stacks(layer, stacks)
    index = stacks.index(names, x.device)
    flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(a.dtype)  # (batch, tokens, in)
    low = torch.bmm(flat, a.index_select(0, index).transpose(1, 2))  # (batch, tokens, r)
    update = torch.bmm(low, b.index_select(0, index).transpose(1, 2))  # (batch, tokens, out)
    return result + update.reshape(result.shape).to(result.dtype)


def install(model: Any, registry: ResidentAdapters) -> None:
    """Route mixed-adapter forwards of every LoRA Linear through the stacked path, now and after each
    adapter load (a new adapter can wrap projections that had no LoRA yet)."""
    stacks = Stacks(registry)

    def on_change() -> None:
        _patch(model, stacks)
        stacks.refresh()

    registry.on_change.append(on_change)
    on_change()


def lora_linear_types() -> tuple[type, ...]:
    """peft's LoRA layers over a linear base that the stacked path serves: over `nn.Linear`, and over a
    bitsandbytes `Linear4bit` where bitsandbytes has 4-bit support (peft defines the class only then)."""
    from peft.tuners.lora import Linear

    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:
        return (Linear,)
    return (Linear, Linear4bit)


def _patch(model: Any, stacks: Stacks) -> int:
    kinds = lora_linear_types()
    count = 0
    for module in model.modules():
        if isinstance(module, kinds) and not hasattr(module, "_lorafit_peft_forward"):
            module._lorafit_peft_forward = module.forward
            module.forward = types.MethodType(lambda self, x, *a, **k: _forward(self, stacks, x, *a, **k), module)
            count += 1
    return count
