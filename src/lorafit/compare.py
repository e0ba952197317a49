"""`lorafit compare`: train each method on the same data and budget, evaluate each and the base model,
store every run, and write the report.

Layout of the output directory:
    <out>/base/eval.json
    <out>/<method>/           a normal run directory (summary.json, adapter/ or model/, eval.json)
    <out>/runs.sqlite         unless --store points elsewhere
    <out>/report.html, report.md
"""

from __future__ import annotations

import dataclasses
import gc
import json
import time
from pathlib import Path
from typing import Any

import torch

from lorafit import evaluate
from lorafit.config import METHODS, EvalConfig, TrainConfig
from lorafit.errors import UserError
from lorafit.report import write_report
from lorafit.rundir import write_json_atomic
from lorafit.store import RunRecord, RunStore


def parse_methods(methods: str | list[str]) -> list[str]:
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise UserError(f"methods must be a comma-separated subset of {', '.join(METHODS)}; got {bad}", field="methods")
    if len(set(names)) != len(names):
        raise UserError("methods lists a method twice", field="methods")
    return names


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _evaluate(eval_cfg: EvalConfig, model: str, out: Path, label: str, run: Path | None = None) -> dict[str, Any]:
    subject = evaluate.load_subject(model, eval_cfg, run=run, label=label)
    result = evaluate.evaluate(subject, eval_cfg)
    del subject
    _free()
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "eval.json", result)
    return result


def compare(
    train_cfg: TrainConfig,
    methods: list[str],
    eval_cfg: EvalConfig,
    out_dir: str | Path | None = None,
    store_path: str | Path | None = None,
    progress_factory: Any = None,
    log: Any = print,
    command: list[str] | None = None,
) -> dict[str, Any]:
    """Run the comparison; returns {"out": dir, "report": html path, "runs": [...labels]}."""
    from lorafit.training import train

    out = Path(out_dir or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    group = out.name
    records: list[RunRecord] = []
    with RunStore(store_path or out / "runs.sqlite") as store:
        log(f"evaluating the base model {train_cfg.model}")
        base_eval = _evaluate(eval_cfg, train_cfg.model, out / "base", "base")
        record = RunRecord("base", "eval", "ok", {"model": train_cfg.model}, eval=base_eval, group_name=group)
        store.put(record)
        records.append(record)
        for method in methods:
            cfg = dataclasses.replace(train_cfg, method=method, out=str(out / method))
            log(f"training {method}")
            record = RunRecord(method, "train", "failed", cfg.to_dict(), group_name=group, run_dir=cfg.out)
            try:
                summary = train(cfg, progress_factory() if progress_factory else None)
                record.summary, record.status = summary, "ok"
                _free()
                log(f"evaluating {method}")
                record.eval = _evaluate(eval_cfg, train_cfg.model, Path(cfg.out), method, run=Path(cfg.out))
            except Exception as e:  # one failed method is a result; the comparison goes on
                oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
                record.status, record.error = ("oom" if oom else "failed"), repr(e)
                log(f"{method} {record.status}: {e}")
                _free()
            record.metrics = _metrics(Path(cfg.out))
            store.put(record)
            records.append(record)
    title = f"lorafit compare: {train_cfg.model} on {Path(train_cfg.data).name}, {', '.join(methods)}"
    html_path, md_path = write_report(records, out, title, command)
    return {"out": str(out), "report": str(html_path), "markdown": str(md_path), "runs": [r.label for r in records]}
