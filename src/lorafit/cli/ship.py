"""Commands that take a trained adapter to users: `merge`, `serve` and `bench-serve`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from lorafit.base.config import ServeConfig
from lorafit.base.errors import UserError
from lorafit.base.units import format_bytes
from lorafit.cli.console import stderr_console
from lorafit.cli.options import JsonOut, config_flags, given, print_json

console = stderr_console


def merge_command(
    source: Annotated[Path, typer.Argument(help="A run directory (LoRA/QLoRA) or a PEFT adapter directory.")],
    out: Annotated[Path, typer.Option(help="Directory for the merged model (must not exist, or be empty).")],
    dtype: Annotated[
        str, typer.Option(help="Saved dtype: auto (the base's), fp32, fp16 or bf16. The merge itself is fp32.")
    ] = "auto",
    check: Annotated[
        bool, typer.Option(help="Reload the saved model and compare it with adapter-on-base on fixed prompts.")
    ] = True,
    model: Annotated[str | None, typer.Option(help="Base model (default: the run's, or the adapter's).")] = None,
    json_out: JsonOut = False,
) -> None:
    """Merge a LoRA or QLoRA adapter into its base and save safetensors + tokenizer + config, loadable by
    plain transformers (AutoModelForCausalLM.from_pretrained). Writes merge.json with the check."""
    from lorafit.studies.merge import merge

    result = merge(source, out, dtype, check, model)
    console.print(
        f"merged {result['method']} adapter into {result['base_model']} -> {out} ({result['dtype']}); "
        f"on disk {format_bytes(result['disk_bytes_before'])} (base + adapter) -> "
        f"{format_bytes(result['disk_bytes_after'])}"
    )
    failed = False
    for key, what in (("check", "adapter on base"), ("vs_trained_4bit", "4-bit base + adapter (as trained)")):
        c = result.get(key)
        if c is None:
            continue
        console.print(
            f"vs {what}: greedy outputs equal on {c['greedy_equal_prompts']}/{c['prompts']} prompts "
            f"({c['new_tokens']} tokens), max |logit diff| {c['max_abs_logit_diff']:.3g}"
        )
        failed |= key == "check" and not c["greedy_equal"]
    if json_out:
        print_json(result)
    if failed:
        hint = "" if result["dtype"] == "fp32" else " (16-bit rounding can flip near-ties; --dtype fp32 is exact)"
        console.print(f"[bold red]merge check failed:[/] greedy outputs differ from adapter-on-base{hint}")
        raise typer.Exit(1)


def serve_config(flags: dict[str, Any]) -> ServeConfig:
    """The ServeConfig of `lorafit serve`'s flags (unset ones keep their defaults)."""
    from lorafit.base.config import coerce

    return ServeConfig(**{k: coerce(k, v, "command line", ServeConfig) for k, v in given(flags).items()})


@config_flags(ServeConfig)
def serve_command(**flags: Any) -> None:
    """Serve the base model and its LoRA adapters with an OpenAI-compatible API (completions, chat,
    streaming); requests for different adapters are batched into the same forward passes."""
    from lorafit.serving.server import serve

    serve(serve_config(flags))


