"""The `lorafit` command line: thin Typer commands over library functions.

`train`'s flags are generated from `TrainConfig`'s fields, so an option is defined (name, type,
default, help, choices) in exactly one place. Flags override values from `--config FILE`.
"""

from __future__ import annotations

import dataclasses
import errno
import inspect
import json
import os
import sys
import time
import typing
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from lorafit.base.config import EvalConfig, ServeConfig, TrainConfig, build_config
from lorafit.base.errors import EXIT_OUT_OF_MEMORY, UserError, is_out_of_memory

app = typer.Typer(
    help="Fine-tune language models with LoRA, QLoRA or full fine-tuning, and measure what each choice costs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from lorafit import __version__

        typer.echo(f"lorafit {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Fine-tune language models with LoRA, QLoRA or full fine-tuning, and measure what each choice costs."""


def _cli_type(tp: Any) -> Any:
    """Typer type for a config field: lists are passed comma-separated."""
    hints = typing.get_args(tp) or (tp,)
    inner = next((h for h in hints if h is not type(None)), tp)
    return str if typing.get_origin(inner) is list else inner


def _help(f: dataclasses.Field) -> str:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
    if isinstance(default, list):
        default = ",".join(default)
    text = f.metadata["help"]
    if f.metadata.get("choices"):
        text += f" Choices: {', '.join(f.metadata['choices'])}."
    return f"{text} \\[default: {'unset' if default is None else default}]"


def _option(name: str, annotation: Any, help: str, default: Any = None) -> inspect.Parameter:
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[annotation, typer.Option(help=help)]
    )


def _config_params(cls: type, exclude: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One Typer option per dataclass field (help, default and choices from the field)."""
    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        tp = _cli_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        decls = [f"{flag}/--no-{f.name.replace('_', '-')}"] if tp is bool else [flag]
        params.append(
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[tp | None, typer.Option(*decls, help=_help(f), show_default=False)],
            )
        )
    return params


def _split(flags: dict[str, Any], cls: type) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in flags.items() if k in names}


CONFIG_OPTION = _option("config", Path | None, "YAML file of training options; flags override it.")
JSON_OPTION = inspect.Parameter(
    "json_out",
    inspect.Parameter.KEYWORD_ONLY,
    default=False,
    annotation=Annotated[bool, typer.Option("--json", help="Print the result as JSON on the last stdout line.")],
)


class RunInterrupted(UserError):
    exit_code = 130  # the shell's convention for a run stopped by SIGINT


RESUME_OPTION = _option(
    "resume", Path | None, "Continue this run directory from its newest checkpoint, with its own config.yaml."
)


NPROC_OPTION = _option(
    "nproc",
    int,
    "Train with N processes on this machine (data parallel, one per GPU; gloo on CPU): launches torchrun. "
    "--batch-size is per process; the global batch is batch-size x grad-accum x N.",
    default=1,
)


def _train_signature() -> inspect.Signature:
    return inspect.Signature([CONFIG_OPTION, JSON_OPTION, RESUME_OPTION, NPROC_OPTION, *_config_params(TrainConfig)])


def train_command(
    config: Path | None = None, json_out: bool = False, resume: Path | None = None, nproc: int = 1, **flags: Any
) -> None:
    """Fine-tune a model (full, LoRA or QLoRA) and profile the run: tokens/s, memory, energy, FLOPs/MFU.

    Writes a run directory with config.yaml, metrics.jsonl, summary.json and the adapter (or model).
    Ctrl-C or SIGTERM finishes the step in progress and writes a checkpoint; --resume RUN_DIR continues.
    Several processes: --nproc N, or `torchrun --nproc-per-node N -m lorafit train ...`, or
    `accelerate launch -m lorafit train ...` (multi-node, FSDP: see docs/scale-out.md).
    """
    from lorafit.training import distributed

    if resume is not None:
        given = [k for k, v in flags.items() if v is not None]
        if config is not None or given:
            raise UserError(f"--resume continues with the run's own config.yaml; drop {given or ['--config']}")
        if not (resume / "config.yaml").is_file():
            raise UserError("not a run directory (no config.yaml)", file=str(resume))
        cfg = build_config(resume / "config.yaml")
        cfg.out = str(resume)
    else:
        cfg = build_config(config, flags)
    if nproc != 1 and not distributed.under_launcher():  # options checked above, once, before launching
        raise SystemExit(distributed.launch(nproc, sys.argv[1:], cpu=cfg.device == "cpu"))
    if nproc != 1 and int(os.environ.get("WORLD_SIZE", "1")) != nproc:
        raise UserError(f"--nproc {nproc}, but the launcher started {os.environ['WORLD_SIZE']} processes")
    from lorafit.cli.console import RichProgress, print_summary
    from lorafit.training.loop import train

    try:
        summary = train(cfg, RichProgress(console), resume=resume is not None)
    except KeyboardInterrupt as e:  # click would turn it into "Aborted!" and exit 1
        raise RunInterrupted(f"{e or 'interrupted'}; continue with: lorafit train --resume {cfg.out}") from None
    if not distributed.is_main_process():
        return
    print_summary(console, summary)
    if json_out:
        sys.stdout.write(json.dumps(summary, default=str) + "\n")


train_command.__signature__ = _train_signature()  # type: ignore[attr-defined]
app.command("train")(train_command)


def eval_command(
    model: str = "smollm2-135m",
    run: Path | None = None,
    adapter: Path | None = None,
    method: str | None = None,
    out: Path | None = None,
    json_out: bool = False,
    **flags: Any,
) -> None:
    """Measure a model: perplexity (sliding window), generation speed (TTFT, decode tokens/s) and size.

    Evaluates the base --model, a training run (--run DIR: its adapter or full model on the base it was
    trained on) or a base + PEFT adapter directory (--adapter DIR). Writes eval.json into the run
    directory, or into --out.
    """
    from lorafit.base.config import build_eval_config
    from lorafit.cli.console import print_eval
    from lorafit.run.rundir import write_json_atomic
    from lorafit.studies import evaluate

    if run is not None and adapter is not None:
        raise UserError("give --run or --adapter, not both", field="run")
    if method is not None and method not in ("lora", "qlora"):
        raise UserError("--method is lora (dense base) or qlora (4-bit NF4 base)", field="method")
    cfg = build_eval_config(flags)
    subject = evaluate.load_subject(model, cfg, run=run, adapter=adapter, method=method)
    result = evaluate.evaluate(subject, cfg)
    target = out or run
    if target is not None:
        Path(target).mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(target) / "eval.json", result)
        result["eval_json"] = str(Path(target) / "eval.json")
    print_eval(console, result)
    if json_out:
        sys.stdout.write(json.dumps(result, default=str) + "\n")


eval_command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [
        _option("model", str, "Base model (as for train); ignored with --run, which knows its own.", "smollm2-135m"),
        _option("run", Path | None, "A training run directory to evaluate."),
        _option("adapter", Path | None, "A PEFT adapter directory to evaluate on --model."),
        _option(
            "method",
            str | None,
            "'qlora' loads the base 4-bit (NF4) as QLoRA trains it: with --adapter, or alone to measure the "
            "quantized base (default: dense).",
        ),
        _option("out", Path | None, "Where eval.json goes (default: the run directory; none for a base model)."),
        JSON_OPTION,
        *_config_params(EvalConfig),
    ]
)
app.command("eval")(eval_command)


def compare_command(
    config: Path | None = None,
    methods: str = "full,lora,qlora",
    store: Path | None = None,
    json_out: bool = False,
    **flags: Any,
) -> None:
    """Train each method on the same data and budget, evaluate each and the base model, and write a report.

    Output: one run directory per method, base/eval.json, runs.sqlite (or --store) and a self-contained
    report.html + report.md under --out. Training options apply to every method. Each training and
    evaluation runs in its own process, so each peak memory is its own and an OOM is recorded, not fatal.
    """
    from lorafit.base.config import build_eval_config
    from lorafit.studies.compare import compare, parse_methods

    method_list = parse_methods(methods)
    eval_flags = _split(flags, EvalConfig)
    train_flags = {k: v for k, v in flags.items() if k not in eval_flags}
    cfg = build_config(config, train_flags)
    eval_cfg = build_eval_config({**eval_flags, "device": cfg.device})
    result = compare(
        cfg,
        method_list,
        eval_cfg,
        out_dir=cfg.out,
        store_path=store,
        log=lambda msg: console.print(f"[bold]lorafit compare:[/] {msg}"),
        command=["lorafit", *sys.argv[1:]],
    )
    console.print(f"report: {result['report']}")
    if json_out:
        sys.stdout.write(json.dumps(result) + "\n")


compare_command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [
        CONFIG_OPTION,
        _option("methods", str, "Methods to compare, comma-separated (full, lora, qlora).", "full,lora,qlora"),
        _option("store", Path | None, "SQLite run store to add the runs to (default <out>/runs.sqlite)."),
        JSON_OPTION,
        *_config_params(TrainConfig, exclude=("method",)),
        *_config_params(EvalConfig, exclude=("device",)),
    ]
)
app.command("compare")(compare_command)


@app.command("report")
def report_command(
    run_dirs: Annotated[
        list[Path] | None, typer.Argument(help="Run directories (each with summary.json and/or eval.json).")
    ] = None,
    store: Annotated[Path | None, typer.Option(help="Report runs from this SQLite run store instead.")] = None,
    group: Annotated[str | None, typer.Option(help="With --store: only runs of this compare or sweep.")] = None,
    filter: Annotated[
        list[str] | None,
        typer.Option("--filter", help="With --store: COLUMN=VALUE on label, kind, status or id (repeatable)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Directory for report.html and report.md.")] = Path("."),
    title: Annotated[str, typer.Option(help="Report title.")] = "lorafit report",
) -> None:
    """Write a comparison report (self-contained HTML with charts, and Markdown) for any set of runs."""
    from lorafit.reports.compare import write_report
    from lorafit.run.store import RunStore, record_from_run_dir

    if bool(run_dirs) == bool(store):
        raise UserError("give run directories or --store, one of the two")
    if store is not None:
        if not store.is_file():
            raise UserError("run store not found", file=str(store))
        equal = {}
        for item in filter or []:
            key, sep, value = item.partition("=")
            if not sep:
                raise UserError(f"--filter takes COLUMN=VALUE, got {item!r}", field="filter")
            equal[key.strip()] = value.strip()
        with RunStore(store) as db:
            records = db.runs(group_name=group, **equal)
    else:
        records = [record_from_run_dir(d) for d in run_dirs or []]
    labels = [r.label for r in records]
    for r in records:  # runs of the same method get their directory name added
        if labels.count(r.label) > 1 and r.run_dir:
            r.label = f"{r.label} ({Path(r.run_dir).name})"
    if not records:
        raise UserError("no runs to report")
    html_path, md_path = write_report(records, out, title, ["lorafit", *sys.argv[1:]])
    console.print(f"report: {html_path} and {md_path} ({len(records)} runs)")


def _fmt_bytes(n: Any) -> str:
    return "" if n is None else f"{n / 2**30:.2f} GiB"


def _sweep_table(sweep: Any, state: dict[str, str], results: dict[str, Any]) -> Any:
    from rich.table import Table

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
        s = (results[p.id].summary or {}) if p.id in results else {}
        tps = s.get("tokens_per_s")
        loss = s.get("loss_mean")
        table.add_row(
            p.label,
            state[p.id],
            "" if tps is None else f"{tps:.1f}",
            _fmt_bytes((s.get("peak_memory") or {}).get("peak_bytes")),
            "" if loss is None else f"{loss:.4f}",
        )
    return table


@app.command("sweep")
def sweep_command(
    grid: Annotated[Path, typer.Argument(help="Grid YAML: name, steps, base (options) and grid (option: [values]).")],
    store: Annotated[Path | None, typer.Option(help="SQLite run store (default <out>/runs.sqlite).")] = None,
    out: Annotated[Path | None, typer.Option(help="Sweep directory (default runs/sweep-<name>).")] = None,
    parallel: Annotated[
        int,
        typer.Option(
            help="Points run at the same time (local executor, at most one GPU each: with several GPUs, one per GPU)."
        ),
    ] = 1,
    executor: Annotated[
        str,
        typer.Option(
            help="Where points run: local (subprocesses here) or ray (Ray tasks on a cluster; needs lorafit[ray])."
        ),
    ] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster to join, e.g. auto or ray://head:10001 (default: RAY_ADDRESS, else a local Ray)."
        ),
    ] = None,
    retry_failed: Annotated[bool, typer.Option(help="Run points stored as failed again.")] = False,
    memory_budget: Annotated[
        str | None, typer.Option(help="Memory each point may use, e.g. 8GB (overrides the grid file's).")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print every point's record as JSON at the end.")] = False,
) -> None:
    """Run a grid of training runs, each in its own process; OOM and crashed points are recorded and the
    sweep goes on. Points already in the store are skipped, so an interrupted sweep resumes where it stopped."""
    from rich.live import Live

    from lorafit.run.store import RunStore
    from lorafit.studies.sweep import load_grid, make_executor, run_sweep

    if parallel < 1:
        raise UserError("--parallel must be >= 1", field="parallel")
    provisional = out or Path("runs") / f"sweep-{grid.stem}"
    sweep = load_grid(grid, provisional, memory_budget)
    out_dir = out or Path("runs") / f"sweep-{sweep.name}"
    if out_dir != provisional:
        sweep = load_grid(grid, out_dir, memory_budget)
    runner = make_executor(executor, parallel, ray_address)
    console.print(f"{len(sweep.points)} points; executor {runner.describe()}")
    with (
        RunStore(store or out_dir / "runs.sqlite") as db,
        Live(console=console, auto_refresh=False) as live,
    ):

        def update(state: dict[str, str], results: dict[str, Any]) -> None:
            live.update(_sweep_table(sweep, state, results), refresh=True)

        try:
            results = run_sweep(sweep, db, out_dir, parallel, retry_failed, update, runner)
        finally:
            runner.close()
    console.line()
    from lorafit.reports.compare import write_report
    from lorafit.reports.sweep import sweep_rows, verdict

    records = [results[p.id] for p in sweep.points]
    html_path, _ = write_report(records, out_dir, f"lorafit sweep {sweep.name}", ["lorafit", *sys.argv[1:]])
    console.print(verdict(sweep_rows(records)))
    console.print(f"report: {html_path}; store: {store or out_dir / 'runs.sqlite'} (group {sweep.name})")
    if json_out:
        rows = [dataclasses.asdict(results[p.id]) for p in sweep.points]
        sys.stdout.write(json.dumps(rows, default=str) + "\n")


def _estimate_signature() -> inspect.Signature:
    extra = [
        _option("budget", str | None, "Memory available, e.g. 8GB: say whether the configuration fits."),
        _option("find_max", str | None, "With --budget: the largest 'batch' (size) or 'length' that fits."),
        inspect.Parameter(
            "measure",
            inspect.Parameter.KEYWORD_ONLY,
            default=False,
            annotation=Annotated[
                bool,
                typer.Option(help="Also train 2 steps for real (a process per try); measured next to estimated."),
            ],
        ),
    ]
    return inspect.Signature([CONFIG_OPTION, JSON_OPTION, *extra, *_config_params(TrainConfig)])


def estimate_command(
    config: Path | None = None,
    json_out: bool = False,
    budget: str | None = None,
    find_max: str | None = None,
    measure: bool = False,
    **flags: Any,
) -> None:
    """Training memory before training: weights, adapters, gradients, optimizer state, activations and
    runtime, from the model's config alone (no weights loaded). --budget 8GB --find-max batch|length
    answers what fits; --measure checks the estimate with short real runs."""
    import tempfile

    import torch

    from lorafit.base.config import parse_bytes
    from lorafit.cli.console import print_estimate
    from lorafit.measurement import estimate as est

    cfg = build_config(config, flags)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if find_max is not None and find_max not in est.STEP:
        raise UserError("--find-max takes 'batch' or 'length'", field="find_max")
    if find_max is not None and budget is None:
        raise UserError("--find-max needs --budget", field="find_max")
    budget_bytes = parse_bytes(budget, "budget") if budget is not None else None
    result: dict[str, Any] = {"device": device, "budget_bytes": budget_bytes}
    if find_max is not None:
        best = est.find_max(cfg, find_max, budget_bytes, device)
        result["find_max"] = {"what": find_max, "estimated": best}
        if best is not None:
            cfg = dataclasses.replace(cfg, **{"batch_size" if find_max == "batch" else "max_length": best})
    estimate = est.estimate(cfg, device)
    result["estimate"] = estimate.to_dict()
    if measure:
        with tempfile.TemporaryDirectory(prefix="lorafit-estimate-") as work:
            if find_max is not None:
                value, runs = est.measure_max(cfg, find_max, budget_bytes, Path(work), result["find_max"]["estimated"])
                result["find_max"].update(measured=value, measure_runs=runs)
            else:
                result["measured"] = est.measure(cfg, Path(work))
    print_estimate(console, result)
    if json_out:
        sys.stdout.write(json.dumps(result, default=str) + "\n")


estimate_command.__signature__ = _estimate_signature()  # type: ignore[attr-defined]
app.command("estimate")(estimate_command)


@app.command("merge")
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
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on the last stdout line.")] = False,
) -> None:
    """Merge a LoRA or QLoRA adapter into its base and save safetensors + tokenizer + config, loadable by
    plain transformers (AutoModelForCausalLM.from_pretrained). Writes merge.json with the check."""
    from lorafit.cli.console import fmt_bytes
    from lorafit.studies.merge import merge

    result = merge(source, out, dtype, check, model)
    console.print(
        f"merged {result['method']} adapter into {result['base_model']} -> {out} ({result['dtype']}); "
        f"on disk {fmt_bytes(result['disk_bytes_before'])} (base + adapter) -> {fmt_bytes(result['disk_bytes_after'])}"
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
        sys.stdout.write(json.dumps(result) + "\n")
    if failed:
        hint = "" if result["dtype"] == "fp32" else " (16-bit rounding can flip near-ties; --dtype fp32 is exact)"
        console.print(f"[bold red]merge check failed:[/] greedy outputs differ from adapter-on-base{hint}")
        raise typer.Exit(1)


def serve_command(**flags: Any) -> None:
    """Serve the base model and its LoRA adapters with an OpenAI-compatible API (completions, chat,
    streaming); requests for different adapters are batched into the same forward passes."""
    from lorafit.base.config import coerce
    from lorafit.serving.server import serve

    values = {k: coerce(k, v, "command line", ServeConfig) for k, v in flags.items() if v is not None}
    serve(ServeConfig(**values))


serve_command.__signature__ = inspect.Signature(_config_params(ServeConfig))  # type: ignore[attr-defined]
app.command("serve")(serve_command)


@app.command("bench-serve")
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
    out: Annotated[Path | None, typer.Option(help="Also write the JSON result to this file.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on the last stdout line.")] = False,
) -> None:
    """Load-test the server on loopback: requests/s, output tokens/s, p50/p95/p99 latency and TTFT;
    with --baseline set-adapter, the one-request-at-a-time set_adapter server side by side."""
    from rich.table import Table

    from lorafit.serving.bench import LoadSpec, run

    if baseline not in (None, "set-adapter"):
        raise UserError("--baseline takes set-adapter", field="baseline")
    if min(adapters, requests, concurrency, prompt_words, max_tokens) < 1:
        raise UserError("adapters, requests, concurrency, prompt-words and max-tokens must be >= 1")
    spec = LoadSpec(requests, concurrency, adapters, prompt_words, max_tokens)
    result = run(model, spec, adapters_dir, baseline, rank, max_batch)
    modes = ["batched"] + ([baseline] if baseline else [])
    table = Table(title=f"bench-serve {model}: {requests} requests, concurrency {concurrency}, {adapters} adapters")
    table.add_column("metric")
    for mode in modes:
        table.add_column(mode, justify="right")
    keys = ["requests_per_s", "output_tokens_per_s"] + [
        f"{k}_p{q}_s" for k in ("latency", "ttft") for q in (50, 95, 99)
    ]
    for key in keys:
        table.add_row(key, *(f"{result[m][key]:.3f}" for m in modes))
    console.print(table)
    if baseline:
        console.print(f"output tokens/s: {result['speedup_tokens_per_s']:.2f}x the {baseline} baseline")
    if out is not None:
        from lorafit.run.rundir import write_text_atomic

        write_text_atomic(out, json.dumps(result, indent=1) + "\n")
    if json_out:
        sys.stdout.write(json.dumps(result) + "\n")


runs_app = typer.Typer(help="Query the SQLite run store.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")

RUN_COLUMNS = (
    "id",
    "created",
    "group_name",
    "label",
    "kind",
    "status",
    "tokens_per_s",
    "peak_bytes",
    "mfu",
    "loss_mean",
    "j_per_token",
    "ppl",
    "error",
)


def _flat(r: Any) -> dict[str, Any]:
    s, e = r.summary or {}, r.eval or {}
    return {
        "id": r.id,
        "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created)),
        "group_name": r.group_name,
        "label": r.label,
        "kind": r.kind,
        "status": r.status,
        "tokens_per_s": s.get("tokens_per_s"),
        "peak_bytes": (s.get("peak_memory") or {}).get("peak_bytes"),
        "mfu": s.get("mfu"),
        "loss_mean": s.get("loss_mean"),
        "j_per_token": s.get("j_per_token"),
        "ppl": (e.get("perplexity") or {}).get("ppl"),
        "error": r.error,
    }


def _open_runs(store: Path, group: str | None, status: str | None) -> list[Any]:
    from lorafit.run.store import RunStore

    if not store.is_file():
        raise UserError("run store not found", file=str(store))
    with RunStore(store) as db:
        return db.runs(group_name=group, **({"status": status} if status else {}))


StoreOpt = Annotated[Path, typer.Option("--store", help="SQLite run store.")]
GroupOpt = Annotated[str | None, typer.Option(help="Only runs of this compare or sweep.")]
StatusOpt = Annotated[str | None, typer.Option(help="Only runs with this status (ok, oom, failed, interrupted).")]


@runs_app.command("list")
def runs_list(store: StoreOpt = Path("runs.sqlite"), group: GroupOpt = None, status: StatusOpt = None) -> None:
    """One line per run: id, group, label, status, tokens/s, peak memory."""
    from rich.table import Table

    table = Table()
    for column in ("id", "created", "group", "label", "status", "tokens/s", "peak memory", "error"):
        table.add_column(column)
    for r in _open_runs(store, group, status):
        f = _flat(r)
        tps = "" if f["tokens_per_s"] is None else f"{f['tokens_per_s']:.1f}"
        table.add_row(
            f["id"],
            f["created"],
            f["group_name"] or "",
            f["label"],
            f["status"],
            tps,
            _fmt_bytes(f["peak_bytes"]),
            (f["error"] or "")[:60],
        )
    Console().print(table)


@runs_app.command("show")
def runs_show(
    run_id: Annotated[str, typer.Argument(help="Run id (see runs list).")], store: StoreOpt = Path("runs.sqlite")
) -> None:
    """Everything stored for one run, as JSON."""
    matches = [r for r in _open_runs(store, None, None) if r.id == run_id]
    if not matches:
        raise UserError(f"no run with id {run_id!r}", file=str(store))
    sys.stdout.write(json.dumps(dataclasses.asdict(matches[0]), indent=2, default=str) + "\n")


@runs_app.command("export")
def runs_export(
    store: StoreOpt = Path("runs.sqlite"),
    group: GroupOpt = None,
    status: StatusOpt = None,
    csv_out: Annotated[bool, typer.Option("--csv", help="CSV with one row per run (the default).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="JSON: every stored field of every run.")] = False,
    out: Annotated[Path | None, typer.Option(help="Write to this file instead of stdout.")] = None,
) -> None:
    """Export runs as CSV (key numbers per run) or JSON (everything stored)."""
    import csv
    import io

    if csv_out and json_out:
        raise UserError("give --csv or --json, not both")
    runs = _open_runs(store, group, status)
    if json_out:
        text = json.dumps([dataclasses.asdict(r) for r in runs], indent=2, default=str) + "\n"
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=RUN_COLUMNS)
        writer.writeheader()
        for r in runs:
            writer.writerow(_flat(r))
        text = buf.getvalue()
    if out is None:
        sys.stdout.write(text)
    else:
        from lorafit.run.rundir import write_text_atomic

        write_text_atomic(out, text)


@app.command("archs")
def archs_command() -> None:
    """List the architectures usable as random:<arch> (real shapes, random weights)."""
    from lorafit.inputs.models import known_archs

    for name in known_archs():
        typer.echo(name)


def main() -> None:
    """Entry point: user errors print one clear line and exit 2; bugs keep their traceback."""
    from lorafit.base.allocator import reexec_with_jemalloc
    from lorafit.training.distributed import is_main_process, rank_prefix

    reexec_with_jemalloc()
    try:
        app()
    except KeyboardInterrupt as e:
        note = f": {e}" if str(e) else ""
        if is_main_process():  # every rank stops alike; one says so
            console.print(
                f"[bold yellow]interrupted[/]{note}; continue with lorafit train --resume RUN_DIR", soft_wrap=True
            )
        raise SystemExit(130) from None
    except UserError as e:
        if is_main_process() or not isinstance(e, RunInterrupted):  # rank 0 says how to resume
            console.print(f"[bold red]{rank_prefix()}error:[/] {e}", highlight=False, soft_wrap=True)
        raise SystemExit(e.exit_code) from None
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        where = f" ({e.filename})" if e.filename else ""
        console.print(f"[bold red]error:[/] out of disk space{where}; files written so far are whole", soft_wrap=True)
        raise SystemExit(2) from None
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        console.print(f"[bold red]{rank_prefix()}out of memory:[/] {e}", highlight=False, soft_wrap=True)
        raise SystemExit(EXIT_OUT_OF_MEMORY) from None
