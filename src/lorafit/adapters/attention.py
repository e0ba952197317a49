"""Attention within each sample of a row that holds several, without a mask: padding-free micro-batches.

A micro-batch of samples of different lengths, padded to the longest, spends its projections and attention
on padding: 11.8% of the tokens in the LoRA benchmark's micro-batches, grouped by length (44% ungrouped;
`bench/train_vs_reference.py`, 32 Alpaca samples, batch 4). Laid end to end in one row, with positions
restarting at each sample (TRL's `padding_free`, transformers' DataCollatorWithFlattening), every matmul sees
real tokens only; attention must still stay within each sample. flash-attention's varlen kernel does that
on a GPU; SDPA has no such kernel, and a block-diagonal mask over the row costs (sum t)^2 instead of
sum t^2. `sdpa_by_sample` runs transformers' SDPA attention once per sample, causal, the samples read from
the position ids (each starts at 0), and joins the outputs: per sample, the attention of the padded batch.
Packed rows (--packing) are laid end to end the same way instead of attending through their block-diagonal
mask, which SDPA computes in full: (rows x max_length^2) with no causal skipping, not sum t^2 / 2.
Anything else (a mask, one sample per row) goes to transformers' SDPA attention as it is.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

NAME = "lorafit_sdpa"


@dataclass
class _Remembered:
    """The last row read: every layer, and every checkpointed layer's recompute, gets the same position ids
    tensor, so its lengths are read once per forward (on a GPU, one device sync instead of one per layer and
    pass). Held by weak reference and checked against the tensor's version counter, so a tensor freed or
    changed in place is read again."""

    row: Any = None  # weakref.ref to the position ids tensor
    version: int = -1
    lengths: list[int] | None = None


_last = _Remembered()


def sample_lengths(position_ids: torch.Tensor | None) -> list[int] | None:
    """Lengths of the samples laid end to end in a single row whose positions restart at 0 for each; None
    for anything else (several rows, one sample, no position ids)."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    last = _last
    if last.row is not None and last.row() is position_ids and last.version == position_ids._version:
        return last.lengths
    lengths = read_lengths(position_ids)
    last.row, last.version, last.lengths = weakref.ref(position_ids), position_ids._version, lengths
    return lengths


def read_lengths(position_ids: torch.Tensor) -> list[int] | None:
    """`sample_lengths` of a (1, T) row, read from the tensor (on a GPU, a wait for the device)."""
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if len(starts) < 2 or starts[0] != 0:
        return None
    return [end - start for start, end in zip(starts, [*starts[1:], position_ids.shape[1]], strict=True)]


def sdpa_by_sample(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: (B, H, T, hd) query, key and value -> (B, T, H, hd) output."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lengths = sample_lengths(kwargs.get("position_ids")) if attention_mask is None else None
    if lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs["is_causal"] = True
    parts = zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), strict=True)
    outputs = [sdpa_attention_forward(module, q, k, v, None, **kwargs)[0] for q, k, v in parts]
    return torch.cat(outputs, dim=1), None


def install(model: Any) -> bool:
    """Switch a model on SDPA attention to `sdpa_by_sample`; False (nothing changed) for any other attention,
    whose micro-batches must then stay padded."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    if model.config._attn_implementation != "sdpa":
        return False
    AttentionInterface.register(NAME, sdpa_by_sample)
    # a 4D mask passes through as given; without one the mask is None (no padding in the row),
    # not the block-diagonal mask transformers would build from the restarting positions
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    model.set_attn_implementation(NAME)
    return True
