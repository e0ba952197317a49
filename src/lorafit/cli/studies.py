"""Commands that run or read many runs: `compare`, `sweep`, `estimate` and `report`."""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from lorafit.base.config import EvalConfig, TrainConfig, build_config
from lorafit.base.errors import UserError
from lorafit.cli.console import stderr_console
from lorafit.cli.options import ConfigFile, JsonOut, config_flags, given, print_json
from lorafit.cli.runs import record_json

console = stderr_console


Baseline = Annotated[
    str | None,
    typer.Option(
        help="Run label or method the report's improvement figures are against [default: the first training run; "
        "perplexity: each run's own base]."
    ),
]
StudyFile = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="Study YAML: shared options (any train or eval option) and methods: {METHOD: {option: value}}, "
        "each method's own options; flags override both.",
    ),
]


@config_flags((TrainConfig, ("method",)), (EvalConfig, ("device", "precision")))
def compare_command(
    config: StudyFile = None,
    methods: Annotated[
        str | None,
        typer.Option(
            help="Methods to compare, comma-separated (full, lora, qlora) [default: the study file's methods, "
            "else full,lora,qlora]."
        ),
    ] = None,
    store: Annotated[
        Path | None, typer.Option(help="SQLite run store to add the runs to (default <out>/runs.sqlite).")
    ] = None,
    baseline: Baseline = None,
    json_out: JsonOut = False,
    **flags: Any,
) -> None:
    """Train each method on the same data and budget, evaluate each and the base model, and write a report.

    Output: one run directory per method, base/eval.json, runs.sqlite (or --store) and a self-contained
    report.html + report.md under --out. Training options apply to every method; a study file (--config)
    gives each method its own on top (its methods: mapping). Each training and evaluation runs in its own
    process, so each peak memory is its own and an OOM is recorded, not fatal.
    """
    from lorafit.studies.compare import compare, load_study

    eval_flags = given(flags, EvalConfig)
    train_flags = {k: v for k, v in flags.items() if k not in eval_flags}
    study = load_study(config, train_flags, eval_flags, methods)
    if baseline is not None and baseline not in study.methods:  # before anything trains, not at the report
        raise UserError(f"--baseline {baseline} is none of the methods: {', '.join(study.methods)}", field="baseline")

    def log(msg: str) -> None:
        console.print(f"[bold]lorafit compare:[/] {msg}")

    for note in study.notes:
        log(note)
    result = compare(
        study.shared,
        study.methods,
        study.eval,
        out_dir=study.shared.out,
        store_path=store or study.store,
        log=log,
        command=["lorafit", *sys.argv[1:]],
        configs=study.configs,
        baseline=baseline or study.baseline,
    )
    console.print(f"report: {result['report']}")
    if json_out:
        print_json(result)


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
    baseline: Baseline = None,
) -> None:
    """Write a comparison report (self-contained HTML with charts, and Markdown) for any set of runs."""
    from lorafit.reports import write_report
    from lorafit.reports.compare import label_apart
    from lorafit.run.store import RunStore, record_from_run_dir

    if bool(run_dirs) == bool(store):
        raise UserError("give run directories or --store, one of the two")
    if store is not None:
        if not store.is_file():
            raise UserError("run store not found", file=str(store))
        with RunStore(store) as db:
            records = db.runs(group_name=group, **_column_filters(filter or []))
    else:
        records = [record_from_run_dir(d) for d in run_dirs or []]
    label_apart(records)  # runs of the same method get their directory name added
    if not records:
        raise UserError("no runs to report")
    html_path, md_path = write_report(records, out, title, ["lorafit", *sys.argv[1:]], baseline=baseline)
    console.print(f"report: {html_path} and {md_path} ({len(records)} runs)")


def _column_filters(items: list[str]) -> dict[str, str]:
    equal = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--filter takes COLUMN=VALUE, got {item!r}", field="filter")
        equal[key.strip()] = value.strip()
    return equal


