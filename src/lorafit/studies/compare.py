"""`lorafit compare`: train each method on the same data and budget, evaluate each and the base model,
store every run, and write the report.

Every training and evaluation runs in its own `lorafit` subprocess: peak memory is then that run's
own (a process keeps freed memory, so the second run in one process would inherit the first's
peak), and a run that runs out of memory or crashes is recorded as `oom` / `failed` while the
comparison goes on.

The bases are evaluated in the precision the runs train in, and the 4-bit base (when qlora is
compared) stored as the QLoRA run stores it: its quant type and double quantization.

Layout of the output directory:
    <out>/base/eval.json, <out>/base-nf4/eval.json (the 4-bit base, base-fp4 with --quant-type fp4)
    <out>/<method>/           a normal run directory (config.yaml, summary.json, adapter/ or model/, eval.json)
    <out>/runs.sqlite         unless --store points elsewhere
    <out>/report.html, report.md
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from lorafit.base.config import METHODS, EvalConfig, TrainConfig, dump_yaml, to_flags
from lorafit.base.errors import UserError
from lorafit.reports import write_report
from lorafit.run.rundir import RunDir
from lorafit.run.runner import run_lorafit
from lorafit.run.store import RunRecord, RunStore
from lorafit.run.summary import Summary


def parse_methods(methods: str | list[str]) -> list[str]:
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise UserError(f"methods must be a comma-separated subset of {', '.join(METHODS)}; got {bad}", field="methods")
    if len(set(names)) != len(names):
        raise UserError("methods lists a method twice", field="methods")
    return names


def base_evaluations(train_cfg: TrainConfig, methods: list[str]) -> list[tuple[str, list[str]]]:
    """(label, extra eval flags) of the bases to evaluate: the dense base, and with qlora the 4-bit base
    it trains on, quantized as `train_cfg` says (QLoRA's quality is measured against that model)."""
    bases: list[tuple[str, list[str]]] = [("base", [])]
    if "qlora" in methods:
        double = "--double-quant" if train_cfg.double_quant else "--no-double-quant"
        bases.append(
            (f"base-{train_cfg.quant_type}", ["--method", "qlora", "--quant-type", train_cfg.quant_type, double])
        )
    return bases


def base_eval_config(train_cfg: TrainConfig, eval_cfg: EvalConfig) -> EvalConfig:
    """The bases compute in the precision the runs train in (a run's own eval, 'auto', takes its own)."""
    if eval_cfg.precision != "auto":
        return eval_cfg
    return dataclasses.replace(eval_cfg, precision=train_cfg.precision)


def compare(
    train_cfg: TrainConfig,
    methods: list[str],
    eval_cfg: EvalConfig,
    out_dir: str | Path | None = None,
    store_path: str | Path | None = None,
    log: Any = print,
    command: list[str] | None = None,
) -> dict[str, Any]:
    """Run the comparison; returns {"out": dir, "report": html path, "runs": [...labels], "status": {...}}."""
    out = Path(out_dir or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    group = out.name
    records: list[RunRecord] = []
    with RunStore(store_path or out / "runs.sqlite") as store:
        for label, extra in base_evaluations(train_cfg, methods):
            log(f"evaluating the {label} model {train_cfg.model}")
            flags = to_flags(base_eval_config(train_cfg, eval_cfg))
            args = ["eval", "--model", train_cfg.model, *extra, "--out", str(out / label), *flags]
            record = RunRecord(label, "eval", "failed", {"model": train_cfg.model}, group_name=group)
            record.eval = _run(record, args, log)
            store.put(record)
            records.append(record)
        for method in methods:
            cfg = dataclasses.replace(train_cfg, method=method, out=str(out / method))
            config_file = out / f"{method}.yaml"
            dump_yaml(cfg, config_file)
            log(f"training {method}")
            record = RunRecord(method, "train", "failed", cfg.to_dict(), group_name=group, run_dir=cfg.out)
            trained = _run(record, ["train", "--config", str(config_file)], log)
            if trained is not None:  # one failed method is a result; the comparison goes on
                record.summary = Summary.from_dict(trained)
                log(f"evaluating {method}")
                record.eval = _run(record, ["eval", "--run", cfg.out, *to_flags(eval_cfg)], log)
            record.metrics = RunDir(cfg.out).metrics()
            store.put(record)
            records.append(record)
    title = f"lorafit compare: {train_cfg.model} on {Path(train_cfg.data).name}, {', '.join(methods)}"
    html_path, md_path = write_report(records, out, title, command)
    return {
        "out": str(out),
        "report": str(html_path),
        "markdown": str(md_path),
        "runs": [r.label for r in records],
        "status": {r.label: r.status for r in records},
    }


def _run(record: RunRecord, args: list[str], log: Any) -> Any:
    """Run one `lorafit` step of the comparison into `record`: its JSON result, or None with the
    record's status and error set (out of memory or failed)."""
    finished = run_lorafit(args)
    record.status, record.error = finished.status, finished.error
    if not finished.ok:
        log(f"{record.label} {args[0]} {finished.status}: {finished.error}")
    return finished.result
