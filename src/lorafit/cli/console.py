"""Console output: live progress and the tables of train, eval, estimate and sweep, drawn with rich on stderr
(stdout stays for --json)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

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

from lorafit.base.units import format_budget, format_bytes

if TYPE_CHECKING:  # the console is imported by every command, so `lorafit --help` does not wait for torch
    from lorafit.inputs.data import DataStats
    from lorafit.measurement.figures import PeakMemory, Timing
    from lorafit.measurement.plan import MemoryPlan
    from lorafit.run.summary import Summary

stderr_console = Console(stderr=True)  # every command's tables and messages; stdout carries only --json


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
        if "plan" in info:
            self.console.print(f"memory plan: {info['plan']}")
        if "hint" in info:
            self.console.print(f"hint: {info['hint']}")
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
            mem=format_bytes(row.get("memory_bytes")),
        )

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _per_rank(mem: PeakMemory) -> str:
    ranks = mem.per_rank_peak_bytes
    return f"; max of ranks {', '.join(format_bytes(b) for b in ranks)}" if ranks else ""


def _processes_row(s: Summary) -> list[tuple[str, str]]:
    if (s.processes or 1) <= 1:
        return []
    d = s.environment.distributed
    how = f"{d.kind}, {d.backend}, by {d.launcher}" if d is not None else "None, None, by None"
    return [("processes", f"{s.processes} ({how}); global batch {s.global_batch_size}")]


def _data_row(d: DataStats | None) -> str:
    if d is None:
        return "n/a"
    return (
        f"{d.samples} samples of {Path(d.file).name} ({d.format}, {d.template}), "
        f"{d.tokens} tokens; {d.truncated} truncated, {d.skipped_no_loss} skipped"
    )


def _step_time(t: Timing) -> str:
    """Per optimizer step (micro-batches and update), and per micro-step where they differ."""
    step, micro = t.step_time_s, t.micro_step_time_s
    text = f"mean {step.mean:.3f} s, p50 {step.p50:.3f} s per optimizer step" if step else "n/a (no whole step timed)"
    if micro is not None and (step is None or micro != step):
        text += f"; {micro.mean:.3f} s per micro-step"
    return text


def _peak_memory(mem: PeakMemory | None) -> str:
    """The peak that must fit; on a GPU the allocator's own peaks beside the device-level one."""
    if mem is None:
        return "n/a"
    text = f"{format_bytes(mem.peak_bytes)} ({mem.kind}{_per_rank(mem)})"
    if mem.kind == "cuda" and mem.max_allocated_bytes is not None:
        text += (
            f"; allocator {format_bytes(mem.max_allocated_bytes)} allocated, "
            f"{format_bytes(mem.max_reserved_bytes)} reserved"
        )
    return text


def _figures_rows(s: Summary) -> list[tuple[str, str]]:
    """Throughput, memory, parameters, FLOPs and energy: the rows measured over the timed window."""
    t, mem, fl, en, par = s.timing, s.memory.peak_memory, s.flops, s.energy, s.params
    breakdown = s.memory.memory_breakdown.items() if s.memory.memory_breakdown is not None else []
    return [
        ("tokens/s", f"{t.tokens_per_s:.1f} real tokens/s ({t.tokens} tokens timed)"),
        ("step time", _step_time(t)),
        ("peak memory", _peak_memory(mem)),
        ("memory parts", ", ".join(f"{k} {format_bytes(v)}" for k, v in breakdown)),
        ("trainable", f"{par.trainable_params:,} of {par.total_params:,} ({par.trainable_pct:.2f}%)"),
        ("FLOPs/token", f"{fl.flops_per_token / 1e9:.3f} GFLOP" if fl.flops_per_token else "n/a"),
        (
            "MFU",
            f"{100 * fl.mfu:.1f}% of {fl.peak_flops_per_s / 1e12:.2f} TFLOP/s ({fl.peak_flops_source})"
            if fl.mfu is not None
            else "n/a",
        ),
        (
            "energy",
            f"{en.j_per_token:.3f} J/token, {en.avg_power_w:.0f} W"
            if en.j_per_token is not None
            else f"n/a ({en.energy_unavailable_reason})",
        ),
    ]


