from pathlib import Path

import torch

from lorafit.adapters import methods as adapters
from lorafit.base.config import TrainConfig
from lorafit.inputs import models
from lorafit.run.rundir import RunDir
from lorafit.training.loop import fit, setup


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def run_steps(cfg: TrainConfig):
    """Set up and train; returns the set-up and the frozen and trainable weights from before training."""
    Path(cfg.out).mkdir(parents=True)
    s = setup(cfg)
    before = base_weights(s.peft_model)
    trainable_before = {n: p.detach().clone() for n, p in s.peft_model.named_parameters() if p.requires_grad}
    summary = fit(s, RunDir(cfg.out))
    return s, before, trainable_before, summary


def test_lora_trains_only_adapters_and_base_is_bit_identical(tiny_cfg):
    cfg = tiny_cfg(method="lora", max_steps=3, learning_rate=1e-2)
    s, before, trainable_before, _ = run_steps(cfg)
    names = [n for n, p in s.peft_model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    for n, p in s.peft_model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n
    changed = [
        n
        for n, p in s.peft_model.named_parameters()
        if n in trainable_before and not torch.equal(p, trainable_before[n])
    ]
    assert any("lora_B" in n for n in changed)


def test_qlora_stores_linear_weights_4bit_and_keeps_them(tiny_cfg):
    import bitsandbytes as bnb

    cfg = tiny_cfg(method="qlora", max_steps=3, learning_rate=1e-2)
    s, before, _, _ = run_steps(cfg)
    layers = [m for m in s.peft_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # every projection of both blocks
    for m in layers:
        assert m.weight.dtype == torch.uint8 and m.weight.quant_state.quant_type == "nf4"
        assert m.weight.numel() * 2 == m.in_features * m.out_features  # two 4-bit values per byte
    for n, p in s.peft_model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n
    full = models.load_model(models.resolve("random:tiny"), torch.float32)
    assert adapters.stored_weight_bytes(s.peft_model) < adapters.stored_weight_bytes(full)


def test_full_trains_every_weight(tiny_cfg):
    cfg = tiny_cfg(method="full", max_steps=2, learning_rate=1e-3)
    s, _, trainable_before, _ = run_steps(cfg)
    trainable, total = adapters.count_params(s.peft_model)
    assert trainable == total
    unchanged = [n for n, p in s.peft_model.named_parameters() if torch.equal(p, trainable_before[n])]
    assert unchanged == []
