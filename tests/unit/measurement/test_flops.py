"""The analytic FLOPs (`flops.training_flops` over `flops.model_shape`) against what PyTorch's FLOP
counter sees the same forward and backward do, exactly.

`torch.utils.flop_counter.FlopCounterMode` counts matmuls (2·m·n·k each) and attention kernels. On a
CPU, SDPA's fused kernel is not in its table, so attention runs on the math backend here: batched
matmuls over the full T x T scores, 4·d·T² forward and 8·d·T² backward, the model FLOPs. (Torch
counts the fused GPU kernels' backward as 10·d·T², since they recompute the scores: hardware FLOPs.)
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from lorafit.adapters import fused
from lorafit.adapters import methods as adapters
from lorafit.base.config import TrainConfig
from lorafit.inputs import data
from lorafit.measurement import flops
from tests.helpers import counted_flops, run_samples

# positions (of a 2 x 7 batch) whose output goes through the head, as loss tokens do
LOSS_AT = torch.tensor([[0, 0, 1, 1, 0, 1, 1], [0, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)


class OneProjection(torch.nn.Module):
    """A model of one projection (the part of a block between two inputs that need gradients) and an
    output layer applied to the loss positions only; `config` and `get_output_embeddings` are what
    `model_shape` reads of a transformers model. No attention: 0 layers of it."""

    def __init__(self, d_in: int = 24, d_out: int = 40, vocab: int = 56) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=0, hidden_size=d_out)
        self.proj = torch.nn.Linear(d_in, d_out, bias=False)
        self.head = torch.nn.Linear(d_out, vocab, bias=False)

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.head

    def forward(self, x: torch.Tensor, loss_at: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(x)[loss_at]).sum()


class CausalAttention(torch.nn.Module):
    """`layers` blocks of causal multi-head self-attention (scores over the whole sequence, softmax,
    weighted sum; residual) and an output layer on the loss positions; no projections, so the
    FLOPs are attention's and the head's."""

    def __init__(self, layers: int = 2, heads: int = 4, head_dim: int = 8, vocab: int = 56) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.config = SimpleNamespace(num_hidden_layers=layers, hidden_size=heads * head_dim)
        self.head = torch.nn.Linear(heads * head_dim, vocab, bias=False)

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.head

    def forward(self, x: torch.Tensor, loss_at: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = x
        for _ in range(self.config.num_hidden_layers):
            q = h.view(b, t, self.heads, self.head_dim).transpose(1, 2)
            k, v = q.flip(-1), torch.tanh(q)  # three different tensors, all needing gradients
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + out.transpose(1, 2).reshape(b, t, d)
        return self.head(h[loss_at]).sum()


@pytest.mark.parametrize("method", ["lora", "fused lora", "full"])
def test_one_projection_flops_equal_the_counter(method):
    """LoRA: the frozen projection's forward and input gradient (4N per token), the adapter's
    forward and both gradients (6·N_lora), the frozen head on loss tokens only (4·N_head); full
    fine-tuning 6N and 6·N_head. The input needs gradients, as every block's input but the first."""
    model = OneProjection()
    if method == "full":
        model.requires_grad_(True)
    else:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["proj"]))
        if method == "fused lora":
            assert fused.install(model) == 1
    model.train()
    x = torch.randn(2, 7, 24, requires_grad=True)
    seen = counted_flops(lambda: model(x, LOSS_AT).backward())
    shape = flops.model_shape(model)
    assert (shape.n_body, shape.n_head, shape.n_lora) == (24 * 40, 40 * 56, 0 if method == "full" else 4 * (24 + 40))
    assert flops.training_flops(shape, method == "full", [7, 7], int(LOSS_AT.sum())) == seen


@pytest.mark.parametrize("full", [False, True])
def test_causal_attention_flops_equal_the_counter(full):
    """12·d·T² per layer and sample: forward QKᵀ and AV (2·T²·d each), backward twice that. Samples
    are separate sequences (packed samples are, by their mask), so lengths 5 and 9 cost 5² + 9², not 14²."""
    model = CausalAttention().requires_grad_(full)
    lengths = [5, 9]
    xs = [torch.randn(1, t, 32, requires_grad=True) for t in lengths]
    loss_at = [torch.rand(1, t) < 0.5 for t in lengths]

    def run() -> None:
        for x, at in zip(xs, loss_at, strict=True):
            model(x, at).backward()

    seen = counted_flops(run)
    shape = flops.model_shape(model)
    assert (shape.n_body, shape.layers, shape.hidden) == (0, 2, 32)
    predicted = flops.training_flops(shape, full, lengths, int(sum(a.sum() for a in loss_at)))
    assert predicted == seen
    assert seen > 12 * 2 * 32 * (5**2 + 9**2)  # attention is there, and the head besides