def sweep_command(
    grid: Annotated[
        Path,
        typer.Argument(
            help="Grid YAML: name, steps, base (options), and grid (option: [values]) and/or points (name: options)."
        ),
    ],
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
    """Run a grid of training runs (every combination of grid:, and each named point of points:), each in its
    own process; OOM and crashed points are recorded and the sweep goes on. Points already in the store are
    skipped, so an interrupted sweep resumes where it stopped."""
    from lorafit.reports import write_report
    from lorafit.reports.sweep import sweep_rows, verdict
    from lorafit.studies.sweep import load_grid, make_executor

    if parallel < 1:
        raise UserError("--parallel must be >= 1", field="parallel")
    provisional = out or Path("runs") / f"sweep-{grid.stem}"
    sweep = load_grid(grid, provisional, memory_budget)
    out_dir = out or Path("runs") / f"sweep-{sweep.name}"
    if out_dir != provisional:
        sweep = load_grid(grid, out_dir, memory_budget)
    runner = make_executor(executor, parallel, ray_address)
    console.print(f"{len(sweep.points)} points; executor {runner.describe()}")
    results = _run_live(sweep, store or out_dir / "runs.sqlite", out_dir, parallel, retry_failed, runner)
    console.line()
    records = [results[p.id] for p in sweep.points]
    html_path, _ = write_report(records, out_dir, f"lorafit sweep {sweep.name}", ["lorafit", *sys.argv[1:]])
    console.print(verdict(sweep_rows(records)))
    console.print(f"report: {html_path}; store: {store or out_dir / 'runs.sqlite'} (group {sweep.name})")
    if json_out:
        print_json([record_json(results[p.id]) for p in sweep.points])


def _run_live(sweep: Any, store: Path, out_dir: Path, parallel: int, retry_failed: bool, runner: Any) -> dict:
    """Run the sweep with its table redrawn on stderr as points start and finish."""
    from rich.live import Live

    from lorafit.cli.console import sweep_table
    from lorafit.run.store import RunStore
    from lorafit.studies.sweep import run_sweep

    with RunStore(store) as db, Live(console=console, auto_refresh=False) as live:

        def update(state: dict[str, str], results: dict[str, Any]) -> None:
            live.update(sweep_table(sweep, state, results), refresh=True)

        try:
            return run_sweep(sweep, db, out_dir, parallel, retry_failed, update, runner)
        finally:
            runner.close()


@config_flags(TrainConfig)
def estimate_command(
    config: ConfigFile = None,
    json_out: JsonOut = False,
    budget: Annotated[
        str | None, typer.Option(help="Memory available, e.g. 8GB: say whether the configuration fits.")
    ] = None,
    find_max: Annotated[
        str | None, typer.Option(help="With --budget: the largest 'batch' (size) or 'length' that fits.")
    ] = None,
    measure: Annotated[
        bool, typer.Option(help="Also train 2 steps for real (a process per try); measured next to estimated.")
    ] = False,
    **flags: Any,
) -> None:
    """Training memory before training: weights, adapters, gradients, optimizer state, activations and
    runtime, from the model's config alone (no weights loaded). --budget 8GB --find-max batch|length
    answers what fits; --measure checks the estimate with short real runs."""
    from lorafit.base.device import device_type
    from lorafit.base.units import parse_bytes
    from lorafit.cli.console import print_estimate
    from lorafit.measurement import estimate as est
    from lorafit.studies.measure import measure as measure_run
    from lorafit.studies.measure import measure_max

    cfg = build_config(config, flags)
    # an explicit --device cuda estimates for a GPU even on a machine without one: nothing runs there
    device = cfg.device if cfg.device != "auto" else device_type("auto")
    if find_max is not None and find_max not in est.STEP:
        raise UserError("--find-max takes 'batch' or 'length'", field="find_max")
    if find_max is not None and budget is None:
        raise UserError("--find-max needs --budget", field="find_max")
    budget_bytes = parse_bytes(budget, "budget") if budget is not None else None
    result: dict[str, Any] = {"device": device, "budget": budget, "budget_bytes": budget_bytes}
    if find_max is not None:
        best = est.find_max(cfg, find_max, budget_bytes, device)
        result["find_max"] = {"what": find_max, "estimated": best}
        if best is not None:
            cfg = dataclasses.replace(cfg, **{"batch_size" if find_max == "batch" else "max_length": best})
    result["estimate"] = est.estimate(cfg, device).to_dict()
    if measure:
        with tempfile.TemporaryDirectory(prefix="lorafit-estimate-") as work:
            if find_max is not None:
                value, runs = measure_max(cfg, find_max, budget_bytes, Path(work), result["find_max"]["estimated"])
                result["find_max"].update(measured=value, measure_runs=runs)
            else:
                result["measured"] = measure_run(cfg, Path(work))
    print_estimate(console, result)
    if json_out:
        print_json(result)
