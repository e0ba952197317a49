"""The rows the engine decodes together and their shared KV cache.

Rows are left-padded so every row's next token is in the last column: one forward per step feeds
each row's last sampled token. Rows leave (`select`) when they finish and join (`merge`) between
steps, which is what continuous batching needs; padding columns no row uses any more are trimmed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch


class Row(Protocol):
    """What the KV batch needs of a request: its prompt and its adapter."""

    prompt_ids: list[int]
    adapter: str


class DecodeBatch:
    """Rows being decoded together: their KV cache, attention mask and positions."""

    def __init__(self, rows: Sequence[Any], cache: Any, mask: torch.Tensor, positions: torch.Tensor) -> None:
        self.rows: list[Any] = list(rows)
        self.cache, self.mask, self.positions = cache, mask, positions  # mask (B, T), positions (B, 1)
        self.logits = torch.empty(0)  # (B, vocab), float32 on CPU: the last forward's next-token logits
        self.next_ids = torch.zeros(len(rows), dtype=torch.long)  # (B,) each row's last sampled token

    @classmethod
    def prefill(cls, model: Any, rows: Sequence[Row], pad: int, adapter_names: bool = True) -> DecodeBatch:
        """Run the prompts of `rows` (left-padded with `pad`) through `model`, filling a new KV cache.
        With `adapter_names` each row uses its own adapter (peft's mixed-adapter forward)."""
        from transformers import DynamicCache

        device = next(model.parameters()).device
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
        for i, r in enumerate(rows):  # left padding
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): padding does not shift positions
        batch = cls(rows, DynamicCache(), mask, positions[:, -1:])
        batch.logits = batch._forward(model, ids, positions, adapter_names)
        return batch

    def forward(self, model: Any, adapter_names: bool = True) -> None:
        """One decode step: feed each row's last sampled token."""
        device = self.mask.device
        self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=device)], 1)
        self.positions = self.positions + 1
        self.logits = self._forward(model, self.next_ids[:, None].to(device), self.positions, adapter_names)

    def _forward(self, model: Any, ids: torch.Tensor, positions: torch.Tensor, adapter_names: bool) -> torch.Tensor:
        extra = {"adapter_names": [r.adapter for r in self.rows]} if adapter_names else {}
        out = model(
            input_ids=ids,
            attention_mask=self.mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            **extra,
        )
        return out.logits[:, -1, :].float().cpu()

    def select(self, keep: list[int]) -> DecodeBatch | None:
        """The rows at `keep` (None when empty), with left padding no row needs any more trimmed."""
        if not keep:
            return None
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, device=self.mask.device)
            self.rows = [self.rows[i] for i in keep]
            self.mask = self.mask.index_select(0, index)
            self.positions = self.positions.index_select(0, index)
            self.next_ids = self.next_ids.index_select(0, index.cpu())
            self.logits = self.logits.index_select(0, index.cpu())
            for layer in self.cache.layers:
                layer.keys = layer.keys.index_select(0, index)
                layer.values = layer.values.index_select(0, index)
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else 0
        if start > 0:  # drop columns that are padding in every row
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, start:]
                layer.values = layer.values[:, :, start:]
        return self

    def merge(self, other: DecodeBatch) -> DecodeBatch:
        """This batch and `other` as one: the shorter one is padded on the left."""
        width = max(self.mask.shape[1], other.mask.shape[1])

        def pad(t: torch.Tensor, dim_from_end: int) -> torch.Tensor:
            missing = width - t.shape[-dim_from_end]
            if missing == 0:
                return t
            spec = [0, 0] * (dim_from_end - 1) + [missing, 0]
            return torch.nn.functional.pad(t, spec)

        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([pad(mine.keys, 2), pad(theirs.keys, 2)], 0)  # (B, heads, T, head_dim)
            mine.values = torch.cat([pad(mine.values, 2), pad(theirs.values, 2)], 0)
        self.mask = torch.cat([pad(self.mask, 1), pad(other.mask, 1)], 0)
        self.positions = torch.cat([self.positions, other.positions], 0)
        self.next_ids = torch.cat([self.next_ids, other.next_ids], 0)
        self.logits = torch.cat([self.logits, other.logits], 0)
        self.rows = self.rows + other.rows
        return self
