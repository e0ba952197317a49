"""One command that runs every GPU path of lorafit on one GPU in under eight minutes, and writes what it
measured to docs/benchmarks/<date>-gpu-check-<gpu>.{json,md}.

    python bench/gpu_check.py --dry-run            # the plan: parts, commands, time boxes (no GPU needed)
    python bench/gpu_check.py                      # everything (bash bench/gpu_setup.sh first; docs/gpu.md)
    python bench/gpu_check.py --parts setup,qwen   # a subset
    python bench/gpu_check.py --out-dir "$OUT"     # where the JSON and Markdown go

Parts, in order (PARTS below has each one's commands):

- setup: torch/CUDA/bitsandbytes/NVML versions, compute capability, bf16, the peak FLOP/s lorafit divides
  MFU by for this card and a measured bf16 matmul peak beside it, a 4-bit round trip through bitsandbytes;
- models: materializes random:smollm2-135m and random:qwen2.5-1.5b once (CPU-bound), outside later boxes;
- smollm2: tests/gpu/test_golden_losses.py: LoRA, QLoRA and full fine-tuning in bf16 and LoRA in fp16 with
  loss scaling, each loss curve against the committed CPU fp32 losses (tests/gpu/golden_losses.json);
- qwen: random:qwen2.5-1.5b LoRA and QLoRA at 4 x 1024 with adamw, paged_adamw and adamw_8bit: tokens/s,
  MFU, J/token (NVML), allocator and device-level peaks, and the estimator's peak against the measured one;
- reference: the same model through the transformers + peft + trl reference (../shared/bench/seed_stack.py,
  carried as .gpu-carry/reference/seed_stack.py) and lorafit at its settings: speed and memory ratios;
- budget: --memory-budget 8GB: the plans (`train --plan --json`) and estimates of what fits and what is
  refused, one run under the cap and one that must be refused;
- serve: `bench-serve` of `lorafit serve` on CUDA with 4 adapters against the set-adapter baseline;
- tests: the rest of tests/gpu (bf16 mixed-adapter server equal to peft, QLoRA merge equal to
  adapter-on-base).

Every part runs in its own process under a time box, and so does each of its commands: a failure or a
hang costs at most its box, is recorded (exit code, the traceback from its stderr) and the run goes on.
The report is rewritten after every part, so a run cut short still leaves what it measured.

Time boxes: each part's estimate is built from a few figures for an H100/H200-class machine (ASSUMED,
below: process start, weight loading, the step times the FLOP counts give at a plausible MFU); its box is
about 1.3x the estimate, and the boxes sum under TOTAL_LIMIT_S (8 minutes). They are estimates until a
GPU run measures them: each part's record holds its wall time next to its box, to re-size them from data.
`--box-scale 2` stretches every box for a slower card (e.g. a 24 GB one).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SELF = Path(__file__).resolve()
TOTAL_LIMIT_S = 480  # the budget: every part, on one H100/H200-class GPU
KILL_GRACE_S = 2.0  # a part past its box gets SIGTERM this long before the box ends, SIGKILL at the end
SCHEMA = "lorafit-gpu-check/1"
CARRIED_REFERENCE = ROOT / ".gpu-carry" / "reference" / "seed_stack.py"
SHARED_REFERENCE = ROOT.parent / "shared" / "bench" / "seed_stack.py"

# Figures the estimates are built from (H100/H200 class; seconds). Not measured on a GPU yet: the first
# run's per-part wall times replace them.
ASSUMED = {
    "start_s": 6.0,  # python + torch/transformers/peft/lorafit imports, lorafit's allocator re-exec, CUDA context
    "load_1p5b_s": 4.0,  # 3.1 GB of bf16 safetensors from the page cache onto the GPU
    "quantize_1p5b_s": 3.0,  # bitsandbytes NF4 quantization of 1.5B weights on the GPU
    "warmup_s": 2.0,  # first steps: cuBLAS handles, kernel selection
    "lora_step_1p5b_s": 0.07,  # 4 x 1024 tokens x ~6.5 GFLOP/token (LoRA: 4N + attention) at ~40% of 989 TFLOP/s
    "qlora_step_1p5b_s": 0.14,  # the same plus NF4 dequantization: ~2x (lorafit's CPU profile puts it near 2x)
    "materialize_1p5b_s": 20.0,  # seeded CPU init of 1.5B bf16 weights (serial RNG, ~8 ns/element) + save
}

QWEN = "random:qwen2.5-1.5b"
SMOLLM2 = "random:smollm2-135m"
QWEN_POINT = ["--model", QWEN, "--data", "wikitext2", "--packing", "--batch-size", "4", "--max-length", "1024"]
BUDGET = "8GB"
ESTIMATE_TOLERANCE = 0.15  # |predicted peak / measured peak - 1| the qwen part accepts (lorafit: 4.8% on CPU)


def lorafit(*args: str) -> list[str]:
    return [sys.executable, "-m", "lorafit", *args]


def pytest(*args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA", *args]


@dataclass
class Cmd:
    """One command of a part. Commands of the same `group` run at the same time; `ok_codes` are the exit
    codes that mean it did what it should (a refused --memory-budget exits 4)."""

    name: str
    argv: list[str]
    group: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    ok_codes: tuple[int, ...] = (0,)
    limit_s: float | None = None  # its own time limit inside the part's box (a hang then spares the rest)


@dataclass
class Part:
    name: str
    title: str
    box_s: int
    estimate_s: int
    basis: str  # how estimate_s was reckoned
    commands: Callable[[Path], list[Cmd]]  # from the part's work directory
    derive: Callable[[Path, dict[str, dict]], tuple[dict, list[dict]]]  # -> figures, checks


def check(name: str, ok: bool, detail: str = "") -> dict:
    return {"name": name, "ok": bool(ok), "detail": detail}


# ----------------------------------------------------------------------------------------------- setup


def setup_commands(work: Path) -> list[Cmd]:
    return [
        Cmd("probe", [sys.executable, str(SELF), "_probe"], limit_s=15),
        Cmd("cli", lorafit("--version"), limit_s=10),
    ]


def setup_derive(work: Path, cmds: dict[str, dict]) -> tuple[dict, list[dict]]:
    probe = cmds["probe"]["json"] or {}
    checks = [check("CUDA available", probe.get("cuda_available"), probe.get("gpu_name", ""))]
    if not probe.get("cuda_available"):
        return probe, checks
    table, measured = probe.get("lorafit_peak_bf16"), probe.get("measured_bf16_matmul", {}).get("flops_per_s")
    ratio = measured / table if table and measured else None
    probe["measured_over_lorafit_peak"] = ratio
    bnb, nvml = probe.get("bitsandbytes", {}), probe.get("nvml", {})
    peak_source = probe.get("lorafit_peak_source", "")
    checks += [
        check("bf16 native (compute capability >= 8.0)", probe.get("bf16_native"), probe.get("capability", "")),
        check("lorafit knows this card's peak", probe.get("lorafit_gpu_model") is not None, peak_source),
        check(
            "measured bf16 matmul under lorafit's peak (a data-sheet ceiling)",
            ratio is not None and ratio <= 1.05,
            f"measured / peak = {ratio:.2f}" if ratio else "no figure",
        ),
        check("bitsandbytes NF4 round trip on CUDA", bnb.get("ok"), bnb.get("detail", "")),
        check("NVML energy counter readable", nvml.get("energy_mj") is not None, json.dumps(nvml)),
        check("lorafit CLI runs", cmds["cli"]["ok"], (cmds["cli"]["stdout_tail"] or "").strip()),
    ]  # fmt: skip
    return probe, checks


# ---------------------------------------------------------------------------------------------- models

MATERIALIZE = "import sys; from lorafit.inputs import models; print(models.resolve(sys.argv[1]).location)"


def models_commands(work: Path) -> list[Cmd]:
    return [
        Cmd(spec.split(":")[1], [sys.executable, "-c", MATERIALIZE, spec], group="materialize")
        for spec in (SMOLLM2, QWEN)
    ]


def models_derive(work: Path, cmds: dict[str, dict]) -> tuple[dict, list[dict]]:
    figures = {name: {"wall_s": c["wall_s"], "dir": (c["stdout_tail"] or "").strip()} for name, c in cmds.items()}
    return figures, [check(f"{name} materialized", c["ok"]) for name, c in cmds.items()]


# --------------------------------------------------------------------------------------------- smollm2


def smollm2_commands(work: Path) -> list[Cmd]:
    argv = pytest("tests/gpu/test_golden_losses.py", "--junitxml", str(work / "junit.xml"))
    return [Cmd("golden", argv, env={"LORAFIT_GPU_CHECK_OUT": str(work)})]


def smollm2_derive(work: Path, cmds: dict[str, dict]) -> tuple[dict, list[dict]]:
    golden_file = work / "golden.result.json"
    figures = json.loads(golden_file.read_text()) if golden_file.is_file() else {}
    return figures, junit_checks(work / "junit.xml")


def junit_checks(path: Path) -> list[dict]:
    """One check per test case of a pytest --junitxml file (failures keep their message and traceback)."""
    import xml.etree.ElementTree as ET

    if not path.is_file():
        return [check("pytest wrote its report", False, f"{path} missing")]
    checks = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        if bad is not None:
            checks.append(check(name, False, (bad.get("message", "") + "\n" + (bad.text or ""))[-4000:]))
        elif skipped is not None:
            checks.append(check(name, False, "skipped: " + skipped.get("message", "")))
        else:
            checks.append(check(name, True))
    return checks or [check("pytest ran tests", False, "no test cases in the report")]


# ------------------------------------------------------------------------------------------------ qwen

OPTIMIZERS = ("adamw", "paged_adamw", "adamw_8bit")


def qwen_commands(work: Path) -> list[Cmd]:
    cmds = []
    for method in ("lora", "qlora"):
        for optimizer in OPTIMIZERS:
            argv = lorafit(
                "train", *QWEN_POINT, "--method", method, "--optimizer", optimizer, "--max-steps", "12",
                "--profile-warmup-steps", "2", "--precision", "bf16", "--device", "cuda",
                "--out", str(work / f"{method}-{optimizer}"), "--json",
            )  # fmt: skip
            cmds.append(Cmd(f"{method}-{optimizer}", argv, limit_s=30))  # a hang spares the other five
    return cmds


def run_figures(summary: dict) -> dict:
    """The figures of one `train --json` record the report shows (None where the run did not give one)."""
    peak = summary.get("peak_memory") or {}
    chosen = (summary.get("memory_plan") or {}).get("chosen") or {}
    predicted, measured = chosen.get("predicted_peak_bytes"), peak.get("peak_bytes")
    return {
        "status": summary.get("status"),
        "tokens_per_s": summary.get("tokens_per_s"),
        "train_tokens_per_s": summary.get("train_tokens_per_s"),
        "step_time_p50_s": (summary.get("step_time_s") or {}).get("p50"),
        "mfu": summary.get("mfu"),
        "hfu": summary.get("hfu"),
        "peak_flops_source": summary.get("peak_flops_source"),
        "j_per_token": summary.get("j_per_token"),
        "avg_power_w": summary.get("avg_power_w"),
        "energy_unavailable_reason": summary.get("energy_unavailable_reason"),
        "device_peak_bytes": measured,
        "device_peak_source": peak.get("device_peak_source"),
        "max_allocated_bytes": peak.get("max_allocated_bytes"),
        "max_reserved_bytes": peak.get("max_reserved_bytes"),
        "outside_allocator_bytes": peak.get("outside_allocator_bytes"),
        "paged_optimizer_state_bytes": (summary.get("memory_breakdown") or {}).get("paged_optimizer_state"),
        "plan": f"{chosen.get('checkpointing')} ckpt, {chosen.get('batch_size')} x {chosen.get('grad_accum')}"
        if chosen
        else None,
        "predicted_peak_bytes": predicted,
        "estimate_error": predicted / measured - 1 if predicted and measured else None,
        "loss_first": summary.get("loss_first"),
        "loss_last": summary.get("loss_last"),
    }


def qwen_derive(work: Path, cmds: dict[str, dict]) -> tuple[dict, list[dict]]:
    runs, checks = {}, []
    for name, c in cmds.items():
        summary = c["json"] or {}
        fig = runs[name] = run_figures(summary)
        checks.append(check(f"{name} trained", c["ok"] and fig["status"] == "ok", c.get("error") or ""))
        if not c["ok"]:
            continue
        err = fig["estimate_error"]
        checks += [
            check(f"{name} MFU in (0, 1)", fig["mfu"] is not None and 0 < fig["mfu"] < 1, f"{fig['mfu']}"),
            check(f"{name} J/token from NVML", fig["j_per_token"] is not None, fig["energy_unavailable_reason"] or ""),
            check(
                f"{name} estimated peak within {ESTIMATE_TOLERANCE:.0%} of the measured one",
                err is not None and abs(err) <= ESTIMATE_TOLERANCE,
                f"{err:+.1%}" if err is not None else "no estimate or no peak",
            ),
        ]  # fmt: skip
    return {"runs": runs, "table": figures_table(runs)}, checks


def figures_table(runs: dict[str, dict]) -> dict:
    columns = [
        "run", "tokens/s", "MFU", "J/token", "device peak", "allocated peak", "paged state", "estimate", "error",
    ]  # fmt: skip
    rows = []
    for name, f in runs.items():
        rows.append([
            name, num(f["tokens_per_s"], ".0f"), num(f["mfu"], ".1%"), num(f["j_per_token"], ".3g"),
            gib(f["device_peak_bytes"]), gib(f["max_allocated_bytes"]), gib(f["paged_optimizer_state_bytes"]),
            gib(f["predicted_peak_bytes"]), num(f["estimate_error"], "+.1%"),
        ])  # fmt: skip
    return {"columns": columns, "rows": rows}


# ------------------------------------------------------------------------------------------- reference


def reference_script() -> Path:
    """The reference as the check finds it: ../shared beside a checkout, else the copy gpu_setup.sh carries."""
    return SHARED_REFERENCE if SHARED_REFERENCE.is_file() else CARRIED_REFERENCE


def reference_commands(work: Path) -> list[Cmd]:
    cmds = []
    for method in ("lora", "qlora"):
        ref_args = [
            "--model", QWEN, "--data", "alpaca", "--n", "32", "--method", method, "--seq", "1024", "--bs", "4",
            "--r", "16", "--gc", "off",
        ]  # fmt: skip
        cmds.append(
            Cmd(
                f"reference-{method}",
                [sys.executable, str(SELF), "_reference", str(reference_script()), *ref_args],
                limit_s=40,
            )
        )
        # lorafit at the reference's settings (as bench/train_vs_reference.py): fp32, same samples, loss on
        # every token, LoRA r 16 / alpha 32 / dropout 0.05, lr 2e-4 linear without warm-up, AdamW, one epoch
        argv = lorafit(
            "train", "--model", QWEN, "--data", "alpaca", "--method", method, "--max-samples", "32",
            "--batch-size", "4", "--max-length", "1024", "--lora-r", "16", "--lora-dropout", "0.05",
            "--learning-rate", "2e-4", "--lr-scheduler", "linear", "--warmup-steps", "0", "--optimizer", "adamw",
            "--precision", "fp32", "--train-on-prompt", "--device", "cuda", "--out", str(work / f"lorafit-{method}"),
            "--json",
        )  # fmt: skip
        cmds.append(Cmd(f"lorafit-{method}", argv, limit_s=30))
    return cmds


def reference_derive(work: Path, cmds: dict[str, dict]) -> tuple[dict, list[dict]]:
    figures, checks = {}, []
    for method in ("lora", "qlora"):
        ref, ours = cmds[f"reference-{method}"], cmds[f"lorafit-{method}"]
        if not (ref["ok"] and ours["ok"]):
            checks.append(
                check(f"{method}: both sides ran", False, (ref.get("error") or ours.get("error") or "")[-2000:])
            )
            continue
        r, s = ref["json"] or {}, ours["json"] or {}
        ref_tps = (r.get("reference") or {}).get("tokens_per_s")
        ref_peak = (r.get("cuda") or {}).get("train_max_allocated_bytes")
        our_peak = (s.get("peak_memory") or {}).get("max_allocated_bytes")
        speed = s["train_tokens_per_s"] / ref_tps if ref_tps and s.get("train_tokens_per_s") else None
        memory = our_peak / ref_peak if our_peak and ref_peak else None
        figures[method] = {
            "reference": r,
            "lorafit": run_figures(s),
            "speed_ratio": speed,  # lorafit train tokens/s over the reference's (both: all steps, warm-up included)
            "memory_ratio": memory,  # allocator peaks of the training window, lorafit over the reference
        }
        checks.append(check(f"{method}: lorafit at least as fast as the reference", (speed or 0) >= 1.0, f"x{speed}"))
        checks.append(
            check(
                f"{method}: lorafit's training peak at most the reference's",
                memory is not None and memory <= 1.0,
                f"x{memory}",
            )
        )
    rows = [
        [
            m,
            num(f["speed_ratio"], ".2f"),
            num(f["memory_ratio"], ".2f"),
            gib(f["lorafit"]["max_allocated_bytes"]),
            gib((f["reference"].get("cuda") or {}).get("train_max_allocated_bytes")),
        ]
        for m, f in figures.items()
    ]
    figures["table"] = {"columns": ["method", "speed x", "memory x", "lorafit peak", "reference peak"], "rows": rows}
    return figures, checks


# ---------------------------------------------------------------------------------------------- budget


def budget_commands(work: Path) -> list[Cmd]:
    cmds = []
    for method in ("lora", "qlora", "full"):
        argv = lorafit(
            "train", "--plan", "--json", *QWEN_POINT, "--method", method, "--memory-budget", BUDGET,
            "--precision", "bf16", "--device", "cuda",
        )  # fmt: skip
        cmds.append(Cmd(f"plan-qwen2.5-1.5b-{method}", argv, group="plans", ok_codes=(0, 4), limit_s=25))
    for method in ("lora", "qlora"):
        argv = lorafit(
            "estimate", "--json", "--model", "random:llama-3-8b", "--method", method, "--batch-size", "4",
            "--max-length", "1024", "--budget", BUDGET, "--precision", "bf16", "--device", "cuda",
        )  # fmt: skip
        cmds.append(Cmd(f"estimate-llama-3-8b-{method}", argv, group="plans", limit_s=25))
    run = ["--max-steps", "6", "--profile-warmup-steps", "2", "--precision", "bf16", "--device", "cuda", "--json"]
    capped = [*QWEN_POINT, "--memory-budget", BUDGET, *run]
    lora = lorafit("train", *capped, "--method", "lora", "--out", str(work / "run-lora"))
    full = lorafit("train", *capped, "--method", "full", "--out", str(work / "run-full"))
    cmds.append(Cmd("run-lora", lora, limit_s=35))
    cmds.append(Cmd("run-full-refused", full, ok_codes=(4,), limit_s=25))  # refused before loading: exit 4
    return cmds


def budget_derive(work: Path, cmds: dict[str, dict]) -> tuple[dict, list[dict]]:
    rows, checks = [], []
    for name, c in cmds.items():
        result = c["json"] or {}
        if name.startswith("plan-"):
            chosen = result.get("chosen")
            rows.append(
                [
                    name,
                    "fits" if chosen else "refused",
                    plan_text(chosen),
                    gib((chosen or {}).get("predicted_peak_bytes")),
                ]
            )
        elif name.startswith("estimate-"):
            total = (result.get("estimate") or {}).get("total")
            fits = total is not None and result.get("budget_bytes") and total <= result["budget_bytes"]
            rows.append([name, "fits" if fits else "refused", "as configured", gib(total)])
    figures: dict[str, Any] = {
        "budget": BUDGET,
        "table": {"columns": ["what", "verdict", "plan", "predicted peak"], "rows": rows},
    }
    run = cmds.get("run-lora")
    if run is not None:
        fig = figures["run_lora"] = run_figures(run["json"] or {})
        peak, cap = fig["device_peak_bytes"], 8e9
        checks.append(check("LoRA ran under --memory-budget 8GB", run["ok"], run.get("error") or ""))
        checks.append(check("its device-level peak stayed under 8 GB", peak is not None and peak <= cap, gib(peak)))
    refused = cmds.get("run-full-refused")
    if refused is not None:
        checks.append(check("full fine-tuning of 1.5B refused under 8 GB (exit 4)", refused["rc"] == 4,
                            f"exit {refused['rc']}: {(refused['stderr_tail'] or '')[-300:]}"))  # fmt: skip
    checks += [
        check(f"{n} answered", c["ok"], c.get("error") or "") for n, c in cmds.items() if not n.startswith("run-")
    ]
    return figures, checks


def plan_text(chosen: dict | None) -> str:
    if not chosen:
        return "none fits"
    return f"{chosen['checkpointing']} checkpointing, {chosen['batch_size']} x {chosen['grad_accum']}"


# ----------------------------------------------------------------------------------------------- serve


def serve_commands(work: Path) -> list[Cmd]:
    argv = lorafit(
        "bench-serve", "--model", SMOLLM2, "--adapters", "4", "--requests", "32", "--concurrency", "8",
        "--prompt-words", "32", "--max-tokens", "32", "--baseline", "set-adapter", "--json",
    )  # fmt: skip
    return [Cmd("bench-serve", argv)]


def serve_derive(work: Path, cmds: dict[str, dict]) -> tuple[dict, list[dict]]:
    result = cmds["bench-serve"]["json"] or {}
    batched, baseline = result.get("batched") or {}, result.get("set-adapter") or {}
    memory = batched.get("memory") or {}
    speedup = result.get("speedup_tokens_per_s")
    device_peak = memory.get("device_peak_allocated_bytes")
    checks = [
        check("bench-serve ran", cmds["bench-serve"]["ok"], cmds["bench-serve"].get("error") or ""),
        check("every request answered (both servers)", batched.get("requests") == baseline.get("requests") == 32),
        check("the server held its weights on the GPU", (device_peak or 0) > 0, gib(device_peak)),
        check("batched beats set-adapter on output tokens/s", speedup is not None and speedup > 1, f"x{speedup}"),
    ]  # fmt: skip
    rows = [[mode, num(r.get("output_tokens_per_s"), ".0f"), num(r.get("requests_per_s"), ".2f"),
             num(r.get("latency_p50_s"), ".2f"), num(r.get("ttft_p50_s"), ".3f")]
            for mode, r in (("batched", batched), ("set-adapter", baseline))]  # fmt: skip
    result["table"] = {
        "columns": ["server", "output tokens/s", "requests/s", "p50 latency s", "p50 TTFT s"],
        "rows": rows,
    }
    return result, checks


# ----------------------------------------------------------------------------------------------- tests


def tests_commands(work: Path) -> list[Cmd]:
    argv = pytest("tests/gpu", "--ignore=tests/gpu/test_golden_losses.py", "--junitxml", str(work / "junit.xml"))
    return [Cmd("pytest", argv, env={"LORAFIT_GPU_CHECK_OUT": str(work)})]


def tests_derive(work: Path, cmds: dict[str, dict]) -> tuple[dict, list[dict]]:
    figures = {}
    for extra in sorted(work.glob("*.result.json")):  # what the tests chose to record (tolerances, diffs)
        figures[extra.name.removesuffix(".result.json")] = json.loads(extra.read_text())
    return figures, junit_checks(work / "junit.xml")


# ------------------------------------------------------------------------------------------------ plan

PARTS: list[Part] = [
    Part("setup", "Set-up: versions, capability, peaks", 20, 12,
         "1 probe process (start 6 s, 8192^3 bf16 matmul x13 < 1 s, NF4 round trip 1 s) + `lorafit --version` (~4 s)",
         setup_commands, setup_derive),
    Part("models", "Materialize the random-weight models", 40, 26,
         "both at once: start 6 s + qwen2.5-1.5b init and save ~20 s (smollm2-135m ~3 s, in parallel)",
         models_commands, models_derive),
    Part("smollm2", "smollm2-135m shapes: bf16 / fp16 losses against CPU fp32", 45, 24,
         "pytest start 6 s + 4 train processes at once (start 6 s, 8 steps of 4 x 128 well under 1 s each, "
         "first-step warm-up 2 s, save 1 s) ~14 s + comparisons",
         smollm2_commands, smollm2_derive),
    Part("qwen", "qwen2.5-1.5b LoRA / QLoRA x adamw / paged_adamw / adamw_8bit at 4 x 1024", 115, 95,
         "6 runs one after another (quiet GPU for the timings): LoRA 6 + 4 load + 2 warm-up + 12 x 0.07 + 1 "
         "~14 s; QLoRA + 3 quantize, 12 x 0.14 ~18 s",
         qwen_commands, qwen_derive),
    Part("reference", "The same point through the transformers + peft + trl reference", 85, 66,
         "reference LoRA and QLoRA (start with trl 8 s, fp32 load 5 s, 32 samples / 8 steps fp32 ~4 s, ~20 s each) "
         "+ lorafit at its settings (fp32, ~13 s each)",
         reference_commands, reference_derive),
    Part("budget", "--memory-budget 8GB: what fits and what is refused", 55, 40,
         "5 plans/estimates at once (start + tokenizer, ~10 s) + LoRA under the cap (6 steps with checkpointing, "
         "~18 s) + full refused before loading (~8 s)",
         budget_commands, budget_derive),
    Part("serve", "lorafit serve on CUDA, 4 adapters, batched vs set-adapter", 60, 45,
         "bench-serve start + 4 synthetic adapters ~11 s, 2 servers x (start ~8 s) + 32 requests x 32 tokens "
         "(batched ~3 s, one at a time ~12 s)",
         serve_commands, serve_derive),
    Part("tests", "tests/gpu: server equal to peft in bf16, QLoRA merge", 55, 40,
         "pytest start 6 s + server test (load, 3 adapters, 12 tokens, peft reference) ~12 s + QLoRA merge "
         "(train tiny 10 s, merge with check 10 s, compare 3 s)",
         tests_commands, tests_derive),
]  # fmt: skip


def selftest_commands(work: Path) -> list[Cmd]:
    """The check's own machinery, tested without a GPU: a command that answers JSON, one that fails with a
    traceback and one that hangs past the box, all at once (tests/integration/test_gpu_check_dry_run.py)."""
    hang = "import os, time; open(os.environ['PIDFILE'], 'w').write(str(os.getpid())); time.sleep(600)"
    return [
        Cmd("answers", [sys.executable, "-c", "import json; print(json.dumps({'answer': 42}))"], group="all"),
        Cmd("fails", [sys.executable, "-c", "def f():\n    raise ValueError('planted')\nf()"], group="all"),
        Cmd("hangs", [sys.executable, "-c", hang], group="all", env={"PIDFILE": str(work / "hang.pid")}, limit_s=4),
    ]


def selftest_derive(work: Path, cmds: dict[str, dict]) -> tuple[dict, list[dict]]:
    if os.environ.get("LORAFIT_GPU_CHECK_SELFTEST") == "stuck":  # the part itself hangs: its box must stop it
        time.sleep(600)
    return {"answer": (cmds["answers"]["json"] or {}).get("answer")}, [check("answers answered", cmds["answers"]["ok"])]


if os.environ.get("LORAFIT_GPU_CHECK_SELFTEST"):  # never part of a real run's plan
    PARTS.append(Part("selftest", "The check's own machinery", 8, 1, "three tiny processes", selftest_commands,
                      selftest_derive))  # fmt: skip
PART_NAMES = [p.name for p in PARTS]


# ----------------------------------------------------------------------------------- running a command


def tail(path: Path, chars: int) -> str:
    if not path.is_file():
        return ""
    text = path.read_text(errors="replace")
    return text[-chars:]


def last_json(text: str) -> Any:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads(line)
    return None


def error_text(stderr: str, stdout: str) -> str:
    """The traceback of a failed command (from its last 'Traceback' on), else the end of its output."""
    for text in (stderr, stdout):
        at = text.rfind("Traceback (most recent call last)")
        if at >= 0:
            return text[at:][-6000:]
    return (stderr or stdout)[-3000:]


def kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


class Runner:
    """Runs one part's commands in its work directory before a deadline, recording each as it ends."""

    def __init__(self, part: Part, work: Path, result_file: Path, deadline: float, scale: float = 1.0) -> None:
        self.part, self.work, self.result_file, self.deadline = part, work, result_file, deadline
        self.scale = scale  # --box-scale: command limits stretch with the boxes
        self.record: dict[str, Any] = {"name": part.name, "status": "running", "commands": {}, "checks": []}
        self.children: list[int] = []
        signal.signal(signal.SIGTERM, self._terminated)

    def _terminated(self, *_: Any) -> None:
        for pid in self.children:
            kill_group(pid)
        self.record["status"] = "timeout"
        self.record.setdefault("error", {"message": f"killed at its {self.part.box_s} s time box"})
        self.save()
        os._exit(124)

    def save(self) -> None:
        tmp = self.result_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record, indent=1, default=str))
        tmp.replace(self.result_file)

    def run(self) -> None:
        cmds = self.part.commands(self.work)
        groups: list[list[Cmd]] = []
        for cmd in cmds:
            if groups and cmd.group is not None and groups[-1][0].group == cmd.group:
                groups[-1].append(cmd)
            else:
                groups.append([cmd])
        for group in groups:
            if time.monotonic() >= self.deadline:  # the box is spent: say so rather than start and kill
                for cmd in group:
                    self.finished(cmd, None, 0.0, timed_out=True, started=False)
                continue
            self.run_group(group)
            self.save()
        self.finish()

    def run_group(self, group: list[Cmd]) -> None:
        started = {}
        for cmd in group:
            out, err = self.work / f"{cmd.name}.out", self.work / f"{cmd.name}.err"
            env = {**os.environ, "PYTHONUNBUFFERED": "1", **cmd.env}
            with out.open("w") as stdout, err.open("w") as stderr:  # the child keeps its own copies
                proc = subprocess.Popen(
                    cmd.argv, cwd=ROOT, stdout=stdout, stderr=stderr, env=env, start_new_session=True
                )
            self.children.append(proc.pid)
            with (self.work / "children").open("a") as f:
                f.write(f"{proc.pid}\n")
            started[cmd.name] = (cmd, proc, time.monotonic())
        running = dict(started)
        while running:
            for name, (cmd, proc, t0) in list(running.items()):
                if proc.poll() is not None:
                    self.finished(cmd, proc.returncode, time.monotonic() - t0, timed_out=False)
                    del running[name]
            now = time.monotonic()
            for name, (cmd, proc, t0) in list(running.items()):
                if now >= self.deadline or (cmd.limit_s is not None and now - t0 >= cmd.limit_s * self.scale):
                    kill_group(proc.pid)
                    proc.wait()
                    self.finished(cmd, None, time.monotonic() - t0, timed_out=True)
                    del running[name]
            time.sleep(0.1)

    def finished(self, cmd: Cmd, rc: int | None, wall: float, timed_out: bool, started: bool = True) -> None:
        stdout, stderr = tail(self.work / f"{cmd.name}.out", 200_000), tail(self.work / f"{cmd.name}.err", 20_000)
        ok = rc in cmd.ok_codes
        why = "timed out (its limit or the part's box)\n" if started else "not started: the part's box was spent"
        self.record["commands"][cmd.name] = {
            "argv": cmd.argv,
            "rc": rc,
            "ok": ok,
            "timed_out": timed_out,
            "wall_s": round(wall, 2),
            "json": last_json(stdout),
            "stdout_tail": stdout[-1500:],
            "stderr_tail": stderr[-1500:],
            "error": None if ok else (why if timed_out else "") + error_text(stderr, stdout),
        }

    def finish(self) -> None:
        commands = self.record["commands"]
        try:
            figures, checks = self.part.derive(self.work, commands)
            self.record["figures"], self.record["checks"] = figures, checks
        except Exception as e:  # a derive bug must not hide what the commands measured
            self.record["error"] = {"message": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            self.record["status"] = "failed"
            self.save()
            return
        if any(c["timed_out"] for c in commands.values()):
            self.record["status"] = "timeout"
        elif not all(c["ok"] for c in commands.values()):
            self.record["status"] = "failed"
        elif not all(c["ok"] for c in self.record["checks"]):
            self.record["status"] = "check_failed"
        else:
            self.record["status"] = "ok"
        self.save()


def run_part_here(name: str, work: Path, result_file: Path, box_s: float, scale: float) -> None:
    """`_part`: run one part's commands in this process (the orchestrator's child)."""
    part = next(p for p in PARTS if p.name == name)
    work.mkdir(parents=True, exist_ok=True)
    runner = Runner(part, work, result_file, time.monotonic() + box_s - KILL_GRACE_S - 1.0, scale)
    try:
        runner.run()
    except Exception as e:
        runner.record["status"] = "failed"
        runner.record["error"] = {"message": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        runner.save()


def run_part(part: Part, work: Path, scale: float) -> dict:
    """Run a part in a child process under its box: SIGTERM at box - grace, SIGKILL (its commands too) at box."""
    part_dir = work / part.name
    part_dir.mkdir(parents=True, exist_ok=True)
    result_file = part_dir / "result.json"
    t0 = time.monotonic()
    box_s = part.box_s * scale
    argv = [sys.executable, str(SELF), "_part", part.name, str(part_dir), str(result_file), str(box_s), str(scale)]
    proc = subprocess.Popen(argv, cwd=ROOT, start_new_session=True)
    try:
        proc.wait(timeout=max(1.0, box_s - KILL_GRACE_S))
    except subprocess.TimeoutExpired:
        kill_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)
            proc.wait()
    children = part_dir / "children"
    for pid in children.read_text().split() if children.is_file() else []:
        kill_group(int(pid))  # the commands this part started, by process group
    record = json.loads(result_file.read_text()) if result_file.is_file() else {"name": part.name, "commands": {}}
    if record.get("status") in (None, "running"):
        record["status"] = "timeout" if proc.returncode in (None, -9, -15, 124) else "failed"
        record.setdefault("error", {"message": f"the part's process ended with {proc.returncode} before finishing"})
    record.update(box_s=box_s, estimate_s=part.estimate_s, wall_s=round(time.monotonic() - t0, 2), title=part.title)
    return record


# -------------------------------------------------------------------------------------------- probes


def probe() -> dict:
    """`_probe`: what this machine's GPU stack is, as JSON (run as its own process by the setup part)."""
    import platform

    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "versions": package_versions(),
    }
    if not torch.cuda.is_available():
        return info
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    info.update(gpu_name=props.name, capability=f"{props.major}.{props.minor}", memory_bytes=props.total_memory,
                multiprocessors=props.multi_processor_count)  # fmt: skip
    info.update(lorafit_peaks(device))
    info["measured_bf16_matmul"] = matmul_peak(device)
    info["bitsandbytes"] = nf4_round_trip(device)
    info["nvml"] = nvml_info()
    return info


