"""lorafit train vs the transformers + peft + trl reference, side by side in one run.

The reference runs with gradient checkpointing on (TRL's default) and off (`--reference-gc`); each
lorafit variant is compared with the reference of its own setting. Both train the same model (the
cached SmolLM2-135M safetensors), the same first N Alpaca samples, method, batch size, max length,
LoRA settings (r, alpha = 2r, dropout 0.05, all linear projections), learning rate 2e-4, linear
schedule without warm-up, AdamW, fp32 on CPU, one epoch. The reference
(`shared/bench/seed_stack.py`) puts loss on every token of the chat-formatted sample, so lorafit
runs with --train-on-prompt here to learn the same objective.

Like for like: the reference divides all its tokens by the whole `trainer.train()` time, so the
ratio uses lorafit's `train_tokens_per_s` (all steps, warm-up included), and peak RSS of the whole
process on both sides. Runs alternate (reference, lorafit, ...) for --repeats rounds so machine
load hits both alike; the JSON printed last holds every run and the ratios of the medians.

    python bench/train_vs_reference.py --method qlora --samples 32 --batch-size 4 --max-length 1024

`--budgets 0.4,1.2` adds lorafit runs under --memory-budget at those fractions of the reference's peak:
each records the memory plan it chose and whether its peak RSS stayed under the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lorafit.run.summary import Summary

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE = ROOT.parent / "shared" / "bench" / "seed_stack.py"


def last_json_line(out: str) -> dict:
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON line in output:\n{out[-2000:]}")


def run(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = last_json_line(proc.stdout)
    result["process_wall_s"] = time.perf_counter() - t
    return result


def run_lorafit(cmd: list[str], env: dict[str, str] | None = None) -> Summary:
    """A `lorafit train --json` process's run record."""
    result = run(cmd, env)
    del result["process_wall_s"]
    return Summary.from_dict(result)


def reference_cmd(args: argparse.Namespace, model_dir: str, data: str, gc: str) -> list[str]:
    return [
        sys.executable,
        str(args.reference),
        "--model",
        model_dir,
        "--data",
        data,
        "--n",
        str(args.samples),
        "--method",
        args.method,
        "--seq",
        str(args.max_length),
        "--bs",
        str(args.batch_size),
        "--r",
        str(args.r),
        "--gc",
        gc,
    ]


def checkpointed(variant: str) -> str:
    """The reference setting a lorafit variant is compared with: checkpointing, and budgets set from the
    checkpointed reference's peak, against --gc on."""
    flags = VARIANTS[variant][0]
    return "on" if "--gradient-checkpointing" in flags or "--memory-budget" in flags else "off"


def add_budget_variants(fractions: list[float], reference_peak: float) -> list[str]:
    """lorafit under --memory-budget = fraction x the reference's peak RSS: the memory plan shapes the run."""
    names = []
    for fraction in fractions:
        name = f"budget_{fraction:g}x_reference"
        VARIANTS[name] = (["--memory-budget", f"{int(fraction * reference_peak)}B"], {})
        names.append(name)
    return names


# name -> (extra lorafit flags, extra environment)
VARIANTS: dict[str, tuple[list[str], dict[str, str]]] = {
    "default": ([], {}),
    "checkpointing": (["--gradient-checkpointing"], {}),
    "default_system_malloc": ([], {"LORAFIT_ALLOCATOR": "system"}),
    "checkpointing_system_malloc": (["--gradient-checkpointing"], {"LORAFIT_ALLOCATOR": "system"}),
    "peft_forward": (["--no-fused-lora"], {}),
}