def bench_serve_command(
    model: Annotated[str, typer.Option(help="Base model to serve.")] = "smollm2-135m",
    adapters: Annotated[int, typer.Option(help="Adapters the requests are spread over (round robin).")] = 8,
    adapters_dir: Annotated[
        Path | None, typer.Option(help="Directory of PEFT adapters (default: synthetic random adapters).")
    ] = None,
    requests: Annotated[int, typer.Option(help="Requests to send (after one warm-up).")] = 64,
    concurrency: Annotated[int, typer.Option(help="Requests in flight at once.")] = 8,
    prompt_words: Annotated[int, typer.Option(help="Prompt length in words.")] = 32,
    max_tokens: Annotated[int, typer.Option(help="Tokens generated per request (exactly: ignore_eos).")] = 32,
    baseline: Annotated[
        str | None, typer.Option(help="Also run this server mode on the same load: set-adapter.")
    ] = None,
    rank: Annotated[int, typer.Option(help="LoRA rank of the synthetic adapters.")] = 16,
    max_batch: Annotated[int, typer.Option(help="The batched server's --max-batch.")] = 16,
    quantize: Annotated[
        str,
        typer.Option(
            help="Bases to serve, comma-separated: none (dense), nf4, fp4 (serve --quantize); e.g. none,nf4 runs "
            "the same load on the dense and the 4-bit base, side by side with each server's memory."
        ),
    ] = "none",
    out: Annotated[Path | None, typer.Option(help="Also write the JSON result to this file.")] = None,
    json_out: JsonOut = False,
) -> None:
    """Load-test the server on loopback: requests/s, output tokens/s, p50/p95/p99 latency and TTFT, and
    the server's memory (RSS, weights as stored, device memory on CUDA); with --baseline set-adapter, the
    one-request-at-a-time set_adapter server side by side; with --quantize none,nf4, dense and 4-bit bases."""
    from lorafit.serving.bench import LoadSpec, run, run_key

    if baseline not in (None, "set-adapter"):
        raise UserError("--baseline takes set-adapter", field="baseline")
    if min(adapters, requests, concurrency, prompt_words, max_tokens) < 1:
        raise UserError("adapters, requests, concurrency, prompt-words and max-tokens must be >= 1")
    quants = bench_quantize(quantize)
    spec = LoadSpec(requests, concurrency, adapters, prompt_words, max_tokens)
    result = run(model, spec, adapters_dir, baseline, rank, max_batch, quants)
    console.print(_bench_table(result, model, spec, baseline, quants))
    for quant in quants:
        if baseline:
            speedup = result[run_key("speedup_tokens_per_s", quant)]
            console.print(f"output tokens/s{_on(quant)}: {speedup:.2f}x the {baseline} baseline")
    for quant, ratios in result.get("vs_dense", {}).items():
        parts = [f"{label} {ratios[key]:.2f}x" for label, key in VS_DENSE if key in ratios]
        console.print(f"{quant} base vs dense (batched): {', '.join(parts)}")
    if out is not None:
        from lorafit.run.rundir import write_text_atomic

        write_text_atomic(out, json.dumps(result, indent=1) + "\n")
    if json_out:
        print_json(result)


def bench_quantize(text: str) -> tuple[str, ...]:
    """--quantize of bench-serve: comma-separated bases, each one serve --quantize takes, none twice."""
    from lorafit.base.config import SERVE_QUANT

    quants = tuple(q.strip() for q in text.split(",") if q.strip())
    bad = [q for q in quants if q not in SERVE_QUANT]
    if bad or not quants:
        raise UserError(f"--quantize takes {', '.join(SERVE_QUANT)} (comma-separated); got {text!r}", field="quantize")
    if len(set(quants)) < len(quants):
        raise UserError(f"--quantize names a base twice: {text!r}", field="quantize")
    return quants


VS_DENSE = (  # (label, key of bench.vs_dense's ratios)
    ("weights", "weight_bytes"),
    ("RSS after warm-up", "rss_warm_bytes"),
    ("peak RSS", "peak_rss_bytes"),
    ("device peak reserved", "device_peak_reserved_bytes"),
    ("output tokens/s", "output_tokens_per_s"),
)


def _on(quant: str) -> str:
    return "" if quant == "none" else f" ({quant} base)"


MEMORY_ROWS = (  # (row label, key in a run's "memory"): device rows only where the server ran on CUDA
    ("weights (as stored)", "weight_bytes"),
    ("RSS when ready", "rss_ready_bytes"),
    ("RSS after warm-up", "rss_warm_bytes"),
    ("peak RSS under load", "peak_rss_bytes"),
    ("device peak allocated", "device_peak_allocated_bytes"),
    ("device peak reserved", "device_peak_reserved_bytes"),
)


def _bench_table(
    result: dict[str, Any], model: str, spec: Any, baseline: str | None, quants: tuple[str, ...] = ("none",)
) -> Any:
    from rich.table import Table

    from lorafit.serving.bench import run_key

    runs = [run_key(mode, q) for q in quants for mode in ["batched"] + ([baseline] if baseline else [])]
    title = f"bench-serve {model}: {spec.requests} requests, concurrency {spec.concurrency}, {spec.adapters} adapters"
    table = Table(title=title)
    table.add_column("metric")
    for key in runs:
        table.add_column(key, justify="right")
    keys = ["requests_per_s", "output_tokens_per_s"] + [
        f"{k}_p{q}_s" for k in ("latency", "ttft") for q in (50, 95, 99)
    ]
    for key in keys:
        table.add_row(key, *(f"{result[r][key]:.3f}" for r in runs))
    for label, key in MEMORY_ROWS:
        values = [result[r].get("memory", {}).get(key) for r in runs]
        if any(v is not None for v in values):
            table.add_row(label, *(format_bytes(v) for v in values))
    return table
