"""Data-parallel training, side by side in one run: lorafit on 1 process and on N (`--nproc N`), and
the transformers + peft + trl reference on N processes (its Trainer runs DDP when started with
torchrun's environment).

All three train the same model, samples, method and LoRA settings with the same global batch:
lorafit's single process uses grad-accum N to match N processes of --batch-size each. What it shows:
whether N processes keep the single-process loss curve and weights (max differences), and the
throughput of each. On a CPU the processes share the cores (cores / N threads each), so N processes
are not expected to be faster; on N GPUs the same command measures scaling.

Throughput like for like with the reference: all tokens over the whole training time (lorafit's
`train_tokens_per_s`: the global tokens over the slowest rank's time).

    python bench/scale_out.py --nproc 2 --method lora --samples 16 --batch-size 2 --max-length 512
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lorafit.base.jsonable import to_json_object
from lorafit.run.summary import Summary

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_vs_reference import (  # noqa: E402
    DEFAULT_REFERENCE,
    emit,
    last_json_line,
    lorafit_cmd,
    reference_cmd,
    run_lorafit,
)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(cmd: list[str], nproc: int, env: dict[str, str]) -> dict:
    """`cmd` as `nproc` ranks with the environment torchrun gives its workers (torchrun's own parser
    would take the reference's `--n` for one of its options); rank 0's JSON line is the result."""
    import subprocess

    port = str(free_port())
    procs = []
    t = time.perf_counter()
    for rank in range(nproc):
        rank_env = {
            **os.environ, **env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
        }  # fmt: skip
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=rank_env))
    outs = [p.communicate() for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"{' '.join(cmd)} failed:\n" + "\n".join(err[-2000:] for _, err in outs))
    result = last_json_line(outs[0][0])
    result["process_wall_s"] = time.perf_counter() - t
    return result


def adapter_max_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x = load_file(a / "adapter" / "adapter_model.safetensors")
    y = load_file(b / "adapter" / "adapter_model.safetensors")
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def loss_curve(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def tokens_per_s(row: Summary | dict) -> float | None:
    """A lorafit run's tokens/s over all steps, or the reference's (its own JSON)."""
    return row.timing.train_tokens_per_s if isinstance(row, Summary) else row["tokens_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--method", default="lora", choices=["qlora", "lora"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=2, help="per process")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE)
    ap.add_argument("--no-reference", action="store_true", help="lorafit only")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    args.lorafit_args = []  # what train_vs_reference's command builders expect

    from lorafit.inputs import data, models

    model_dir = models.resolve(args.model).location  # convert once, outside any timed run
    alpaca = str(data.BUILTIN["alpaca"])
    # dropout off: with it each rank draws its own masks, so curves differ by design
    common = ["--lora-dropout", "0"]
    runs: dict[str, list[dict]] = {"lorafit_1": [], f"lorafit_{args.nproc}": [], f"reference_{args.nproc}": []}
    diffs: list[dict] = []
    threads = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.nproc))}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            one, many = Path(tmp) / f"one{i}", Path(tmp) / f"many{i}"
            cmd = lorafit_cmd(args, alpaca, one, "default") + [*common, "--grad-accum", str(args.nproc)]
            runs["lorafit_1"].append(run_lorafit(cmd))
            cmd = lorafit_cmd(args, alpaca, many, "default") + [*common, "--nproc", str(args.nproc)]
            runs[f"lorafit_{args.nproc}"].append(run_lorafit(cmd))
            a, b = loss_curve(one), loss_curve(many)
            diffs.append(
                {
                    "steps": len(a),
                    "loss_max_abs_diff": max(abs(x - y) for x, y in zip(a, b, strict=True)),
                    "adapter_max_abs_diff": adapter_max_diff(one, many),
                }
            )
            if not args.no_reference:
                cmd = reference_cmd(args, model_dir, alpaca)
                runs[f"reference_{args.nproc}"].append(run_ranks(cmd, args.nproc, threads))
            print(
                f"round {i + 1}: " + ", ".join(f"{k} {tokens_per_s(v[-1])}" for k, v in runs.items() if v),
                file=sys.stderr,
            )

    def med(rows: list[dict], key) -> float | None:
        return statistics.median(key(r) for r in rows) if rows else None

    result: dict = {
        "benchmark": "scale_out",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": {k: v for k, v in vars(args).items() if k not in ("reference", "out", "lorafit_args")},
        "global_batch_size": args.batch_size * args.nproc,
        "equivalence": diffs,
    }
    for name in ("lorafit_1", f"lorafit_{args.nproc}"):
        rows = runs[name]
        result[name] = {
            "processes": rows[0].processes,
            "train_tokens_per_s": med(rows, lambda r: r.timing.train_tokens_per_s),
            "timed_tokens_per_s": med(rows, lambda r: r.timing.tokens_per_s),
            "peak_bytes_max_rank": med(rows, lambda r: r.peak_bytes),
            "peak_bytes_all_ranks": med(rows, lambda r: sum(r.memory.peak_memory.per_rank_peak_bytes or [0])) or None,
            "loss_token_mean": med(rows, lambda r: r.losses.loss_token_mean),
            "mfu": med(rows, lambda r: r.flops.mfu),
            "distributed": to_json_object(dataclasses.replace(rows[0].environment.distributed, per_rank=None))
            | {"per_rank": None},
            "versions": rows[0].environment.versions,
        }
    refs = runs[f"reference_{args.nproc}"]
    if refs:
        result[f"reference_{args.nproc}"] = {
            "launcher": "N processes with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT)",
            "tokens_per_s": med(refs, lambda r: r["tokens_per_s"]),
            "peak_rss_bytes_rank0": med(refs, lambda r: r["peak_rss_mb"] * 2**20),
            "final_loss": med(refs, lambda r: r["final_loss"]),
            "runs": refs,
        }
        result["ratios"] = {
            f"lorafit_{args.nproc}_vs_reference_{args.nproc}_tokens_per_s": result[f"lorafit_{args.nproc}"][
                "train_tokens_per_s"
            ]
            / result[f"reference_{args.nproc}"]["tokens_per_s"],
        }
    result["ratios"] = result.get("ratios", {}) | {
        f"lorafit_{args.nproc}_vs_lorafit_1_tokens_per_s": result[f"lorafit_{args.nproc}"]["train_tokens_per_s"]
        / result["lorafit_1"]["train_tokens_per_s"]
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
