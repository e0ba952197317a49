"""QLoRA's unquantized weights in fp32 (peft's way) or in the compute dtype (lorafit's default): loss and memory.

bitsandbytes quantizes only the decoder's linear projections; the embeddings, the output layer, the norms
and any biases stay dense. peft's `prepare_model_for_kbit_training` casts them to fp32;
`--no-fp32-unquantized` keeps them in the compute dtype. Two parts:

- training: the same QLoRA run both ways (same seed, data and order), each in its own process one after
  the other: the loss of every optimizer step, the weights bytes of summary.json's memory breakdown and
  the training window's peak RSS;
- weights only, from each architecture's config (no loading): the unquantized elements, their bytes in
  fp32 and in bf16, and lorafit's estimate of all frozen weights (`estimate.weights_bytes`) both ways.

bf16 is slow on CPUs without bf16 matrix units (on one thread, about 1.2 GFLOP/s against 65 fp32 on this project's
2-core AVX2 machine), so the default run is short.

    python bench/qlora_unquantized.py --out docs/benchmarks/2026-12-02-cpu-qlora-unquantized
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from lorafit.base.config import TrainConfig
from lorafit.measurement import estimate
from lorafit.run.rundir import read_metrics

WAYS = {"compute-dtype": "--no-fp32-unquantized", "fp32": "--fp32-unquantized"}
ARCHS = ("smollm2-135m", "qwen2.5-0.5b", "qwen2.5-1.5b", "tinyllama-1.1b", "qwen2.5-7b", "llama-3-8b")


def train_args(a: argparse.Namespace) -> list[str]:
    """One QLoRA run as configured, with the memory plan and checkpointing fixed so both ways run alike."""
    return [
        "--model", a.model, "--data", "alpaca", "--method", "qlora", "--precision", a.precision,
        "--max-length", str(a.max_length), "--batch-size", str(a.batch_size), "--max-steps", str(a.steps),
        "--max-samples", str(a.steps * a.batch_size), "--lora-r", "16", "--seed", "0",
        "--no-plan-memory", "--no-gradient-checkpointing",
    ]  # fmt: skip


def run(args: list[str], out_dir: Path) -> dict:
    """Train in a fresh process; the summary's memory and loss figures and the per-step losses."""
    cmd = [sys.executable, "-m", "lorafit", "train", *args, "--out", str(out_dir), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"status": "failed", "error": proc.stderr[-2000:]}
    s = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = read_metrics(out_dir / "metrics.jsonl")
    return {
        "status": s["status"],
        "peak_bytes": s["peak_memory"]["peak_bytes"],
        "process_peak_bytes": s["peak_memory"].get("process_peak_bytes"),
        "memory_breakdown": s["memory_breakdown"],
        "tokens_per_s": s["tokens_per_s"],
        "step_time_s_mean": s["step_time_s"]["mean"],
        "loss_first": s["loss_first"],
        "loss_last": s["loss_last"],
        "loss_mean": s["loss_mean"],
        "loss_token_mean": s["loss_token_mean"],
        "losses": [r["loss"] for r in rows],
        "grad_norms": [r.get("grad_norm") for r in rows],
    }


def relative_differences(a: list[float], b: list[float]) -> list[float]:
    """|a - b| / |b| per step: how far the compute-dtype run's loss (a) is from the fp32 run's (b)."""
    return [abs(x - y) / abs(y) for x, y in zip(a, b, strict=True)]


def unquantized_elements(arch: estimate.Arch) -> int:
    """Elements bitsandbytes leaves dense: embeddings, an untied output layer, 2 norms per layer and the
    final one, and the projections' biases (Qwen2's q/k/v)."""
    embed = arch.vocab * arch.hidden
    head = 0 if arch.tied else embed
    norms = (2 * arch.layers + 1) * arch.hidden
    return embed + head + norms + arch.layers * arch.bias_params()


def weights_only(spec: str, precision: str) -> dict:
    """Unquantized bytes both ways, and lorafit's estimate of the whole frozen base both ways."""
    arch = estimate.arch_from_config(estimate.model_config(spec))
    n = unquantized_elements(arch)
    cfgs = {way: TrainConfig(model=spec, method="qlora", fp32_unquantized=way == "fp32") for way in WAYS}
    return {
        "tied_embeddings": arch.tied,
        "unquantized_elements": n,
        "unquantized_bytes": {"fp32": 4 * n, "compute-dtype": 2 * n},
        "saved_bytes": 2 * n,
        "estimate_weights_bytes": {way: estimate.weights_bytes(arch, cfg, precision) for way, cfg in cfgs.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--no-train", action="store_true", help="only the weights-only figures")
    p.add_argument("--out", type=Path, help="write <out>.json (and print it)")
    a = p.parse_args()
    args = train_args(a)
    runs: dict[str, dict] = {}
    if not a.no_train:
        with tempfile.TemporaryDirectory() as tmp:
            for way, flag in WAYS.items():
                runs[way] = run([*args, flag], Path(tmp) / way)
                print(f"{way}: {json.dumps(runs[way])}", file=sys.stderr, flush=True)
    result: dict = {"train_args": args, "ways": WAYS, "runs": runs}
    if all(r.get("status") == "ok" for r in runs.values()) and runs:
        off, on = runs["compute-dtype"], runs["fp32"]
        rel = relative_differences(off["losses"], on["losses"])
        result["comparison"] = {
            "loss_rel_diff_per_step": rel,
            "loss_rel_diff_max": max(rel),
            "loss_rel_diff_step1": rel[0],
            "loss_mean_rel_diff": abs(off["loss_mean"] - on["loss_mean"]) / on["loss_mean"],
            "weights_saved_bytes": on["memory_breakdown"]["weights"] - off["memory_breakdown"]["weights"],
            "activations_saved_bytes": on["memory_breakdown"]["activations_workspace"]
            - off["memory_breakdown"]["activations_workspace"],
            "peak_saved_bytes": on["peak_bytes"] - off["peak_bytes"],
        }
    result["weights_only"] = {
        spec: weights_only(spec if spec == "smollm2-135m" else f"random:{spec}", "bf16") for spec in ARCHS
    }
    text = json.dumps(result, indent=2)
    if a.out:
        a.out.with_suffix(".json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