def package_versions() -> dict[str, str]:
    from importlib import metadata

    names = ["transformers", "peft", "accelerate", "bitsandbytes", "trl", "datasets", "fastapi", "uvicorn",
             "nvidia-ml-py", "triton", "safetensors", "lorafit", "cmeel-mimalloc"]  # fmt: skip
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def lorafit_peaks(device: Any) -> dict:
    import torch

    from lorafit.base.device import bf16_supported
    from lorafit.measurement.flops import gpu_model, peak_flops

    peak, source = peak_flops(device, torch.bfloat16)
    return {
        "bf16_native": bf16_supported("cuda"),
        "torch_bf16_supported": torch.cuda.is_bf16_supported(),
        "lorafit_gpu_model": gpu_model(torch.cuda.get_device_name(device)),
        "lorafit_peak_bf16": peak,
        "lorafit_peak_source": source,
    }


def matmul_peak(device: Any, n: int = 8192, reps: int = 10) -> dict:
    """bf16 n^3 matmul on random data (never zeros: they run faster), 3 warm-ups, `reps` timed by CUDA events."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1000 / reps
    return {"n": n, "reps": reps, "seconds_each": seconds, "flops_per_s": 2 * n**3 / seconds}


def nf4_round_trip(device: Any) -> dict:
    """bitsandbytes' CUDA library loads and NF4 quantization round-trips a Gaussian matrix with its usual
    error (~10% relative in the Frobenius norm for 4-bit NF4 at block 64; over 15% means it is broken)."""
    try:
        import bitsandbytes.functional as bnbf
        import torch

        w = torch.randn(1024, 1024, device=device, dtype=torch.bfloat16)
        q, state = bnbf.quantize_4bit(w, quant_type="nf4")
        rel = float((bnbf.dequantize_4bit(q, state) - w).float().norm() / w.float().norm())
        return {"ok": rel < 0.15, "relative_error": rel, "detail": f"relative error {rel:.3f}"}
    except Exception as e:
        return {"ok": False, "detail": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


def nvml_info() -> dict:
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        info: dict[str, Any] = {
            "driver": pynvml.nvmlSystemGetDriverVersion(),
            "nvml": pynvml.nvmlSystemGetNVMLVersion(),
        }
        for key, read in (
            ("energy_mj", pynvml.nvmlDeviceGetTotalEnergyConsumption),
            ("power_mw", pynvml.nvmlDeviceGetPowerUsage),
        ):
            try:
                info[key] = read(handle)
            except pynvml.NVMLError as e:
                info[key], info[f"{key}_error"] = None, str(e)
        return info
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


def reference_run(script: Path, args: list[str]) -> None:
    """`_reference`: run the reference script (its model spec and data resolved through lorafit, as
    bench/train_vs_reference.py does) and print one JSON line: its own result and the CUDA allocator's
    peaks, over the whole process and over `Trainer.train` alone (lorafit's window also starts after
    loading)."""
    if not script.is_file():
        raise SystemExit(f"reference script not found: {script} (bash bench/gpu_setup.sh --prepare copies it)")
    import torch
    import transformers

    from lorafit.inputs import data, models

    args = list(args)
    args[args.index("--model") + 1] = models.resolve(args[args.index("--model") + 1]).location
    args[args.index("--data") + 1] = str(data.BUILTIN[args[args.index("--data") + 1]])
    cuda: dict[str, Any] = {}
    original = transformers.Trainer.train

    def train(self, *a, **kw):
        if not torch.cuda.is_available():
            return original(self, *a, **kw)
        cuda["load_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = original(self, *a, **kw)
        cuda["train_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        cuda["train_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
        return out

    transformers.Trainer.train = train
    import runpy

    captured = io.StringIO()
    sys.argv = [str(script), *args]
    with contextlib.redirect_stdout(captured):
        runpy.run_path(str(script), run_name="__main__")
    print(captured.getvalue(), end="")
    print(json.dumps({"reference": last_json(captured.getvalue()), "cuda": cuda}))


# -------------------------------------------------------------------------------------------- report


def num(value: Any, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def gib(value: Any) -> str:
    return "-" if not value else f"{value / 2**30:.2f} GiB"


def gpu_slug(records: list[dict]) -> str:
    for r in records:
        name = (r.get("figures") or {}).get("gpu_name")
        if name:
            return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
        name = out.stdout.strip().splitlines()[0]
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    except Exception:
        return "unknown-gpu"


def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['gpu']} ({report['date']})", "",
             f"`{report['command']}`: {report['wall_s']:.0f} s of {report['total_box_s']:g} s in time boxes "
             f"(limit {TOTAL_LIMIT_S} s).", "",
             "| part | status | wall s | box s | checks passed |", "|---|---|---:|---:|---|"]  # fmt: skip
    for r in report["parts"]:
        passed = sum(c["ok"] for c in r.get("checks", []))
        wall, box, n = r.get("wall_s", 0), r.get("box_s"), len(r.get("checks", []))
        lines.append(f"| {r['name']} | {r['status']} | {wall:.0f} | {box:g} | {passed}/{n} |")
    for r in report["parts"]:
        lines += ["", f"## {r['name']}: {r.get('title', '')}", "", f"Status **{r['status']}**.", ""]
        lines += [f"- {'✓' if c['ok'] else '✗'} {c['name']}" + (f": {first_line(c['detail'])}" if c["detail"] else "")
                  for c in r.get("checks", [])]  # fmt: skip
        table = (r.get("figures") or {}).get("table")
        if table:
            lines += ["", "| " + " | ".join(table["columns"]) + " |", "|" + "---|" * len(table["columns"])]
            lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in table["rows"]]
        failures = [(n, c) for n, c in r.get("commands", {}).items() if not c["ok"]]
        if r.get("error"):
            failures.append(("part", {"error": r["error"].get("traceback") or r["error"].get("message")}))
        for name, c in failures:
            lines += ["", f"`{name}` failed:", "", "```", (c.get("error") or "")[-1500:].strip(), "```"]
    return "\n".join(lines) + "\n"


def first_line(text: str) -> str:
    text = str(text).strip()
    return text.splitlines()[0][:200] if text else ""


def write_report(out_dir: Path, report: dict) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{report['date']}-gpu-check-{report['gpu']}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    md_path.write_text(markdown(report))
    return json_path, md_path


# ---------------------------------------------------------------------------------------------- main


def selected_parts(spec: str | None) -> list[Part]:
    if not spec:
        return list(PARTS)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in PART_NAMES]
    if unknown:
        raise SystemExit(f"unknown part(s) {', '.join(unknown)}; parts: {', '.join(PART_NAMES)}")
    return [p for p in PARTS if p.name in names]


def plan(parts: list[Part], work: Path, scale: float) -> dict:
    """What a run would do: each part's commands, time box and estimate, and the totals."""
    out = []
    for p in parts:
        cmds = [
            {**asdict(c), "limit_s": c.limit_s and c.limit_s * scale, "shell": shlex.join(c.argv)}
            for c in p.commands(work / p.name)
        ]
        out.append({"name": p.name, "title": p.title, "box_s": p.box_s * scale, "estimate_s": p.estimate_s * scale,
                    "basis": p.basis, "commands": cmds})  # fmt: skip
    total = sum(p["box_s"] for p in out)
    return {"parts": out, "total_box_s": total, "total_estimate_s": sum(p["estimate_s"] for p in out),
            "limit_s": TOTAL_LIMIT_S, "within_limit": total <= TOTAL_LIMIT_S, "assumed": ASSUMED,
            "reference_script": str(reference_script())}  # fmt: skip


