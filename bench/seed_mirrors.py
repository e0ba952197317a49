"""The three reference studies' memory and size tables as lorafit computes them offline, beside the
studies' own figures, with a line for each figure that cannot be right and the arithmetic why.

    .venv/bin/python bench/seed_mirrors.py                                      # JSON on stdout
    .venv/bin/python bench/seed_mirrors.py --md docs/benchmarks/seed-mirrors.md # and the page

Nothing trains and no GPU is needed: every figure is lorafit's estimator (`lorafit.measurement.estimate`,
the Python API behind `lorafit estimate --json`, for a CUDA device whose context is assumed, 512 MiB)
or an analytic count (parameters, `lorafit.measurement.flops.training_flops`). The studies
(../shared/reference/):

- rtx4060: "Profiling LoRA/QLoRA Fine-Tuning Efficiency on Consumer GPUs: An RTX 4060 Case Study"
  (arXiv 2509.12229): Qwen2.5-1.5B-Instruct, 8 GB, batch x length x optimizer x precision;
- guide: "LoRA vs. QLoRA: Production Fine-Tuning LLMs on a Single GPU": Llama-3-8B on an RTX 4090;
- qlora_report: "QLoRA Fine-Tuning of LLaMA Models: A Comprehensive Performance Analysis": TinyLlama-1.1B.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from lorafit.base.config import TrainConfig
from lorafit.base.units import GiB, MiB, format_budget, format_bytes, parse_bytes
from lorafit.measurement import estimate as est
from lorafit.measurement.flops import GPU_PEAKS, training_flops
from lorafit.measurement.plan import model_shape

ROOT = Path(__file__).resolve().parents[1]
RTX4060_SWEEP = ROOT / "examples" / "sweeps" / "rtx4060-qwen2.5-1.5b.yaml"
CONTEXT = est.GPU_CONTEXT_ASSUMED  # fixed, so the page is the same on a machine with or without a GPU
ACCURACY_DOC = "2026-12-02-cpu-estimate-accuracy.md"


def peak(cfg: TrainConfig, config: dict[str, Any]) -> est.Estimate:
    """The estimator's device peak of `cfg` on a CUDA GPU (allocator peak + the assumed context)."""
    return est.estimate(cfg, "cuda", config, CONTEXT)


def max_batch(cfg: TrainConfig, config: dict[str, Any], budget: int, limit: int = 4096) -> int | None:
    """Largest batch whose estimate fits `budget` (est.largest_fitting: doubling, then bisection)."""

    def fits(b: int) -> bool:
        return peak(dataclasses.replace(cfg, batch_size=b), config).total <= budget

    return est.largest_fitting(fits, 1, 1, limit)


def total_params(arch: est.Arch) -> int:
    """Every parameter of the model, as lorafit counts them: full fine-tuning's trainable set."""
    return est.trainable_params(arch, TrainConfig(method="full"))


# ---------------------------------------------------------------- the RTX 4060 study: what fits in 8 GB

RTX4060_STUDY = {  # what the reference reports (its abstract and key results)
    "model": "Qwen2.5-1.5B-Instruct",
    "gpu": "RTX 4060 (8 GB)",
    "longest_feasible_length": 2048,  # "sequence lengths up to 2048 tokens were feasible"
    "tokens_per_s": {"baseline": 500, "paged": 628},  # AdamW fp16 vs PagedAdamW fp16 (Run 2)
    "joules_per_token": {"most efficient": 0.15, "bf16": 0.32},
    "board_power_w": 95,
}


def rtx4060_grid(path: Path = RTX4060_SWEEP) -> dict[str, Any]:
    """The study's grid as the example sweep runs it (the reference names the axes, not their values)."""
    spec = yaml.safe_load(path.read_text())
    return {"base": spec["base"], "grid": spec["grid"], "budget": spec["memory_budget"], "file": path.name}


def rtx4060_cell(base: dict[str, Any], config: dict[str, Any], budget: int, **point: Any) -> dict[str, Any]:
    """One cell (`point`: method, optimizer, precision, max_length, batch_size): the estimator's peak as
    configured (no checkpointing, Hugging Face Trainer's default) and with full gradient checkpointing."""
    cfg = TrainConfig(model=base["model"], lora_r=base.get("lora_r", 16), gradient_checkpointing=False, **point)
    plain = peak(cfg, config)
    checkpointed = peak(dataclasses.replace(cfg, gradient_checkpointing=True), config)
    return {
        **point,
        "peak_bytes": plain.total,
        "fits": plain.total <= budget,
        "parts": plain.parts,
        "peak_checkpointed_bytes": checkpointed.total,
        "fits_checkpointed": checkpointed.total <= budget,
        "trainable_params": plain.trainable_params,
    }


