"""The memory estimator on Mistral and Phi-3 (fused qkv_proj and gate_up_proj): every component against
exact byte counts of the shipped configs shrunk to tiny sizes, and the trainable parameters at full size
against peft's own count on the real shapes (built on the meta device: no memory, no weights)."""

from __future__ import annotations

import json

import pytest
import torch

from lorafit.adapters import methods as adapters
from lorafit.base.config import TrainConfig
from lorafit.base.errors import UserError
from lorafit.inputs import models
from lorafit.measurement import estimate
from tests.helpers import lorafit, saved_bytes

B, L = 2, 64
ARCHS = ("phi-3-mini", "mistral-7b")
UNFUSED = {
    "qkv_proj": ["q_proj", "k_proj", "v_proj"],
    "gate_up_proj": ["gate_proj", "up_proj"],
    "down_proj": ["down_proj"],
}


def build(cfg: TrainConfig):
    quant = adapters.quantization_config(cfg, torch.float32)
    loaded = models.load_model(models.resolve(cfg.model), torch.float32, quant, attention=cfg.attention)
    return adapters.apply_method(loaded, cfg).train()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "options",
    [
        {"method": "lora"},
        {"method": "qlora"},
        {"method": "full"},
        {"method": "lora", "target_modules": ["qkv_proj", "down_proj"]},
        {"method": "lora", "target_modules": ["qkv_proj", "gate_up_proj"], "lora_r": 4},
        {"method": "lora", "attention": "eager"},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_components_equal_exact_byte_counts(shrunk_dirs, arch, options):
    if arch == "mistral-7b" and "target_modules" in options:  # the same projections, unfused
        options = {**options, "target_modules": [n for t in options["target_modules"] for n in UNFUSED[t]]}
    cfg = TrainConfig(model=shrunk_dirs[arch], batch_size=B, max_length=L, lora_dropout=0.1, **options)
    model = build(cfg)
    est = estimate.estimate(cfg, "cpu", runtime=0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_bytes = sum(p.numel() * p.element_size() for p in trainable)
    assert est.trainable_params == sum(p.numel() for p in trainable)
    assert est.parts["trainable"] == trainable_bytes
    assert est.parts["weights"] == adapters.stored_weight_bytes(model) - trainable_bytes

    ids = torch.randint(5, 4000, (B, L))
    saved, loss = saved_bytes(model, {"input_ids": ids}, ids)
    assert saved == est.activations["saved"]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    loss.backward()
    assert est.parts["grads"] == sum(p.grad.numel() * p.grad.element_size() for p in trainable)
    optimizer.step()
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
    assert est.parts["optimizer_state"] == state


@pytest.mark.parametrize(("arch", "targets"), [("phi-3-mini", 4), ("mistral-7b", 7)])
def test_full_size_trainable_params_equal_peft_on_the_real_shapes(arch, targets):
    """r=16 on the default targets: the estimate from config.json against the LoRA matrices peft creates on
    the full-size model (meta device), through lorafit's own method set-up."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = TrainConfig(model=f"random:{arch}")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**models.arch_config(arch)))
        model = adapters.apply_method(model, cfg)
    trainable, _ = adapters.count_params(model)
    assert estimate.estimate(cfg, "cuda", runtime=0).trainable_params == trainable
    lora_layers = [m for m in model.modules() if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)]
    assert len(lora_layers) == targets * 32


def test_phi3s_fused_shapes_from_its_config():
    """LoRA on qkv_proj: A is hidden x r, B is r x (q + k + v); on gate_up_proj B is r x 2·intermediate."""
    arch = estimate.arch_from_config(models.arch_config("phi-3-mini"))
    assert arch.linears() == [
        ("qkv_proj", 3072, 3 * 3072),
        ("o_proj", 3072, 3072),
        ("gate_up_proj", 3072, 2 * 8192),
        ("down_proj", 8192, 3072),
    ]
    gqa = estimate.arch_from_config({**models.arch_config("phi-3-mini"), "num_key_value_heads": 8})
    assert gqa.linears()[0] == ("qkv_proj", 3072, 3072 + 2 * 8 * 96)
    only_qkv = TrainConfig(model="random:phi-3-mini", target_modules=["qkv_proj"], lora_r=8)
    assert estimate.trainable_params(arch, only_qkv) == 32 * 8 * (3072 + 3 * 3072)
    llama_names = TrainConfig(model="random:phi-3-mini", target_modules=["q_proj", "o_proj"])
    with pytest.raises(UserError, match=r"\['q_proj'\] are not among .*'qkv_proj', 'o_proj', 'gate_up_proj'"):
        estimate.trainable_params(arch, llama_names)


@pytest.mark.parametrize("arch", ARCHS)
def test_estimate_command_on_the_full_shapes_allocates_nothing(arch, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "cache"))
    proc = lorafit("estimate", "--model", f"random:{arch}", "--device", "cuda", "--max-length", "1024", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])["estimate"]
    expected = estimate.estimate(TrainConfig(model=f"random:{arch}", max_length=1024), "cuda", runtime=0)
    assert result["trainable_params"] == expected.trainable_params
    assert {**result["parts"], "runtime": 0} == expected.parts
    assert not (tmp_path / "cache" / "models").exists()  # config.json only: no weights materialized
