"""`lorafit compare`: train each method on the same data and budget, evaluate each and the base model,
store every run, and write the report.

Every training and evaluation runs in its own `lorafit` subprocess: peak memory is then that run's
own (a process keeps freed memory, so the second run in one process would inherit the first's
peak), and a run that runs out of memory or crashes is recorded as `oom` / `failed` while the
comparison goes on.

The bases are evaluated in the precision the runs train in, and the 4-bit base (when qlora is
compared) stored as the QLoRA run stores it: its quant type and double quantization.

A study file (`lorafit compare --config study.yaml`, read by `load_study`) gives every method its own
settings, as the QLoRA report's Table 3 gives full fine-tuning and QLoRA their own batch, accumulation,
learning rate and optimizer:

    model: random:tinyllama-1.1b     # shared: any train option, and the eval options (ppl, gen_tokens, ...)
    max_steps: 500
    methods:                         # the methods to run, each with its own options on top
      full: {batch_size: 2, grad_accum: 4, learning_rate: 2.0e-5, optimizer: adamw}
      qlora: {batch_size: 4, grad_accum: 2, learning_rate: 2.0e-4, optimizer: paged_adamw_8bit}

A method's run gets the defaults, then the file's shared options, then its own, then the command
line's flags (the last word: `--batch-size 1` sets every method's). `--methods` picks methods; one the
file does not list runs with the shared options. Each run's resolved config is its row's `config` in
the store (and <out>/<method>.yaml, <out>/<method>/config.yaml).

Layout of the output directory:
    <out>/base/eval.json, <out>/base-nf4/eval.json (the 4-bit base, base-fp4 with --quant-type fp4)
    <out>/<method>/           a normal run directory (config.yaml, summary.json, adapter/ or model/, eval.json)
    <out>/runs.sqlite         unless --store points elsewhere
    <out>/report.html, report.md
"""

from __future__ import annotations

import dataclasses
import difflib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafit.base.config import (
    METHODS,
    EvalConfig,
    TrainConfig,
    coerce,
    dump_yaml,
    field_names,
    to_flags,
    unknown_key,
)
from lorafit.base.errors import UserError
from lorafit.reports import write_report
from lorafit.run.rundir import RunDir
from lorafit.run.runner import run_lorafit
from lorafit.run.store import RunRecord, RunStore
from lorafit.run.summary import Summary
from lorafit.studies.sweep import read_yaml

# EvalConfig's device and precision are not options of a study: the runs' own (a run's eval computes in
# its own precision, the bases in the runs'), as on compare's command line.
EVAL_OPTIONS = tuple(name for name in field_names(EvalConfig) if name not in ("device", "precision"))
STUDY_OPTIONS = ("methods", "store", "baseline")  # compare's own, beside the train and eval options
SET_BY_COMPARE = ("method", "out")  # each method's run: its method, and <out>/<method>
SHARED_ONLY = ("model", "device")  # the bases are evaluated once, on one model and device


def parse_methods(methods: str | list[str]) -> list[str]:
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise UserError(f"methods must be a comma-separated subset of {', '.join(METHODS)}; got {bad}", field="methods")
    if len(set(names)) != len(names):
        raise UserError("methods lists a method twice", field="methods")
    return names


@dataclass
class StudyFile:
    """A study file as written, every value checked: shared options, per-method ones, eval options."""

    shared: dict[str, Any] = field(default_factory=dict)
    methods: list[str] | None = None  # the file's methods, in its order (None: it names none)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> its own options
    eval: dict[str, Any] = field(default_factory=dict)
    store: str | None = None
    baseline: str | None = None  # the run or method the report's improvements are against


@dataclass
class Study:
    """What `lorafit compare` runs: each method's resolved config, the shared one (model, data, the
    bases' precision), how every model is evaluated, and notes for the log."""

    shared: TrainConfig
    configs: dict[str, TrainConfig]  # method -> its run's config (out set by compare), in run order
    eval: EvalConfig
    store: str | None = None
    notes: list[str] = field(default_factory=list)
    baseline: str | None = None

    @property
    def methods(self) -> list[str]:
        return list(self.configs)