def lorafit_cmd(args: argparse.Namespace, data: str, out: Path, variant: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lorafit",
        "train",
        "--model",
        args.model,
        "--data",
        data,
        "--method",
        args.method,
        "--max-samples",
        str(args.samples),
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
        "--lora-r",
        str(args.r),
        "--lora-dropout",
        "0.05",
        "--learning-rate",
        "2e-4",
        "--lr-scheduler",
        "linear",
        "--warmup-steps",
        "0",
        "--optimizer",
        "adamw",
        "--precision",
        "fp32",
        "--train-on-prompt",
        "--out",
        str(out),
        "--json",
        *VARIANTS[variant][0],
        *args.lorafit_args,
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="qlora", choices=["qlora", "lora"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE)
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    ap.add_argument(
        "--variants",
        default="default,checkpointing,peft_forward",
        help="lorafit configurations to run, comma-separated: " + ", ".join(VARIANTS),
    )
    ap.add_argument(
        "--reference-gc",
        default="on,off",
        help="reference runs with gradient checkpointing on (TRL's default) and/or off; each lorafit variant is "
        "compared with the one of its own setting (checkpointing variants with on), or the one there is",
    )
    ap.add_argument(
        "--budgets",
        default="",
        help="also run lorafit under --memory-budget at these fractions of the reference's peak RSS (its first "
        "--reference-gc setting, measured in the first round), e.g. 0.4,1.2",
    )
    ap.add_argument("lorafit_args", nargs="*", help="extra lorafit train flags (after --)")
    args = ap.parse_args()
    if not args.reference.is_file():
        sys.exit(f"reference script not found: {args.reference} (pass --reference)")

    from lorafit.inputs import data, models

    model_dir = models.resolve(args.model).location  # convert once, outside any timed run
    alpaca = str(data.BUILTIN["alpaca"])
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    gcs = [g.strip() for g in args.reference_gc.split(",") if g.strip()]
    refs: dict[str, list[dict]] = {gc: [] for gc in gcs}
    ours: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for gc in gcs:
                refs[gc].append(run(reference_cmd(args, model_dir, alpaca, gc)))
                print(f"reference --gc {gc} run {i + 1}: {refs[gc][-1]['tokens_per_s']} tokens/s", file=sys.stderr)
            if i == 0 and args.budgets:
                fractions = [float(f) for f in args.budgets.split(",")]
                budgeted = add_budget_variants(fractions, refs[gcs[0]][0]["peak_rss_mb"] * 2**20)
                variants += budgeted
                ours.update({v: [] for v in budgeted})
            for v in variants:
                ours[v].append(run_lorafit(lorafit_cmd(args, alpaca, Path(tmp) / f"{v}{i}", v), VARIANTS[v][1]))
                print(
                    f"lorafit {v} run {i + 1}: {ours[v][-1].timing.train_tokens_per_s:.1f} tokens/s",
                    file=sys.stderr,
                )

    def med(rows: list[dict], key) -> float:
        return statistics.median(key(r) for r in rows)

    reference = {
        gc: {
            "tokens": rows[0]["tokens"],
            "tokens_per_s": med(rows, lambda r: r["tokens_per_s"]),
            "peak_rss_bytes": med(rows, lambda r: r["peak_rss_mb"] * 2**20),
            "mean_loss": med(rows, lambda r: r["final_loss"]),
            "runs": rows,
        }
        for gc, rows in refs.items()
    }
    result = {
        "benchmark": "train_vs_reference",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": {k: v for k, v in vars(args).items() if k not in ("reference", "out")},
        "reference": {f"gc_{gc}": figures for gc, figures in reference.items()},
    }
    keep = (
        "train_tokens_per_s",
        "tokens_per_s",
        "train_s",
        "loss_mean",
        "loss_token_mean",
        "peak_memory",
        "memory_breakdown",
        "mfu",
        "flops_per_token",
        "data",
        "device",
        "versions",
        "allocator",
    )
    for v, rows in ours.items():
        tps = med(rows, lambda r: r.timing.train_tokens_per_s)
        rss = med(rows, lambda r: r.memory.peak_memory.process_peak_bytes)
        token_loss = med(rows, lambda r: r.losses.loss_token_mean)
        gc = checkpointed(v) if checkpointed(v) in reference else gcs[0]
        ref_tps, ref_rss, ref_loss = (reference[gc][k] for k in ("tokens_per_s", "peak_rss_bytes", "mean_loss"))
        result[f"lorafit_{v}"] = {
            "flags": VARIANTS[v][0],
            "env": VARIANTS[v][1],
            "allocator": rows[0].environment.allocator,
            "tokens": rows[0].data.tokens,
            "tokens_per_s": tps,
            "timed_tokens_per_s": med(rows, lambda r: r.timing.tokens_per_s),
            "peak_rss_bytes": rss,
            "loss_token_mean": token_loss,
            "loss_step_mean": med(rows, lambda r: r.losses.loss_mean),
            "mfu": med(rows, lambda r: r.flops.mfu),
            **budget_figures(rows),
            "runs": [{k: v for k, v in r.to_dict().items() if k in keep} for r in rows],
            "ratios": {
                "against": f"reference --gc {gc}",
                "tokens_per_s": tps / ref_tps,
                "peak_rss": rss / ref_rss,
                # the reference's mean of per-step losses over randomly mixed batches estimates the
                # token-weighted mean; lorafit groups batches by length, so its own step mean is not comparable
                "mean_loss_rel_diff": abs(token_loss - ref_loss) / ref_loss,
            },
        }
    emit(result, args.out)


def budget_figures(rows: list[Summary]) -> dict:
    """Under --memory-budget: the budget, the plan each run chose, and whether its peak RSS stayed under."""
    budget = rows[0].memory.peak_memory.budget_bytes
    if budget is None:
        return {}
    return {
        "budget_bytes": budget,
        "plans": [r.memory_plan.describe() if r.memory_plan else None for r in rows],
        "predicted_peak_bytes": [r.memory_plan.chosen.predicted_peak_bytes if r.memory_plan else None for r in rows],
        "under_budget": all(r.memory.peak_memory.process_peak_bytes <= budget for r in rows),
    }


def emit(result: dict, out: Path | None) -> None:
    """The result as the last stdout line (JSON), and indented into `out` when given."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