def rtx4060(path: Path = RTX4060_SWEEP) -> dict[str, Any]:
    """Every cell of method x optimizer x precision x length x batch under the sweep's 8 GB budget."""
    grid = rtx4060_grid(path)
    base, axes = grid["base"], grid["grid"]
    config = est.model_config(base["model"])
    budget = parse_bytes(grid["budget"], "memory_budget")
    cells = []
    for method in axes["method"]:
        for optimizer in axes["optimizer"]:
            for precision in axes["precision"]:
                for length in axes["max_length"]:
                    for b in axes["batch_size"]:
                        point = {"method": method, "optimizer": optimizer, "precision": precision}
                        cells.append(rtx4060_cell(base, config, budget, **point, max_length=length, batch_size=b))
    rtx = GPU_PEAKS["RTX 4060"]
    return {
        "grid_file": f"examples/sweeps/{grid['file']}",
        "base": base,
        "axes": axes,
        "budget": grid["budget"],
        "budget_bytes": budget,
        "card_bytes": 8 * GiB,
        "total_params": total_params(est.arch_from_config(config)),
        "cells": cells,
        "study": RTX4060_STUDY,
        "peak_flops": {"fp16": rtx.fp16, "bf16": rtx.bf16},
    }


# ---------------------------------------------------------------- the guide: RTX 4090, Llama-3-8B

GUIDE_STUDY = {  # the guide's table (Section 4), as printed
    "lora": {"base_memory": "16.5GB", "max_batch": 1, "peak": "23.8GB", "peak_batch": 1, "trainable": 33.5e6},
    "qlora": {"base_memory": "5.5GB", "max_batch": 4, "peak": "15.2GB", "peak_batch": 4, "trainable": 33.5e6},
    "trainable_pct": 0.42,
}


def guide_config(method: str, batch: int = 1, checkpointing: bool = False, fused: bool = True) -> TrainConfig:
    """The guide's script: r=64, alpha 16, dropout 0.1 on all seven projections, paged_adamw_32bit,
    bf16, max_seq_length 1024 (its TrainingArguments leave gradient checkpointing off)."""
    return TrainConfig(
        model="random:llama-3-8b",
        method=method,
        lora_r=64,
        lora_alpha=16,
        lora_dropout=0.1,
        optimizer="paged_adamw",
        precision="bf16",
        max_length=1024,
        batch_size=batch,
        gradient_checkpointing=checkpointing,
        fused_lora=fused,
    )


def guide_row(method: str, config: dict[str, Any], budgets: dict[str, int], total: int) -> dict[str, Any]:
    """Base memory, largest batches, peaks at the guide's batch and trainable parameters of one method."""
    arch = est.arch_from_config(config)
    cfg = guide_config(method)
    b = GUIDE_STUDY[method]["peak_batch"]
    trainable = est.trainable_params(arch, cfg)
    plain = peak(guide_config(method, b), config)
    largest = {
        name: {
            "plain": max_batch(cfg, config, n),
            "checkpointed": max_batch(guide_config(method, 1, True), config, n),
        }
        for name, n in budgets.items()
    }
    return {
        "weights_bytes": est.weights_bytes(arch, cfg, "bf16"),
        "max_batch": largest,
        "peak_batch": b,
        "peak_bytes": plain.total,
        "peak_parts": plain.parts,
        "peak_unfused_bytes": peak(guide_config(method, b, fused=False), config).total,
        "peak_checkpointed_bytes": peak(guide_config(method, b, True), config).total,
        "trainable_params": trainable,
        "trainable_pct_of_base": 100 * trainable / total,
        "trainable_pct_peft": 100 * trainable / (total + trainable),  # peft's print_trainable_parameters
        "study": GUIDE_STUDY[method],
    }


def guide() -> dict[str, Any]:
    """Base memory, the largest batch at 1024 under 24 GB (and the card's 24 GiB), peaks, trainable."""
    config = est.model_config("random:llama-3-8b")
    arch = est.arch_from_config(config)
    total = total_params(arch)
    budgets = {"24GB": parse_bytes("24GB", "budget"), "24GiB": 24 * GiB}
    # what 33.5M counts: r=64 on q_proj and v_proj where v is as wide as q (no grouped-query attention:
    # Llama-2-7B's shapes), against the same two projections of Llama-3-8B
    no_gqa = est.arch_from_config({**config, "num_key_value_heads": config["num_attention_heads"]})
    qv = dataclasses.replace(guide_config("lora"), target_modules=["q_proj", "v_proj"])
    quantized = arch.layers * sum(i * o for _, i, o in arch.linears())
    nf4 = {dq: est.weights_bytes(arch, TrainConfig(method="qlora", double_quant=dq), "bf16") for dq in (False, True)}
    return {
        "total_params": total,
        "budgets": budgets,
        "context_bytes": CONTEXT,
        "rows": {m: guide_row(m, config, budgets, total) for m in ("lora", "qlora")},
        "study_trainable_pct": GUIDE_STUDY["trainable_pct"],
        "qv_no_gqa_r64": est.trainable_params(no_gqa, qv),
        "qv_llama3_r64": est.trainable_params(arch, qv),
        "fp16_weights_bytes": est.weights_bytes(arch, TrainConfig(method="lora"), "fp16"),
        "fp32_weights_bytes": total * 4,
        "double_quant_bits_saved": 8 * (nf4[False] - nf4[True]) / quantized,
    }


# ---------------------------------------------------------------- the QLoRA report: TinyLlama-1.1B

