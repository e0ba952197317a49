"""Analytic training FLOPs, peak FLOP/s, and MFU/HFU.

Per token (N = matmul parameters, L layers, d hidden, T the token's own sequence length; the
convention of PaLM, Chowdhery et al. 2022, appendix B, also used by nanoGPT's `estimate_mfu`):
- full fine-tuning: 6N + 12·L·d·T
- LoRA/QLoRA (frozen base): forward 2N, input gradients 2N, adapter weight gradients 6·N_lora,
  attention 12·L·d·T  ->  4N + 6·N_lora + 12·L·d·T
Honest accounting: only real tokens count (never padding), and the output layer (lm_head) counts
only for tokens that carry loss, since the objective needs no logits anywhere else. Under LoRA the
first block's q/k/v read the frozen embeddings, so their input gradients are never needed (autograd
skips them): 2·N_first less. Gradient checkpointing (HFU, not MFU) reruns each block's forward in
backward, except what torch's non-reentrant checkpoint never reruns: a block's last matmul
(down_proj) whose output nothing saves, unless a LoRA branch wraps it (lorafit's fused branch reruns
it in its own node; peft's unfused one skips only its lora_B, a few FLOPs this count keeps); and where
the embeddings' output requires grad (LoRA checkpointing hooks it so), the first block's input
gradients are computed after all. N is counted on the model's own modules, so fused projections (Phi-3's
qkv_proj: d x (q + k + v), gate_up_proj: d x 2f, their LoRA A and B alike) need nothing of their own; the
first block's inputs are its q/k/v or qkv_proj. Checked against `torch.utils.flop_counter` exactly in
tests/unit/measurement/test_flops.py and, on Phi-3 and Mistral shapes, test_flops_archs.py.
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass
from typing import Any

import torch

from lorafit.adapters.fused import base_matmul_last
from lorafit.base import matmul


@dataclass(frozen=True)
class GpuPeak:
    """Dense (not 2:4 sparse) tensor-core peaks in FLOP/s with FP32 accumulate, which is what PyTorch's
    fp16/bf16 matmuls use. `bf16` is None where the GPU has no bf16 tensor cores (Volta, Turing: bf16 is
    emulated there, so the measured matmul peak stands in). `source` names where the figure comes from."""

    fp16: float
    bf16: float | None
    source: str


# GeForce cards run fp16/bf16 tensor math with FP32 accumulate at half their FP16-accumulate rate:
# 512 FLOP per clock per SM on Ampere GA10x, Ada and GeForce Blackwell (the whitepapers' RTX 3090,
# 4090 and 4080 figures are SMs x boost clock x 512). Figures NVIDIA prints as "with sparsity" are
# halved here. Where no NVIDIA table lists a card, the figure is derived with that formula.
_GA102 = "NVIDIA Ampere GA102 GPU Architecture whitepaper, Peak FP16/BF16 Tensor TFLOPS with FP32 Accumulate"
_ADA = "NVIDIA Ada GPU Architecture whitepaper, Peak FP16/BF16 Tensor TFLOPS with FP32 Accumulate"


def _derived(sms: int, boost_mhz: int, per_sm_clock: int) -> tuple[float, str]:
    """SMs x boost clock x FLOP/clk/SM, and the formula, for a card no NVIDIA table lists."""
    peak = sms * boost_mhz * 1e6 * per_sm_clock
    return peak, f"derived: {sms} SMs x {boost_mhz} MHz boost x {per_sm_clock} FLOP/clk/SM"


def _same(peak: float, source: str) -> GpuPeak:
    """A card with bf16 tensor cores: bf16 runs at the fp16 rate (Ampere and later)."""
    return GpuPeak(peak, peak, source)


GPU_PEAKS: dict[str, GpuPeak] = {
    # GeForce Ampere (compute capability 8.6)
    "RTX 3060": _same(*_derived(28, 1777, 512)),  # = 25.5 TFLOP/s; not in the GA102 whitepaper (GA106)
    "RTX 3090": _same(71e12, _GA102),  # 82 SMs x 1695 MHz x 512
    # GeForce Ada (8.9). 4090 and 4080 are in the whitepaper's table; the others are derived with its
    # per-SM rate (its "RTX 4080 12GB" column, 80.2, is the AD104 card later sold as the 4070 Ti).
    "RTX 4090": _same(165.2e12, _ADA),  # 128 SMs x 2520 MHz x 512
    "RTX 4080": _same(97.5e12, _ADA),  # 76 SMs x 2505 MHz x 512
    "RTX 4070 Ti": _same(*_derived(60, 2610, 512)),  # = 80.2
    "RTX 4070": _same(*_derived(46, 2475, 512)),  # = 58.3
    "RTX 4060 Ti": _same(*_derived(34, 2535, 512)),  # = 44.1
    "RTX 4060": _same(*_derived(24, 2460, 512)),  # = 30.2
    # GeForce Blackwell (12.0): = 209.5; a quarter of the 838 TFLOPS NVIDIA quotes (FP16 accumulate, sparse)
    "RTX 5090": _same(*_derived(170, 2407, 512)),
    # Data-centre Ampere (8.0, 8.6)
    "A100": _same(312e12, "NVIDIA A100 data sheet, BF16/FP16 Tensor Core 312 TFLOPS (624 sparse)"),  # SXM4 and PCIe
    "A10": _same(125e12, "NVIDIA A10 data sheet, BF16/FP16 Tensor Core 125 TFLOPS (250 sparse)"),
    # A10G (AWS G5) has no public NVIDIA data sheet: 80 SMs x 1710 MHz at the GeForce GA10x rate = 70.0,
    # the "70 TFLOPS" third parties list for it; not verified against NVIDIA.
    "A10G": _same(*_derived(80, 1710, 512)),
    # Data-centre Ada (8.9)
    "L4": _same(121e12, "NVIDIA L4 data sheet, FP16/BF16 Tensor Core 242 TFLOPS sparse / 2"),
    "L40": _same(181.05e12, "NVIDIA L40 data sheet, FP16/BF16 Tensor Core 181.05 TFLOPS (362.1 sparse)"),
    "L40S": _same(362.05e12, "NVIDIA L40S data sheet, FP16/BF16 Tensor Core 362.05 TFLOPS (733 sparse)"),
    # Hopper (9.0): data sheets print 1,979 (SXM) and 1,513 (PCIe) TFLOPS with sparsity; the H100
    # whitepaper gives dense 989.4 and 756.5.
    "H100 SXM": _same(989e12, "NVIDIA H100 data sheet, FP16/BF16 Tensor Core 1,979 TFLOPS sparse / 2"),
    "H100 PCIe": _same(756e12, "NVIDIA H100 data sheet, FP16/BF16 Tensor Core (PCIe) 1,513 TFLOPS sparse / 2"),
    "H200": _same(989e12, "NVIDIA H200 data sheet (SXM), FP16/BF16 Tensor Core 1,979 TFLOPS sparse / 2"),
    "GH200": _same(989e12, "NVIDIA GH200 data sheet: the H100 SXM's Hopper GPU, FP16/BF16 Tensor Core as H100 SXM"),
    # Blackwell (10.0)
    "B200": _same(2250e12, "NVIDIA HGX B200 data sheet, FP16/BF16 Tensor Core 4.5 PFLOPS sparse per GPU / 2"),
    # Turing (7.5) and Volta (7.0): fp16 tensor cores only
    "T4": GpuPeak(65e12, None, "NVIDIA T4 data sheet, Mixed Precision (FP16/FP32) 65 TFLOPS"),
    "V100 SXM2": GpuPeak(125e12, None, "NVIDIA V100 data sheet, Tensor Performance (SXM2) 125 TFLOPS"),
    "V100 PCIe": GpuPeak(112e12, None, "NVIDIA V100 data sheet, Tensor Performance (PCIe) 112 TFLOPS"),
}

# Normalised device names (see normalise_gpu_name) of the table's models where they differ from its key.
GPU_NAME_ALIASES: dict[str, str] = {
    "h100": "H100 SXM",  # "NVIDIA H100 80GB HBM3"
    "h100 sxm5": "H100 SXM",
    "a100 sxm": "A100",
    "a100 sxm4": "A100",  # "NVIDIA A100-SXM4-80GB"
    "a100 pcie": "A100",  # "NVIDIA A100-PCIE-40GB", "NVIDIA A100 80GB PCIe"
}
_VENDOR_WORDS = {"nvidia", "geforce", "tesla"}
_MEMORY_WORD = re.compile(r"\d+gb|hbm\d*e?")  # memory size and kind do not change the compute peak


def normalise_gpu_name(device_name: str) -> str:
    """torch.cuda.get_device_name() as lower-case model words: vendor and brand words ("NVIDIA", "GeForce",
    "Tesla") and memory words ("80GB", "HBM3") dropped, dashes as spaces. "Tesla V100-SXM2-16GB" -> "v100 sxm2"."""
    words = re.split(r"[\s_-]+", device_name.lower())
    return " ".join(w for w in words if w and w not in _VENDOR_WORDS and not _MEMORY_WORD.fullmatch(w))


def gpu_model(device_name: str) -> str | None:
    """The GPU_PEAKS key whose whole model name is `device_name`'s, or None: "RTX 4060 Ti" is not an
    "RTX 4060", "L40" is not an "L4", and variants with other clocks ("H100 NVL", "RTX 4090 D", laptop
    GPUs) are unknown rather than given a sibling's figure."""
    name = normalise_gpu_name(device_name)
    by_name = {normalise_gpu_name(key): key for key in GPU_PEAKS}
    return by_name.get(name) or GPU_NAME_ALIASES.get(name)