def print_plan(p: dict) -> None:
    for part in p["parts"]:
        box, estimate = part["box_s"], part["estimate_s"]
        print(f"[{part['name']}] {part['title']}: box {box:g} s (estimate {estimate:g} s: {part['basis']})")
        for c in part["commands"]:
            together = f", with group {c['group']}" if c["group"] else ""
            limit = f", limit {c['limit_s']:g} s" if c["limit_s"] else ""
            print(f"    {c['name']}{together}{limit}: {c['shell']}")
    verdict = "within" if p["within_limit"] else "OVER"
    total, estimate = p["total_box_s"], p["total_estimate_s"]
    print(f"total: {total:g} s in time boxes (estimate {estimate:g} s), limit {p['limit_s']} s: {verdict}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_part"]:
        run_part_here(argv[1], Path(argv[2]), Path(argv[3]), float(argv[4]), float(argv[5]))
        return 0
    if argv[:1] == ["_probe"]:
        print(json.dumps(probe(), default=str))
        return 0
    if argv[:1] == ["_reference"]:
        reference_run(Path(argv[1]), argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    ap.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")
    ap.add_argument("--parts", help=f"comma-separated subset of: {', '.join(PART_NAMES)}")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "docs" / "benchmarks")
    ap.add_argument("--work", type=Path, help="scratch directory (default: a new one under /tmp)")
    ap.add_argument("--box-scale", type=float, default=1.0, help="multiply every time box (slower cards)")
    args = ap.parse_args(argv)
    parts = selected_parts(args.parts)
    work = args.work or Path(f"/tmp/lorafit-gpu-check-{time.strftime('%Y%m%d-%H%M%S')}")
    the_plan = plan(parts, work, args.box_scale)
    if args.dry_run:
        print(json.dumps(the_plan, indent=1)) if args.json else print_plan(the_plan)
        return 0
    return run_all(parts, work, args)


