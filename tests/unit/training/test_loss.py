import pytest
import torch

from lorafit.inputs.data import IGNORE
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