def gpu_peak_flops(device_name: str, dtype: torch.dtype = torch.float16) -> float | None:
    """The data-sheet dense tensor peak of `dtype` on this GPU; None for unknown GPUs, for bf16 where it is
    emulated and for fp32 (those use the measured matmul peak)."""
    model = gpu_model(device_name)
    if model is None:
        return None
    peak = GPU_PEAKS[model]
    return {torch.float16: peak.fp16, torch.bfloat16: peak.bf16}.get(dtype)


@dataclass(frozen=True)
class ModelShape:
    """What the FLOPs formulas need from a model."""

    n_body: int  # matmul params in the blocks (frozen base for LoRA)
    n_head: int  # output-layer params (lm_head)
    n_lora: int  # adapter params (0 for full fine-tuning)
    layers: int
    hidden: int
    n_first: int = 0  # the matmuls reading the first block's input: layer 0's q/k/v (or qkv) and LoRA A
    n_last: int = 0  # each block's last matmul (down_proj) where no LoRA branch wraps it, summed over blocks
    first_inputs_grad: bool = False  # the embeddings' output requires grad (full, or offloaded checkpointing's hook)
    # of layer 0's four attention-backward matmuls (dQ, dK, dV, dP), those needed when its input needs no grad:
    # a query, key or value gets a gradient only through its own LoRA (dP serves dQ and dK)
    first_attention_grads: int = 4


