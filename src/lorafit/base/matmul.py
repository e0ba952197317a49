"""Which library multiplies the fp32 matrices lorafit writes itself on a CPU: oneDNN where it is faster
than the BLAS torch links (MKL on x86), timed once per process, or either on request.

torch's CPU `mm`/`addmm` call MKL's sgemm, which takes its AVX-512 code path only on Intel CPUs. On the AMD
EPYC (Zen 5) of docs/benchmarks/2026-12-03-cpu-onednn-matmul.md it ran SmolLM2-135M's projections at
~205 GFLOP/s on 2 cores, while oneDNN, also inside every torch CPU wheel (`torch.ops.mkldnn`), ran the
same products at 320-430 GFLOP/s, in fp32 (results within 1.1e-6 of MKL's, relative to the largest
element: a different summation order), and a LoRA step 1.3-1.6x faster.

oneDNN (through torch's ideep, torch 2.13) keeps memory for every distinct product shape it has run:
0.4 MB per shape with its primitive cache off (ONEDNN_PRIMITIVE_CACHE_CAPACITY=0), 0.8 MB with it on,
for 576 -> 1536 products of 1024-2047 rows (docs/benchmarks/2026-12-03-cpu-onednn-row-blocks.md). A
micro-batch's row count is its token count, new at almost every micro-step, so a long run's RSS would
grow step after step. Here oneDNN therefore only sees rows in the counts of ONEDNN_ROWS: a product's rows
are split into blocks of those, the last < 64 computed as the last 64 again or, fewer than 24, on the BLAS
(`row_blocks`), as is a product of fewer rows; its inner and output sizes are the model's. Every product
that contracts over the token count (a LoRA weight's gradient) stays on the BLAS.

`LORAFIT_CPU_MATMUL=auto` (the default: time both once per process, take oneDNN where it is AUTO_MARGIN
faster) | `onednn` | `blas` chooses. Only the multiplies lorafit writes itself go through here (a LoRA
layer's frozen base, forward and input gradient; the LoRA branch's rank-r products; the fused loss's output
layer); everything else is torch's own.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

from lorafit.base.errors import UserError

CHOICES = ("auto", "onednn", "blas")
PROBE_SHAPE = (512, 576, 1536)  # (rows, in, out): a SmolLM2 MLP projection, ~2 ms per product on 2 cores
PROBE_REPEATS = 5
# `auto` takes oneDNN only this much faster than the BLAS: where the two are close (MKL on an Intel CPU), a
# timing could come out either way from run to run, and runs on one machine should multiply alike
AUTO_MARGIN = 1.1
# the row counts oneDNN is given, largest first, each half the one before (`row_blocks`): a bounded set of
# shapes per weight. At 256-512 rows it runs SmolLM2's projections at 450-500 GFLOP/s, at 64 rows 340-410
# (BLAS: 190-215); under 64 the BLAS is as fast for rank-16 products
ONEDNN_ROWS = (512, 256, 128, 64)
# a oneDNN block's output is at most this many bytes where that is under ONEDNN_ROWS[0] rows: oneDNN returns a
# new tensor, copied into the caller's buffer, and a block this size costs little beside it (SmolLM2's
# 49,152-token vocabulary: 128-row blocks; 512 rows of its logits took 81 ms in blocks of 128, 161 through MKL
# straight into the buffer)
INTO_BLOCK_BYTES = 32 * 2**20
# a product's last rows under this many go to the BLAS; from it, oneDNN multiplies the last ONEDNN_ROWS[-1]
# rows again instead (`row_blocks`): 64 rows of 576 -> 1536 through oneDNN took 0.27 ms, 32 on the BLAS
# 0.34, 16 0.19 (bench/cpu_matmul.py)
BLAS_TAIL_BELOW = 24


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
    generator = torch.Generator().manual_seed(0)  # not torch's global one: a run's random stream stays its own
    x, weight = torch.randn(rows, inner, generator=generator), torch.randn(out, inner, generator=generator)
    flops = 2 * rows * inner * out
    rates = {"blas": flops / best_seconds(lambda: x @ weight.t()) / 1e9}
    if onednn_available():
        rates["onednn"] = flops / best_seconds(lambda: onednn_linear(x, weight)) / 1e9
    return rates


@functools.cache
def cpu_backend() -> str:
    """The library for fp32 products: LORAFIT_CPU_MATMUL, or with `auto` oneDNN where it is AUTO_MARGIN
    faster than the BLAS here."""
    choice = os.environ.get("LORAFIT_CPU_MATMUL", "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise UserError(f"LORAFIT_CPU_MATMUL={choice!r}: expected one of {', '.join(CHOICES)}")
    if choice == "onednn" and not onednn_available():
        raise UserError("LORAFIT_CPU_MATMUL=onednn: this torch build has no oneDNN (torch.backends.mkldnn)")
    if choice != "auto":
        return choice
    rates = probe()
    return "onednn" if rates.get("onednn", 0.0) > AUTO_MARGIN * rates["blas"] else "blas"


def onednn_runs(device: str, dtype: torch.dtype) -> bool:
    """Whether products of `dtype` operands on `device` ("cpu", "cuda") go through oneDNN: fp32 on the CPU,
    with oneDNN chosen."""
    return device == "cpu" and dtype == torch.float32 and cpu_backend() == "onednn"


def via_onednn(*tensors: torch.Tensor) -> bool:
    """Whether a product of these tensors goes through oneDNN (`onednn_runs` for every one of them)."""
    return all(onednn_runs(t.device.type, t.dtype) for t in tensors)


class Block(NamedTuple):
    """Rows of a product multiplied in one call; the first `skip` an earlier block already gave."""

    rows: slice
    skip: int
    onednn: bool


def row_blocks(rows: int, largest: int = ONEDNN_ROWS[0]) -> list[Block]:
    """The calls covering a product of `rows` rows through oneDNN, in order: blocks of the largest of
    ONEDNN_ROWS not above `largest` (at least the smallest) while they fit, then at most one of each smaller
    size; the last < ONEDNN_ROWS[-1] rows then go to the BLAS under BLAS_TAIL_BELOW of them, else are the
    last ONEDNN_ROWS[-1] rows again, the overlap skipped. 700 rows: [0, 512), [512, 640), [636, 700)
    skipping 4; 650 rows: [0, 512), [512, 640), [640, 650) on the BLAS. Under ONEDNN_ROWS[-1] rows, one
    block on the BLAS."""
    smallest = ONEDNN_ROWS[-1]
    sizes = [size for size in ONEDNN_ROWS if size <= largest] or [smallest]
    blocks, start = [], 0
    for size in sizes:
        while rows - start >= size:
            blocks.append(Block(slice(start, start + size), 0, onednn=True))
            start += size
    tail = rows - start
    if tail >= BLAS_TAIL_BELOW and rows >= smallest:
        blocks.append(Block(slice(rows - smallest, rows), smallest - tail, onednn=True))
    elif tail:
        blocks.append(Block(slice(start, rows), 0, onednn=False))
    return blocks


def _block_rows(columns: int, element_size: int = 4) -> int:
    """Most rows of a oneDNN block with `columns` output columns: as many as fit INTO_BLOCK_BYTES."""
    return max(1, INTO_BLOCK_BYTES // (columns * element_size))


def into_block_bytes(rows: int, columns: int) -> int:
    """Bytes of the largest transient `linear_into` makes for a (rows, columns) fp32 output through oneDNN."""
    blocks = row_blocks(rows, _block_rows(columns))
    return max((b.rows.stop - b.rows.start for b in blocks if b.onednn), default=0) * columns * 4


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (N, in) @ weight (out, in)^T, a new (N, out) tensor."""
    if not via_onednn(x, weight):
        return x @ weight.t()
    blocks = row_blocks(x.shape[0], _block_rows(weight.shape[0]))
    if len(blocks) == 1:
        return onednn_linear(x, weight) if blocks[0].onednn else x @ weight.t()
    return _into(x.new_empty(x.shape[0], weight.shape[0]), x, weight, blocks)


