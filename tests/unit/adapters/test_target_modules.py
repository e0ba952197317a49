"""Which projections get LoRA: the default resolves to the model's own linear layers (Phi-3's fused
qkv_proj and gate_up_proj), and an explicit list naming anything else is a clear error.

The models are the shipped Phi-3-mini and Mistral-7B configs with shrunk sizes (tiny random weights)."""

from __future__ import annotations

import pytest
import torch

from lorafit.adapters import methods as adapters
from lorafit.base.config import ALL_LINEAR, TrainConfig
from lorafit.base.errors import UserError
from lorafit.inputs import models
from tests.helpers import SHRUNK


def load(path: str, cfg: TrainConfig):
    dtype = adapters.base_dtype(cfg.method, "fp32")
    quant = adapters.quantization_config(cfg, dtype)
    return models.load_model(models.resolve(path), dtype, quantization_config=quant)


def lora_layers(peft_model) -> dict[str, torch.nn.Module]:
    """Qualified name -> module of every layer peft wrapped with a LoRA branch."""
    return {n: m for n, m in peft_model.named_modules() if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)}


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_default_targets_are_phi3s_fused_projections(shrunk_dirs, method):
    cfg = TrainConfig(method=method)
    assert cfg.target_modules == list(ALL_LINEAR)  # the default: Llama's names, which Phi-3 lacks in part
    model = adapters.apply_method(load(shrunk_dirs["phi-3-mini"], cfg), cfg)
    wrapped = lora_layers(model)
    names = {n.rsplit(".", 1)[-1] for n in wrapped}
    assert names == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert len(wrapped) == 4 * SHRUNK["num_hidden_layers"]  # every projection of every block, not lm_head
    assert set(model.peft_config["default"].target_modules) == names
    qkv = next(m for n, m in wrapped.items() if n.endswith("qkv_proj"))
    # A: hidden x r, B: r x (q + k + v) = 4·16 + 2·2·16
    assert qkv.lora_A["default"].weight.shape == (cfg.lora_r, 64)
    assert qkv.lora_B["default"].weight.shape == (64 + 2 * 32, cfg.lora_r)


@pytest.mark.parametrize("arch", ["phi-3-mini", "mistral-7b"])
def test_default_targets_wrap_what_peft_all_linear_wraps(shrunk_dirs, arch):
    """peft's own 'all-linear' (every Linear but the output layer) wraps the same layers."""
    from peft import LoraConfig, get_peft_model

    cfg = TrainConfig(method="lora")
    ours = adapters.apply_method(load(shrunk_dirs[arch], cfg), cfg)
    theirs = get_peft_model(load(shrunk_dirs[arch], cfg), LoraConfig(r=cfg.lora_r, target_modules="all-linear"))
    assert set(lora_layers(ours)) == set(lora_layers(theirs))


def test_default_targets_on_llama_style_models_are_the_seven_projections(shrunk_dirs):
    cfg = TrainConfig(method="lora")
    model = adapters.apply_method(load(shrunk_dirs["mistral-7b"], cfg), cfg)
    assert sorted(model.peft_config["default"].target_modules) == sorted(ALL_LINEAR)
    assert len(lora_layers(model)) == 7 * SHRUNK["num_hidden_layers"]


def test_an_explicit_subset_of_phi3s_projections_is_kept(shrunk_dirs):
    cfg = TrainConfig(method="lora", target_modules=["qkv_proj"])
    model = adapters.apply_method(load(shrunk_dirs["phi-3-mini"], cfg), cfg)
    assert {n.rsplit(".", 1)[-1] for n in lora_layers(model)} == {"qkv_proj"}


def test_explicit_targets_the_model_lacks_name_what_it_has(shrunk_dirs):
    cfg = TrainConfig(method="lora", target_modules=["q_proj", "v_proj", "o_proj"])
    with pytest.raises(UserError) as caught:
        adapters.apply_method(load(shrunk_dirs["phi-3-mini"], cfg), cfg)
    message = str(caught.value)
    assert "['q_proj', 'v_proj']" in message and "o_proj'" not in message.split("has")[0]
    for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
        assert name in message.split("has")[1]
    assert caught.value.field == "target_modules"


@pytest.mark.parametrize("target", ["mlp", "self_attn", "input_layernorm", "act_fn"])
def test_a_module_that_is_not_a_linear_layer_is_a_user_error(tiny_model, target):
    """Names that exist but are not linear layers used to pass the check and fail inside peft."""
    cfg = TrainConfig(method="lora", target_modules=[target, "q_proj"])
    with pytest.raises(UserError, match=rf"\['{target}'\] .*not .*linear"):
        adapters.apply_method(tiny_model, cfg)
