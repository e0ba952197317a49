"""Adapters that cannot be loaded get one clear error: missing config, pickle weights, corrupted or
truncated safetensors, or an adapter made for another model."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorafit.adapters.files import check_adapter_files, load_adapter
from lorafit.base.errors import UserError


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_a_good_adapter_loads(adapter_dir):
    from lorafit.inputs import models

    model = models.load_model(models.resolve("random:tiny"), torch.float32)
    loaded = load_adapter(model, adapter_dir)
    assert any("lora_A" in n for n, _ in loaded.named_parameters())


def test_truncated_and_corrupted_safetensors(adapter_dir, tmp_path):
    cut = copy(adapter_dir, tmp_path / "cut")
    weights = cut / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match="corrupted or truncated") as info:
        check_adapter_files(cut)
    assert info.value.file == str(weights)
    junk = copy(adapter_dir, tmp_path / "junk")
    (junk / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="corrupted or truncated"):
        check_adapter_files(junk)


def test_pickle_and_missing_files_are_refused(adapter_dir, tmp_path):
    pickled = copy(adapter_dir, tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").unlink()
    torch.save({}, pickled / "adapter_model.bin")
    with pytest.raises(UserError, match="pickle adapters"):
        check_adapter_files(pickled)
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(UserError, match="no adapter_config.json"):
        check_adapter_files(bare)


def test_adapter_for_another_model_names_the_mismatch(adapter_dir):
    other = LlamaForCausalLM(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=4096)
    )  # fmt: skip
    with pytest.raises(UserError, match=r"does not fit this base model: 8 tensors differ in shape") as info:
        load_adapter(other, adapter_dir)
    assert "[4, 64] in the adapter and [4, 32] here" in info.value.message
