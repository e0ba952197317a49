"""Which library multiplies the fp32 matrices lorafit writes itself on a CPU: the BLAS torch links (MKL on x86),
by default, or oneDNN, on request.

torch's CPU `mm`/`addmm` call MKL's sgemm, which takes its AVX-512 code path only on Intel CPUs. On the AMD
EPYC (Zen 5) of docs/benchmarks/2026-12-03-cpu-onednn-matmul.md it ran SmolLM2-135M's projections at
~205 GFLOP/s on 2 cores, while oneDNN, also inside every torch CPU wheel (`torch.ops.mkldnn`), ran the
same products at 320-430 GFLOP/s, in fp32 (results within 1.1e-6 of MKL's, relative to the largest
element: a different summation order), and a LoRA step 1.3-1.6x faster.

It is not the default because oneDNN (through torch's ideep, torch 2.13) keeps ~1 MB resident for every
distinct product shape it has run, whatever ONEDNN_PRIMITIVE_CACHE_CAPACITY or LRU_CACHE_CAPACITY say:
a micro-batch's row count is its token count, new at almost every micro-step, so a long run's RSS would
grow step after step (+200 MB over the benchmark's 32 micro-steps of 1 sample), which no memory plan can
fit by construction. Bounding the shapes it sees is the open step.

`LORAFIT_CPU_MATMUL=blas` (the default) | `onednn` | `auto` (time both once per process, take the faster)
chooses. Only the multiplies lorafit writes itself go through here (a LoRA layer's frozen base, forward
and input gradient; the LoRA branch's rank-r products; the fused loss's output layer); everything else is
torch's own.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable

import torch

from lorafit.base.errors import UserError

CHOICES = ("blas", "onednn", "auto")
PROBE_SHAPE = (512, 576, 1536)  # (rows, in, out): a SmolLM2 MLP projection, ~2 ms per product on 2 cores
PROBE_REPEATS = 5
# `linear_into` multiplies this many bytes of output rows at a time: oneDNN returns a new tensor, and a block
# this size costs little beside the caller's buffer (SmolLM2's 49,152-token vocabulary: 170 rows; 512 rows of
# its logits took 81 ms in blocks of 128, 161 through MKL straight into the buffer)
INTO_BLOCK_BYTES = 32 * 2**20


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (N, in) @ weight (out, in)^T through oneDNN's matmul primitive (any strides; a new (N, out))."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def onednn_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (N, k) @ b (k, M) through oneDNN (b read through its transpose, no copy)."""
    return onednn_linear(a, b.t())


def best_seconds(product: Callable[[], object], repeats: int = PROBE_REPEATS) -> float:
    """Best of `repeats` timings of `product()`, after one untimed call (oneDNN builds its kernel)."""
    product()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        product()
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def probe() -> dict[str, float]:
    """GFLOP/s of each library on PROBE_SHAPE in fp32 on this CPU (2 x rows x in x out FLOPs per product)."""
    rows, inner, out = PROBE_SHAPE
    x, weight = torch.randn(rows, inner), torch.randn(out, inner)
    flops = 2 * rows * inner * out
    rates = {"blas": flops / best_seconds(lambda: x @ weight.t()) / 1e9}
    if onednn_available():
        rates["onednn"] = flops / best_seconds(lambda: onednn_linear(x, weight)) / 1e9
    return rates


@functools.cache
def cpu_backend() -> str:
    """The library for fp32 products: LORAFIT_CPU_MATMUL, or with `auto` the faster of the two here."""
    choice = os.environ.get("LORAFIT_CPU_MATMUL", "blas").strip().lower() or "blas"
    if choice not in CHOICES:
        raise UserError(f"LORAFIT_CPU_MATMUL={choice!r}: expected one of {', '.join(CHOICES)}")
    if choice == "onednn" and not onednn_available():
        raise UserError("LORAFIT_CPU_MATMUL=onednn: this torch build has no oneDNN (torch.backends.mkldnn)")
    if choice != "auto":
        return choice
    rates = probe()
    return "onednn" if rates.get("onednn", 0.0) > rates["blas"] else "blas"


def via_onednn(*tensors: torch.Tensor) -> bool:
    """Whether a product of these tensors goes through oneDNN: all fp32 on the CPU, and oneDNN chosen."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and cpu_backend() == "onednn"


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (N, in) @ weight (out, in)^T, a new (N, out) tensor."""
    return onednn_linear(x, weight) if via_onednn(x, weight) else x @ weight.t()


def linear_onto(update: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """update (N, out) += x (N, in) @ weight (out, in)^T, in place. Through oneDNN the product is a
    transient (N, out) tensor added after (oneDNN has no in-place accumulation here): 7.2 ms against
    MKL's 14.8 for addmm_ on 1800 x 576 -> 1536."""
    if via_onednn(update, x, weight):
        return update.add_(onednn_linear(x, weight))
    return update.addmm_(x, weight.t())


def _block_rows(columns: int, element_size: int = 4) -> int:
    """Rows of a `linear_into` block: as many as fit INTO_BLOCK_BYTES, at least one."""
    return max(1, INTO_BLOCK_BYTES // (columns * element_size))


def into_block_bytes(rows: int, columns: int) -> int:
    """Bytes of the largest transient `linear_into` makes for a (rows, columns) fp32 output through oneDNN."""
    return min(rows, _block_rows(columns)) * columns * 4


def linear_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out (N, out) = x (N, in) @ weight (out, in)^T, written into `out` (a buffer the caller reuses).
    Through oneDNN in blocks of rows, each product a transient of at most INTO_BLOCK_BYTES."""
    if not via_onednn(out, x, weight):
        return torch.mm(x, weight.t(), out=out)
    rows = _block_rows(weight.shape[0], out.element_size())
    for start in range(0, x.shape[0], rows):
        out[start : start + rows].copy_(onednn_linear(x[start : start + rows], weight))
    return out


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (N, k) @ b (k, M), a new (N, M) tensor."""
    return onednn_matmul(a, b) if via_onednn(a, b) else a @ b