def run_all(parts: list[Part], work: Path, args: argparse.Namespace) -> int:
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    report: dict[str, Any] = {
        "schema": SCHEMA, "date": time.strftime("%Y-%m-%d"), "gpu": "unknown-gpu",
        "command": shlex.join(["python", "bench/gpu_check.py", *sys.argv[1:]]), "work": str(work),
        "total_box_s": sum(p.box_s for p in parts) * args.box_scale, "limit_s": TOTAL_LIMIT_S, "assumed": ASSUMED,
        "parts": [],
    }  # fmt: skip
    paths = None
    for part in parts:
        print(f"[{part.name}] {part.title} (box {part.box_s * args.box_scale:g} s)", flush=True)
        record = run_part(part, work, args.box_scale)
        report["parts"].append(record)
        report["gpu"] = gpu_slug(report["parts"])
        report["wall_s"] = time.monotonic() - started
        if paths and paths[0].name != f"{report['date']}-gpu-check-{report['gpu']}.json":
            for old in paths:
                old.unlink(missing_ok=True)
        paths = write_report(args.out_dir, report)
        failed = [c["name"] for c in record.get("checks", []) if not c["ok"]]
        print(
            f"[{part.name}] {record['status']} in {record['wall_s']:.0f} s" + (f"; failed: {failed}" if failed else ""),
            flush=True,
        )
    print(f"wrote {paths[0]} and {paths[1]}" if paths else "no parts ran")
    return 0 if all(r["status"] == "ok" for r in report["parts"]) else 1


if __name__ == "__main__":
    sys.exit(main())