REPORT = {  # Tables 1-3 and 5-9 as printed ("MB" there is MiB: 1,100,048,384 x 2 B / 2^20 = 2,098.18)
    "total_params": 1_100_048_384,
    "trainable": 12_615_680,
    "trainable_pct": 1.15,
    "vocab_size": 32_000,
    "fp16_mb": 2098.18,
    "base_4bit_mb": 524.54,
    "adapter_mb": 24.06,
    "qlora_total_mb": 548.61,
    "compression": 3.82,
    "reduction_pct": 73.9,
    "arch": {"hidden_size": 768, "num_hidden_layers": 22, "num_attention_heads": 12, "intermediate_size": 3072},
    "flops_per_step": {"full": 13.52e12, "qlora": 3.53e12},
    "time_per_step_s": {"full": 2.88, "qlora": 3.96},
    "achieved_tflops": {"full": 4.69, "qlora": 0.89},
    "mfu_pct": {"full": 13.18, "qlora": 2.51},
}
T4_MEMORY = 15360 * MiB  # a Colab T4 as nvidia-smi shows it (16 GB on the data sheet, less ECC)
T4_TEXT = "15 GiB (15,360 MiB as Colab shows it; 16 GB on the data sheet)"


def report_configs() -> dict[str, TrainConfig]:
    """Table 3 (per method) and Table 4 (QLoRA): rows of at most 512 tokens (Table 1), fp16."""
    common = {"model": "random:tinyllama-1.1b", "max_length": 512, "precision": "fp16", "gradient_checkpointing": False}
    full = TrainConfig(method="full", batch_size=2, grad_accum=4, optimizer="adamw", learning_rate=2e-5, **common)
    qlora = TrainConfig(
        method="qlora",
        batch_size=4,
        grad_accum=2,
        optimizer="paged_adamw_8bit",
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        double_quant=True,
        **common,
    )
    return {"full": full, "qlora": qlora}


def step_flops(arch: est.Arch, cfg: TrainConfig, rows: int) -> float:
    """Model FLOPs of `rows` rows of max_length real tokens, every token but the last carrying loss."""
    lengths = [cfg.max_length] * rows
    return training_flops(model_shape(arch, cfg), cfg.method == "full", lengths, rows * (cfg.max_length - 1))


def qlora_report() -> dict[str, Any]:
    """Tables 2 and 5-8 as lorafit counts them: shapes, parameters, sizes, training peaks, FLOPs, MFU."""
    config = est.model_config("random:tinyllama-1.1b")
    arch = est.arch_from_config(config)
    cfgs = report_configs()
    total = total_params(arch)
    trainable = est.trainable_params(arch, cfgs["qlora"])
    # as deployed: NF4 linears with their constants, embeddings/head/norms 16-bit as bitsandbytes leaves them
    base_4bit = est.weights_bytes(arch, dataclasses.replace(cfgs["qlora"], fp32_unquantized=False), "fp16")
    flops = {
        m: {
            "optimizer_step": step_flops(arch, c, c.batch_size * c.grad_accum),
            "micro_batch": step_flops(arch, c, c.batch_size),
        }
        for m, c in cfgs.items()
    }
    widths = {**REPORT["arch"], "num_key_value_heads": REPORT["arch"]["num_attention_heads"], "head_dim": 64}
    estimates = {m: peak(c, config) for m, c in cfgs.items()}
    return {
        "arch": {k: config[k] for k in REPORT["arch"]},
        "table2_arch_params": total_params(est.arch_from_config({**config, **widths})),
        "vocab_size": config["vocab_size"],
        "total_params": total,
        "trainable_params": trainable,
        "trainable_pct": 100 * trainable / total,
        "fp16_bytes": total * 2,
        "base_4bit_bytes": base_4bit,
        "adapter_fp32_bytes": trainable * 4,  # lorafit (as peft) keeps and saves LoRA matrices in fp32
        "adapter_fp16_bytes": trainable * 2,
        "peak_bytes": {m: e.total for m, e in estimates.items()},
        "peak_parts": {m: e.parts for m, e in estimates.items()},
        "t4_memory_bytes": T4_MEMORY,
        "flops": flops,
        "report_flops_tokens": REPORT["flops_per_step"]["full"] / (6 * total),
        "t4_peak_flops": GPU_PEAKS["T4"].fp16,
        "achieved_flops": {m: flops[m]["optimizer_step"] / REPORT["time_per_step_s"][m] for m in cfgs},
        "report": REPORT,
    }


# ---------------------------------------------------------------- all three, and the page


def provenance() -> dict[str, str]:
    """The code the figures came from (JSON only: the page leaves it out, so a re-run that gives the same
    figures leaves the page unchanged)."""
    try:
        head = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
        commit = head.stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    return {"commit": commit, "python": sys.version.split()[0]}


def compute() -> dict[str, Any]:
    return {"rtx4060": rtx4060(), "guide": guide(), "qlora_report": qlora_report(), "provenance": provenance()}


def gib(n: float) -> str:
    return format_bytes(n, "GiB")


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def mib(n: float) -> str:
    return f"{n / MiB:,.2f} MiB"


def both(n: float) -> str:
    return f"{gb(n)} ({gib(n)})"


def mark(fits: bool) -> str:
    return "✓" if fits else "✗"


