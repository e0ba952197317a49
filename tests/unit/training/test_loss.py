import pytest
import torch

from lorafit.inputs.data import IGNORE
from lorafit.measurement.estimate import WEIGHT_GRAD_SLICE
from lorafit.training.loss import fused_linear_cross_entropy, reference_cross_entropy


@pytest.mark.parametrize("weight_trains", [False, True])
@pytest.mark.parametrize("chunk", [3, 1024])
def test_fused_loss_and_grads_equal_full_logits(weight_trains, chunk):
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=weight_trains)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :4] = IGNORE  # a masked prompt
    labels[1, 7:] = IGNORE  # padding
    fused, n = fused_linear_cross_entropy(hidden, weight, labels, chunk=chunk)
    fused.backward()
    grads = (hidden.grad.clone(), weight.grad.clone() if weight_trains else None)
    hidden.grad = None
    weight.grad = None
    ref, n_ref = reference_cross_entropy(hidden @ weight.T, labels)
    ref.backward()
    assert n == n_ref == 5 + 6  # shifted targets: row 0 keeps positions 4-8, row 1 keeps 1-6
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-5, atol=1e-6)
    if weight_trains:
        torch.testing.assert_close(grads[1], weight.grad, rtol=1e-5, atol=1e-6)


def test_no_loss_tokens_gives_zero_loss_with_grad():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    loss, n = fused_linear_cross_entropy(hidden, torch.randn(10, 8), torch.full((1, 4), IGNORE))
    loss.backward()
    assert n == 0 and loss.item() == 0.0 and hidden.grad is not None


def _large_allocations(run, at_least: int) -> int:
    """Blocks of `at_least` bytes or more that `run()` allocates, as the profiler's memory events count them:
    nested ones included (a bf16 operand that `add_` copies to fp32 first)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    return sum(e.self_cpu_memory_usage >= at_least for e in prof.events())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["blas", "onednn"])
def test_chunk_logits_take_their_memory_once_not_once_per_chunk(dtype, backend, cpu_matmul, monkeypatch):
    """With the allocator keeping freed memory (mimalloc without purge), each chunk's fresh logits stayed
    resident: the loss held 2.3x one chunk's logits in RSS (SmolLM2, 4,096 tokens: 345 MB for 144 MB in bf16).
    Through oneDNN (fp32 on a CPU) the products are transients of at most `matmul.INTO_BLOCK_BYTES`, here
    two rows, under the size counted."""
    from lorafit.base import matmul

    cpu_matmul(backend)
    monkeypatch.setattr(matmul, "INTO_BLOCK_BYTES", 2 * 1000 * 4)
    tokens, vocab, chunk = 40, 1000, 8  # 5 chunks
    hidden = torch.randn(1, tokens + 1, 16, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, 16, dtype=dtype)
    labels = torch.randint(0, vocab, (1, tokens + 1))
    count = _large_allocations(
        lambda: fused_linear_cross_entropy(hidden, weight, labels, chunk=chunk), at_least=chunk * vocab * 2
    )
    assert count == (2 if dtype == torch.bfloat16 else 1)  # fp32 logits, and a bf16 product/probabilities buffer


@pytest.mark.parametrize("autocast", [False, True])
def test_the_output_layers_gradient_takes_its_memory_once_not_once_per_chunk(autocast):
    """Full fine-tuning: each chunk's product for the output layer's gradient was a fresh (V, d) tensor (under
    autocast also its fp32 copy), as large as the layer itself: per chunk, what the logits' buffers fixed."""
    d, chunk, tokens = 128, 8, 40  # 5 chunks; (V, d) in bf16 is 4 of the fp32 slices it is added in
    vocab = 4 * WEIGHT_GRAD_SLICE // d
    hidden = torch.randn(1, tokens + 1, d, requires_grad=True)
    weight = torch.randn(vocab, d, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens + 1))

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            fused_linear_cross_entropy(hidden, weight, labels, chunk=chunk)

    count = _large_allocations(run, at_least=vocab * d * 2)
    assert count == (3 if autocast else 1)  # the fp32 gradient; under autocast the weight's bf16 copy, one product


@pytest.mark.parametrize("slice_elements", [None, 40])  # one slice; 25 of 2 rows (the gradient added in parts)
def test_fused_loss_under_autocast_equals_full_logits_in_its_dtype(monkeypatch, slice_elements):
    """Full fine-tuning under bf16 autocast: fp32 hidden states and weight, bf16 products, fp32 softmax."""
    if slice_elements is not None:
        monkeypatch.setattr("lorafit.training.loss.WEIGHT_GRAD_SLICE", slice_elements)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :3] = IGNORE  # 14 loss tokens: chunks of 4, the last one short
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, _ = fused_linear_cross_entropy(hidden, weight, labels, chunk=4)
    fused.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, _ = reference_cross_entropy(hidden @ weight.T, labels)
    ref.backward()
    assert grads[0].dtype == hidden.dtype and grads[1].dtype == weight.dtype
    torch.testing.assert_close(fused, ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(grads[1], weight.grad, rtol=2e-2, atol=2e-3)