@pytest.mark.parametrize("method", ["full", "lora"])
def test_whole_model_flops_equal_the_counter(tiny_model, tiny_tokenizer, method):
    """The tiny Llama, every op, attention included: matmuls of all blocks, the head on loss tokens."""
    model = adapters.apply_method(tiny_model, TrainConfig(method=method, lora_dropout=0.0)).train()
    samples, _ = data.build_samples("alpaca", tiny_tokenizer, 128, max_samples=4)
    seen = counted_flops(lambda: run_samples(model, tiny_tokenizer, samples))
    batch = data.collate([[s] for s in samples], tiny_tokenizer.pad_token_id, packed=False)
    predicted = flops.training_flops(
        flops.model_shape(model), method == "full", batch.sample_lengths, batch.loss_tokens
    )
    assert predicted == seen


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("layers", [None, 1])
def test_gradient_checkpointing_flops_equal_the_counter(tiny_model, tiny_tokenizer, method, layers):
    """recompute=True (HFU): the blocks' forward once more in backward, attention included, not the
    head, nor the blocks' last frozen matmul (down_proj): bare under full fine-tuning, and last in LoRA's fused
    branch (`fused.frozen_linear`), the recompute stops before it.
    Selective checkpointing (the first of the tiny model's two blocks) reruns that block only."""
    from lorafit.adapters import checkpointing

    cfg = TrainConfig(method=method, lora_dropout=0.0, gradient_checkpointing=True, checkpoint_layers=layers)
    model = adapters.apply_method(tiny_model, cfg).train()
    fraction = checkpointing.restrict(model, cfg)
    assert fraction == (0.5 if layers else 1.0)
    samples, _ = data.build_samples("alpaca", tiny_tokenizer, 128, max_samples=3)
    seen = counted_flops(lambda: run_samples(model, tiny_tokenizer, samples))
    batch = data.collate([[s] for s in samples], tiny_tokenizer.pad_token_id, packed=False)
    shape = flops.model_shape(model)
    full = method == "full"
    predicted = flops.training_flops(shape, full, batch.sample_lengths, batch.loss_tokens, recompute=fraction)
    assert predicted == seen


def test_peak_table_and_measured_peak():
    assert flops.gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert flops.gpu_peak_flops("Some Future GPU") is None
    peak, source = flops.peak_flops(torch.device("cpu"), torch.float32)
    assert peak > 1e9 and "measured" in source


@pytest.mark.parametrize("checkpointing", [True, False])
def test_flops_of_lora_on_q_and_v_equal_the_counter(tiny_model, tiny_tokenizer, checkpointing):
    """LoRA on q and v only: down_proj is a bare frozen Linear, which the non-reentrant checkpoint does not
    rerun (as under full fine-tuning); the first block's inputs get no gradient (nothing before trains),
    and its attention backward skips dK: its keys have no LoRA."""
    cfg = TrainConfig(
        method="lora", lora_dropout=0.0, gradient_checkpointing=checkpointing, target_modules=["q_proj", "v_proj"]
    )
    model = adapters.apply_method(tiny_model, cfg).train()
    samples, _ = data.build_samples("alpaca", tiny_tokenizer, 128, max_samples=3)
    seen = counted_flops(lambda: run_samples(model, tiny_tokenizer, samples))
    batch = data.collate([[s] for s in samples], tiny_tokenizer.pad_token_id, packed=False)
    shape = flops.model_shape(model)
    assert shape.n_last > 0 and not shape.first_inputs_grad and shape.first_attention_grads == 3
    predicted = flops.training_flops(shape, False, batch.sample_lengths, batch.loss_tokens, recompute=checkpointing)
    assert predicted == seen


@pytest.mark.parametrize(
    ("method", "checkpointing", "expected"),
    [("full", False, True), ("full", True, True), ("lora", False, False), ("lora", True, False)],
)
def test_whether_the_first_blocks_inputs_get_gradients_is_asked_of_the_model(
    tiny_model, method, checkpointing, expected
):
    """Trained embeddings: yes. LoRA with (non-reentrant) checkpointing: no, although transformers hooks the
    embeddings to require grad when checkpointing is switched on; nothing before the first block trains,
    so that hook only costs the first block's input gradients. Asked of the model, not assumed."""
    cfg = TrainConfig(method=method, gradient_checkpointing=checkpointing)
    assert flops.model_shape(adapters.apply_method(tiny_model, cfg)).first_inputs_grad is expected
