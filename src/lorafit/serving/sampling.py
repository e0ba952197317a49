"""How the next token is chosen from a row's logits: greedy, or temperature + nucleus (top_p) with a
per-request seeded generator, as in the OpenAI API's `temperature`, `top_p` and `seed`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Sampling:
    """One request's decoding options, checked by the API before they reach the engine."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)

    def generator(self) -> torch.Generator | None:
        """A CPU generator seeded with `seed` (None: the global one), so a seeded request repeats."""
        return None if self.seed is None else torch.Generator().manual_seed(self.seed)


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The next token from one row's logits (vocab,): greedy at temperature 0; otherwise temperature,
    nucleus (top_p; Holtzman et al. 2020) and a draw from `generator`."""
    if sampling.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < sampling.top_p  # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