def cell_name(c: dict[str, Any]) -> str:
    return f"{c['method']} {c['optimizer']} {c['precision']} {c['batch_size']}×{c['max_length']}"


def rtx4060_md(r: dict[str, Any]) -> list[str]:
    axes = r["axes"]
    by = {(c["method"], c["optimizer"], c["precision"], c["max_length"], c["batch_size"]): c for c in r["cells"]}
    longest = r["study"]["longest_feasible_length"]
    out = [
        "## 1. RTX 4060 study: what fits in 8 GB (Qwen2.5-1.5B)",
        "",
        "Grid: the study's axes (method, batch, sequence length, optimizer, precision) with the values of "
        f"[`{r['grid_file']}`](../../{r['grid_file']}), the sweep that reproduces the study on a GPU (the reference "
        'names the axes and "up to 2048 tokens", not the batch sizes or the LoRA rank; rank '
        f"{r['base'].get('lora_r', 16)}, all seven projections). Model `{r['base']['model']}` "
        f"({r['total_params']:,} parameters). Budget {format_budget(r['budget'])}, the sweep's `memory_budget`; "
        "the card itself has 8 GiB. Every row holds `max_length` real tokens (the estimator's worst case).",
        "",
        "Each cell: the estimator's peak in GiB as configured (no gradient checkpointing) / with full gradient "
        'checkpointing; ✓ fits the budget, ✗ does not. The study reports one memory result: "sequence lengths up '
        'to 2048 tokens were feasible" within 8 GB (method, batch and checkpointing not given).',
        "",
    ]
    for m in axes["method"]:
        for o in axes["optimizer"]:
            for p in axes["precision"]:
                out += [f"**{m}, {o}, {p}**", ""]
                out += ["| length | " + " | ".join(f"batch {b}" for b in axes["batch_size"]) + " | study |"]
                out += ["|---|" + "---|" * (len(axes["batch_size"]) + 1)]
                for length in axes["max_length"]:
                    row = [by[(m, o, p, length, b)] for b in axes["batch_size"]]
                    text = [
                        f"{c['peak_bytes'] / GiB:.2f} {mark(c['fits'])} / "
                        f"{c['peak_checkpointed_bytes'] / GiB:.2f} {mark(c['fits_checkpointed'])}"
                        for c in row
                    ]
                    study = "feasible (batch not given)" if length == longest else ""
                    out.append(f"| {length} | " + " | ".join(text) + f" | {study} |")
                out.append("")
    return out + rtx4060_against(r) + rtx4060_wrong(r)


def rtx4060_against(r: dict[str, Any]) -> list[str]:
    """The study's one memory result (2048 tokens fit) against the grid, and the cells near the line."""
    longest = r["study"]["longest_feasible_length"]
    at = [c for c in r["cells"] if c["max_length"] == longest and c["batch_size"] == 1]
    fit = [f"{c['method']} {c['optimizer']} {c['precision']}" for c in at if c["fits"]]
    miss = [f"{c['method']} {c['optimizer']} {c['precision']} ({gib(c['peak_bytes'])})" for c in at if not c["fits"]]
    every = "every" if all(c["fits_checkpointed"] for c in at) else "not every"
    borderline = [c for c in r["cells"] if r["budget_bytes"] < c["peak_bytes"] <= r["card_bytes"]]
    return [
        "### Against the study",
        "",
        f"- **{longest} tokens in 8 GB** (the study: feasible). At batch 1 × {longest} without checkpointing the "
        f"estimator fits {', '.join(fit) or 'none'}; over the budget: {', '.join(miss) or 'none'}. With full "
        f"checkpointing {every} method/optimizer/precision fits at batch 1 × {longest}. The study's claim holds as "
        "configured only for QLoRA in bf16; for the rest it needs gradient checkpointing (or rows shorter than "
        f"{longest} tokens), which the reference does not mention.",
        f"- **Between the 8 GB budget and the card's 8 GiB**: {len(borderline)} cells "
        f"({', '.join(map(cell_name, borderline)) or 'none'}); they would fit the card with no margin, not the budget.",
        "",
    ]