def load_study(
    path: Path | None,
    train_flags: dict[str, Any] | None = None,
    eval_flags: dict[str, Any] | None = None,
    methods: str | None = None,
) -> Study:
    """The comparison a study file (None: none) and the command line ask for; every method's config is
    built, so a bad option fails here, before anything runs, naming the file, the method and the key."""
    spec = read_study(path) if path is not None else StudyFile()
    source = str(path) if path is not None else "command line"
    cli = {k: coerce(k, v, "command line") for k, v in (train_flags or {}).items() if v is not None}
    shared = _train_config({**spec.shared, **cli}, source, cli)
    names = parse_methods(methods) if methods is not None else spec.methods or list(METHODS)
    configs, notes = {}, []
    for method in names:
        own = spec.overrides.get(method, {})
        notes += [
            f"--{k.replace('_', '-')} {cli[k]} (command line) replaces {method}'s {k}: {own[k]} from {source}"
            for k in own
            if k in cli and cli[k] != own[k]
        ]
        where = f"{source} (methods.{method})" if method in spec.overrides else source
        configs[method] = _train_config({**spec.shared, **own, **cli, "method": method}, where, cli)
    given = {k: coerce(k, v, "command line", EvalConfig) for k, v in (eval_flags or {}).items() if v is not None}
    try:
        eval_cfg = EvalConfig(**{**spec.eval, **given, "device": shared.device})
    except UserError as e:
        raise UserError(e.message, file=source, field=e.field) from e
    if spec.baseline is not None and spec.baseline not in configs:
        raise UserError(f"baseline {spec.baseline!r} is none of the methods: {', '.join(configs)}", file=source,
                        field="baseline")  # fmt: skip
    return Study(shared, configs, eval_cfg, spec.store, notes, spec.baseline)


def _train_config(values: dict[str, Any], source: str, cli: dict[str, Any]) -> TrainConfig:
    """TrainConfig(**values), its errors naming where the refused value was set: `source` (the file, or
    the file's method) or the command line."""
    try:
        return TrainConfig(**values)
    except UserError as e:
        raise UserError(e.message, file="command line" if e.field in cli else source, field=e.field) from e


def read_study(path: Path) -> StudyFile:
    """Read a study file: top-level train options, eval options, `store`, and `methods:` (a mapping of
    method: its own train options, or a list of methods)."""
    source = str(path)
    raw = read_yaml(path, "study")
    if raw is None:
        return StudyFile()
    if not isinstance(raw, dict):
        raise UserError("a study file is a mapping of option: value, with methods: {method: options}", file=source)
    spec = StudyFile()
    for key, value in raw.items():
        key = str(key).replace("-", "_")
        if key == "methods":
            spec.methods, spec.overrides = _methods(value, source)
        elif key == "store":
            spec.store = _text(key, value, source)
        elif key == "baseline":
            spec.baseline = _text(key, value, source)
        elif key == "method":  # top-level `out` is the comparison's directory
            raise UserError("compare sets each run's method: list the methods under methods:", file=source, field=key)
        elif key in EVAL_OPTIONS:
            spec.eval[key] = coerce(key, value, source, EvalConfig)
        elif key in field_names(TrainConfig):
            spec.shared[key] = coerce(key, value, source)
        else:
            raise _unknown_option(key, source)
    return spec


def _text(key: str, value: Any, source: str) -> str:
    if not isinstance(value, str) or not value:
        raise UserError(f"{key} must be a path, got {value!r}", file=source, field=key)
    return value


def _unknown_option(key: str, source: str) -> UserError:
    """unknown_key's error, its did-you-mean drawn from every option a study file takes."""
    close = difflib.get_close_matches(key, [*field_names(TrainConfig), *EVAL_OPTIONS, *STUDY_OPTIONS], n=1)
    if close and close[0] in STUDY_OPTIONS:
        return UserError(f"unknown option '{key}'; did you mean '{close[0]}'?", file=source, field=key)
    return unknown_key(key, source, EvalConfig if close and close[0] in EVAL_OPTIONS else TrainConfig)


