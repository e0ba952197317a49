"""The `lorafit` command line: the app, its commands, and how errors reach the user.

Each command is a plain function in the module of its group (train, evaluate, studies, ship, runs),
declared one way (see `cli.options`) and registered here under its name.
"""

from __future__ import annotations

import errno
from typing import Annotated

import typer

from lorafit.base.errors import EXIT_OUT_OF_MEMORY, UserError, is_out_of_memory
from lorafit.base.quiet import demote_library_logs
from lorafit.cli import evaluate, runs, ship, studies, train, ui
from lorafit.cli.console import stderr_console as console
from lorafit.cli.help import NarrowAwareCommand, reflow

app = typer.Typer(
    help="Fine-tune language models with LoRA, QLoRA or full fine-tuning, and measure what each choice costs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
runs_app = typer.Typer(help="Query the SQLite run store.", no_args_is_help=True)


def archs_command() -> None:
    """List the architectures usable as random:<arch> (real shapes, random weights)."""
    from lorafit.inputs.models import known_archs

    for name in known_archs():
        typer.echo(name)


COMMANDS = {
    app: {
        "train": train.train_command,
        "eval": evaluate.eval_command,
        "compare": studies.compare_command,
        "report": studies.report_command,
        "sweep": studies.sweep_command,
        "estimate": studies.estimate_command,
        "merge": ship.merge_command,
        "serve": ship.serve_command,
        "bench-serve": ship.bench_serve_command,
        "archs": archs_command,
        "ui": ui.ui_command,
    },
    runs_app: {"list": runs.runs_list, "show": runs.runs_show, "export": runs.runs_export},
}


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


def _register() -> None:
    for group, commands in COMMANDS.items():
        for name, command in commands.items():
            group.command(name, cls=NarrowAwareCommand, help=reflow(command.__doc__))(command)
    app.add_typer(runs_app, name="runs")


_register()


def main() -> None:
    """Entry point: user errors print one clear line and exit 2; bugs keep their traceback."""
    from lorafit.base.allocator import reexec_with_allocator

    try:
        reexec_with_allocator()  # first: everything before it is paid twice
    except UserError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise SystemExit(e.exit_code) from None
    demote_library_logs()  # before any command imports bitsandbytes (through transformers or peft)
    from lorafit.training.distributed import is_main_process, rank_prefix

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
        if is_main_process() or not isinstance(e, train.RunInterrupted):  # rank 0 says how to resume
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
