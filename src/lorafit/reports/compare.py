"""The comparison report, laid out as the QLoRA report lays out its comparison (Table 12, Figure 1).

`build_rows` turns stored runs (each training run's `Summary`, each eval.json read as an `Evaluation`,
each config.yaml read through `TrainConfig`'s field types) into flat rows of numbers; the HTML and
Markdown writers only format those rows, so a test can check every shown number against the store.
The page has four tables: the comparison (Table 12's columns, one row per run), each run's improvement
against a baseline run, each run's own settings (the options that differ between runs), and the peak
memory breakdown. The charts (`reports.charts`) and the page around them (`reports.page`) live apart.
A figure a record does not hold (an older record, a run without evaluation) is shown as "—", never
estimated.
"""

from __future__ import annotations

import dataclasses
import functools
import html
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from lorafit.base.config import TrainConfig, coerce, field_names
from lorafit.base.errors import UserError
from lorafit.base.units import format_bytes
from lorafit.measurement import estimate
from lorafit.reports.charts import BREAKDOWN, CHART_TITLES, charts
from lorafit.reports.page import (
    MISSING,
    figures_html,
    html_page,
    html_table,
    markdown_environment,
    markdown_table,
    num,
)
from lorafit.run.evaluation import EvalPerplexity, Evaluation
from lorafit.run.store import RunRecord
from lorafit.run.summary import Summary

Row = dict[str, Any]
T = TypeVar("T")

# ---------------------------------------------------------------- size as deployed

NF4_BLOCK = 64  # bitsandbytes 4-bit blocksize: one absmax per 64 weights
NESTED_BLOCK = 256  # double quantization: the 8-bit absmax get one fp32 constant per 256 blocks
SIZE_NOTE = (
    "size as deployed: LoRA and full fine-tuning, the merged model in 16-bit (2 B x base parameters); QLoRA, "
    "the 4-bit base + adapter: the quantized weights (every projection of the decoder layers) at 4 bits, "
    "plus their absmax constants (blocks of 64: fp32 each, 0.5 bit/parameter; with double quantization "
    "8-bit each + one fp32 per 256 blocks, 8/64 + 32/(64x256) = 0.127 bit/parameter; bitsandbytes' 4-bit "
    "layout, QLoRA paper (Dettmers et al. 2023) section 3), plus the unquantized embeddings, norms and lm_head "
    "in 16-bit, plus the adapter in 16-bit; the quantized/unquantized split is read from the model's "
    "config.json. Compression: the 16-bit base (2 B x base parameters) over the size as deployed"
)


def four_bit_bytes(quantized: int, double_quant: bool) -> float:
    """Bytes of `quantized` weights as bitsandbytes stores them in 4 bits: 4 bits each, plus one absmax
    per block of 64 (fp32; with double quantization 8-bit, plus one fp32 per 256 blocks). The per-tensor
    16-value code books (64 B each) are left out."""
    blocks = quantized / NF4_BLOCK
    constants = blocks + blocks / NESTED_BLOCK * 4 if double_quant else blocks * 4
    return quantized / 2 + constants


def deployed_bytes(
    base_params: int, adapter_params: int, quantized: int | None = None, double_quant: bool | None = None
) -> float | None:
    """Size as deployed (`SIZE_NOTE`). Dense (`quantized` 0): the merged model in 16-bit, the adapter
    folded into the base. 4-bit: `quantized` of the `base_params` in 4 bits with their constants, the rest
    in 16-bit, plus the adapter in 16-bit; None when the split or the double quantization is unknown
    (None), or the split cannot be this model's."""
    if quantized == 0:
        return 2.0 * base_params
    if quantized is None or double_quant is None or not 0 < quantized <= base_params:
        return None
    return four_bit_bytes(quantized, double_quant) + 2.0 * (base_params - quantized) + 2.0 * adapter_params