def rtx4060_wrong(r: dict[str, Any]) -> list[str]:
    """The reference's explanations that its own configuration contradicts, with lorafit's figures."""
    cells, study = r["cells"], r["study"]
    key = ("method", "optimizer", "max_length", "batch_size")
    by_precision: dict[tuple[Any, ...], dict[str, int]] = {}
    for c in cells:
        by_precision.setdefault(tuple(c[k] for k in key), {})[c["precision"]] = c["peak_bytes"]
    lora_same = all(v["fp16"] == v["bf16"] for k, v in by_precision.items() if k[0] == "lora")
    qlora_more = min(v["fp16"] - v["bf16"] for k, v in by_precision.items() if k[0] == "qlora")
    adamw = next(c for c in cells if c["method"] == "lora" and c["optimizer"] == "adamw")
    state = adamw["parts"]["optimizer_state"]
    base, paged = study["tokens_per_s"]["baseline"], study["tokens_per_s"]["paged"]
    watts = study["board_power_w"]
    fp16, bf16 = r["peak_flops"]["fp16"], r["peak_flops"]["bf16"]
    return [
        "### Where the study's explanations cannot be right",
        "",
        '- *"bf16 operations require more computational resources and memory bandwidth compared to fp16"* (the '
        "reference's explanation of its bf16 result): both are 2-byte formats. LoRA's estimated peak is "
        f"{'identical' if lora_same else 'NOT identical'} in fp16 and bf16 in every cell of the grid, and the RTX "
        f"4060's dense tensor peak is the same for both in lorafit's table ({fp16 / 1e12:.1f} and "
        f"{bf16 / 1e12:.1f} TFLOP/s: 24 SMs × 2,460 MHz × 512 FLOP/clk/SM). Where lorafit's figures differ, it is "
        "the other way: QLoRA in fp16 keeps the unquantized weights and the residual stream in fp32 (as peft's "
        f"`prepare_model_for_kbit_training`), at least {gib(qlora_more)} more than bf16. A bf16 slowdown (the "
        "study's 0.32 J/token) has to come from elsewhere (kernels, the run's other settings).",
        '- *PagedAdamW\'s "ability to handle memory allocation more efficiently than standard AdamW"* as the '
        "cause of "
        f"+{100 * (paged / base - 1):.1f}% throughput ({paged} vs {base} tokens/s): what a paged AdamW moves out of "
        f"the allocator here is the LoRA moments, {mib(state)} ({adamw['trainable_params']:,} trainable × 2 moments "
        f"× 4 B), {100 * state / r['budget_bytes']:.1f}% of the budget. Paging that little cannot change what fits, "
        "and it adds host transfers: a 25% speed-up is not its memory effect. (Throughput itself needs the GPU run.)",
        f"- Arithmetic that holds: {watts} W / {paged} tokens/s = {watts / paged:.3f} J/token (the study: 0.15); "
        f"0.32 J/token at {watts} W is {watts / 0.32:.0f} tokens/s for bf16; {paged} / {base} = "
        f'{paged / base:.3f} ("up to 25%").',
        "",
    ]


