"""The page both reports are printed on: a self-contained HTML document and its Markdown twin.

The compare and sweep reports differ only in their rows, tables and charts; this module holds
what they share: number formatting, HTML and Markdown tables, the style sheet, the environment
block (device, versions, command), charts embedded as base64 PNG data URIs so the HTML file
stands alone, and writing report.html and report.md atomically. Byte sizes are not formatted here:
the reports print them through `lorafit.base.units.format_bytes` in binary units, labelled so.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

from lorafit.base.jsonable import to_json_object
from lorafit.run.rundir import write_text_atomic
from lorafit.run.store import RunRecord

# ---------------------------------------------------------------- numbers


MISSING = "—"  # the comparison report's mark for a figure the record does not hold (as the QLoRA report's Table 12)


def num(value: Any, fmt: str = "{:.3g}", scale: float = 1.0, missing: str = "n/a") -> str:
    """`value / scale` formatted, or `missing` for a missing (None or NaN) figure."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return fmt.format(value / scale)


# ---------------------------------------------------------------- tables


def html_table(head: list[str], body: list[list[str]], caption: str | None = None) -> str:
    """A table; the caption (e.g. which run is the baseline) sits above it, inside the <table>."""
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table>{cap}<thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def markdown_table(head: list[str], body: list[list[str]]) -> str:
    """A pipe table; a "|" inside a cell becomes "/" so it cannot split the cell."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in body])


# ---------------------------------------------------------------- charts


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display needed); imported only to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig: Any) -> str:
    """The figure as a base64 PNG (and closed, so a report of many charts does not hold them all)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def svg(fig: Any) -> str:
    """The figure as an inline <svg> element (text kept as text, and closed like `png`): the same chart as
    the report's PNG, for a page that draws it without an image request (`lorafit ui`)."""
    buf = io.StringIO()
    with pyplot().rc_context({"svg.fonttype": "none", "svg.hashsalt": "lorafit"}):
        fig.savefig(buf, format="svg", bbox_inches="tight")
    pyplot().close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]


def figures_html(images: dict[str, str], titles: dict[str, str]) -> str:
    """<figure>s of base64 PNG charts, each marked with data-chart=<name> (tests look for them)."""
    return "".join(
        f'<figure><img alt="{name}" data-chart="{name}" src="data:image/png;base64,{image}">'
        f"<figcaption>{html.escape(titles.get(name, name))}</figcaption></figure>"
        for name, image in images.items()
    )


# ---------------------------------------------------------------- the environment block


def environment(records: list[RunRecord], command: list[str] | None = None) -> dict[str, Any]:
    """Where the numbers came from: the first training run's device, precision, versions and data."""
    summary = next((r.summary for r in records if r.summary), None)
    env = summary.environment if summary else None
    return {
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(command if command is not None else sys.argv),
        "device": to_json_object(env.device) if env and env.device else {"platform": platform.platform()},
        "precision": summary.precision if summary else None,
        "versions": env.versions if env else None,
        "data": summary.data.file if summary and summary.data else None,
        "eval_settings": next((r.eval["settings"] for r in records if r.eval and "settings" in r.eval), None),
    }


def markdown_environment(records: list[RunRecord], command: list[str] | None) -> list[str]:
    env = json.dumps(environment(records, command), indent=2, default=str)
    return ["## Environment", "", "```json", env, "```", "", "Charts are in report.html."]


# ---------------------------------------------------------------- the document

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1280px;
color:#222;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0;display:block;overflow-x:auto}
th,td{border:1px solid #ccc;padding:.3rem .5rem;text-align:right;white-space:nowrap}
th{background:#f3f3f3}caption{text-align:left;font-size:.85rem;color:#555;padding:.2rem 0}
td:first-child,th:first-child{text-align:left;font-weight:600}
figure{margin:1rem 0}img{max-width:100%;height:auto}figcaption{font-size:.85rem;color:#555}
pre{background:#f7f7f7;padding:.75rem;font-size:.8rem;overflow-x:auto}
"""


def html_page(title: str, body: str, records: list[RunRecord], command: list[str] | None) -> str:
    """A self-contained HTML document: title, body, and the environment block."""
    env = html.escape(json.dumps(environment(records, command), indent=2, default=str))
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}"
        f"<h2>Environment</h2><pre>{env}</pre></body></html>"
    )


def write_documents(out_dir: str | Path, html_text: str, md_text: str) -> tuple[Path, Path]:
    """Write report.html and report.md into `out_dir` atomically; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    html_path, md_path = out / "report.html", out / "report.md"
    write_text_atomic(html_path, html_text)
    write_text_atomic(md_path, md_text)
    return html_path, md_path