def linear_onto(update: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """update (N, out) += x (N, in) @ weight (out, in)^T, in place. Through oneDNN each block's product is a
    transient (block, out) tensor added after (oneDNN has no in-place accumulation here): 7.2 ms against
    MKL's 14.8 for addmm_ on 1800 x 576 -> 1536 in one block."""
    if not via_onednn(update, x, weight):
        return update.addmm_(x, weight.t())
    for rows, skip, onednn in row_blocks(x.shape[0], _block_rows(weight.shape[0])):
        if onednn:
            update[rows.start + skip : rows.stop].add_(onednn_linear(x[rows], weight)[skip:])
        else:
            update[rows].addmm_(x[rows], weight.t())
    return update


def linear_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out (N, out) = x (N, in) @ weight (out, in)^T, written into `out` (a buffer the caller reuses).
    Through oneDNN in blocks of rows (`row_blocks`), each product a transient of at most INTO_BLOCK_BYTES
    (or ONEDNN_ROWS[-1] rows)."""
    if not via_onednn(out, x, weight):
        return torch.mm(x, weight.t(), out=out)
    return _into(out, x, weight, row_blocks(x.shape[0], _block_rows(weight.shape[0])))


def _into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, blocks: list[Block]) -> torch.Tensor:
    for rows, skip, onednn in blocks:
        if onednn:
            out[rows.start + skip : rows.stop].copy_(onednn_linear(x[rows], weight)[skip:])
        else:
            torch.mm(x[rows], weight.t(), out=out[rows])
    return out


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (N, k) @ b (k, M), a new (N, M) tensor; N may vary from call to call, k and M should not (oneDNN
    would see a new shape each time: see the module's docstring)."""
    return linear(a, b.t()) if via_onednn(a, b) else a @ b
