"""Perplexity, generation speed and size measurements on the tiny random model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lorafit.base.config import EvalConfig
from lorafit.base.errors import UserError
from lorafit.studies import evaluate
from lorafit.studies.subject import load_subject


@pytest.fixture
def eval_model(tiny_model):
    return tiny_model.eval()


def _brute_force_nll(model, ids: torch.Tensor, max_length: int, stride: int) -> list[float]:
    """One forward per token, independent of the windowed implementation: token t is predicted from
    ids[b:t], b the start of the first window (b = k * stride) that reaches t. A token that starts a
    window no earlier window covered has no context there and is not scored."""
    n = ids.numel()
    nll = []
    for t in range(1, n):
        # the first window (begin = k*stride) whose end min(begin+max_length, n) is past t
        begin = 0
        while min(begin + max_length, n) <= t:
            begin += stride
        if begin == t:
            continue
        with torch.no_grad():
            logits = model(input_ids=ids[begin:t][None]).logits[0, -1]
        nll.append(float(F.cross_entropy(logits[None], ids[t : t + 1])))
    return nll


@pytest.mark.parametrize(("max_length", "stride"), [(16, 8), (16, 16), (12, 5), (64, 32)])
def test_sliding_window_perplexity_equals_token_by_token(eval_model, max_length, stride):
    torch.manual_seed(0)
    ids = torch.randint(0, 4096, (41,))
    got = evaluate.perplexity(eval_model, ids, max_length, stride)
    expected = _brute_force_nll(eval_model, ids, max_length, stride)
    assert got["tokens_scored"] == len(expected) == (40 if stride < max_length else 40 - (40 // max_length))
    assert got["nll_mean"] == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(sum(expected) / len(expected)), rel=1e-5)


def test_one_window_is_one_forward(eval_model):
    ids = torch.randint(0, 4096, (30,))
    with torch.no_grad():
        logits = eval_model(input_ids=ids[None]).logits[0, :-1]
    direct = float(F.cross_entropy(logits, ids[1:]))
    got = evaluate.perplexity(eval_model, ids, max_length=64, stride=32)
    assert got["windows"] == 1
    assert got["ppl"] == pytest.approx(math.exp(direct), rel=1e-5)


def test_eval_config_rejects_gaps_between_windows():
    with pytest.raises(UserError, match="ppl_stride"):
        EvalConfig(ppl_max_length=128, ppl_stride=256)
    with pytest.raises(UserError, match="gen_tokens"):
        EvalConfig(gen_tokens=0)


def test_perplexity_text_sources(tmp_path, tiny_tokenizer):
    text, what = evaluate.perplexity_text("wikitext2", tiny_tokenizer)
    assert what == "wikitext2 test" and text.startswith(" \n = Robert <unk> = ")  # test split, not valid.txt
    (tmp_path / "a.json").write_text(
        '[{"instruction": "i", "input": "", "output": "first"}, {"instruction": "j", "input": "", "output": "second"}]'
    )
    text, _ = evaluate.perplexity_text(str(tmp_path / "a.json"), tiny_tokenizer)
    assert text == "first\n\nsecond"
    with pytest.raises(UserError, match="not found"):
        evaluate.perplexity_text(str(tmp_path / "missing.txt"), tiny_tokenizer)


def test_generation_speed_counts_tokens(eval_model, tiny_tokenizer):
    g = evaluate.generation_speed(eval_model, tiny_tokenizer, new_tokens=6, batch=2, repeats=2)
    assert g["batch"] == 2 and g["new_tokens"] == 6 and g["prompt_tokens"] > 0
    assert 0 < g["ttft_s"] < g["total_s"]
    assert g["decode_tokens_per_s"] == pytest.approx(2 * 5 / (g["total_s"] - g["ttft_s"]))


def test_eval_of_a_lora_run(tiny_cfg, tmp_path):
    from lorafit.training.loop import train

    summary = train(tiny_cfg(method="lora", max_steps=1))
    cfg = EvalConfig(ppl_max_tokens=64, ppl_max_length=32, ppl_stride=16, gen_tokens=4, gen_repeats=1)
    subject = load_subject("ignored-for-runs", cfg, run=summary.run_dir)
    assert subject.method == "lora" and subject.model_spec == "random:tiny"
    result = evaluate.evaluate(subject, cfg)
    size = result["size"]
    assert size["adapter_params"] == summary.params.trainable_params
    adapter_files = sum(f.stat().st_size for f in (tmp_path / "run" / "adapter").glob("*.safetensors"))
    assert size["disk_adapter_bytes"] == adapter_files > 0
    assert size["disk_bytes"] == size["disk_base_bytes"] + adapter_files
    assert result["perplexity"]["tokens_scored"] == 63
    assert result["generation"]["new_tokens"] == 4
    with pytest.raises(UserError, match="not a run directory"):
        load_subject("random:tiny", cfg, run=tmp_path)
