"""Host allocators side by side on the same lorafit runs: peak RSS, speed and loss, in one run.

Each candidate trains the same configurations in a fresh process (an allocator is chosen at process
start), in alternating order over --repeats rounds so machine load hits all alike:

- glibc: the system allocator as a fresh install has it;
- glibc-tuned: glibc with a fixed mmap threshold (GLIBC_TUNABLES), so large blocks are always mapped
  and returned when freed instead of fragmenting the heap (the dynamic threshold rises to 32 MiB);
- mimalloc: the PyPI wheel's (cmeel-mimalloc), preloaded, with its default purging;
- mimalloc-nopurge: the same keeping freed pages for reuse (as lorafit's jemalloc settings do);
- mimalloc-nopurge-nothp: the same on 4 KiB pages (MIMALLOC_ALLOW_THP=0: no transparent huge pages,
  whose first touch can wait on the kernel compacting memory), lorafit's default;
- jemalloc: the system's libjemalloc, where installed (not on a stock machine).

    python bench/allocators.py --repeats 1 --out docs/benchmarks/2026-12-02-cpu-allocators
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from lorafit.base.allocator import find_jemalloc, find_mimalloc

# the LoRA setting of bench/train_vs_reference.py
LORA_BENCH = [
    "--model", "smollm2-135m", "--data", "alpaca", "--method", "lora", "--max-samples", "32",
    "--batch-size", "4", "--max-length", "1024", "--lora-r", "16", "--lora-dropout", "0.05",
    "--precision", "fp32", "--train-on-prompt",
]  # fmt: skip
CONFIGS = {
    "qlora-demo": [
        "--model", "smollm2-135m", "--data", "alpaca", "--method", "qlora", "--max-samples", "32",
        "--batch-size", "4", "--max-length", "1024", "--lora-r", "16",
    ],
    "lora-bench": LORA_BENCH,
    "lora-bench-gc": [*LORA_BENCH, "--gradient-checkpointing"],
    "lora-r32-gc": [
        "--model", "smollm2-135m", "--data", "alpaca", "--method", "lora", "--max-samples", "32",
        "--batch-size", "4", "--max-length", "512", "--lora-r", "32", "--gradient-checkpointing",
    ],
}  # fmt: skip
GLIBC_TUNED = "glibc.malloc.mmap_threshold=131072:glibc.malloc.trim_threshold=131072"


def candidates() -> dict[str, dict[str, str]]:
    """Environment of each allocator candidate found on this machine."""
    system = {"LORAFIT_ALLOCATOR": "system"}
    out = {"glibc": system, "glibc-tuned": {**system, "GLIBC_TUNABLES": GLIBC_TUNED}}
    mimalloc = find_mimalloc()
    if mimalloc:
        out["mimalloc"] = {**system, "LD_PRELOAD": mimalloc}
        out["mimalloc-nopurge"] = {**system, "LD_PRELOAD": mimalloc, "MIMALLOC_PURGE_DELAY": "-1"}
        out["mimalloc-nopurge-nothp"] = {**out["mimalloc-nopurge"], "MIMALLOC_ALLOW_THP": "0"}
    jemalloc = find_jemalloc()
    if jemalloc:
        out["jemalloc"] = {**system, "LD_PRELOAD": jemalloc, "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}
    return out


def run(env_extra: dict[str, str], args: list[str], out_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_CONF")}
    env.update(env_extra)
    cmd = [sys.executable, "-m", "lorafit", "train", *args, "--out", str(out_dir), "--json"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"status": "failed", "error": proc.stderr[-1500:]}
    s = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "status": s["status"],
        "allocator": s["allocator"],
        "peak_bytes": s["peak_memory"]["peak_bytes"],
        "process_peak_bytes": s["peak_memory"].get("process_peak_bytes"),
        "tokens_per_s": s["tokens_per_s"],
        "train_tokens_per_s": s["train_tokens_per_s"],
        "loss_token_mean": s["loss_token_mean"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--configs", nargs="*", default=list(CONFIGS))
    p.add_argument("--candidates", nargs="*", help="allocators to run (default: all found)")
    p.add_argument("--out", type=Path, help="write <out>.json (and print it)")
    a = p.parse_args()
    envs = candidates()
    if a.candidates:
        unknown = set(a.candidates) - set(envs)
        if unknown:
            p.error(f"unknown or missing candidates {sorted(unknown)}; found {sorted(envs)}")
        envs = {name: envs[name] for name in a.candidates}
    runs: dict[str, dict[str, list[dict]]] = {c: {name: [] for name in envs} for c in a.configs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            for config in a.configs:
                for name, env in envs.items():
                    result = run(env, CONFIGS[config], Path(tmp) / f"{config}-{name}-{r}")
                    runs[config][name].append(result)
                    print(f"{config} {name}: {json.dumps(result)}", file=sys.stderr, flush=True)
    summary = {
        config: {
            name: {
                "peak_bytes_median": statistics.median(x["peak_bytes"] for x in rs if x["status"] == "ok"),
                "tokens_per_s_median": statistics.median(x["tokens_per_s"] for x in rs if x["status"] == "ok"),
                "train_tokens_per_s_median": statistics.median(
                    x["train_tokens_per_s"] for x in rs if x["status"] == "ok"
                ),
                "loss_token_mean": rs[0].get("loss_token_mean"),
                "allocator": rs[0].get("allocator"),
            }
            for name, rs in by_name.items()
            if any(x["status"] == "ok" for x in rs)
        }
        for config, by_name in runs.items()
    }
    result = {"configs": {c: CONFIGS[c] for c in a.configs}, "candidates": envs, "summary": summary, "runs": runs}
    text = json.dumps(result, indent=2)
    if a.out:
        a.out.with_suffix(".json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
