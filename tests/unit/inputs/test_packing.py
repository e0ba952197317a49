import pytest
import torch

from lorafit.inputs import data, models
from lorafit.inputs.data import Sample


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_sample_logits_equal_sample_alone(tiny_source, tiny_tokenizer, attention):
    model = models.load_model(tiny_source, torch.float32, attention=attention).eval()
    samples, _ = data.build_samples("alpaca", tiny_tokenizer, 96, max_samples=3)
    packed = data.collate([samples], tiny_tokenizer.pad_token_id, packed=True)
    with torch.no_grad():
        additive = torch.float32 if attention == "eager" else None
        logits = model(**packed.model_inputs(torch.device("cpu"), additive)).logits[0]
        at = 0
        for s in samples:
            alone = model(input_ids=torch.tensor([s.input_ids])).logits[0]
            torch.testing.assert_close(logits[at : at + len(s)], alone, atol=1e-4, rtol=0)
            at += len(s)


def test_padded_batch_matches_alone(tiny_source):
    model = models.load_model(tiny_source, torch.float32).eval()
    a, b = Sample(list(range(10, 30)), [0] * 20), Sample(list(range(40, 48)), [0] * 8)
    batch = data.collate([[a], [b]], pad_id=3, packed=False)
    with torch.no_grad():
        logits = model(**batch.model_inputs(torch.device("cpu"))).logits
        alone = model(input_ids=torch.tensor([b.input_ids])).logits[0]
    torch.testing.assert_close(logits[1, :8], alone, atol=1e-4, rtol=0)
