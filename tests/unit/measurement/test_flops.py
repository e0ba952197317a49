import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lorafit.adapters import methods as adapters
from lorafit.base.config import TrainConfig
from lorafit.inputs import data
from lorafit.measurement import flops
from lorafit.training.loss import causal_lm_loss

MATMULS = {"mm", "addmm", "bmm"}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_matmul_flops_match_flop_counter(tiny_model, tiny_tokenizer, method):
    model = adapters.apply_method(tiny_model, TrainConfig(method=method, lora_dropout=0.0))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    samples, _ = data.build_samples("alpaca", tiny_tokenizer, 128, max_samples=4)
    batch = data.collate([[s] for s in samples], tiny_tokenizer.pad_token_id, packed=False)
    # count only real tokens: run each sample alone so no padding reaches the counter
    counter = FlopCounterMode(display=False)
    with counter:
        for s in samples:
            one = data.collate([[s]], tiny_tokenizer.pad_token_id, packed=False)
            causal_lm_loss(base, one.model_inputs(torch.device("cpu")), one.labels, fused=True).backward()
    counted = sum(v for op, v in counter.get_flop_counts()["Global"].items() if str(op).split(".")[-1] in MATMULS)
    shape = flops.model_shape(model)
    no_attention = flops.ModelShape(shape.n_body, shape.n_head, shape.n_lora, 0, shape.hidden)
    predicted = flops.training_flops(no_attention, method == "full", batch.sample_lengths, batch.loss_tokens)
    assert abs(predicted - counted) / counted < 0.10


def test_attention_term_and_recompute():
    shape = flops.ModelShape(n_body=100, n_head=10, n_lora=5, layers=2, hidden=4)
    lora = flops.training_flops(shape, False, [3], loss_tokens=2)
    assert lora == 4 * 100 * 3 + 4 * 10 * 2 + 6 * 5 * 3 + 12 * 2 * 4 * 9
    full = flops.training_flops(shape, True, [3], loss_tokens=2)
    assert full == 6 * 100 * 3 + 6 * 10 * 2 + 6 * 5 * 3 + 12 * 2 * 4 * 9
    assert flops.training_flops(shape, False, [3], 2, recompute=True) == lora + 2 * 105 * 3 + 4 * 2 * 4 * 9


def test_peak_table_and_measured_peak():
    assert flops.gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert flops.gpu_peak_flops("Some Future GPU") is None
    peak, source = flops.peak_flops(torch.device("cpu"), torch.float32)
    assert peak > 1e9 and "measured" in source
