"""fp32 matrix products on this CPU through the BLAS torch links (MKL on x86) and through oneDNN, at the shapes of
a LoRA step of SmolLM2-135M (the frozen projections forward and their input gradients, the output layer), and
what `lorafit.base.matmul` chooses here. Prints JSON.

    python bench/cpu_matmul.py [--tokens 1624] [--threads N]

MKL takes its AVX-512 kernels only on Intel CPUs; on AMD ones oneDNN (inside every torch CPU wheel) may be
faster. Each product is timed as the best of --repeats after an untimed call; `max_rel_diff` is the largest
difference between the two results relative to the largest element (fp32 summation order).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from lorafit.base import matmul

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1624, help="rows of a micro-batch (the benchmark's largest)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = ap.parse_args()
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
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
