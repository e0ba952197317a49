"""What the fused LoRA branch's dropout costs: one projection's forward + backward, dropped positions
(CPU, small p) against a dense mask (CUDA, larger p), with p = 0 as the floor, side by side in one run.

    python bench/fused_dropout.py --tokens 1768 --shapes 576x576,1536x576 --ps 0.05,0.1,0.3

Prints JSON: milliseconds per forward + backward (median of --repeats), and each path's extra over p = 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lorafit.adapters import fused


def step_ms(x: torch.Tensor, result: torch.Tensor, a: torch.Tensor, b: torch.Tensor, p: float, repeats: int) -> float:
    """Median wall milliseconds of one LoraBranch forward + backward."""
    grad = torch.ones_like(result)
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        out = fused.LoraBranch.apply(x, result, a, b, 2.0, p, 1234 + i)
        out.backward(grad)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1768, help="rows of the flattened input (batch x length)")
    ap.add_argument("--shapes", default="576x576,1536x576", help="in x out of the projections")
    ap.add_argument("--ps", default="0.05,0.1,0.3")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for shape in args.shapes.split(","):
        n_in, n_out = (int(v) for v in shape.split("x"))
        x = torch.randn(args.tokens, n_in, requires_grad=True)
        result = torch.randn(args.tokens, n_out, requires_grad=True)
        a = (0.01 * torch.randn(args.rank, n_in)).requires_grad_()
        b = (0.01 * torch.randn(n_out, args.rank)).requires_grad_()
        floor = step_ms(x, result, a, b, 0.0, args.repeats)
        for p in (float(v) for v in args.ps.split(",")):
            sparse_below = fused.SPARSE_BELOW
            try:
                fused.SPARSE_BELOW = 1.0
                positions = step_ms(x, result, a, b, p, args.repeats)
                fused.SPARSE_BELOW = 0.0
                dense = step_ms(x, result, a, b, p, args.repeats)
            finally:
                fused.SPARSE_BELOW = sparse_below
            rows.append({
                "tokens": args.tokens, "in": n_in, "out": n_out, "p": p, "no_dropout_ms": round(floor, 3),
                "positions_ms": round(positions, 3), "dense_mask_ms": round(dense, 3),
                "positions_extra_ms": round(positions - floor, 3), "dense_mask_extra_ms": round(dense - floor, 3),
                "default": "positions" if p < sparse_below else "dense mask",
            })  # fmt: skip
    print(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
