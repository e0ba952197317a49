"""torch's AdamW step on CPU: the per-tensor loop (fused=False, what torch picks on CPU by default) against the
fused kernel, on the parameter shapes of SmolLM2-135M and Qwen2.5-0.5B (random values, fp32, as full fine-tuning
trains them). Prints JSON: the step's time (best of 3 after the step that creates the state), what it allocates
beyond its state (the profiler's running total) and how far the two updates drift apart in 5 steps.

    python bench/optimizer_step.py
"""

from __future__ import annotations

import json
import time

import torch

from lorafit.measurement.trace import peak_allocated

# (vocab, hidden, intermediate, k/v width, layers) of the tied-embedding models lorafit measures on CPU
MODELS = {"smollm2-135m": (49152, 576, 1536, 192, 30), "qwen2.5-0.5b": (151936, 896, 4864, 128, 24)}


def shapes(vocab: int, d: int, inter: int, kv: int, layers: int) -> list[tuple[int, ...]]:
    layer = [(d, d), (kv, d), (kv, d), (d, d), (inter, d), (inter, d), (d, inter), (d,), (d,)]
    return [(vocab, d), *layer * layers, (d,)]


def step_figures(params: list[torch.nn.Parameter], fused: bool) -> dict[str, float]:
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=fused)
    optimizer.step()  # the state
    times = []
    for _ in range(3):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return {"step_s": min(times), "allocated_beyond_state_bytes": peak_allocated(optimizer.step)}


def drift(shape_list: list[tuple[int, ...]], steps: int = 5) -> float:
    """Largest difference between the loop's and the fused kernel's weights after `steps` identical updates."""
    a = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shape_list]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b, strict=True):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    loop, fused = (
        torch.optim.AdamW(a, lr=1e-3, weight_decay=0.01),
        torch.optim.AdamW(b, lr=1e-3, weight_decay=0.01, fused=True),
    )
    for _ in range(steps):
        loop.step()
        fused.step()
    return max(float((p - q).abs().max()) for p, q in zip(a, b, strict=True))


def main() -> None:
    torch.manual_seed(0)
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "models": {}}
    for name, dims in MODELS.items():
        shape_list = shapes(*dims)
        params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shape_list]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        loop, fused = step_figures(params, fused=False), step_figures(params, fused=True)
        result["models"][name] = {
            "params": sum(p.numel() for p in params),
            "loop": loop,
            "fused": fused,
            "speedup": loop["step_s"] / fused["step_s"],
            "max_weight_difference_after_5_steps": drift(shape_list[:3]),
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
