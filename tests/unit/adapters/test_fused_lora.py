"""The fused LoRA branch computes what peft computes, with the dropout mask redrawn in backward."""

from __future__ import annotations

import pytest
import torch

from lorafit.adapters import fused as fused_lora
from lorafit.adapters import methods as adapters
from lorafit.inputs import data
from lorafit.measurement import flops
from lorafit.training.loss import causal_lm_loss


def _peft_model(tiny_source, tiny_cfg, method: str, dropout: float, precision: str = "fp32"):
    from lorafit.base.device import DTYPES
    from lorafit.inputs import models

    cfg = tiny_cfg(method=method, lora_dropout=dropout, lora_alpha=24.0, fused_lora=False)
    dtype = adapters.base_dtype(cfg.method, precision)
    model = models.load_model(tiny_source, dtype, adapters.quantization_config(cfg, DTYPES[precision]))
    model = adapters.apply_method(model, cfg)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; make the branch matter
            p.data.normal_(0, 0.05)
    return model.train()


def _batch(tiny_tokenizer):
    samples, _ = data.build_samples("alpaca", tiny_tokenizer, max_length=64, max_samples=4)
    return data.collate([[s] for s in samples], tiny_tokenizer.pad_token_id, packed=False)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model.get_base_model(), batch.model_inputs(torch.device("cpu")), batch.labels, True)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _unfuse(model) -> None:
    for module in model.modules():
        module.__dict__.pop("forward", None)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_fused_branch_equals_peft_without_dropout(tiny_source, tiny_tokenizer, tiny_cfg, method):
    model = _peft_model(tiny_source, tiny_cfg, method, dropout=0.0)
    batch = _batch(tiny_tokenizer)
    loss_peft, grads_peft = _loss_and_grads(model, batch)
    assert fused_lora.install(model) == 2 * 7  # two layers, seven projections each
    loss_fused, grads_fused = _loss_and_grads(model, batch)
    assert loss_fused == pytest.approx(float(loss_peft), rel=1e-6)
    for name, grad in grads_peft.items():
        torch.testing.assert_close(grads_fused[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("p", [0.05, 0.3])  # dropped positions (p < SPARSE_BELOW on CPU), a dense mask
def test_fused_branch_matches_the_explicit_formula_with_dropout(p):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    result = torch.randn(3, 5, 24, dtype=torch.float64)
    a = torch.randn(8, 32, dtype=torch.float64)
    b = torch.randn(24, 8, dtype=torch.float64)
    scaling, seed = 1.5, 1234
    out = fused_lora.LoraBranch.apply(x, result.clone(), a, b, scaling, p, seed)  # the sum lands in place
    dropped = fused_lora.Dropped.draw(torch.Size((15, 32)), p, seed, x.device)
    assert (dropped.positions is not None) == (p < fused_lora.SPARSE_BELOW)
    kept = dropped.zero_(x.reshape(15, 32).clone()) / dropped.keep
    assert 0 < int((kept == 0).sum()) < 15 * 32 // 2  # some dropped, most kept
    expected = result + ((kept @ a.t()) @ b.t() * scaling).view(3, 5, 24)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("p", [0.1, 0.4])
def test_backward_redraws_the_forward_mask(p):
    """gradcheck compares the analytic backward with finite differences of the forward: it only
    passes if backward regenerates exactly the elements the forward dropped."""
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    result = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: fused_lora.LoraBranch.apply(*t, 2.0, p, 99), (x, result, a, b))


@pytest.mark.parametrize("p", [0.01, 0.05, 0.15])
def test_dropped_positions_are_independent_drops_at_exactly_p(p):
    """Each element is dropped with probability p and independently: the count is Binomial(n, p) (within
    5 standard deviations), the gaps between drops are Geometric(p) (P(gap = 1) = p, mean 1 / p), and a
    run long enough to need a second round of gaps still covers all n."""
    n = 2_000_000
    positions = fused_lora.dropped_positions(n, p, seed=7)
    assert positions.dtype == torch.int64 and int(positions[0]) >= 0 and int(positions[-1]) < n
    gaps = torch.diff(positions)
    assert bool((gaps > 0).all())  # sorted, no position twice
    sd = (n * p * (1 - p)) ** 0.5
    assert abs(positions.numel() - n * p) < 5 * sd
    m = gaps.numel()
    assert abs(float((gaps == 1).double().mean()) - p) < 5 * (p * (1 - p) / m) ** 0.5
    assert abs(float(gaps.double().mean()) - 1 / p) < 5 * (1 - p) ** 0.5 / p / m**0.5
    assert int(positions[-1]) > n - 20 / p  # the last drop is near the end: no truncated tail
    assert torch.equal(positions, fused_lora.dropped_positions(n, p, seed=7))
    assert not torch.equal(positions[:100], fused_lora.dropped_positions(n, p, seed=8)[:100])


def test_dropped_positions_draw_more_rounds_when_the_first_falls_short(monkeypatch):
    """A first round that ends before n (rare by design) is continued, not truncated."""
    real_rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda size, **kw: real_rand(max(1, size // 50), **kw))
    positions = fused_lora.dropped_positions(100_000, 0.05, seed=3)
    assert abs(positions.numel() - 5_000) < 5 * (100_000 * 0.05 * 0.95) ** 0.5
    assert bool((torch.diff(positions) > 0).all()) and int(positions[-1]) < 100_000


def test_dropped_mask_rate_and_reproducibility():
    shape = torch.Size((1000, 1000))
    mask, keep = fused_lora.dropped_mask(shape, 0.05, seed=7, device=torch.device("cpu"))
    assert mask.shape == shape and mask.dtype == torch.bool
    assert keep == pytest.approx(1 - 3277 / 65536)  # p rounded to a multiple of 1/65536
    assert float(mask.float().mean()) == pytest.approx(0.05, abs=0.002)
    again, _ = fused_lora.dropped_mask(shape, 0.05, seed=7, device=torch.device("cpu"))
    other, _ = fused_lora.dropped_mask(shape, 0.05, seed=8, device=torch.device("cpu"))
    assert torch.equal(mask, again) and not torch.equal(mask, other)
    none, keep0 = fused_lora.dropped_mask(shape, 0.0, seed=7, device=torch.device("cpu"))
    assert not none.any() and keep0 == 1.0


def test_fused_dropout_keeps_nothing_for_backward(tiny_source, tiny_tokenizer, tiny_cfg):
    """peft keeps a mask and the dropped input per projection for backward; the fused branch keeps
    only the (shared) input, so dropout adds no saved memory at all."""
    model = _peft_model(tiny_source, tiny_cfg, "lora", dropout=0.1)
    batch = _batch(tiny_tokenizer)

    def saved_bytes() -> int:
        seen: dict[int, int] = {}

        def pack(t):
            if not isinstance(t, torch.nn.Parameter):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            inputs = batch.model_inputs(torch.device("cpu"))
            causal_lm_loss(model.get_base_model(), inputs, batch.labels, True).backward()
        return sum(seen.values())

    peft_bytes = saved_bytes()
    fused_lora.install(model)
    fused_bytes = saved_bytes()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    fused_no_dropout_bytes = saved_bytes()
    assert fused_bytes == fused_no_dropout_bytes
    assert fused_bytes < 0.75 * peft_bytes, (fused_bytes, peft_bytes)


def test_peft_forward_used_where_the_fused_branch_does_not_apply(tiny_source, tiny_tokenizer, tiny_cfg):
    model = _peft_model(tiny_source, tiny_cfg, "lora", dropout=0.1)
    batch = _batch(tiny_tokenizer)
    inputs = batch.model_inputs(torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        before = model(**inputs).logits
        fused_lora.install(model)
        after = model(**inputs).logits  # inference: no dropout, peft's path
        with model.disable_adapter():
            base = model(**inputs).logits
    torch.testing.assert_close(after, before)
    assert not torch.allclose(base, after)  # adapters do act, and disabling them is honoured
    _unfuse(model)


def test_frozen_linear_after_the_branch_is_the_same_sum():
    """The dense route (update first, the frozen matmul accumulating onto it): the same function and
    gradients as base(x) + branch, through gradcheck."""
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 6, dtype=torch.float64)
    a = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)

    def dense(x, a, b):
        return fused_lora.frozen_linear(fused_lora.LoraBranch.apply(x, None, a, b, 2.0, 0.1, 99), x, weight)

    base = torch.nn.functional.linear(x, weight)
    torch.testing.assert_close(dense(x, a, b), fused_lora.LoraBranch.apply(x, base, a, b, 2.0, 0.1, 99))
    assert torch.autograd.gradcheck(dense, (x, a, b))


@pytest.mark.parametrize("backend", ["onednn", "blas"])
def test_frozen_linear_in_fp32_through_either_library(backend, cpu_matmul):
    """In fp32 on a CPU the frozen matmul goes through `base.matmul`'s library (oneDNN: `FrozenLinear`): the
    same sum and input gradients as autograd's addmm_ in float64, to fp32 rounding; the weight gets none."""
    cpu_matmul(backend)
    torch.manual_seed(0)
    # 100 rows: a 64-row block through oneDNN (base.matmul.row_blocks) and a 36-row tail on the BLAS
    x64, weight64, update64 = torch.randn(100, 24, dtype=torch.float64), torch.randn(40, 24), torch.randn(100, 40)
    grad64 = torch.randn(100, 40, dtype=torch.float64)
    leaves = [t.float().requires_grad_() for t in (x64, update64)]
    x, update = leaves
    out = fused_lora.frozen_linear(update * 1.0, x, weight64.float())  # onto a non-leaf, as after the branch
    assert (type(out.grad_fn).__name__ == "FrozenLinearBackward") == (backend == "onednn")
    out.backward(grad64.float())
    reference = update64 + x64 @ weight64.double().t()
    torch.testing.assert_close(out.detach().double(), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), grad64 @ weight64.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(update.grad.double(), grad64)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_onednn_never_sees_a_token_count(tiny_source, tiny_cfg, method, cpu_matmul, monkeypatch):
    """oneDNN keeps memory per product shape (base.matmul), and a micro-batch's token count is new at almost
    every step: through a LoRA model's forward and backward it sees rows only in ONEDNN_ROWS and no
    dimension that is a token count (the weights' gradients, which contract over it, stay on the BLAS)."""
    from lorafit.base import matmul

    cpu_matmul("onednn")
    seen: set[tuple[int, int, int]] = set()
    run = matmul.onednn_linear

    def recorded(x, weight):
        seen.add((*x.shape, weight.shape[0]))
        return run(x, weight)

    monkeypatch.setattr(matmul, "onednn_linear", recorded)
    model = _peft_model(tiny_source, tiny_cfg, method, dropout=0.0)
    fused_lora.install(model)
    batch_shapes = ((1, 70), (1, 135), (2, 97))
    for shape in batch_shapes:
        ids = torch.randint(0, 100, shape)
        model.zero_grad(set_to_none=True)
        causal_lm_loss(model.get_base_model(), {"input_ids": ids}, ids.clone(), True).backward()
    assert {rows for rows, _, _ in seen} == {64, 128}  # 70 = 64 + 6; 135 = 128 + 7; 194 = 128 + 64 + 2
    assert not {dim for shape in seen for dim in shape} & {70, 135, 97, 2 * 97}


def test_a_biased_base_through_the_fused_forward_equals_peft():
    """A base with a frozen bias (Qwen2's q/k/v), 3-D input: the fused forward (update, frozen matmul, then
    the bias) gives peft's output and gradients, and gradcheck passes through it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("proj", torch.nn.Linear(6, 5, bias=True))
    model = get_peft_model(net.double(), LoraConfig(r=3, lora_alpha=6, target_modules=["proj"], lora_dropout=0.0))
    layer = model.base_model.model.proj
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight

    def grads(out):
        return torch.autograd.grad(out.square().sum(), (x, a, b))

    peft_out = layer(x)
    peft_grads = grads(peft_out)
    assert fused_lora.install(model) == 1
    fused_out = layer(x)
    torch.testing.assert_close(fused_out, peft_out)
    for fused, reference in zip(grads(fused_out), peft_grads, strict=True):
        torch.testing.assert_close(fused, reference)
    assert torch.autograd.gradcheck(lambda x: layer(x), (x,))


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_checkpointed_recompute_skips_the_last_frozen_matmul(tiny_source, tiny_tokenizer, tiny_cfg, method):
    """Under checkpointing the layer's recompute stops once its saved tensors are back; with the frozen
    matmul last, down_proj's base weight is read once in backward (its input gradient), not twice
    (recompute + input gradient); the loss and gradients stay those of the run without checkpointing.
    A 4-bit weight is read through its dequantization (one per read)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    batch = _batch(tiny_tokenizer)
    plain = _peft_model(tiny_source, tiny_cfg, method, dropout=0.1)
    fused_lora.install(plain)
    torch.manual_seed(5)
    loss_plain, grads_plain = _loss_and_grads(plain, batch)
    model = _peft_model(tiny_source, tiny_cfg, method, dropout=0.1)
    model.load_state_dict({k: v for k, v in plain.state_dict().items() if "lora_" in k}, strict=False)
    adapters.enable_checkpointing(model)
    fused_lora.install(model)
    down_layers = [m for n, m in model.named_modules() if n.endswith("mlp.down_proj")]
    downs = [m.base_layer.weight for m in down_layers]
    # the FLOP count leaves the skipped matmuls out of the recompute
    assert flops.model_shape(model).n_last == sum(m.in_features * m.out_features for m in down_layers)
    storages = {w.untyped_storage().data_ptr() for w in downs}

    class Reads(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            flat = [a for a in args if isinstance(a, torch.Tensor)]
            reads = (
                *("mm.default", "addmm.default", "addmm_.default", "_linear_pointwise.default"),
                *("dequantize_4bit.default", "gemm_4bit.default"),
            )
            if func.__name__ in reads and any(a.untyped_storage().data_ptr() in storages for a in flat):
                Reads.calls += 1
            return func(*args, **(kwargs or {}))

    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    loss = causal_lm_loss(model.get_base_model(), batch.model_inputs(torch.device("cpu")), batch.labels, True)
    with Reads():
        loss.backward()
    assert len(downs) == 2 and Reads.calls == len(downs)
    assert float(loss.detach()) == pytest.approx(float(loss_plain), rel=1e-6)
    for name, grad in grads_plain.items():
        p = dict(model.named_parameters())[name]
        torch.testing.assert_close(p.grad, grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_a_small_update_survives_bf16(tiny_source, tiny_cfg, method, bias):
    """Under bf16 the frozen matmul and the LoRA update are summed and rounded once. Rounding the base output to
    bf16 first, then adding, drops every update under half a bf16 step: early in training, most of them (QLoRA
    in bf16 lost 3-8% of its progress per step against fp32 on SmolLM2; dense LoRA, summed once, matched fp32).
    A frozen bias (Qwen2's q/k/v) is the same for every token: the update rounded onto it first is dropped
    in every row alike, so the bias comes last."""
    model = _peft_model(tiny_source, tiny_cfg, method, dropout=0.0, precision="bf16")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    if bias:  # 1.0: a bf16 step there is 2^-7, so 1e-4 on top of it rounds away
        ones = torch.ones(layer.out_features, dtype=torch.bfloat16)
        layer.get_base_layer().bias = torch.nn.Parameter(ones, requires_grad=False)
    fused_lora.install(layer)
    update = 1e-4  # a bf16 step is 2^-7 relative: 1e-4 is under half of one for outputs above ~0.026
    with torch.no_grad():
        layer.lora_A["default"].weight.zero_()[0, 0] = 1.0  # the rank-1 intermediate is x[..., 0]
        layer.lora_B["default"].weight.zero_()[:, 0] = update / layer.scaling["default"]
    x = torch.randn(4096, layer.in_features, dtype=torch.bfloat16)
    x[:, 0] = 1.0  # so every output takes +1e-4
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        base = layer.get_base_layer()(x).float()
        shift = (layer(x).float() - base).mean()
    assert float(shift) == pytest.approx(update, rel=0.2)