def guide_md(g: dict[str, Any]) -> list[str]:
    lo, q = g["rows"]["lora"], g["rows"]["qlora"]
    ctx = g["context_bytes"]

    def batch(r: dict[str, Any], kind: str) -> str:
        a, b = r["max_batch"]["24GB"][kind], r["max_batch"]["24GiB"][kind]
        return f"{a}" if a == b else f"{a} ({b} under 24 GiB)"

    def pct(r: dict[str, Any]) -> str:
        share = f"{r['trainable_pct_of_base']:.2f}% of the base; peft prints {r['trainable_pct_peft']:.2f}%"
        return f"{r['trainable_params'] / 1e6:.1f}M ({share})"

    def base(r: dict[str, Any]) -> str:
        return f"{both(r['weights_bytes'])}; with the CUDA context {gb(r['weights_bytes'] + ctx)}"

    def row(name: str, study: str, f: Any) -> str:
        s = {m: GUIDE_STUDY[m][study] if study else "—" for m in ("lora", "qlora")}
        if study in ("base_memory", "peak"):  # the guide's memory figures are approximate ("~16.5 GB")
            s = {m: f"~{v}" for m, v in s.items()}
        return f"| {name} | {s['lora']} | {f(lo)} | {s['qlora']} | {f(q)} |"

    pct_study = f"~33.5M ({g['study_trainable_pct']}%)"
    return [
        "## 2. LoRA-vs-QLoRA guide: the RTX 4090 table's memory half (Llama-3-8B)",
        "",
        f"`random:llama-3-8b` ({g['total_params']:,} parameters) as the guide's script configures it: r=64, alpha 16, "
        "dropout 0.1 on all seven projections, `paged_adamw_32bit` (`--optimizer paged_adamw`), bf16, sequence "
        "length 1024, no gradient checkpointing (its `TrainingArguments` leave it off). The guide's figures are in "
        "GB; lorafit's in GB (10⁹) and GiB. Budget: 24 GB (the guide's figure), and the card's 24 GiB where the "
        "answer differs. Paged optimizer state is outside the allocator's peak (CUDA unified memory).",
        "",
        "| metric | guide LoRA (bf16) | lorafit LoRA | guide QLoRA (nf4) | lorafit QLoRA |",
        "|---|---|---|---|---|",
        row("base model memory", "base_memory", base),
        row("max batch at 1024", "max_batch", lambda r: batch(r, "plain")),
        row("max batch at 1024, checkpointed", "", lambda r: batch(r, "checkpointed")),
        row("peak at the guide's batch (LoRA 1, QLoRA 4)", "peak", lambda r: both(r["peak_bytes"])),
        row("same, peft's own LoRA forward (`--no-fused-lora`)", "", lambda r: gb(r["peak_unfused_bytes"])),
        row("same, full gradient checkpointing", "", lambda r: gb(r["peak_checkpointed_bytes"])),
        f"| trainable parameters | {pct_study} | {pct(lo)} | {pct_study} | {pct(q)} |",
        "",
        "### Where the guide's figures cannot be right",
        "",
        f"- **Trainable parameters, 33.5M (0.42%)**: r=64 on all seven projections of Llama-3-8B is "
        f"{lo['trainable_params']:,} = 32 layers × 64 × (q 4096+4096, k 4096+1024, v 4096+1024, o 4096+4096, "
        f"gate, up and down 4096+14336 each) = 32 × 64 × 81,920, {lo['trainable_params'] / 33.5e6:.1f}× the "
        "guide's figure. 33.5M is what r=64 on q_proj and v_proj gives where v is as wide as q (Llama-2-7B's "
        f"shapes, no grouped-query attention): {g['qv_no_gqa_r64']:,} = 32 × 2 × 64 × (4096 + 4096); on "
        f"Llama-3-8B, q_proj + v_proj at r=64 is {g['qv_llama3_r64']:,}. And 0.42% is 33.5M over Llama-3-8B's "
        f"{g['total_params'] / 1e9:.2f}B.",
        f'- **"Llama 3 8B ... would normally require ~32GB of VRAM in FP16"**: {g["total_params"]:,} parameters × '
        f"2 B = {both(g['fp16_weights_bytes'])} of weights (lorafit's count of the dense model); 32 GB is fp32 "
        f"({gb(g['fp32_weights_bytes'])}). The guide's own table says ~16.5 GB.",
        "- **QLoRA peak ~15.2 GB at batch 4 × 1024** with checkpointing off: the estimator puts 4 rows of 1024 real "
        f"tokens at {gb(q['peak_bytes'])} (activations alone {gb(q['peak_parts']['activations_workspace'])}), over "
        f"the 24 GB card; with full checkpointing {gb(q['peak_checkpointed_bytes'])}. 15.2 GB is neither: it is "
        "what rows well short of 1024 tokens give (guanaco-llama2-1k, padded per batch, not to 1024), so the "
        'table\'s "sequence length 1024" is a cap, not what the rows held. The same goes for the maximum batch of '
        f"4 (the estimator at full rows: {q['max_batch']['24GB']['plain']}; {q['max_batch']['24GiB']['plain']} under "
        "24 GiB).",
        '- **Double quantization saves "about 0.4-0.5 bits per parameter"**: lorafit\'s NF4 layout (blocks of 64 '
        "with an fp32 absmax, double-quantized to an 8-bit absmax plus an fp32 constant per 256 blocks) saves "
        f"{g['double_quant_bits_saved']:.3f} bits per quantized parameter (32/64 - 8/64 - 32/(64·256); the QLoRA "
        f'paper\'s 0.373): {65e9 * g["double_quant_bits_saved"] / 8 / 1e9:.2f} GB on 65B parameters. "Over 3 GB" '
        "holds; the per-parameter range does not.",
        f"- Agrees: the bases' ~16.5 and ~5.5 GB (the estimator with the CUDA context: {gb(lo['weights_bytes'] + ctx)} "
        f"and {gb(q['weights_bytes'] + ctx)}); LoRA's maximum batch of 1; LoRA's ~23.8 GB at batch 1 in number "
        f"(lorafit's fused path: {gb(lo['peak_bytes'])}), though peft's own forward, which the guide ran, keeps a "
        f"dropout copy of each projection's input: {gb(lo['peak_unfused_bytes'])} at full 1024-token rows, so the "
        "guide's rows were short there too.",
        "",
    ]


def report_table(q: dict[str, Any]) -> list[str]:
    rep, flops, arch = q["report"], q["flops"], q["arch"]
    deployed = q["base_4bit_bytes"] + q["adapter_fp32_bytes"]
    deployed16 = q["base_4bit_bytes"] + q["adapter_fp16_bytes"]
    t4 = q["t4_peak_flops"]
    shapes = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    over = "over" if q["peak_bytes"]["full"] > q["t4_memory_bytes"] else "within"

    def tera(n: float) -> str:
        return f"{n / 1e12:.2f} T"

    def step(m: str) -> str:
        return f"{tera(flops[m]['optimizer_step'])} (micro-batch: {tera(flops[m]['micro_batch'])})"

    achieved = " / ".join(f"{q['achieved_flops'][m] / 1e12:.2f}" for m in ("full", "qlora"))
    mfu = " / ".join(f"{100 * q['achieved_flops'][m] / t4:.1f}%" for m in ("full", "qlora"))
    return [
        "| table: figure | report | lorafit |",
        "|---|---|---|",
        "| 2: hidden / layers / heads / intermediate | "
        + " / ".join(str(rep["arch"][k]) for k in shapes)
        + " | "
        + " / ".join(str(arch[k]) for k in shapes)
        + " |",
        f"| 1: vocabulary | {rep['vocab_size']:,} | {q['vocab_size']:,} |",
        f"| 6, 12: total parameters | {rep['total_params']:,} | {q['total_params']:,} |",
        f"| 6: QLoRA trainable parameters | {rep['trainable']:,} ({rep['trainable_pct']}%) | "
        f"{q['trainable_params']:,} ({q['trainable_pct']:.2f}%) |",
        f"| 5: standard model, fp16 | {rep['fp16_mb']:,} MB | {mib(q['fp16_bytes'])} |",
        f"| 5: QLoRA base, 4-bit | {rep['base_4bit_mb']} MB | {mib(q['base_4bit_bytes'])} (NF4 + constants; "
        "embeddings, head, norms 16-bit) |",
        f"| 5: LoRA adapters | {rep['adapter_mb']} MB | {mib(q['adapter_fp32_bytes'])} in fp32, as trained and "
        f"saved; {mib(q['adapter_fp16_bytes'])} in fp16 |",
        f"| 5: QLoRA total | {rep['qlora_total_mb']} MB | {mib(deployed)} (fp16 adapter: {mib(deployed16)}) |",
        f"| 5, 12: compression | {rep['compression']}× ({rep['reduction_pct']}% smaller) | "
        f"{q['fp16_bytes'] / deployed:.2f}× ({100 * (1 - deployed / q['fp16_bytes']):.1f}% smaller) |",
        "| training peak, standard (estimator, T4) | — (Table 5 gives model sizes only) | "
        f"{gib(q['peak_bytes']['full'])}: {over} a T4's 15 GiB |",
        f"| training peak, QLoRA (estimator, T4) | — | {gib(q['peak_bytes']['qlora'])} |",
        f"| 7: FLOPs per optimizer step, standard | {tera(rep['flops_per_step']['full'])} | {step('full')} |",
        f"| 7: FLOPs per optimizer step, QLoRA | {tera(rep['flops_per_step']['qlora'])} | {step('qlora')} |",
        "| 8: achieved TFLOP/s, standard / QLoRA (FLOPs per step / the report's time per step) | "
        f"{rep['achieved_tflops']['full']} / {rep['achieved_tflops']['qlora']} | {achieved} |",
        f"| 8: MFU, standard / QLoRA | {rep['mfu_pct']['full']}% / {rep['mfu_pct']['qlora']}% | {mfu} of the T4's "
        f"{t4 / 1e12:.0f} TFLOP/s |",
        "",
    ]