def _methods(spec: Any, source: str) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """(methods, their own options) of `methods:`: a mapping method -> options (empty: shared options
    only), or a list / comma-separated string of methods."""
    if isinstance(spec, (str, list)):
        try:
            return parse_methods(spec), {}
        except UserError as e:
            raise UserError(e.message, file=source, field="methods") from e
    if not isinstance(spec, dict) or not spec:
        raise UserError(
            f"methods must be a mapping of method: {{option: value}} (or a list of methods), got {spec!r}",
            file=source,
            field="methods",
        )
    overrides = {}
    for name, options in spec.items():
        method = _method_name(name, source)
        where = f"{source} (methods.{method})"
        if options is not None and not isinstance(options, dict):
            raise UserError(f"{method}'s options must be a mapping of option: value, got {options!r}", file=where)
        overrides[method] = {_key(k): _method_option(_key(k), v, where) for k, v in (options or {}).items()}
    return list(overrides), overrides


def _key(key: Any) -> str:
    return str(key).replace("-", "_")


def _method_name(name: Any, source: str) -> str:
    if name in METHODS:
        return name
    close = difflib.get_close_matches(str(name), METHODS, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise UserError(
        f"unknown method '{name}'{hint} (methods: {', '.join(METHODS)})", file=source, field=f"methods.{name}"
    )


def _method_option(key: str, value: Any, where: str) -> Any:
    """One of a method's own options, checked: a train option that may differ between methods."""
    if key in SET_BY_COMPARE:
        raise UserError(f"'{key}' is set by compare for each method's run", file=where, field=key)
    if key in SHARED_ONLY:
        raise UserError(
            f"'{key}' is shared by every method (the bases are evaluated once, on one model and device): "
            "set it at the top level",
            file=where,
            field=key,
        )
    if key in EVAL_OPTIONS or key in STUDY_OPTIONS:
        raise UserError(f"'{key}' is shared by every method: set it at the top level", file=where, field=key)
    return coerce(key, value, where)  # an unknown key: unknown_key's did-you-mean


def base_evaluations(configs: dict[str, TrainConfig], shared: TrainConfig) -> list[tuple[str, TrainConfig, list[str]]]:
    """(label, the config whose precision it computes in, extra eval flags) of the bases to evaluate:
    the dense base, in the dense methods' precision (the shared one when they differ or none is
    compared), and with qlora the 4-bit base it trains on, quantized and computing as the QLoRA run
    does (QLoRA's quality is measured against that model)."""
    dense = {cfg.precision for m, cfg in configs.items() if m != "qlora"}
    reference = dataclasses.replace(shared, precision=dense.pop()) if len(dense) == 1 else shared
    bases: list[tuple[str, TrainConfig, list[str]]] = [("base", reference, [])]
    qlora = configs.get("qlora")
    if qlora is not None:
        double = "--double-quant" if qlora.double_quant else "--no-double-quant"
        flags = ["--method", "qlora", "--quant-type", qlora.quant_type, double]
        bases.append((f"base-{qlora.quant_type}", qlora, flags))
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
    configs: dict[str, TrainConfig] | None = None,
    baseline: str | None = None,
) -> dict[str, Any]:
    """Run the comparison; returns {"out": dir, "report": html path, "runs": [...labels], "status": {...}}.

    `configs` gives a method its own config (a study file's, `load_study`); a method without one
    trains with `train_cfg`, which also names the model the bases are evaluated on. `baseline`: the method
    the report's improvements are measured against (default: the first)."""
    out = Path(out_dir or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    group = out.name
    per_method = {m: (configs or {}).get(m) or dataclasses.replace(train_cfg, method=m) for m in methods}
    records: list[RunRecord] = []
    with RunStore(store_path or out / "runs.sqlite") as store:
        for label, reference, extra in base_evaluations(per_method, train_cfg):
            log(f"evaluating the {label} model {train_cfg.model}")
            flags = to_flags(base_eval_config(reference, eval_cfg))
            args = ["eval", "--model", train_cfg.model, *extra, "--out", str(out / label), *flags]
            record = RunRecord(label, "eval", "failed", {"model": train_cfg.model}, group_name=group)
            record.eval = _run(record, args, log)
            store.put(record)
            records.append(record)
        for method in methods:
            cfg = dataclasses.replace(per_method[method], out=str(out / method))
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
    html_path, md_path = write_report(records, out, title, command, baseline=baseline)
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
