"""Live progress and the closing summary table, drawn with rich on stderr (stdout stays for --json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GB"


class RichProgress:
    """Step, loss, tokens/s and memory, updated every optimizer step."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._bar: Progress | None = None
        self._task: Any = None

    def start(self, total_steps: int, info: dict[str, Any]) -> None:
        processes = info.get("processes", 1)
        across = f", {processes} processes" if processes > 1 else ""
        self.console.print(
            f"training {total_steps} steps on {info['samples']} samples, {info['device']} {info['precision']}{across}"
        )
        self._bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("mem {task.fields[mem]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
        )
        self._bar.start()
        self._task = self._bar.add_task("train", total=total_steps, loss="-", tps="-", mem="-")

    def step(self, row: dict[str, Any]) -> None:
        if self._bar is None:
            return
        tps = row.get("tokens_per_s")
        self._bar.update(
            self._task,
            advance=1,
            loss=f"{row['loss']:.4f}",
            tps=f"{tps:.0f}" if tps else "-",
            mem=fmt_bytes(row.get("memory_bytes")),
        )

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _per_rank(mem: dict[str, Any]) -> str:
    ranks = mem.get("per_rank_peak_bytes")
    return f"; max of ranks {', '.join(fmt_bytes(b) for b in ranks)}" if ranks else ""


def _processes_row(s: dict[str, Any]) -> list[tuple[str, str]]:
    d = s.get("distributed") or {}
    if s.get("processes", 1) <= 1:
        return []
    return [
        (
            "processes",
            f"{s['processes']} ({d.get('kind')}, {d.get('backend')}, by {d.get('launcher')}); "
            f"global batch {s['global_batch_size']}",
        )
    ]


def print_summary(console: Console, s: dict[str, Any]) -> None:
    table = Table(title=f"lorafit {s['method']} on {s['model']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    step = s.get("step_time_s") or {}
    mem = s["peak_memory"]
    d = s["data"]
    rows = [
        (
            "data",
            f"{d['samples']} samples of {Path(d['file']).name} ({d['format']}, {d['template']}), "
            f"{d['tokens']} tokens; {d['truncated']} truncated, {d['skipped_no_loss']} skipped",
        ),
        ("loss", f"{s['loss_first']:.4f} -> {s['loss_last']:.4f} (mean {s['loss_mean']:.4f})"),
        ("steps", f"{s['steps']} ({s['timed_steps']} timed after {s['warmup_steps']} warm-up micro-steps)"),
        *_processes_row(s),
        ("tokens/s", f"{s['tokens_per_s']:.1f} real tokens/s ({s['tokens']} tokens timed)"),
        ("step time", f"mean {step.get('mean', 0):.3f} s, p50 {step.get('p50', 0):.3f} s"),
        ("peak memory", f"{fmt_bytes(mem['peak_bytes'])} ({mem['kind']}{_per_rank(mem)})"),
        ("memory parts", ", ".join(f"{k} {fmt_bytes(v)}" for k, v in s["memory_breakdown"].items())),
        ("trainable", f"{s['trainable_params']:,} of {s['total_params']:,} ({s['trainable_pct']:.2f}%)"),
        ("FLOPs/token", f"{s['flops_per_token'] / 1e9:.3f} GFLOP" if s["flops_per_token"] else "n/a"),
        (
            "MFU",
            f"{100 * s['mfu']:.1f}% of {s['peak_flops_per_s'] / 1e12:.2f} TFLOP/s ({s['peak_flops_source']})"
            if s["mfu"] is not None
            else "n/a",
        ),
        (
            "energy",
            f"{s['j_per_token']:.3f} J/token, {s['avg_power_w']:.0f} W"
            if s["j_per_token"] is not None
            else f"n/a ({s.get('energy_unavailable_reason')})",
        ),
        ("wall time", f"{s['wall_s']:.1f} s"),
        ("allocator", s["allocator"]),
        ("saved", s["saved"]),
        ("run directory", s["run_dir"]),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def print_eval(console: Console, e: dict[str, Any]) -> None:
    """The eval.json of one model as a two-column table."""
    title = f"lorafit eval: {e['label']} ({e['model']}{', adapter ' + e['adapter'] if e['adapter'] else ''})"
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    size = e["size"]
    rows = [
        ("parameters", f"{size['total_params']:,} ({size['adapter_params']:,} in the adapter)"),
        (
            "on disk",
            f"{fmt_bytes(size['disk_bytes'])} to ship (base {fmt_bytes(size['disk_base_bytes'])}, "
            f"adapter {fmt_bytes(size['disk_adapter_bytes'])})",
        ),
        (
            "in memory",
            f"{fmt_bytes(size['memory_bytes'])} of weights, {size['compression_vs_fp16']:.2f}x compression vs fp16",
        ),
    ]
    if "perplexity" in e:
        p = e["perplexity"]
        rows.append(
            (
                "perplexity",
                f"{p['ppl']:.3f} on {p['text']} ({p['tokens_scored']:,} of {p['text_tokens']:,} tokens, "
                f"window {p['max_length']}, "
                f"stride {p['stride']}, {p['windows']} windows)",
            )
        )
    if "generation" in e:
        g = e["generation"]
        decode = "n/a" if g["decode_tokens_per_s"] is None else f"{g['decode_tokens_per_s']:.1f}"
        rows.append(
            (
                "generation",
                f"TTFT {1000 * g['ttft_s']:.0f} ms, decode {decode} tokens/s "
                f"(batch {g['batch']}, {g['new_tokens']} new tokens, prompt {g['prompt_tokens']} tokens, "
                f"median of {g['repeats']})",
            )
        )
    rows.append(("device", e["device"]))
    if e.get("eval_json"):
        rows.append(("saved", e["eval_json"]))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def print_estimate(console: Console, result: dict[str, Any]) -> None:
    """The estimated breakdown, measured next to it when there is a measurement, and what fits."""
    est = result["estimate"]
    measured = (result.get("measured") or {}).get("memory_breakdown")
    table = Table(
        title=f"estimated training memory ({result['device']}, batch {est['batch_size']} x {est['max_length']} "
        f"tokens, {est['precision']})",
        title_justify="left",
    )
    table.add_column("part")
    table.add_column("estimate", justify="right")
    if measured:
        table.add_column("measured", justify="right")
        table.add_column("error", justify="right")
    rows = [*est["parts"].items(), ("total", est["total"])]
    for part, value in rows:
        cells = [part, fmt_bytes(value)]
        if measured:
            real = result["measured"]["peak_bytes"] if part == "total" else measured.get(part)
            cells += [fmt_bytes(real), f"{100 * (value - real) / real:+.1f}%" if real else ""]
        table.add_row(*cells, style="bold" if part == "total" else None)
    console.print(table)
    if result.get("measured") and not measured:
        console.print(f"measured run: {result['measured']['status']} ({result['measured']['error']})")
    budget = result.get("budget_bytes")
    if budget is not None:
        verdict = "fits" if est["total"] <= budget else "does not fit"
        console.print(f"budget {fmt_bytes(budget)}: {verdict} (estimate {fmt_bytes(est['total'])})")
    found = result.get("find_max")
    if found:
        name = "batch size" if found["what"] == "batch" else "max length"
        line = f"largest {name} that fits: {_or_none(found['estimated'])} (estimate)"
        if "measured" in found:
            line += f", {_or_none(found['measured'])} measured ({found['measure_runs']} runs)"
        console.print(line)
    for note in est["notes"]:
        console.print(f"[dim]{note}[/]")


def _or_none(value: Any) -> str:
    return "none" if value is None else str(value)
