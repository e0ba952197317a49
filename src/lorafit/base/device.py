"""Where a command computes and in which dtype: decided here, once, for train, eval, merge, serve and estimate.

On CPU lorafit computes in fp32 (bf16 is ~20x slower on CPUs without bf16 units); on a GPU `auto` means
bf16 where the GPU supports it.
"""

from __future__ import annotations

import torch

from lorafit.base.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def device_type(requested: str = "auto") -> str:
    """'cuda' or 'cpu' for a --device of auto, cpu or cuda; cuda without a visible GPU is an error."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda asked for, but no CUDA GPU is visible", field="device")
    if requested == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return "cuda"


def choose_device(requested: str = "auto") -> torch.device:
    return torch.device(device_type(requested))


def bf16_supported(kind: str) -> bool:
    return kind == "cuda" and torch.cuda.is_bf16_supported()


def resolve_precision(requested: str, kind: str, gpu_fallback: str = "fp32", bf16_ok: bool | None = None) -> str:
    """The precision a run uses on a device of `kind`: `auto` is bf16 on GPUs that support it, else
    `gpu_fallback` on a GPU (the server uses fp16) and fp32 on CPU; fp16 (loss-scaled) needs a GPU.
    `bf16_ok` answers "does the GPU support bf16" for a GPU that is not here (estimate); None asks torch."""
    if requested == "auto":
        if kind != "cuda":
            return "fp32"
        return "bf16" if (bf16_supported(kind) if bf16_ok is None else bf16_ok) else gpu_fallback
    if kind == "cpu" and requested == "fp16":
        raise UserError(
            "precision fp16 needs a GPU (no fp16 loss-scaled training on CPU); use fp32 or bf16", field="precision"
        )
    return requested


def compute_dtype(requested: str, kind: str, gpu_fallback: str = "fp32") -> torch.dtype:
    return DTYPES[resolve_precision(requested, kind, gpu_fallback)]
