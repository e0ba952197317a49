"""Packed and padded batches give every real token the logits it has alone: the batch's attention mask
and position ids keep other samples and the padding out of its attention."""

import pytest
import torch

from lorafit.inputs import data, models
from lorafit.inputs.data import Sample

CPU = torch.device("cpu")


def alone(model, sample: Sample) -> torch.Tensor:
    """Logits of one sample run by itself: no padding, no neighbours."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([sample.input_ids])).logits[0]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_sample_logits_equal_sample_alone(tiny_source, tiny_tokenizer, attention):
    model = models.load_model(tiny_source, torch.float32, attention=attention).eval()
    samples, _ = data.build_samples("alpaca", tiny_tokenizer, 96, max_samples=3)
    packed = data.collate([samples], tiny_tokenizer.pad_token_id, packed=True)
    additive = torch.float32 if attention == "eager" else None
    with torch.no_grad():
        logits = model(**packed.model_inputs(CPU, additive)).logits[0]
    at = 0
    for s in samples:
        torch.testing.assert_close(logits[at : at + len(s)], alone(model, s), atol=1e-4, rtol=0)
        at += len(s)


def left_padded(inputs: dict[str, torch.Tensor], lengths: list[int]) -> dict[str, torch.Tensor]:
    """The same right-padded rows with each row's padding moved in front of its tokens (mask and
    positions moved along), as a left-padding server lays them out."""
    width = inputs["input_ids"].shape[1]
    return {
        key: torch.stack([torch.roll(row, width - n) for row, n in zip(t, lengths, strict=True)])
        for key, t in inputs.items()
    }


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_padded_batch_rows_match_alone_wherever_the_padding_sits(tiny_source, attention):
    """Training right-pads, and causal attention never looks ahead at that padding, so there no mask is
    needed: the model gets none and attention runs its plain causal kernel. Moved in front of the tokens,
    the padding is in every token's view: only the batch's mask (0 on padding) keeps it out, and its
    positions must restart at 0 per sample."""
    model = models.load_model(tiny_source, torch.float32, attention=attention).eval()
    rows = [Sample(list(range(10, 30)), [0] * 20), Sample(list(range(40, 48)), [0] * 8)]
    batch = data.collate([[s] for s in rows], pad_id=3, packed=False)
    right = batch.model_inputs(CPU)
    assert "attention_mask" not in right
    left = left_padded({**right, "attention_mask": batch.attention_mask}, [len(s) for s in rows])
    width = right["input_ids"].shape[1]
    with torch.no_grad():
        right_logits, left_logits = model(**right).logits, model(**left).logits
        unmasked = model(**{**left, "attention_mask": torch.ones_like(left["attention_mask"])}).logits
    for r, s in enumerate(rows):
        expected = alone(model, s)
        torch.testing.assert_close(right_logits[r, : len(s)], expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(left_logits[r, width - len(s) :], expected, atol=1e-4, rtol=0)
    # control: in this layout a mask that lets the padding in changes the short row, so the check
    # above would catch a collate that marked padding as real
    assert (unmasked[1, width - len(rows[1]) :] - alone(model, rows[1])).abs().max() > 1e-2


def test_flattened_batch_lays_rows_end_to_end_only_where_padding_is_a_tenth_or_more():
    """Same samples, labels (each sample's first token carries no loss) and counts; one row, no padding."""
    long, short, near = (
        Sample(list(range(10, 30)), list(range(10, 30))),
        Sample([5] * 8, [5] * 8),
        Sample([6] * 19, [6] * 19),
    )
    padded = data.collate([[long], [short]], pad_id=3, packed=False)
    flat = data.collate([[long], [short]], pad_id=3, packed=False, flatten=True)
    assert data.padding_share([[long], [short]]) == pytest.approx(12 / 40)
    assert flat.input_ids.tolist() == [long.input_ids + short.input_ids]
    assert flat.position_ids.tolist() == [list(range(20)) + list(range(8))]
    assert flat.labels[0, 20] == data.IGNORE and flat.labels[0, 0] == data.IGNORE
    assert sorted(flat.labels[flat.labels != data.IGNORE].tolist()) == sorted(
        padded.labels[padded.labels != data.IGNORE].tolist()
    )
    assert (flat.tokens, flat.loss_tokens, flat.sample_lengths) == (
        padded.tokens,
        padded.loss_tokens,
        padded.sample_lengths,
    )
    assert "attention_mask" not in flat.model_inputs(CPU)
    kept = data.collate([[long], [near]], pad_id=3, packed=False, flatten=True)  # 1 of 40 tokens is padding
    assert kept.input_ids.shape == (2, 20)


def test_packed_rows_are_laid_end_to_end_when_the_model_attends_by_sample():
    """Packed rows need their block-diagonal mask only where attention cannot find the samples itself."""
    a, b, c = Sample(list(range(10, 22)), list(range(10, 22))), Sample([5] * 6, [5] * 6), Sample([6] * 9, [6] * 9)
    rows = [[a, b], [c]]
    packed = data.collate(rows, pad_id=3, packed=True)
    flat = data.collate(rows, pad_id=3, packed=True, flatten=True)
    assert packed.attention_mask.dim() == 4  # without per-sample attention: the mask, padded rows
    assert flat.input_ids.tolist() == [a.input_ids + b.input_ids + c.input_ids]
    assert flat.position_ids.tolist() == [list(range(12)) + list(range(6)) + list(range(9))]
    assert "attention_mask" not in flat.model_inputs(CPU)
    assert (flat.tokens, flat.loss_tokens, flat.sample_lengths) == (
        packed.tokens,
        packed.loss_tokens,
        packed.sample_lengths,
    )
    one = data.collate([[a, b]], pad_id=3, packed=True, flatten=True)  # one packed row: no mask either
    assert one.input_ids.shape == (1, 18) and "attention_mask" not in one.model_inputs(CPU)
