"""Per-sample SDPA over a row of samples laid end to end: every token gets the logits and gradients it
gets in the padded batch, with and without checkpointing (the recompute finds the samples again)."""

from __future__ import annotations

import pytest
import torch

from lorafit.adapters import attention
from lorafit.adapters import methods as adapters
from lorafit.base.config import TrainConfig
from lorafit.inputs import data, models
from lorafit.training.loss import causal_lm_loss

CPU = torch.device("cpu")


def test_sample_lengths_from_restarting_positions():
    assert attention.sample_lengths(torch.tensor([[0, 1, 2, 0, 1, 0]])) == [3, 2, 1]
    assert attention.sample_lengths(torch.tensor([[0, 1, 2, 3]])) is None  # one sample: plain SDPA
    assert attention.sample_lengths(torch.tensor([[0, 1, 0], [0, 1, 2]])) is None  # padded rows
    assert attention.sample_lengths(None) is None


def test_sample_lengths_follow_changes_to_the_position_ids():
    ids = torch.tensor([[0, 1, 2, 0, 1, 0]])
    assert attention.sample_lengths(ids) == [3, 2, 1]
    ids[0, 2] = 0  # same tensor, new contents: read again, not the remembered lengths
    assert attention.sample_lengths(ids) == [2, 1, 2, 1]
    assert attention.sample_lengths(torch.tensor([[0, 0, 1]])) == [1, 2]


def test_only_sdpa_models_are_switched(tiny_source):
    eager = models.load_model(tiny_source, torch.float32, attention="eager")
    assert not attention.install(eager) and eager.config._attn_implementation == "eager"
    sdpa = models.load_model(tiny_source, torch.float32)
    assert attention.install(sdpa) and sdpa.config._attn_implementation == attention.NAME


def _lora_model(tiny_source, cfg):
    """The tiny model on per-sample attention with LoRA as `cfg` says, in training mode."""
    base = models.load_model(tiny_source, torch.float32)
    assert attention.install(base)
    model = adapters.apply_method(base, cfg).train()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)  # peft starts B at zero: make the adapters matter
    return model


def _loss_and_grads(model, batch, weight):
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model.get_base_model(), batch.model_inputs(CPU), batch.labels, True)
    (loss * weight).backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_flat_row_trains_as_the_padded_batch(tiny_source, tiny_tokenizer, checkpointing, monkeypatch):
    model = _lora_model(tiny_source, TrainConfig(method="lora", lora_dropout=0.0, gradient_checkpointing=checkpointing))
    samples, _ = data.build_samples("alpaca", tiny_tokenizer, max_length=128, max_samples=8)
    by_length = sorted(samples, key=len)
    rows = [[s] for s in (*by_length[:2], *by_length[-2:])]
    assert data.padding_share(rows) >= data.FLATTEN_ABOVE
    padded = data.collate(rows, tiny_tokenizer.pad_token_id, packed=False)
    flat = data.collate(rows, tiny_tokenizer.pad_token_id, packed=False, flatten=True)
    assert flat.input_ids.shape[0] == 1 and flat.input_ids.shape[1] == padded.tokens
    loss_padded, grads_padded = _loss_and_grads(model, padded, 1.0)
    sdpa, calls = torch.nn.functional.scaled_dot_product_attention, []

    def counted(q, k, v, attn_mask=None, **kw):
        calls.append((q.shape[2], attn_mask is None and kw.get("is_causal")))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    read, reads = attention.read_lengths, []
    monkeypatch.setattr(attention, "read_lengths", lambda ids: reads.append(ids) or read(ids))
    loss_flat, grads_flat = _loss_and_grads(model, flat, 1.0)
    # each layer attends sample by sample through the causal kernel, no (T x T) mask; again in the recompute
    passes = 2 if checkpointing else 1
    assert calls == [(len(s[0]), True) for s in rows] * 2 * passes
    # the boundaries (a device sync on a GPU) are read from the position ids once, not per layer and pass
    assert len(reads) == 1
    assert float(loss_flat) == pytest.approx(float(loss_padded), rel=1e-5)
    for name, grad in grads_padded.items():
        torch.testing.assert_close(grads_flat[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_flat_packed_rows_train_as_the_masked_rows(tiny_source, tiny_tokenizer):
    """--packing with per-sample attention: the packed rows laid end to end, no (T x T) mask, give the loss
    and gradients of the block-diagonal mask."""
    model = _lora_model(tiny_source, TrainConfig(method="lora", lora_dropout=0.0, packing=True))
    samples, _ = data.build_samples("alpaca", tiny_tokenizer, max_length=64, max_samples=8)
    rows = [[samples[i] for i in row] for row in data.pack_rows([len(s) for s in samples], 128)][:2]
    assert all(len(row) > 1 for row in rows)
    masked = data.collate(rows, tiny_tokenizer.pad_token_id, packed=True)
    flat = data.collate(rows, tiny_tokenizer.pad_token_id, packed=True, flatten=True)
    assert masked.model_inputs(CPU)["attention_mask"].dim() == 4 and flat.input_ids.shape[0] == 1
    loss_masked, grads_masked = _loss_and_grads(model, masked, 1.0)
    loss_flat, grads_flat = _loss_and_grads(model, flat, 1.0)
    assert float(loss_flat) == pytest.approx(float(loss_masked), rel=1e-5)
    for name, grad in grads_masked.items():
        torch.testing.assert_close(grads_flat[name], grad, rtol=1e-4, atol=1e-6, msg=name)
