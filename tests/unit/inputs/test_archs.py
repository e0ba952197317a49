"""The Mistral-7B and Phi-3-mini shapes lorafit ships (`random:mistral-7b`, `random:phi-3-mini`): the
published configs, transformers' own classes built from them at full size (meta device: no memory), and
tiny versions (the same configs, sizes shrunk) trained end to end through `lorafit train`'s code path.

Sources of the published values are in src/lorafit/inputs/archs/README.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorafit.base.config import TrainConfig
from lorafit.inputs import models
from lorafit.measurement import estimate

# The published config.json values (mistralai/Mistral-7B-v0.1, microsoft/Phi-3-mini-4k-instruct)
PUBLISHED = {
    "mistral-7b": {
        "model_type": "mistral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "max_position_embeddings": 32768,
        "sliding_window": 4096,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-05,
        "tie_word_embeddings": False,
    },
    "phi-3-mini": {
        "model_type": "phi3",
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32064,
        "max_position_embeddings": 4096,
        "original_max_position_embeddings": 4096,
        "sliding_window": 2047,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-05,
        "tie_word_embeddings": False,
    },
}
# Parameter counts the model pages give (huggingface.co, "Model size"), in billions to three figures
PUBLISHED_BILLIONS = {"mistral-7b": 7.24, "phi-3-mini": 3.82}
SHRUNK = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4}
SHRUNK |= {"num_key_value_heads": 2, "vocab_size": 4096}


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_shipped_configs_carry_the_published_values(arch):
    shipped = models.arch_config(arch)
    assert {k: shipped[k] for k in PUBLISHED[arch]} == PUBLISHED[arch]
    assert arch in models.known_archs()


@pytest.mark.parametrize(
    ("arch", "config_class", "model_class", "head_dim"),
    [("mistral-7b", "MistralConfig", "MistralForCausalLM", 128), ("phi-3-mini", "Phi3Config", "Phi3ForCausalLM", 96)],
)
def test_transformers_builds_the_full_size_models(arch, config_class, model_class, head_dim):
    """From the shipped config, transformers' own classes, with the published parameter count (embeddings,
    blocks, norms, output layer: counted here from the shapes, and rounded as the model pages do)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**models.arch_config(arch))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert (type(config).__name__, type(model).__name__) == (config_class, model_class)
    assert config.sliding_window == PUBLISHED[arch]["sliding_window"]
    attention = model.model.layers[0].self_attn
    assert attention.head_dim == head_dim
    total = sum(p.numel() for p in model.parameters())
    shapes = estimate.arch_from_config(models.arch_config(arch))
    d, v = shapes.hidden, shapes.vocab
    per_layer = sum(i * o for _, i, o in shapes.linears()) + 2 * d  # projections and two norms
    assert total == 2 * v * d + shapes.layers * per_layer + d
    assert round(total / 1e9, 2) == PUBLISHED_BILLIONS[arch]


@pytest.mark.parametrize(
    ("arch", "projections"),
    [
        ("phi-3-mini", {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
        ("mistral-7b", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ],
)
def test_tiny_versions_train_end_to_end(arch, projections, tmp_path, tiny_cfg):
    """`lorafit train` on the arch shrunk to tiny sizes, default targets: a step, a summary whose trainable
    parameters are the estimator's from config.json, and an adapter on the model's own projections."""
    from lorafit.training.loop import train

    config = {**models.arch_config(arch), **SHRUNK}
    model_dir = models.write_random_model(config, tmp_path / arch)
    summary = train(tiny_cfg(model=str(model_dir), method="lora", max_steps=1, max_samples=4, max_length=64))
    assert summary.ok and summary.steps == 1
    assert summary.memory_plan is not None  # planned from config.json by the estimator
    assert summary.params.trainable_params == estimate.trainable_params(
        estimate.arch_from_config(config), TrainConfig()
    )
    assert summary.flops.flops_per_step > 0
    adapter = json.loads((Path(summary.run_dir) / "adapter" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == projections