def report_wrong(q: dict[str, Any]) -> list[str]:
    rep, flops, arch = q["report"], q["flops"], q["arch"]
    deployed = q["base_4bit_bytes"] + q["adapter_fp32_bytes"]
    full, qlora = flops["full"]["optimizer_step"], flops["qlora"]["optimizer_step"]
    six_n = 6 * rep["total_params"] * 2048
    mfu = {m: 100 * q["achieved_flops"][m] / q["t4_peak_flops"] for m in ("full", "qlora")}
    size_ratio = rep["qlora_total_mb"] / rep["fp16_mb"]
    implied_peak = rep["achieved_tflops"]["full"] / rep["mfu_pct"]["full"] * 100
    head_params = 2 * q["vocab_size"] * arch["hidden_size"]
    return [
        "### Where the report's figures cannot be right",
        "",
        "- **Table 7, QLoRA FLOPs 3.53 T**: it is the standard figure scaled by the size compression, "
        f"6 × {rep['total_params']:,} × 2,048 = {six_n / 1e12:.3f} T × {rep['qlora_total_mb']} / "
        f'{rep["fp16_mb"]:,} = {six_n * size_ratio / 1e12:.2f} T, hence the same "73.9% less" as the size. '
        "Storing weights in 4 bits removes no FLOPs: bitsandbytes dequantizes to fp16 and multiplies in fp16. A "
        "frozen base skips only the weight gradients: forward 2N + input gradients 2N + adapters 6·N_lora per "
        f"token, against full fine-tuning's 6N. Per optimizer step (8 rows × 512 tokens for both) lorafit counts "
        f"QLoRA at {100 * qlora / full:.0f}% of standard fine-tuning ({qlora / 1e12:.2f} vs {full / 1e12:.2f} T), "
        "not 26%.",
        f"- **Table 7, standard FLOPs 13.52 T** = 6 × {rep['total_params']:,} × "
        f"{q['report_flops_tokens']:,.0f} tokens: 6N per token over 2,048 tokens, which is neither standard "
        "fine-tuning's micro-batch in Table 3 (2 × 512 = 1,024) nor its optimizer step (8 × 512 = 4,096), but "
        "QLoRA's micro-batch (4 × 512); and it leaves out attention (12·L·d·T per token).",
        f"- **Table 8, MFU**: 4.69 / 13.18% and 0.89 / 2.51% both put the peak at {implied_peak:.1f} TFLOP/s, which "
        "is no T4 figure (65 TFLOP/s fp16 tensor, 8.1 fp32). With lorafit's FLOPs and the report's own step "
        f'times: {mfu["full"]:.1f}% and {mfu["qlora"]:.1f}% of 65 TFLOP/s. Table 12\'s "-10.67%" is percentage '
        f"points ({rep['mfu_pct']['full']} - {rep['mfu_pct']['qlora']}); relative to standard it is "
        f"{100 * (rep['mfu_pct']['qlora'] / rep['mfu_pct']['full'] - 1):.1f}%.",
        f"- **Table 5, 4-bit base 524.54 MB** = {rep['fp16_mb']:,} / 4 exactly: every parameter at 4 bits and no "
        "quantization constants. bitsandbytes quantizes only the decoder's linear layers; the embeddings and the "
        f"output layer ({head_params:,} parameters) stay 16-bit, and each block of 64 weights carries its "
        f"constant: {mib(q['base_4bit_bytes'])}. The adapter's 24.06 MB is {rep['trainable']:,} × 2 B (fp16); "
        f"LoRA matrices train and save in fp32: {mib(q['adapter_fp32_bytes'])}. As deployed the compression is "
        f"{q['fp16_bytes'] / deployed:.2f}×, not {rep['compression']}×.",
        "- **Table 2, the architecture**: 768 / 12 heads / 3,072 are BERT-base's and GPT-2-small's widths, not "
        f"TinyLlama's ({arch['hidden_size']} / {arch['num_attention_heads']} / {arch['intermediate_size']}). A "
        "Llama with Table 2's shapes (22 layers, SwiGLU, untied embeddings, vocabulary 32,000) has "
        f"{q['table2_arch_params']:,} parameters, not {rep['total_params']:,}.",
        "- **Table 3's standard fine-tuning on a T4**: AdamW with fp16 mixed precision keeps fp32 weights, fp32 "
        f"gradients and two fp32 moments, 16 B × {q['total_params']:,} = {gb(16 * q['total_params'])} before any "
        f"activation; the estimator's peak is {gib(q['peak_bytes']['full'])}, over a T4's {T4_TEXT}. It fits a T4 "
        "only with 16-bit weights and optimizer state (not mixed precision), which the report does not describe.",
        "- Agrees: total and trainable parameters (to the parameter), the vocabulary, the fp16 size, and the "
        "arithmetic of 3.82× and 73.9% from the report's own sizes.",
        "",
    ]


