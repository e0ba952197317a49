"""Token choice: greedy at temperature 0, a seeded draw repeats, and top_p keeps the nucleus only."""

from __future__ import annotations

import torch

from lorafit.serving.sampling import Sampling, sample

LOGITS = torch.tensor([0.0, 3.0, 2.9, -1.0])


def test_greedy_at_temperature_zero():
    assert sample(LOGITS, Sampling(temperature=0), None) == 1


def test_a_seeded_draw_repeats():
    options = Sampling(temperature=1.5, seed=3)
    draws = [[sample(LOGITS, options, g) for _ in range(20)] for g in (options.generator(), options.generator())]
    assert draws[0] == draws[1] and len(set(draws[0])) > 1


def test_a_small_top_p_keeps_only_the_most_likely_token():
    options = Sampling(temperature=1.0, top_p=0.1, seed=0)
    generator = options.generator()
    assert {sample(LOGITS, options, generator) for _ in range(20)} == {1}