def model_shape(model: Any) -> ModelShape:
    """Count matmul parameters through the modules: LoRA layers are found by their lora_A/lora_B dicts."""
    lora_ids: set[int] = set()
    n_lora = 0
    for m in model.modules():
        if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict):
            for sub in (*m.lora_A.values(), *m.lora_B.values()):
                lora_ids.add(id(sub))
                n_lora += sum(p.numel() for p in sub.parameters())
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    n_head = head.in_features * head.out_features
    n_body = sum(
        m.in_features * m.out_features
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and id(m) not in lora_ids and m is not head
    )
    cfg = base.config
    n_first, n_last = _matmul_params(model, FIRST_INPUTS), _last_matmul_params(model)
    adapted = {m.group(1) for name, _ in model.named_modules() if (m := FIRST_LORA.search(name))}
    return ModelShape(
        n_body, n_head, n_lora, cfg.num_hidden_layers, cfg.hidden_size, n_first, n_last, _embeddings_need_grad(base),
        first_attention_grads(adapted),
    )  # fmt: skip


def first_attention_grads(adapted: set[str]) -> int:
    """How many of the attention-backward matmuls (dQ, dK, dV and dP = dO V^T, which dQ and dK need) layer
    0 runs when nothing before it trains, given which of its projections (q_proj, k_proj, v_proj, qkv_proj)
    carry LoRA."""
    q, k, v = (bool({"qkv_proj", name} & adapted) for name in ("q_proj", "k_proj", "v_proj"))
    return q + k + v + (q or k)


def _embeddings_need_grad(base: Any) -> bool:
    """Whether the embeddings' output requires grad, asked of the model itself: trained embeddings, or
    the forward hook `enable_input_require_grads` adds (so checkpointed blocks get gradients)."""
    embeddings = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    if embeddings is None:
        return False
    with torch.enable_grad():
        probe = embeddings(torch.zeros(1, 1, dtype=torch.long, device=embeddings.weight.device))
    return bool(probe.requires_grad)


# module names (peft's LoRA wraps the base as .base_layer and adds .lora_A.<adapter>)
FIRST_INPUTS = re.compile(r"\.layers\.0\.self_attn\.(q_proj|k_proj|v_proj|qkv_proj)(\.base_layer|\.lora_A\.[^.]+)?$")
FIRST_LORA = re.compile(r"\.layers\.0\.self_attn\.(q_proj|k_proj|v_proj|qkv_proj)\.lora_A$")
LAST_MATMUL = re.compile(r"\.mlp\.down_proj$")  # bare, or the LoRA layer (its base is down_proj.base_layer)


