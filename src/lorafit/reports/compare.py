"""The comparison report: one table of what each run cost and what it is worth, with charts.

`build_rows` turns stored runs (training summary + evaluation) into flat rows of numbers; the HTML
and Markdown writers only format those rows, so a test can check every shown number against the
store. Charts are matplotlib PNGs embedded as data URIs: the HTML file stands alone.
"""

from __future__ import annotations

import base64
import html
import io
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorafit.run.store import RunRecord

GIB = 2**30
MB = 1e6


def _get(d: dict[str, Any] | None, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def build_rows(records: list[RunRecord]) -> list[dict[str, Any]]:
    """One row of numbers per run. `ppl_before` is the base model's perplexity when a base run is
    present; for QLoRA, that of the 4-bit base ("base-nf4") it was trained on, when present."""

    def base_ppl(label: str) -> float | None:
        base = next((r for r in records if r.label == label and r.eval), None)
        return _get(base.eval if base else None, "perplexity", "ppl")

    rows = []
    for r in records:
        s, e = r.summary or {}, r.eval or {}
        method = s.get("method") or e.get("method") or r.label
        ppl_before = (base_ppl("base-nf4") if method == "qlora" else None) or base_ppl("base")
        timed_steps = s.get("timed_steps") or 0
        row = {
            "label": r.label,
            "method": method,
            "status": r.status,
            "disk_bytes": _get(e, "size", "disk_bytes"),
            "adapter_disk_bytes": _get(e, "size", "disk_adapter_bytes"),
            "memory_bytes": _get(e, "size", "memory_bytes"),
            "compression_vs_fp16": _get(e, "size", "compression_vs_fp16"),
            "trainable_params": s.get("trainable_params"),
            "trainable_pct": s.get("trainable_pct"),
            "flops_per_token": s.get("flops_per_token"),
            "flops_per_step": s["model_flops"] / timed_steps if s.get("model_flops") and timed_steps else None,
            "mfu": s.get("mfu"),
            "step_time_s": _get(s, "step_time_s", "mean"),
            "train_tokens_per_s": s.get("tokens_per_s"),
            "peak_memory_bytes": _get(s, "peak_memory", "peak_bytes"),
            "peak_memory_kind": _get(s, "peak_memory", "kind"),
            "memory_breakdown": s.get("memory_breakdown") or {},
            "j_per_token": s.get("j_per_token"),
            "energy_note": s.get("energy_unavailable_reason"),
            "ppl_before": ppl_before if r.summary else None,
            "ppl": _get(e, "perplexity", "ppl"),
            "ppl_settings": _ppl_settings(_get(e, "perplexity")),
            "decode_tokens_per_s": _get(e, "generation", "decode_tokens_per_s"),
            "ttft_s": _get(e, "generation", "ttft_s"),
            "loss_first": s.get("loss_first"),
            "loss_last": s.get("loss_last"),
            "losses": [m["loss"] for m in r.metrics if "loss" in m],
        }
        rows.append(row)
    return rows


def _ppl_settings(p: dict[str, Any] | None) -> str | None:
    if not p or "text" not in p:
        return None
    of = f" of {p['text_tokens']:,}" if isinstance(p.get("text_tokens"), int) else ""
    return f"{p['text']}, {p['tokens_scored']:,}{of} tokens scored, window {p['max_length']}, stride {p['stride']}"


# ---------------------------------------------------------------- formatting


def _num(value: Any, fmt: str = "{:.3g}", scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return fmt.format(value / scale)


def _params(n: Any) -> str:
    if n is None:
        return "n/a"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


COLUMNS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("run", lambda r: r["label"]),
    ("size on disk", lambda r: _num(r["disk_bytes"], "{:.1f} MB", MB)),
    ("adapter on disk", lambda r: _num(r["adapter_disk_bytes"] or None, "{:.2f} MB", MB)),
    ("weights in memory", lambda r: _num(r["memory_bytes"], "{:.1f} MB", MB)),
    ("compression vs fp16", lambda r: _num(r["compression_vs_fp16"], "{:.2f}x")),
    ("trainable params", lambda r: _params(r["trainable_params"])),
    ("trainable %", lambda r: _num(r["trainable_pct"], "{:.2f}%")),
    ("FLOPs / step", lambda r: _num(r["flops_per_step"], "{:.3g}")),
    ("FLOPs / token", lambda r: _num(r["flops_per_token"], "{:.3g}")),
    ("MFU", lambda r: _num(r["mfu"], "{:.1%}")),
    ("time / step", lambda r: _num(r["step_time_s"], "{:.2f} s")),
    ("train tokens/s", lambda r: _num(r["train_tokens_per_s"], "{:.1f}")),
    ("peak memory", lambda r: _num(r["peak_memory_bytes"], "{:.2f} GiB", GIB)),
    ("J / token", lambda r: _num(r["j_per_token"], "{:.3g}") if r["j_per_token"] is not None else "n/a"),
    ("perplexity", lambda r: _ppl(r)),
    ("decode tokens/s", lambda r: _num(r["decode_tokens_per_s"], "{:.1f}")),
    ("TTFT", lambda r: _num(r["ttft_s"], "{:.3f} s")),
]


def _ppl(r: dict[str, Any]) -> str:
    if r["ppl_before"] is not None and r["ppl"] is not None:
        return f"{r['ppl_before']:.2f} → {r['ppl']:.2f}"
    return _num(r["ppl"], "{:.2f}")


def table_cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    return [c for c, _ in COLUMNS], [[f(r) for _, f in COLUMNS] for r in rows]


# ---------------------------------------------------------------- charts

# (title, row key, unit scale, unit label, larger is better; None: neither)
PANELS: list[tuple[str, str, float, str, bool | None]] = [
    ("Size on disk", "disk_bytes", MB, "MB", False),
    ("Trainable parameters", "trainable_params", 1e6, "M", None),
    ("MFU", "mfu", 0.01, "%", True),
    ("Time per step", "step_time_s", 1.0, "s", False),
    ("Perplexity", "ppl", 1.0, "", False),
    ("Inference decode tokens/s", "decode_tokens_per_s", 1.0, "tokens/s", True),
]
RADAR = [
    ("size", "disk_bytes", False),
    ("MFU", "mfu", True),
    ("train tokens/s", "train_tokens_per_s", True),
    ("peak memory", "peak_memory_bytes", False),
    ("perplexity", "ppl", False),
    ("decode tokens/s", "decode_tokens_per_s", True),
]
BREAKDOWN = ["runtime", "weights", "trainable", "grads", "optimizer_state", "activations_workspace"]


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def charts(rows: list[dict[str, Any]]) -> dict[str, str]:
    """{chart name: base64 PNG} for the six-panel bars, the radar, memory breakdown and loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {r["label"]: colors[i % len(colors)] for i, r in enumerate(rows)}
    out: dict[str, str] = {}

    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (title, key, scale, unit, better) in zip(axes.flat, PANELS, strict=True):
        shown = [r for r in rows if r[key] is not None]
        ax.bar([r["label"] for r in shown], [r[key] / scale for r in shown], color=[color[r["label"]] for r in shown])
        for i, r in enumerate(shown):
            ax.annotate(f"{r[key] / scale:.3g}", (i, r[key] / scale), ha="center", va="bottom", fontsize=8)
        direction = "" if better is None else f" ({'higher' if better else 'lower'} is better)"
        ax.set_title(title + direction, fontsize=10)
        ax.set_ylabel(unit)
        if not shown:
            ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    out["six_panel"] = _png(fig)

    fig = plt.figure(figsize=(6.5, 6.5))
    ax = fig.add_subplot(projection="polar")
    angles = [2 * math.pi * i / len(RADAR) for i in range(len(RADAR))]
    for r in rows:
        values = []
        for _, key, better in RADAR:
            present = [x[key] for x in rows if x[key]]
            v = r[key]
            # normalized so that larger is better and the best run scores 1; missing scores 0
            values.append(0.0 if not v or not present else (v / max(present) if better else min(present) / v))
        ax.plot(angles + angles[:1], values + values[:1], color=color[r["label"]], label=r["label"])
        ax.fill(angles + angles[:1], values + values[:1], color=color[r["label"]], alpha=0.1)
    ax.set_xticks(angles, [name for name, _, _ in RADAR])
    ax.set_ylim(0, 1.05)
    ax.set_title("Normalized: 1 = best run, larger is better", fontsize=10)
    ax.legend(loc="upper right", bbox_to_anchor=(1.3, 1.1))
    out["radar"] = _png(fig)

    trained = [r for r in rows if r["memory_breakdown"]]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bottom = [0.0] * len(trained)
    for part in BREAKDOWN:
        heights = [(r["memory_breakdown"].get(part) or 0) / GIB for r in trained]
        ax.bar([r["label"] for r in trained], heights, bottom=bottom, label=part.replace("_", " "))
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_ylabel("GiB at peak")
    ax.set_title("Peak memory breakdown", fontsize=10)
    if trained:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    out["memory_breakdown"] = _png(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in trained:
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], marker=".", label=r["label"], color=color[r["label"]])
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("Loss per step", fontsize=10)
    if trained:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no training runs", ha="center", va="center", transform=ax.transAxes)
    out["loss_curves"] = _png(fig)
    return out


CHART_TITLES = {
    "six_panel": "Size, trainable parameters, MFU, time per step, perplexity, inference speed",
    "radar": "All metrics normalized (larger is better)",
    "memory_breakdown": "Peak memory breakdown per run",
    "loss_curves": "Training loss per step",
}


# ---------------------------------------------------------------- documents


def environment(records: list[RunRecord], command: list[str] | None = None) -> dict[str, Any]:
    first = next((r for r in records if r.summary), None)
    s = first.summary if first else {}
    return {
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(command if command is not None else sys.argv),
        "device": s.get("device") or {"platform": platform.platform()},
        "precision": s.get("precision"),
        "versions": s.get("versions"),
        "data": _get(s, "data", "file"),
        "eval_settings": next((r.eval["settings"] for r in records if r.eval and "settings" in r.eval), None),
    }


def _breakdown_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = ["run", "peak (kind)"] + [p.replace("_", " ") for p in BREAKDOWN]
    body = [
        [r["label"], f"{_num(r['peak_memory_bytes'], '{:.2f} GiB', GIB)} ({r['peak_memory_kind']})"]
        + [_num(r["memory_breakdown"].get(p), "{:.1f} MB", MB) for p in BREAKDOWN]
        for r in rows
        if r["memory_breakdown"]
    ]
    return head, body


def _notes(rows: list[dict[str, Any]]) -> list[str]:
    notes = sorted({r["energy_note"] for r in rows if r["j_per_token"] is None and r["energy_note"]})
    out = [f"J/token n/a: {n}" for n in notes]
    settings = sorted({r["ppl_settings"] for r in rows if r["ppl_settings"]})
    out += [f"perplexity: {s}" for s in settings]
    return out


def _html_table(head: list[str], body: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1280px;
color:#222;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0;display:block;overflow-x:auto}
th,td{border:1px solid #ccc;padding:.3rem .5rem;text-align:right;white-space:nowrap}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left;font-weight:600}
figure{margin:1rem 0}img{max-width:100%;height:auto}figcaption{font-size:.85rem;color:#555}
pre{background:#f7f7f7;padding:.75rem;font-size:.8rem;overflow-x:auto}
"""


def figures_html(images: dict[str, str], titles: dict[str, str]) -> str:
    """<figure>s of base64 PNG charts, each marked with data-chart=<name> (tests look for them)."""
    return "".join(
        f'<figure><img alt="{name}" data-chart="{name}" src="data:image/png;base64,{png}">'
        f"<figcaption>{html.escape(titles.get(name, name))}</figcaption></figure>"
        for name, png in images.items()
    )


def html_page(title: str, body: str, records: list[RunRecord], command: list[str] | None) -> str:
    """A self-contained HTML document: title, body, and the environment block."""
    import json

    env = html.escape(json.dumps(environment(records, command), indent=2, default=str))
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}"
        f"<h2>Environment</h2><pre>{env}</pre></body></html>"
    )


