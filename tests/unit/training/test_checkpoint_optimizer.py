"""Resuming keeps the optimizer's kernel: a checkpoint saved by the per-tensor AdamW loop (lorafit's CPU default
before it asked for torch's fused kernel there) loads into the fused optimizer and stays fused."""

from __future__ import annotations

import torch

from lorafit.base.config import TrainConfig
from lorafit.training.checkpoint import load_optimizer_state
from lorafit.training.setup import make_optimizer


def _params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32))]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def test_a_loop_checkpoint_resumes_on_the_fused_kernel():
    old = _params()
    loop = torch.optim.AdamW(old, lr=1e-3, fused=False)
    loop.step()
    new = _params()
    fused = make_optimizer(TrainConfig(model="random:tiny", learning_rate=1e-3), new, torch.device("cpu"))
    load_optimizer_state(fused, loop.state_dict())
    assert [g["fused"] for g in fused.param_groups] == [True]
    assert fused.state[new[0]]["exp_avg"].equal(loop.state[old[0]]["exp_avg"])  # the state itself came
    with torch.no_grad():
        for p, q in zip(new, old, strict=True):
            p.copy_(q)
    loop.step()
    fused.step()
    assert all(torch.allclose(p, q, atol=1e-7) for p, q in zip(new, old, strict=True))
