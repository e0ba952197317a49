"""The `lorafit` command line: thin Typer commands over library functions.

`train`'s flags are generated from `TrainConfig`'s fields, so an option is defined (name, type,
default, help, choices) in exactly one place. Flags override values from `--config FILE`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
import typing
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from lorafit.config import TrainConfig, build_config
from lorafit.errors import UserError

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


def _train_signature() -> inspect.Signature:
    hints = typing.get_type_hints(TrainConfig)
    params = [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[Path | None, typer.Option(help="YAML file of options; flags override it.")],
        ),
        inspect.Parameter(
            "json_out",
            inspect.Parameter.KEYWORD_ONLY,
            default=False,
            annotation=Annotated[bool, typer.Option("--json", help="Print summary.json as the last stdout line.")],
        ),
    ]
    for f in dataclasses.fields(TrainConfig):
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
    return inspect.Signature(params)


def train_command(config: Path | None = None, json_out: bool = False, **flags: Any) -> None:
    """Fine-tune a model (full, LoRA or QLoRA) and profile the run: tokens/s, memory, energy, FLOPs/MFU.

    Writes a run directory with config.yaml, metrics.jsonl, summary.json and the adapter (or model).
    """
    from lorafit.progress import RichProgress, print_summary
    from lorafit.training import train

    cfg = build_config(config, flags)
    summary = train(cfg, RichProgress(console))
    print_summary(console, summary)
    if json_out:
        sys.stdout.write(json.dumps(summary, default=str) + "\n")


train_command.__signature__ = _train_signature()  # type: ignore[attr-defined]
app.command("train")(train_command)


@app.command("archs")
def archs_command() -> None:
    """List the architectures usable as random:<arch> (real shapes, random weights)."""
    from lorafit.models import known_archs

    for name in known_archs():
        typer.echo(name)


def main() -> None:
    """Entry point: user errors print one clear line and exit 2; bugs keep their traceback."""
    from lorafit.allocator import reexec_with_jemalloc

    reexec_with_jemalloc()
    try:
        app()
    except UserError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise SystemExit(e.exit_code) from None
