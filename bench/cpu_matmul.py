"""fp32 matrix products on this CPU through the BLAS torch links (MKL on x86) and through oneDNN, at the shapes of
a LoRA step of SmolLM2-135M (the frozen projections forward and their input gradients, the output layer), and
what `lorafit.base.matmul` chooses here; then what each way keeps resident over products of many distinct row
counts, each in its own process on lorafit's allocator (oneDNN keeps memory per product shape). Prints JSON.

    python bench/cpu_matmul.py [--tokens 1624] [--threads N] [--distinct 205]

MKL takes its AVX-512 kernels only on Intel CPUs; on AMD ones oneDNN (inside every torch CPU wheel) may be
faster. Each product is timed as the best of --repeats after an untimed call; `max_rel_diff` is the largest
difference between the two results relative to the largest element (fp32 summation order).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

from lorafit.base import matmul
from lorafit.base.allocator import active_allocator, reexec_with_allocator
from lorafit.measurement.host_memory import rss_bytes

HIDDEN, INTERMEDIATE, KV, VOCAB = 576, 1536, 192, 49152  # SmolLM2-135M


def shapes(tokens: int) -> dict[str, tuple[int, int, int]]:
    """name -> (rows, inner, columns) of a (rows, inner) @ (inner, columns) product."""
    return {
        "q_proj forward": (tokens, HIDDEN, HIDDEN),
        "k_proj forward": (tokens, HIDDEN, KV),
        "gate_proj forward": (tokens, HIDDEN, INTERMEDIATE),
        "down_proj forward": (tokens, INTERMEDIATE, HIDDEN),
        "gate_proj input gradient": (tokens, INTERMEDIATE, HIDDEN),
        "down_proj input gradient": (tokens, HIDDEN, INTERMEDIATE),
        "output layer, 512 rows of logits": (512, HIDDEN, VOCAB),
        "output layer input gradient": (512, VOCAB, HIDDEN),
    }


# how each way multiplies in the resident-memory runs: the BLAS, oneDNN at each product's own row count, and
# lorafit's (oneDNN in blocks of base.matmul.ONEDNN_ROWS rows)
WAYS = {
    "blas": lambda x, weight: x @ weight.t(),
    "onednn_whole": matmul.onednn_linear,
    "onednn_row_blocks": matmul.linear,
}


def resident(way: str, distinct: int, threads: int | None) -> dict:
    """In this process: RSS growth over `distinct` products of 576 -> 1536 with row counts 1024, 1029, ...
    (each new), then over the same counts again, and the seconds the first pass took."""
    if threads:
        torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    counts = range(1024, 1024 + 5 * distinct, 5)
    x, weight = (
        torch.randn(counts[-1], HIDDEN, generator=generator),
        torch.randn(INTERMEDIATE, HIDDEN, generator=generator),
    )
    multiply = WAYS[way]
    for n in (512, 1000, 999):  # the first calls of each library, not counted
        multiply(x[:n], weight)
    before = rss_bytes()
    start = time.perf_counter()
    for n in counts:
        multiply(x[:n], weight)
    seconds = time.perf_counter() - start
    after = rss_bytes()
    for n in counts:
        multiply(x[:n], weight)
    return {
        "way": way,
        "allocator": active_allocator(),
        "distinct_row_counts": distinct,
        "rss_growth_mb": round((after - before) / 2**20, 1),
        "rss_growth_mb_per_shape": round((after - before) / 2**20 / distinct, 3),
        "rss_growth_again_mb": round((rss_bytes() - after) / 2**20, 1),
        "first_pass_s": round(seconds, 3),
    }


def resident_runs(args: argparse.Namespace) -> list[dict]:
    """`resident` for each way, each in a fresh process (RSS is the process's)."""
    runs = []
    for way in WAYS:
        cmd = [sys.executable, __file__, "--resident", way, "--distinct", str(args.distinct)]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        env = {**os.environ, "LORAFIT_CPU_MATMUL": "onednn"}
        runs.append(json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout))
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1624, help="rows of a micro-batch (the benchmark's largest)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--distinct", type=int, default=205, help="distinct row counts in the resident-memory runs")
    ap.add_argument("--resident", choices=sorted(WAYS), help=argparse.SUPPRESS)  # one resident-memory run
    args = ap.parse_args()
    if args.resident:
        print(json.dumps(resident(args.resident, args.distinct, args.threads)))
        return
    reexec_with_allocator([__file__, *sys.argv[1:]])  # measure on the allocator lorafit runs on
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for name, (n, k, m) in shapes(args.tokens).items():
        a = torch.randn(n, k, generator=generator)
        weight = torch.randn(m, k, generator=generator)  # (out, in), as a Linear holds it
        flops = 2 * n * k * m
        blas = matmul.best_seconds(lambda: a @ weight.t(), args.repeats)  # noqa: B023
        onednn = matmul.best_seconds(lambda: matmul.onednn_linear(a, weight), args.repeats)  # noqa: B023
        expected = a @ weight.t()
        diff = (matmul.onednn_linear(a, weight) - expected).abs().max() / expected.abs().max()
        rows.append({
            "product": name,
            "shape": [n, k, m],
            "blas_gflops": round(flops / blas / 1e9, 1),
            "onednn_gflops": round(flops / onednn / 1e9, 1),
            "speedup": round(blas / onednn, 2),
            "max_rel_diff": float(diff),
        })  # fmt: skip
    print(
        json.dumps(
            {
                "benchmark": "cpu_matmul",
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "machine": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "probe_gflops": {k: round(v, 1) for k, v in matmul.probe().items()},
                "chosen": matmul.cpu_backend(),
                "products": rows,
                "resident": resident_runs(args),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
