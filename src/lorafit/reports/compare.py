"""The comparison report: one table of what each run cost and what it is worth, with charts.

`build_rows` turns stored runs (training summary + evaluation) into flat rows of numbers; the HTML
and Markdown writers only format those rows, so a test can check every shown number against the
store. The charts (`reports.charts`) and the page around them (`reports.page`) live apart.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorafit.base.units import format_bytes
from lorafit.reports.charts import BREAKDOWN, CHART_TITLES, charts
from lorafit.reports.page import figures_html, html_page, html_table, markdown_environment, markdown_table, num
from lorafit.run.store import RunRecord
from lorafit.run.summary import Summary

Row = dict[str, Any]


def _get(d: dict[str, Any] | None, *path: str) -> Any:
    """eval.json's value at `path`, or None where any step is missing (eval.json is not typed yet)."""
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def build_rows(records: list[RunRecord]) -> list[Row]:
    """One row of numbers per run. `ppl_before` is the perplexity of the base a trained run started
    from: for QLoRA the 4-bit base stored as it was (same quant type and double quantization), n/a when
    none like it was evaluated; for the other methods the dense base ("base")."""
    rows = []
    for r in records:
        e = r.eval or {}
        row = {"label": r.label, "status": r.status, **_training_cells(r.summary), **_eval_cells(e)}
        row["method"] = row["method"] or e.get("method") or r.label
        if row["method"] == "qlora":  # its own 4-bit base or none: the dense base is another model
            base = _four_bit_base(records, r)
        else:
            base = next((b for b in records if b.label == "base" and b.eval), None)
        row["ppl_before"] = _get(base.eval, "perplexity", "ppl") if base and r.summary else None
        row["losses"] = [m["loss"] for m in r.metrics if "loss" in m]
        rows.append(row)
    return rows


def _base_quantization(r: RunRecord) -> tuple[str, bool] | None:
    """(quant type, double quant) of an evaluation of a 4-bit base, None for any other run. eval.json
    records it; an older one only says it in its label "base-nf4", then always built from train's
    defaults (NF4 with double quantization)."""
    if r.summary is not None or not r.eval:
        return None
    q = r.eval.get("quantization")
    if isinstance(q, dict):  # a 4-bit base; an adapter evaluated on one is not a base
        return (q.get("quant_type"), q.get("double_quant")) if r.eval.get("method") == "base" else None
    return ("nf4", True) if r.label == "base-nf4" or r.eval.get("label") == "base-nf4" else None


def _four_bit_base(records: list[RunRecord], run: RunRecord) -> RunRecord | None:
    """The evaluated 4-bit base stored as the QLoRA `run` stored its base (its eval.json's quantization,
    else its config's), or None."""
    q = _get(run.eval, "quantization") or run.config or {}
    want = (q.get("quant_type", "nf4"), q.get("double_quant", True))
    return next((b for b in records if b.eval and _base_quantization(b) == want), None)


def _training_cells(summary: Summary | None) -> Row:
    """The training run's figures (all None for an evaluation-only run). A step is an optimizer step
    (summary schema v2: `Flops.flops_per_step`, `Timing.step_time_s`); a v1 summary timed micro-batches
    only, so its step figures stay n/a rather than show a micro-batch under "step"."""
    s = summary or Summary(status="n/a")
    timing, flops, peak, breakdown = s.timing, s.flops, s.memory.peak_memory, s.memory.memory_breakdown
    return {
        "method": s.method,
        "trainable_params": s.params.trainable_params,
        "trainable_pct": s.params.trainable_pct,
        "flops_per_token": flops.flops_per_token,
        "flops_per_step": flops.flops_per_step,
        "mfu": flops.mfu,
        "step_time_s": timing.step_time_s.mean if timing.step_time_s else None,
        "micro_steps_only": timing.step_time_s is None and timing.micro_step_time_s is not None,
        "train_tokens_per_s": timing.tokens_per_s,
        "peak_memory_bytes": s.peak_bytes,
        "peak_memory_kind": peak.kind if peak else None,
        "memory_breakdown": dict(breakdown.items()) if breakdown else {},
        "j_per_token": s.energy.j_per_token,
        "energy_note": s.energy.energy_unavailable_reason,
        "loss_first": s.losses.loss_first,
        "loss_last": s.losses.loss_last,
    }


def _eval_cells(e: dict[str, Any]) -> Row:
    """The evaluation's figures: size, perplexity, generation speed."""
    return {
        "disk_bytes": _get(e, "size", "disk_bytes"),
        "adapter_disk_bytes": _get(e, "size", "disk_adapter_bytes"),
        "memory_bytes": _get(e, "size", "memory_bytes"),
        "compression_vs_fp16": _get(e, "size", "compression_vs_fp16"),
        "ppl": _get(e, "perplexity", "ppl"),
        "ppl_settings": _ppl_settings(_get(e, "perplexity")),
        "decode_tokens_per_s": _get(e, "generation", "decode_tokens_per_s"),
        "ttft_s": _get(e, "generation", "ttft_s"),
    }


