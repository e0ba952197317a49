"""Real behaviour on the built-in SmolLM2-135M (slow: converts the GGUF once, then trains on CPU)."""

import json

import pytest
import torch

from lorafit.base.config import EvalConfig, TrainConfig
from lorafit.inputs import data, models
from lorafit.studies import evaluate
from lorafit.studies.subject import load_subject
from lorafit.training import loop as train
from tests.helpers import metrics_rows

pytestmark = pytest.mark.slow
PROMPT = [{"role": "user", "content": "Give three tips for staying healthy."}]


def greedy(model, tokenizer, n=24) -> str:
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_qlora_lowers_loss_and_adapter_changes_the_answer(tmp_path):
    cfg = TrainConfig(
        model="smollm2-135m",
        method="qlora",
        max_samples=8,  # three passes over 8 samples: learning them is plain in the loss and the perplexity
        batch_size=2,
        max_length=256,
        max_steps=12,
        learning_rate=1e-3,
        lora_r=8,
        epochs=5,
        out=str(tmp_path / "run"),
    )
    summary = train.train(cfg)
    assert summary.steps == 12
    first, last = summary.losses.loss_first, summary.losses.loss_last
    losses = [row["loss"] for row in metrics_rows(tmp_path / "run")]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, (first, last, losses)

    from peft import PeftModel

    source = models.resolve("smollm2-135m")
    tokenizer = models.load_tokenizer(source)
    base = models.load_model(source, torch.float32).eval()
    before = greedy(base, tokenizer)
    tuned = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
    after = greedy(tuned, tokenizer)
    assert before.strip() and after.strip() and before != after

    # eval sees the learning: perplexity of the trained responses drops after training
    records = json.loads(data.BUILTIN["alpaca"].read_text(encoding="utf-8"))[:8]
    (tmp_path / "train8.json").write_text(json.dumps(records))
    ecfg = EvalConfig(ppl=str(tmp_path / "train8.json"), ppl_max_length=256, ppl_stride=128, gen=False)
    ppl_base = evaluate.evaluate(load_subject("smollm2-135m", ecfg), ecfg)["perplexity"]["ppl"]
    tuned_subject = load_subject("smollm2-135m", ecfg, run=tmp_path / "run")
    assert tuned_subject.method == "qlora"  # loaded 4-bit, as trained
    ppl_tuned = evaluate.evaluate(tuned_subject, ecfg)["perplexity"]["ppl"]
    assert ppl_tuned < ppl_base, (ppl_base, ppl_tuned)


def test_builtin_model_wikitext2_perplexity_is_plausible():
    """SmolLM2-135M scores 13.6 on the first 4k tokens of WikiText-2 test (16.6 on 16k); a broken
    window, shift or tokenization lands far outside this range."""
    ecfg = EvalConfig(ppl_max_tokens=2048, gen=False)
    p = evaluate.evaluate(load_subject("smollm2-135m", ecfg), ecfg)["perplexity"]
    assert p["tokens_scored"] == 2047 and p["windows"] == 3
    assert 8 < p["ppl"] < 30, p


def test_builtin_model_knows_paris():
    source = models.resolve("smollm2-135m")
    tokenizer = models.load_tokenizer(source)
    model = models.load_model(source, torch.float32).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
