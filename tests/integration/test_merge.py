"""`lorafit merge` on tiny LoRA and QLoRA runs: the saved model loads with plain transformers and
equals adapter-on-base; errors for what cannot be merged."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lorafit.base.errors import UserError
from lorafit.inputs import models
from lorafit.studies.merge import merge
from lorafit.training import loop as train
from tests.helpers import lorafit


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A LoRA and a QLoRA run trained hard enough (lr 1e-2) that the adapter changes outputs."""
    from lorafit.base.config import TrainConfig

    root = tmp_path_factory.mktemp("merge")
    out = {}
    for method in ("lora", "qlora"):
        cfg = TrainConfig(
            model="random:tiny",
            method=method,
            max_samples=8,
            max_length=64,
            learning_rate=1e-2,
            out=str(root / method),
        )
        train.train(cfg)
        out[method] = root / method
    return out


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_lora_merge_equals_adapter_on_base_and_loads_with_plain_transformers(runs, tmp_path):
    proc = lorafit("merge", str(runs["lora"]), "--out", str(tmp_path / "m"), "--dtype", "fp32", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["check"]["greedy_equal"] and result["check"]["max_abs_logit_diff"] < 1e-4
    assert json.loads((tmp_path / "m" / "merge.json").read_text()) == result
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # plain transformers: no peft
    assert not any("lora" in name for name in load_file(tmp_path / "m" / "model.safetensors"))
    from peft import PeftModel

    source = models.resolve("random:tiny").location
    base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    ids = torch.randint(5, 4000, (2, 24))
    base_logits = logits(base, ids)
    with_adapter = PeftModel.from_pretrained(base, runs["lora"] / "adapter")
    expected = logits(with_adapter, ids)
    got = logits(merged, ids)
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter matters: the check can fail
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert result["disk_bytes_after"] == (tmp_path / "m" / "model.safetensors").stat().st_size


def test_qlora_merge_reports_distance_from_the_4bit_model_it_was_trained_as(runs, tmp_path):
    result = merge(runs["qlora"], tmp_path / "q", dtype="fp32")
    assert result["method"] == "qlora"
    assert result["check"]["greedy_equal"] and result["check"]["max_abs_logit_diff"] < 1e-4
    trained = result["vs_trained_4bit"]
    assert 0 < trained["max_abs_logit_diff"] < 5  # NF4 rounding of the base: small but not zero
    assert trained["prompts"] == 4


def test_bf16_merge_halves_the_size(runs, tmp_path):
    result = merge(runs["lora"], tmp_path / "b", dtype="bf16", check=False)
    tensors = load_file(tmp_path / "b" / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    base_bytes = result["disk_base_bytes"]
    assert result["disk_bytes_after"] < 0.55 * base_bytes and "check" not in result


def test_merge_refuses_what_it_cannot_merge(runs, tmp_path):
    with pytest.raises(UserError, match="not a run directory"):
        merge(tmp_path, tmp_path / "x")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "random:tiny"}))
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(UserError, match="pickle adapters"):
        merge(pickled, tmp_path / "x")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        merge(runs["lora"], busy)
    assert (busy / "keep.txt").read_text() == "mine"
    full = tmp_path / "full-run"
    full.mkdir()
    (full / "config.yaml").write_text("model: random:tiny\nmethod: full\n")
    with pytest.raises(UserError, match="full fine-tune has no adapter"):
        merge(full, tmp_path / "x")
    with pytest.raises(UserError, match="dtype"):
        merge(runs["lora"], tmp_path / "y", dtype="int8")
