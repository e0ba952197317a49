"""Analytic training FLOPs, peak FLOP/s, and MFU/HFU.

Per token (N = matmul parameters, L layers, d hidden, T the token's own sequence length; the
convention of PaLM, Chowdhery et al. 2022, appendix B, also used by nanoGPT's `estimate_mfu`):
- full fine-tuning: 6N + 12·L·d·T
- LoRA/QLoRA (frozen base): forward 2N, input gradients 2N, adapter weight gradients 6·N_lora,
  attention 12·L·d·T  ->  4N + 6·N_lora + 12·L·d·T
Honest accounting: only real tokens count (never padding), and the output layer (lm_head) counts
only for tokens that carry loss, since the objective needs no logits anywhere else. Gradient
checkpointing adds one forward (HFU, not MFU).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

import torch

# Dense (not sparse) data-sheet peaks for 16-bit tensor-core math, FLOP/s. Matched by substring
# of torch.cuda.get_device_name(), most specific first.
GPU_PEAK_16BIT: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A10G", 125e12),
    ("A10", 125e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 4090", 165.2e12),
    ("RTX 4080", 97.5e12),
    ("RTX 4070", 58.3e12),
    ("RTX 4060", 30.0e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),
    ("T4", 65e12),
]


@dataclass(frozen=True)
class ModelShape:
    """What the FLOPs formulas need from a model."""

    n_body: int  # matmul params in the blocks (frozen base for LoRA)
    n_head: int  # output-layer params (lm_head)
    n_lora: int  # adapter params (0 for full fine-tuning)
    layers: int
    hidden: int


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
    return ModelShape(n_body, n_head, n_lora, cfg.num_hidden_layers, cfg.hidden_size)


def training_flops(
    shape: ModelShape, full: bool, sample_lengths: list[int], loss_tokens: int, recompute: bool = False
) -> float:
    """Model FLOPs of one training pass over samples of the given lengths (recompute=True gives HFU FLOPs)."""
    c = 6 if full else 4
    tokens = sum(sample_lengths)
    attn = 12 * shape.layers * shape.hidden * sum(t * t for t in sample_lengths)
    flops = c * shape.n_body * tokens + c * shape.n_head * loss_tokens + 6 * shape.n_lora * tokens + attn
    if recompute:  # checkpointing reruns the blocks' forward (not the head) in backward
        flops += 2 * (shape.n_body + shape.n_lora) * tokens + attn / 3
    return float(flops)


def gpu_peak_flops(device_name: str) -> float | None:
    for key, peak in GPU_PEAK_16BIT:
        if key in device_name:
            return peak
    return None


@functools.lru_cache(maxsize=8)
def measured_matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """Best FLOP/s of an n³ matmul on `device`: the peak for CPUs and GPUs missing from the table.

    The size grows from 256 to `n` only while one product takes under 0.1 s, so a dtype the device
    is slow at (bf16 on a CPU without bf16 units runs at ~1 GFLOP/s) is measured in about a second,
    not minutes; `reps` stop early past 1 s in all."""
    size = min(256, n)
    while True:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        a @ b  # warm-up
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        if size >= n or time.perf_counter() - t > 0.1:
            break
        size *= 2
    best = float("inf")
    spent = 0.0
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        took = time.perf_counter() - t
        best, spent = min(best, took), spent + took
        if spent > 1.0:
            break
    return 2 * size**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """Peak FLOP/s for MFU and where the figure comes from."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name)
        if peak is not None:
            return peak, f"data sheet, dense 16-bit, {name}"
    peak = measured_matmul_peak(device, dtype)
    return peak, f"measured {str(dtype).removeprefix('torch.')} matmul on {device.type} (best of n³, n <= 2048)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