def _last_matmul_params(model: Any) -> int:
    """Params of the blocks' last matmuls (down_proj) that a checkpointed block's recompute skips: bare ones,
    and LoRA-wrapped ones whose fused branch runs the frozen matmul last (`adapters.fused.frozen_linear`)."""
    return sum(
        m.in_features * m.out_features
        for name, m in model.named_modules()
        if LAST_MATMUL.search(name) and (isinstance(m, torch.nn.Linear) or base_matmul_last(m))
    )


def _matmul_params(model: Any, names: re.Pattern[str]) -> int:
    return sum(
        m.in_features * m.out_features
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and names.search(name)
    )


def training_flops(
    shape: ModelShape, full: bool, sample_lengths: list[int], loss_tokens: int, recompute: float = 0.0
) -> float:
    """Model FLOPs of one training pass over samples of the given lengths; `recompute` is the fraction of
    blocks checkpointed (1.0: all, selective checkpointing less), whose forward backward reruns: HFU FLOPs."""
    c = 6 if full else 4
    tokens = sum(sample_lengths)
    attn = 12 * shape.layers * shape.hidden * sum(t * t for t in sample_lengths)
    flops = c * shape.n_body * tokens + c * shape.n_head * loss_tokens + 6 * shape.n_lora * tokens + attn
    if not full and not shape.first_inputs_grad and shape.n_first:  # nothing before the first block trains:
        flops -= 2 * shape.n_first * tokens  # no gradient for its input, and of its attention's backward only
        flops -= (4 - shape.first_attention_grads) * 2 * shape.hidden * sum(t * t for t in sample_lengths)  # LoRA's
    if recompute:  # checkpointing reruns the blocks' forward in backward: not the head, not a bare down_proj
        flops += recompute * (2 * (shape.n_body + shape.n_lora) * tokens + attn / 3 - 2 * shape.n_last * tokens)
    return float(flops)


@functools.lru_cache(maxsize=8)
def measured_matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """Best FLOP/s of an n³ matmul on `device`: the peak for CPUs and GPUs missing from the table.

    In fp32 on a CPU, the better of torch's BLAS and oneDNN (`base.matmul`): on the AMD CPU where lorafit's
    products go through oneDNN, MKL's peak was 213 GFLOP/s and a LoRA step then read MFU 1.02."""
    products = [torch.matmul]
    if device.type == "cpu" and dtype == torch.float32 and matmul.onednn_available():
        products.append(matmul.onednn_matmul)
    return max(_measured_peak(product, device, dtype, n, reps) for product in products)


def _measured_peak(product: Any, device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    """Best FLOP/s of `product` on n³ operands. The size grows from 256 to `n` only while one product takes
    under 0.1 s, so a dtype the device is slow at (bf16 on a CPU without bf16 units runs at ~1 GFLOP/s) is
    measured in about a second, not minutes; `reps` stop early past 1 s in all."""
    size = min(256, n)
    generator = torch.Generator(device).manual_seed(0)  # not torch's global one: a run's random stream stays its own
    while True:
        a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
        b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
        product(a, b)  # warm-up
        _sync(device)
        t = time.perf_counter()
        product(a, b)
        _sync(device)
        if size >= n or time.perf_counter() - t > 0.1:
            break
        size *= 2
    best = float("inf")
    spent = 0.0
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        product(a, b)
        _sync(device)
        took = time.perf_counter() - t
        best, spent = min(best, took), spent + took
        if spent > 1.0:
            break
    return 2 * size**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """Peak FLOP/s of `dtype` (the dtype the run computes in) for MFU, and where the figure comes from:
    the table for fp16/bf16 on a known GPU, else a measured matmul in that dtype (CPUs, unknown GPUs,
    fp32, bf16 on GPUs that emulate it)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name, dtype)
        if peak is not None:
            model = gpu_model(name)
            return peak, f"dense {_dtype_name(dtype)} tensor peak of {model} ({name}): {GPU_PEAKS[model].source}"
    peak = measured_matmul_peak(device, dtype)
    libraries = " of BLAS and oneDNN" if device.type == "cpu" and dtype == torch.float32 else ""
    return peak, f"measured {_dtype_name(dtype)} matmul on {device.type} (best{libraries} of n³, n <= 2048)"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