def _ppl_settings(p: dict[str, Any] | None) -> str | None:
    if not p or "text" not in p:
        return None
    of = f" of {p['text_tokens']:,}" if isinstance(p.get("text_tokens"), int) else ""
    return f"{p['text']}, {p['tokens_scored']:,}{of} tokens scored, window {p['max_length']}, stride {p['stride']}"


# ---------------------------------------------------------------- tables


def _params(n: Any) -> str:
    if n is None:
        return "n/a"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def _ppl(r: Row) -> str:
    if r["ppl_before"] is not None and r["ppl"] is not None:
        return f"{r['ppl_before']:.2f} → {r['ppl']:.2f}"
    return num(r["ppl"], "{:.2f}")


def _bytes(n: Any, unit: str, digits: int) -> str:
    """Bytes in `unit` (binary: MiB = 2**20, GiB = 2**30, labelled so), n/a for a missing figure."""
    return format_bytes(n, unit, digits=digits)


COLUMNS: list[tuple[str, Callable[[Row], str]]] = [
    ("run", lambda r: r["label"]),
    ("size on disk", lambda r: _bytes(r["disk_bytes"], "MiB", 1)),
    ("adapter on disk", lambda r: _bytes(r["adapter_disk_bytes"] or None, "MiB", 2)),
    ("weights in memory", lambda r: _bytes(r["memory_bytes"], "MiB", 1)),
    ("compression vs fp16", lambda r: num(r["compression_vs_fp16"], "{:.2f}x")),
    ("trainable params", lambda r: _params(r["trainable_params"])),
    ("trainable %", lambda r: num(r["trainable_pct"], "{:.2f}%")),
    ("FLOPs / step", lambda r: num(r["flops_per_step"], "{:.3g}")),
    ("FLOPs / token", lambda r: num(r["flops_per_token"], "{:.3g}")),
    ("MFU", lambda r: num(r["mfu"], "{:.1%}")),
    ("time / step", lambda r: num(r["step_time_s"], "{:.2f} s")),
    ("train tokens/s", lambda r: num(r["train_tokens_per_s"], "{:.1f}")),
    ("peak memory", lambda r: _bytes(r["peak_memory_bytes"], "GiB", 2)),
    ("J / token", lambda r: num(r["j_per_token"], "{:.3g}")),
    ("perplexity", _ppl),
    ("decode tokens/s", lambda r: num(r["decode_tokens_per_s"], "{:.1f}")),
    ("TTFT", lambda r: num(r["ttft_s"], "{:.3f} s")),
]


def table_cells(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    return [c for c, _ in COLUMNS], [[f(r) for _, f in COLUMNS] for r in rows]


def _breakdown_rows(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    head = ["run", "peak (kind)"] + [p.replace("_", " ") for p in BREAKDOWN]
    body = [
        [r["label"], f"{_bytes(r['peak_memory_bytes'], 'GiB', 2)} ({r['peak_memory_kind']})"]
        + [_bytes(r["memory_breakdown"].get(p, 0), "MiB", 1) for p in BREAKDOWN]
        for r in rows
        if r["memory_breakdown"]
    ]
    return head, body


def _notes(rows: list[Row]) -> list[str]:
    notes = sorted({r["energy_note"] for r in rows if r["j_per_token"] is None and r["energy_note"]})
    out = [f"J/token n/a: {n}" for n in notes]
    v1 = [r["label"] for r in rows if r["micro_steps_only"]]
    if v1:
        out.append(
            f"time / step and FLOPs / step n/a for {', '.join(v1)}: its summary (schema v1) timed micro-batches, "
            "not optimizer steps"
        )
    settings = sorted({r["ppl_settings"] for r in rows if r["ppl_settings"]})
    out += [f"perplexity: {s}" for s in settings]
    return out


# ---------------------------------------------------------------- documents


def render_html(records: list[RunRecord], title: str, command: list[str] | None = None) -> str:
    rows = build_rows(records)
    head, body = table_cells(rows)
    bhead, bbody = _breakdown_rows(rows)
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in _notes(rows))
    return html_page(
        title,
        f'<h2>Comparison</h2><div id="comparison">{html_table(head, body)}</div>'
        f"<ul>{notes}</ul>"
        f'<h2>Peak memory breakdown</h2><div id="memory">{html_table(bhead, bbody)}</div>'
        f"<h2>Charts</h2>{figures_html(charts(rows), CHART_TITLES)}",
        records,
        command,
    )


def render_markdown(records: list[RunRecord], title: str, command: list[str] | None = None) -> str:
    rows = build_rows(records)
    parts = [f"# {title}", "", markdown_table(*table_cells(rows)), ""]
    parts += [f"- {n}" for n in _notes(rows)]
    parts += ["", "## Peak memory breakdown", "", markdown_table(*_breakdown_rows(rows)), ""]
    parts += markdown_environment(records, command)
    return "\n".join(parts) + "\n"


def write_report(
    records: list[RunRecord], out_dir: str | Path, title: str = "lorafit comparison", command: list[str] | None = None
) -> tuple[Path, Path]:
    """Moved to `lorafit.reports.write_report` (which also picks the sweep report); this alias stays only
    until studies/compare.py and the CLI import it from there."""
    from lorafit.reports import write_report as write

    return write(records, out_dir, title, command)