def markdown_table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in body])


def markdown_environment(records: list[RunRecord], command: list[str] | None) -> list[str]:
    import json

    env = json.dumps(environment(records, command), indent=2, default=str)
    return ["## Environment", "", "```json", env, "```", "", "Charts are in report.html."]


def render_html(records: list[RunRecord], title: str, command: list[str] | None = None) -> str:
    rows = build_rows(records)
    head, body = table_cells(rows)
    bhead, bbody = _breakdown_rows(rows)
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in _notes(rows))
    return html_page(
        title,
        f'<h2>Comparison</h2><div id="comparison">{_html_table(head, body)}</div>'
        f"<ul>{notes}</ul>"
        f'<h2>Peak memory breakdown</h2><div id="memory">{_html_table(bhead, bbody)}</div>'
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


def write_documents(out_dir: str | Path, html_text: str, md_text: str) -> tuple[Path, Path]:
    """Write report.html and report.md into `out_dir` atomically; returns their paths."""
    from lorafit.run.rundir import write_text_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    html_path, md_path = out / "report.html", out / "report.md"
    write_text_atomic(html_path, html_text)
    write_text_atomic(md_path, md_text)
    return html_path, md_path


def write_report(
    records: list[RunRecord], out_dir: str | Path, title: str = "lorafit comparison", command: list[str] | None = None
) -> tuple[Path, Path]:
    """Write the comparison report (self-contained HTML and Markdown) into `out_dir`.

    A set of sweep points gets the sweep report (lorafit.sweep_report) instead."""
    if records and all(r.kind == "sweep" for r in records):
        from lorafit.reports import sweep as sweep_report

        html_text = sweep_report.render_html(records, title, command)
        return write_documents(out_dir, html_text, sweep_report.render_markdown(records, title, command))
    return write_documents(out_dir, render_html(records, title, command), render_markdown(records, title, command))