@functools.cache
def quantized_params(model: str | None) -> int | None:
    """Weights bitsandbytes quantizes in `model`: every projection of every decoder layer (transformers
    keeps lm_head out of the conversion; embeddings and norms are not linear layers), read from the
    config.json of a built-in, `random:` or local model without loading it; None for anything else (a
    report reaches no network) or an architecture the estimator does not model."""
    if not model or not (model == "smollm2-135m" or model.startswith("random:") or Path(model).is_dir()):
        return None
    try:
        arch = estimate.arch_from_config(estimate.model_config(model))
    except (UserError, OSError, ValueError):
        return None
    return arch.layers * sum(i * o for _, i, o in arch.linears())


# ---------------------------------------------------------------- settings (config.yaml)

HIDDEN_SETTINGS = ("out",)  # differs for every run: the run directory


def stored_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The TrainConfig options a run stored (config.yaml, or the run store's config column), each checked
    against its field's type; an option this lorafit does not know, or a value of the wrong type, is left
    out (shown "—")."""
    known, out = set(field_names(TrainConfig)), {}
    for name, value in config.items():
        if name in known:
            try:
                out[name] = coerce(name, value, "config.yaml")
            except UserError:
                continue
    return out


def _default(name: str) -> Any:
    f = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def _setting(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return "unset" if value is None else str(value)


# ---------------------------------------------------------------- rows


def label_apart(records: list[RunRecord]) -> list[RunRecord]:
    """`records`, each whose label another shares (two runs of one method) labelled with its directory's
    name added, so every row and baseline choice of the report names one run. Relabels in place."""
    labels = [r.label for r in records]
    for r in records:
        if labels.count(r.label) > 1 and r.run_dir:
            r.label = f"{r.label} ({Path(r.run_dir).name})"
    return records


def build_rows(records: list[RunRecord]) -> list[Row]:
    """One row of numbers per run. `ppl_before` is the perplexity of the base a trained run started
    from: for QLoRA the 4-bit base stored as it was (same quant type and double quantization), n/a when
    none like it was evaluated; for the other methods the dense base ("base")."""
    evals = [Evaluation.from_dict(r.eval) for r in records]
    rows = []
    for r, e in zip(records, evals, strict=True):
        settings = stored_settings(r.config or {})
        row = {"label": r.label, "status": r.status, **_training_cells(r.summary), **_eval_cells(e)}
        row["method"] = row["method"] or e.method or r.label
        row["trained"] = r.summary is not None
        row["settings"] = settings if r.summary is not None else {}  # an evaluation stores only its model
        row["memory_plan"] = _plan(r.summary)
        row.update(_size_cells(row, r.summary, e, settings))
        base = _four_bit_base(records, evals, e, settings) if row["method"] == "qlora" else _dense_base(records, evals)
        row["ppl_before"] = base.perplexity.ppl if base and r.summary else None
        row["losses"] = [m["loss"] for m in r.metrics if "loss" in m]
        rows.append(row)
    return rows


def _dense_base(records: list[RunRecord], evals: list[Evaluation]) -> Evaluation | None:
    return next((e for r, e in zip(records, evals, strict=True) if r.label == "base" and r.eval), None)


def _base_quantization(r: RunRecord, e: Evaluation) -> tuple[str | None, bool | None] | None:
    """(quant type, double quant) of an evaluation of a 4-bit base, None for any other run. eval.json
    records it; an older one only says it in its label "base-nf4", then always built from train's
    defaults (NF4 with double quantization)."""
    if r.summary is not None or not r.eval:
        return None
    if e.quantization is not None:  # a 4-bit base; an adapter evaluated on one is not a base
        return (e.quantization.quant_type, e.quantization.double_quant) if e.method == "base" else None
    return ("nf4", True) if "base-nf4" in (r.label, e.label) else None


def _four_bit_base(
    records: list[RunRecord], evals: list[Evaluation], run: Evaluation, settings: dict[str, Any]
) -> Evaluation | None:
    """The evaluated 4-bit base stored as the QLoRA run stored its base (its eval.json's quantization,
    else its config's), or None."""
    q = run.quantization
    stored = (settings.get("quant_type", "nf4"), settings.get("double_quant", True))
    want = (q.quant_type, q.double_quant) if q else stored
    return next((e for r, e in zip(records, evals, strict=True) if r.eval and _base_quantization(r, e) == want), None)


def _plan(summary: Summary | None) -> str | None:
    plan = summary.memory_plan if summary else None
    return plan.chosen.describe() if plan and plan.chosen else None


def _training_cells(summary: Summary | None) -> Row:
    """The training run's figures (all None for an evaluation-only run). A step is an optimizer step
    (summary schema v2: `Flops.flops_per_step`, `Timing.step_time_s`); a v1 summary timed micro-batches
    only, so its step figures stay "—" rather than show a micro-batch under "step"."""
    s = summary or Summary(status="n/a")
    timing, flops, peak, breakdown = s.timing, s.flops, s.memory.peak_memory, s.memory.memory_breakdown
    return {
        "method": s.method,
        "model": s.model,
        "total_params": s.params.total_params,
        "trainable_params": s.params.trainable_params,
        "trainable_pct": s.params.trainable_pct,
        "flops_per_step": flops.flops_per_step,
        "achieved_flops_per_s": flops.achieved_flops_per_s,
        "mfu": flops.mfu,
        "step_time_s": timing.step_time_s.mean if timing.step_time_s else None,
        "micro_steps_only": timing.step_time_s is None and timing.micro_step_time_s is not None,
        "train_s": timing.train_s,
        "train_tokens_per_s": timing.tokens_per_s,
        "peak_memory_bytes": s.peak_bytes,
        "peak_memory_kind": peak.kind if peak else None,
        "memory_breakdown": dict(breakdown.items()) if breakdown else {},
        "j_per_token": s.energy.j_per_token,
        "energy_note": s.energy.energy_unavailable_reason,
        "loss_first": s.losses.loss_first,
        "loss_last": s.losses.loss_last,
    }


def _eval_cells(e: Evaluation) -> Row:
    """The evaluation's figures: size on disk, perplexity, generation time and speed."""
    gen = e.generation
    return {
        "disk_bytes": e.size.disk_bytes,
        "ppl": e.perplexity.ppl,
        "ppl_settings": _ppl_settings(e.perplexity),
        "gen_total_s": gen.total_s,
        "gen_new_tokens": gen.new_tokens,
        "gen_batch": gen.batch,
        "gen_tokens_per_s": gen.tokens_per_s,
    }


def _ppl_settings(p: EvalPerplexity) -> str | None:
    if p.text is None or p.tokens_scored is None:
        return None
    of = f" of {p.text_tokens:,}" if p.text_tokens is not None else ""
    return f"{p.text}, {p.tokens_scored:,}{of} tokens scored, window {p.max_length}, stride {p.stride}"


def _size_cells(row: Row, summary: Summary | None, e: Evaluation, settings: dict[str, Any]) -> Row:
    """Total parameters, size as deployed, the 16-bit base and the compression against it (`SIZE_NOTE`).
    Parameters come from the training summary, else the evaluation; an adapter (LoRA, QLoRA) is the
    trainable part, full fine-tuning has none."""
    method = row["method"]
    total = row["total_params"] if row["total_params"] is not None else e.size.total_params
    adapter = 0
    if method in ("lora", "qlora"):
        adapter = row["trainable_params"] if summary is not None else e.size.adapter_params
    four_bit = method == "qlora" or (method == "base" and e.quantization is not None)
    if total is None or adapter is None:
        return {"total_params": total, "deployed_bytes": None, "fp16_bytes": None, "compression": None}
    base = total - adapter
    deployed = deployed_bytes(base, adapter, quantized=0)
    if four_bit:
        double = e.quantization.double_quant if e.quantization else settings.get("double_quant")
        model = row["model"] or settings.get("model") or e.model
        deployed = deployed_bytes(base, adapter, quantized_params(model), double)
    fp16 = 2.0 * base
    return {
        "total_params": total,
        "deployed_bytes": deployed,
        "fp16_bytes": fp16,
        "compression": fp16 / deployed if deployed else None,
    }


# ---------------------------------------------------------------- the baseline


def baseline_index(rows: list[Row], baseline: str | None = None) -> int:
    """The row every improvement is measured against: the run labelled `baseline`, else the first run of
    method `baseline`; by default the first training run (the first row when none trained)."""
    if baseline is None:
        return next((i for i, r in enumerate(rows) if r["trained"]), 0)
    for key in ("label", "method"):
        hit = next((i for i, r in enumerate(rows) if r[key] == baseline), None)
        if hit is not None:
            return hit
    names = ", ".join(dict.fromkeys(r["label"] for r in rows))
    raise UserError(f"baseline {baseline!r} is no run label or method of this report; runs: {names}", field="baseline")


@dataclass(frozen=True)
class Gain:
    """One improvement column: the row key it compares and whether larger is better. `points`: the
    difference in percentage points (the study's MFU column), not a relative change."""

    title: str
    key: str
    larger_is_better: bool
    points: bool = False


GAINS = [
    Gain("size as deployed", "deployed_bytes", False),
    Gain("trainable params", "trainable_params", False),
    Gain("FLOPs / step", "flops_per_step", False),
    Gain("MFU", "mfu", True, points=True),
    Gain("time / step", "step_time_s", False),
    Gain("training time", "train_s", False),
    Gain("train tokens/s", "train_tokens_per_s", True),
    Gain("peak memory", "peak_memory_bytes", False),
    Gain("J / token", "j_per_token", False),
    Gain("perplexity", "ppl", False),
    Gain("inference time", "gen_total_s", False),
    Gain("generation tokens/s", "gen_tokens_per_s", True),
]


def improvement(value: float | None, reference: float | None, gain: Gain) -> float | None:
    """How much better `value` is than `reference`, in % (positive: better, as the study's Table 12 signs
    it: 73.9% smaller, -37.3% for a longer training time); percentage points for MFU."""
    if value is None or reference is None:
        return None
    if gain.points:
        return 100.0 * (value - reference)
    if reference == 0:
        return None
    change = (value - reference) / reference
    return 100.0 * (change if gain.larger_is_better else -change)


def _same_generation(a: Row, b: Row) -> bool:
    """Inference times compare only over the same number of generated tokens."""
    return (a["gen_new_tokens"], a["gen_batch"]) == (b["gen_new_tokens"], b["gen_batch"])


def _gain_cell(row: Row, base: Row, gain: Gain, explicit: bool) -> str:
    if gain.key == "ppl" and not explicit:  # by default each run against the base model it was trained from
        return _percent(improvement(row["ppl"], row["ppl_before"], gain), gain)
    if row is base:
        return "baseline"
    if gain.key == "gen_total_s" and not _same_generation(row, base):
        return MISSING
    return _percent(improvement(row[gain.key], base[gain.key], gain), gain)


def _percent(value: float | None, gain: Gain) -> str:
    shown = None if value is None else round(value, 2) or 0.0  # no "-0.00%" for an equal figure
    return num(shown, "{:+.2f} pp" if gain.points else "{:+.2f}%", missing=MISSING)


def improvement_cells(rows: list[Row], baseline: str | None = None) -> tuple[list[str], list[list[str]], str]:
    """(head, body, caption) of the improvement table against the baseline."""
    base = rows[baseline_index(rows, baseline)]
    head = ["run", *(g.title for g in GAINS)]
    body = [[r["label"], *(_gain_cell(r, base, g, baseline is not None) for g in GAINS)] for r in rows]
    ppl = "perplexity against " + (base["label"] if baseline else "the base each run was trained from")
    caption = f"baseline: {base['label']}; improvement in % (MFU in percentage points), positive = better; {ppl}"
    return head, body, caption


# ---------------------------------------------------------------- the comparison table


def _params(n: Any) -> str:
    if n is None:
        return MISSING
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def _ppl(r: Row) -> str:
    if r["ppl_before"] is not None and r["ppl"] is not None:
        return f"{r['ppl_before']:.2f} → {r['ppl']:.2f}"
    return num(r["ppl"], "{:.2f}", missing=MISSING)


def _bytes(n: Any, unit: str, digits: int) -> str:
    """Bytes in `unit` (binary: MiB = 2**20, GiB = 2**30, labelled so), "—" for a missing figure."""
    return format_bytes(n, unit, missing=MISSING, digits=digits)


def _inference(r: Row) -> str:
    """Seconds to generate N tokens (a batch of B prompts: B x N), as the study's "50 tokens generated"."""
    if r["gen_total_s"] is None or r["gen_new_tokens"] is None:
        return MISSING
    batch = f"{r['gen_batch']} x " if r["gen_batch"] and r["gen_batch"] > 1 else ""
    return f"{r['gen_total_s']:.3g} s ({batch}{r['gen_new_tokens']} tokens)"


def _n(fmt: str, scale: float = 1.0) -> Callable[[Any], str]:
    return lambda v: num(v, fmt, scale, missing=MISSING)


# (column, cell): Table 12's columns, then what lorafit measures beside them
COLUMNS: list[tuple[str, Callable[[Row], str]]] = [
    ("run", lambda r: r["label"]),
    ("total params", lambda r: _params(r["total_params"])),
    ("trainable params", lambda r: _params(r["trainable_params"])),
    ("trainable %", lambda r: _n("{:.2f}%")(r["trainable_pct"])),
    ("size as deployed", lambda r: _bytes(r["deployed_bytes"], "MiB", 2)),
    ("size on disk", lambda r: _bytes(r["disk_bytes"], "MiB", 2)),
    ("compression vs 16-bit", lambda r: _n("{:.2f}x")(r["compression"])),
    ("FLOPs / step", lambda r: _n("{:.3g} TFLOP", 1e12)(r["flops_per_step"])),
    ("achieved TFLOP/s", lambda r: _n("{:.3g}", 1e12)(r["achieved_flops_per_s"])),
    ("MFU", lambda r: _n("{:.2%}")(r["mfu"])),
    ("time / step", lambda r: _n("{:.3g} s")(r["step_time_s"])),
    ("training time", lambda r: _n("{:.1f} s")(r["train_s"])),
    ("train tokens/s", lambda r: _n("{:.1f}")(r["train_tokens_per_s"])),
    ("peak memory", lambda r: _bytes(r["peak_memory_bytes"], "GiB", 2)),
    ("J / token", lambda r: _n("{:.3g} J")(r["j_per_token"])),
    ("perplexity", _ppl),
    ("inference time", _inference),
    ("generation tokens/s", lambda r: _n("{:.1f}")(r["gen_tokens_per_s"])),
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


# ---------------------------------------------------------------- each run's settings


def settings_cells(rows: list[Row]) -> tuple[list[str], list[list[str]], str]:
    """(head, body, shared) of the training runs that stored a config: the options whose values differ between
    them (absent from a run's config: "—"), the memory plan each ran with, and a line of the options they
    share that are not TrainConfig's defaults."""
    runs = [r for r in rows if r["settings"]]
    names = [n for n in field_names(TrainConfig) if n not in HIDDEN_SETTINGS and any(n in r["settings"] for r in runs)]
    differ = [n for n in names if len({repr(r["settings"].get(n, MISSING)) for r in runs}) > 1]
    plan = any(r["memory_plan"] for r in runs)
    head = ["run", *differ, *(["memory plan (as run)"] if plan else [])]
    body = [
        [r["label"], *(_setting(r["settings"][n]) if n in r["settings"] else MISSING for n in differ)]
        + ([r["memory_plan"] or MISSING] if plan else [])
        for r in runs
    ]
    same = [n for n in names if n not in differ and all(n in r["settings"] for r in runs)]
    shared = ", ".join(f"{n}={_setting(runs[0]['settings'][n])}" for n in same if runs[0]["settings"][n] != _default(n))
    return head, body, shared


# ---------------------------------------------------------------- notes and documents


def _notes(rows: list[Row]) -> list[str]:
    notes = sorted({r["energy_note"] for r in rows if r["j_per_token"] is None and r["energy_note"]})
    out = [f"J/token not measured: {n}" for n in notes]
    v1 = [r["label"] for r in rows if r["micro_steps_only"]]
    if v1:
        out.append(
            f"time / step and FLOPs / step not shown for {', '.join(v1)}: its summary (schema v1) timed micro-batches, "
            "not optimizer steps"
        )
    out.append(
        "time / step: one optimizer step (all its micro-batches and the update); training time: every step, "
        "warm-up included; FLOPs / step: analytic FLOPs per optimizer step; achieved TFLOP/s and MFU over the "
        "timed steps"
    )
    out.append(SIZE_NOTE)
    out.append(
        "inference time: median time to generate N new tokens greedily with the KV cache (prefill included); "
        "generation tokens/s: those tokens over that time"
    )
    settings = sorted({r["ppl_settings"] for r in rows if r["ppl_settings"]})
    out += [f"perplexity: {s}" for s in settings]
    return out


def sections(records: list[RunRecord], baseline: str | None) -> dict[str, Any]:
    """Everything both documents show, computed once (the rows, tables and notes; `lorafit ui` shows them too)."""
    rows = build_rows(records)
    return {
        "rows": rows,
        "table": table_cells(rows),
        "improvement": improvement_cells(rows, baseline) if rows else ([], [], ""),
        "settings": settings_cells(rows),
        "breakdown": _breakdown_rows(rows),
        "notes": _notes(rows),
    }


def render_html(
    records: list[RunRecord], title: str, command: list[str] | None = None, baseline: str | None = None
) -> str:
    """The report page. `baseline`: the run label or method improvements are measured against
    (`baseline_index`); None: the first training run, and for perplexity each run's own base."""
    s = sections(records, baseline)
    ihead, ibody, caption = s["improvement"]
    shead, sbody, shared = s["settings"]
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in s["notes"])
    shared_html = f"<p>Shared by every run (not the defaults): {html.escape(shared)}</p>" if shared else ""
    return html_page(
        title,
        f'<h2>Comparison</h2><div id="comparison">{html_table(*s["table"])}</div>'
        f"<ul>{notes}</ul>"
        f'<h2>Improvement against the baseline</h2><div id="improvement">{html_table(ihead, ibody, caption)}</div>'
        f'<h2>Settings per run</h2><div id="settings">{html_table(shead, sbody)}</div>{shared_html}'
        f'<h2>Peak memory breakdown</h2><div id="memory">{html_table(*s["breakdown"])}</div>'
        f"<h2>Charts</h2>{figures_html(charts(s['rows']), CHART_TITLES)}",
        records,
        command,
    )


def render_markdown(
    records: list[RunRecord], title: str, command: list[str] | None = None, baseline: str | None = None
) -> str:
    """The report as Markdown: the same tables and notes as `render_html`, without the charts."""
    s = sections(records, baseline)
    ihead, ibody, caption = s["improvement"]
    shead, sbody, shared = s["settings"]
    parts = [f"# {title}", "", markdown_table(*s["table"]), ""]
    parts += [f"- {n}" for n in s["notes"]]
    parts += ["", "## Improvement against the baseline", "", caption, "", markdown_table(ihead, ibody), ""]
    parts += ["## Settings per run", "", markdown_table(shead, sbody), ""]
    parts += [f"Shared by every run (not the defaults): {shared}", ""] if shared else []
    parts += ["## Peak memory breakdown", "", markdown_table(*s["breakdown"]), ""]
    parts += markdown_environment(records, command)
    return "\n".join(parts) + "\n"