def print_summary(console: Console, s: Summary, memory_budget: str | None = None) -> None:
    """The closing table of `lorafit train`: one row per part of the run record, and the run's
    --memory-budget (as typed, with its binary value) when it had one."""
    table = Table(title=f"lorafit {s.method} on {s.model}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    loss = s.losses
    rows = [
        ("data", _data_row(s.data)),
        ("loss", f"{loss.loss_first:.4f} -> {loss.loss_last:.4f} (mean {loss.loss_mean:.4f})"),
        (
            "steps",
            f"{s.steps} optimizer steps ({s.timing.timed_steps} micro-steps timed after {s.timing.warmup_steps} "
            "warm-up)",
        ),
        *_processes_row(s),
        *_figures_rows(s),
        *([("memory budget", format_budget(memory_budget))] if memory_budget else []),
        *([("memory plan", s.memory_plan.describe())] if s.memory_plan is not None else []),
        ("wall time", f"{s.wall_s:.1f} s"),
        ("allocator", s.environment.allocator),
        *_matmul_row(s),
        ("saved", s.saved),
        ("run directory", s.run_dir),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def _matmul_row(s: Summary) -> list[tuple[str, str]]:
    """Which library ran lorafit's fp32 products on a CPU (`base.matmul`), where the record says."""
    device = s.environment.device
    if device is None or device.matmul is None:
        return []
    return [
        ("cpu matmul", f"{device.matmul} (lorafit's fp32 products; LORAFIT_CPU_MATMUL, default auto: the faster here)")
    ]


def print_plan(console: Console, plan: MemoryPlan) -> None:
    """`lorafit train --plan`: every plan considered, its predicted peak and time, and why it lost."""
    table = Table(title=f"memory plan: {plan.describe()}", title_justify="left")
    for column in ("plan", "micro-batch x accum", "predicted peak", "+ margin", "time", "outcome"):
        table.add_column(column)
    for c in sorted([*([plan.chosen] if plan.chosen else []), *plan.alternatives], key=lambda c: c.relative_time):
        table.add_row(
            c.mode(),
            f"{c.batch_size} x {c.grad_accum}",
            format_bytes(c.predicted_peak_bytes),
            format_bytes(c.predicted_peak_bytes * (1 + plan.margin)),
            f"x{c.relative_time:.2f}",
            "[bold green]chosen[/]" if c is plan.chosen else (c.why_not or ""),
        )
    console.print(table)
    console.print(
        f"budget: {format_bytes(plan.budget_bytes)} ({plan.budget_source}); checkpointing decided by {plan.decided_by}"
    )
    if plan.peak_row_tokens is not None:
        console.print(f"peaks estimated at micro-batches of the data's longest row: {plan.peak_row_tokens} tokens")


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
            f"{format_bytes(size['disk_bytes'])} to ship (base {format_bytes(size['disk_base_bytes'])}, "
            f"adapter {format_bytes(size['disk_adapter_bytes'])})",
        ),
        (
            "in memory",
            f"{format_bytes(size['memory_bytes'])} of weights, {size['compression_vs_fp16']:.2f}x compression vs fp16",
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
        cells = [part, format_bytes(value)]
        if measured:
            real = result["measured"]["peak_bytes"] if part == "total" else measured.get(part)
            cells += [format_bytes(real), f"{100 * (value - real) / real:+.1f}%" if real else ""]
        table.add_row(*cells, style="bold" if part == "total" else None)
    console.print(table)
    if result.get("measured") and not measured:
        console.print(f"measured run: {result['measured']['status']} ({result['measured']['error']})")
    budget = result.get("budget_bytes")
    if budget is not None:
        verdict = "fits" if est["total"] <= budget else "does not fit"
        console.print(f"budget {_budget_text(result)}: {verdict} (estimate {format_bytes(est['total'])})")
    found = result.get("find_max")
    if found:
        name = "batch size" if found["what"] == "batch" else "max length"
        line = f"largest {name} that fits: {_or_none(found['estimated'])} (estimate)"
        if "measured" in found:
            line += f", {_or_none(found['measured'])} measured ({found['measure_runs']} runs)"
        console.print(line)
    for note in est["notes"]:
        console.print(f"[dim]{note}[/]")


def _budget_text(result: dict[str, Any]) -> str:
    """The budget as the user typed it ("8GB (7.45 GiB)"), or its bytes in binary units when the result
    carries only `budget_bytes`."""
    typed = result.get("budget")
    return format_budget(typed) if typed else format_bytes(result["budget_bytes"])


def _or_none(value: Any) -> str:
    return "none" if value is None else str(value)


def sweep_table(sweep: Any, state: dict[str, str], results: dict[str, Any]) -> Table:
    """The live table of `lorafit sweep`: one row per point, its status and figures once it has run."""
    counts = {k: sum(1 for v in state.values() if v.startswith(k)) for k in ("ok", "oom", "failed", "running")}
    left = sum(1 for v in state.values() if v == "waiting")
    title = (
        f"sweep {sweep.name}: {counts['ok']} ok, {counts['oom']} oom, {counts['failed']} failed, "
        f"{counts['running']} running, {left} left"
    )
    table = Table(title=title, title_justify="left")
    for column in ("point", "status", "tokens/s", "peak memory", "loss"):
        table.add_column(column, justify="left" if column in ("point", "status") else "right")
    for p in sweep.points:
        s: Summary | None = results[p.id].summary if p.id in results else None
        tps = s.timing.tokens_per_s if s else None
        loss = s.losses.loss_mean if s else None
        table.add_row(
            p.label,
            state[p.id],
            "" if tps is None else f"{tps:.1f}",
            format_bytes(s.peak_bytes if s else None, "GiB", missing=""),
            "" if loss is None else f"{loss:.4f}",
        )
    return table