def report_md(q: dict[str, Any]) -> list[str]:
    rep = q["report"]
    return [
        "## 3. QLoRA report: Tables 2 and 5-8 (TinyLlama-1.1B)",
        "",
        "`random:tinyllama-1.1b` with Table 3's settings: standard fine-tuning batch 2 × 4 accumulation, AdamW; "
        "QLoRA batch 4 × 2, `paged_adamw_8bit`, r=16, alpha 32, dropout 0.05 on the seven projections, NF4 with "
        'double quantization; fp16, rows of 512 tokens (Table 1). The report\'s "MB" are MiB '
        f"({rep['total_params']:,} × 2 B / 2²⁰ = {rep['total_params'] * 2 / MiB:,.2f}).",
        "",
        *report_table(q),
        *report_wrong(q),
    ]


CLI_CELL = {"method": "qlora", "optimizer": "paged_adamw", "precision": "bf16", "max_length": 2048, "batch_size": 1}


def intro(r: dict[str, Any]) -> list[str]:
    cell = next(c for c in r["cells"] if all(c[k] == v for k, v in CLI_CELL.items()))
    verdict = f"{gib(cell['peak_bytes'])}, {'fits' if cell['fits'] else 'does not fit'}"
    return [
        "# The reference studies' tables, computed offline by lorafit",
        "",
        "The three studies of the project's reference set, mirrored with what lorafit computes without a GPU: the "
        "training-memory **estimator's figures** (`lorafit estimate`, `lorafit.measurement.estimate`) and analytic "
        "counts (parameters, sizes, `lorafit.measurement.flops.training_flops`). Nothing here trained. The "
        "estimator is measured within 10% of real peaks on CPU (17 points, largest error 4.8%: "
        f"[{ACCURACY_DOC}]({ACCURACY_DOC})); on a GPU its accuracy is not measured yet, and the CUDA context is an "
        f"assumption ({format_bytes(CONTEXT, digits=0)}). **The GPU reproduction is pending a GPU**: "
        "`lorafit sweep examples/sweeps/rtx4060-qwen2.5-1.5b.yaml` for section 1, and "
        "`bench/estimate_accuracy.py --device cuda --model random:qwen2.5-1.5b` for the estimator's GPU accuracy.",
        "",
        "Estimates describe lorafit's own training path (fused LoRA branch, chunked loss, SDPA) at rows of "
        "`max_length` real tokens: a Hugging Face Trainer run like the studies' keeps more (full logits, peft's "
        "dropout copies), and rows shorter than `max_length` need less.",
        "",
        "```bash",
        ".venv/bin/python bench/seed_mirrors.py --md docs/benchmarks/seed-mirrors.md > seed-mirrors.json",
        f"# one cell of section 1 through the CLI (the same figure as the script's: {verdict}):",
        ".venv/bin/lorafit estimate --model random:qwen2.5-1.5b --device cuda --method qlora --lora-r 16 \\",
        "    --optimizer paged_adamw --precision bf16 --batch-size 1 --max-length 2048 \\",
        "    --no-gradient-checkpointing --budget 8GB --json",
        "```",
        "",
    ]


def markdown(result: dict[str, Any]) -> str:
    body = rtx4060_md(result["rtx4060"]) + guide_md(result["guide"]) + report_md(result["qlora_report"])
    return "\n".join(intro(result["rtx4060"]) + body).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    summary = (__doc__ or "").split("\n\n")[0]
    parser = argparse.ArgumentParser(description=summary, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--md", type=Path, help="Also write the page (tables and findings) to this file.")
    args = parser.parse_args(argv)
    result = compute()
    print(json.dumps(result, indent=1))
    if args.md:
        args.md.write_text(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
