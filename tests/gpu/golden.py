"""Golden losses: the CPU fp32 run of the batches tests/gpu/test_golden_losses.py trains on a GPU.

The GPU runs (bf16 LoRA, QLoRA and full fine-tuning, and fp16 LoRA with loss scaling) must give the
same per-step losses as lorafit's fp32 CPU run of the same flags, within `RELATIVE_TOLERANCE`. The CPU
losses are committed (golden_losses.json) so the GPU machine, whose time is scarce, does not recompute
them; they hold for the weights they were made with, so the file also records a SHA-256 of those
weights (`weights_fingerprint`): where the GPU machine materializes other random weights (another
torch or transformers initialising differently), the test recomputes the CPU reference there instead.

Regenerate after changing the flags or the model's random weights (on CPU: the three runs at once took
10 minutes on a loaded 2-core machine):

    .venv/bin/python -m tests.gpu.golden
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

GOLDEN_FILE = Path(__file__).with_name("golden_losses.json")
COMMAND = "python -m tests.gpu.golden"
MODEL = "random:smollm2-135m"  # SmolLM2-135M's shapes; its real weights (98 MB) cannot travel to the GPU machine

# One fixed batch (4 samples, batch 4) trained for 8 steps: every step sees the same tokens, so the
# loss falls step after step and a step's loss depends only on the weights. No dropout and no memory
# plan: the CPU and the GPU draw different random numbers and could pick another checkpointing.
COMMON_FLAGS = [
    "--model", MODEL, "--data", "alpaca", "--max-samples", "4", "--batch-size", "4", "--max-length", "128",
    "--max-steps", "8", "--lora-r", "16", "--lora-dropout", "0", "--optimizer", "adamw",
    "--lr-scheduler", "constant", "--warmup-steps", "0", "--max-grad-norm", "1.0", "--seed", "0",
    "--no-plan-memory", "--profile-warmup-steps", "1",
]  # fmt: skip
LEARNING_RATES = {"lora": "1e-3", "qlora": "1e-3", "full": "2e-4"}  # adapters start at zero: they need more

# GPU case -> (method, precision); each compares with its method's CPU fp32 reference.
CASES: dict[str, tuple[str, str]] = {
    "lora-bf16": ("lora", "bf16"),
    "qlora-bf16": ("qlora", "bf16"),
    "full-bf16": ("full", "bf16"),
    "lora-fp16": ("lora", "fp16"),
}

# Per step, |GPU loss - CPU fp32 loss| <= RELATIVE_TOLERANCE x CPU loss. bf16 keeps 8 significant bits
# (unit roundoff 2^-9 ~ 0.2%), fp16 11 bits; the losses here are means over a few hundred tokens, which averages
# rounding out, but each step's update is computed from rounded gradients and the runs drift apart over
# 8 steps. 2% is chosen, not derived: it is ~10x the bf16 roundoff and well under the fall the check
# requires (GOLDEN_MIN_FALL), so a wrong update (no loss scaling, a lost gradient) cannot hide in it. The
# GPU run records the deviation it saw (golden.result.json, in gpu_check's report) to tighten it from data.
RELATIVE_TOLERANCE = 0.02
GOLDEN_MIN_FALL = 3 * RELATIVE_TOLERANCE  # the CPU loss must fall by more than this fraction over the steps


def train_flags(method: str) -> list[str]:
    """The flags of one golden run (without device, precision and output), as the GPU test runs them."""
    return [*COMMON_FLAGS, "--method", method, "--learning-rate", LEARNING_RATES[method]]


def weights_fingerprint(model_dir: str | Path) -> str:
    """SHA-256 over every tensor of the model's safetensors files (name, dtype, shape, bytes; sorted by name):
    equal exactly when the weights are, whatever wrote the file's header."""
    import torch
    from safetensors import safe_open

    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in sorted(f.keys()):
                tensor = f.get_tensor(name).contiguous()
                digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
                digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def model_fingerprint() -> str:
    """The fingerprint of MODEL's weights as this machine materializes them (materialized first if need be)."""
    from lorafit.inputs import models

    return weights_fingerprint(models.resolve(MODEL).location)


def losses_of(run_dir: str | Path) -> list[float]:
    """The per-step losses a run wrote to metrics.jsonl (skipped steps have none)."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    return [row["loss"] for row in rows if "loss" in row]


def train_command(method: str, device: str, precision: str, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "lorafit", "train", *train_flags(method),
        "--device", device, "--precision", precision, "--out", str(out), "--json",
    ]  # fmt: skip


def start(command: list[str], log: Path, threads: int | None = None) -> subprocess.Popen:
    """A lorafit process in the background, its output in `log`; `threads` caps its CPU threads."""
    env = dict(os.environ)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def cpu_references(methods: list[str], work: Path, timeout_s: float) -> dict[str, list[float]]:
    """Train each method's fp32 reference on this machine's CPU, all at once (threads shared out)."""
    threads = max(1, (os.cpu_count() or 1) // len(methods))
    procs = {}
    for method in methods:
        out = work / f"cpu-{method}"
        procs[method] = (start(train_command(method, "cpu", "fp32", out), work / f"cpu-{method}.log", threads), out)
    losses = {}
    deadline = time.monotonic() + timeout_s
    with stopping([proc for proc, _ in procs.values()]):
        for method, (proc, out) in procs.items():
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            if code != 0:
                log = (work / f"cpu-{method}.log").read_text()[-3000:]
                raise RuntimeError(f"CPU reference run {method} failed ({code}):\n{log}")
            losses[method] = losses_of(out)
    return losses


@contextlib.contextmanager
def stopping(procs: list[subprocess.Popen]) -> Iterator[None]:
    """Kill whichever of `procs` still run when the block ends (a timeout or an error left them)."""
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def make_golden(work: Path, timeout_s: float) -> dict:
    methods = sorted({method for method, _ in CASES.values()})
    started = time.time()
    fingerprint = model_fingerprint()  # materializes the model once, before the runs share it
    losses = cpu_references(methods, work, timeout_s)
    for method, values in losses.items():
        fall = (values[0] - values[-1]) / values[0]
        if fall < GOLDEN_MIN_FALL:
            raise RuntimeError(
                f"{method}: the loss fell {fall:.1%} over {len(values)} steps, under the {GOLDEN_MIN_FALL:.0%} the "
                "comparison needs to mean anything: raise its learning rate"
            )
    return {
        "about": "lorafit's CPU fp32 losses of the runs tests/gpu/test_golden_losses.py makes on a GPU",
        "command": COMMAND,
        "created": time.strftime("%Y-%m-%d", time.gmtime(started)),
        "model": MODEL,
        "weights_fingerprint": fingerprint,
        "versions": versions(),
        "relative_tolerance": RELATIVE_TOLERANCE,
        "cases": {case: {"method": m, "precision": p} for case, (m, p) in CASES.items()},
        "references": {m: {"flags": train_flags(m), "losses": losses[m]} for m in methods},
    }


def main(argv: list[str] | None = None) -> None:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=GOLDEN_FILE)
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds the CPU runs may take in all")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lorafit-golden-") as work:
        golden = make_golden(Path(work), args.timeout)
    args.out.write_text(json.dumps(golden, indent=1) + "\n")
    for method, ref in golden["references"].items():
        print(f"{method}: " + " ".join(f"{x:.4f}" for x in ref["losses"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
