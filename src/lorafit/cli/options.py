"""How a command declares its options: one way for every command.

A command is a plain function whose typed, `Annotated` parameters are its own options. Options that
set a config dataclass (TrainConfig, EvalConfig, ServeConfig) are not written out again: the
`config_flags(...)` decorator appends one option per dataclass field (name, type, default, help and
choices taken from the field) and Typer hands their values to the function's `**flags`. The way back,
config -> flags, is `lorafit.base.config.to_flags`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from lorafit.base.config import base_type, flag_name

ConfigFile = Annotated[Path | None, typer.Option(help="YAML file of training options; flags override it.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the result as JSON on the last stdout line.")]


def print_json(result: Any) -> None:
    """The --json contract: one JSON document on the last line of stdout (tables go to stderr)."""
    sys.stdout.write(json.dumps(result, default=str) + "\n")


def _cli_type(tp: Any) -> Any:
    """Typer type for a config field: a list field is a repeatable option (items may also be comma-separated)."""
    inner, _optional = base_type(tp)
    return list[str] if typing.get_origin(inner) is list else inner


def field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]


def field_help(f: dataclasses.Field) -> str:
    """The field's help, its choices and its default, as the flag's help text."""
    default = field_default(f)
    if isinstance(default, list):
        default = ", ".join(default)  # a space after each comma lets a narrow terminal wrap the list
    text = f.metadata["help"]
    if f.metadata.get("choices"):
        text += f" Choices: {', '.join(f.metadata['choices'])}."
    return f"{text} \\[default: {'unset' if default is None else default}]"


def config_options(cls: type, exclude: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One keyword-only Typer option per field of the config dataclass `cls`; unset flags arrive as None."""
    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        tp = _cli_type(hints[f.name])
        flag = flag_name(f.name)
        decls = [f"{flag}/--no-{flag[2:]}"] if tp is bool else [flag]
        option = typer.Option(*decls, help=field_help(f), show_default=False)
        params.append(
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[tp | None, option]
            )
        )
    return params


def config_flags(*configs: type | tuple[type, tuple[str, ...]]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the flags of config dataclasses, after its own options; their values go to `**flags`.

    `@config_flags(TrainConfig, (EvalConfig, ("device",)))`: a bare class contributes all its fields, a
    (class, excluded field names) pair all but those.
    """

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = [
            p
            for p in inspect.signature(command, eval_str=True).parameters.values()
            if p.kind is not inspect.Parameter.VAR_KEYWORD
        ]
        generated = []
        for item in configs:
            cls, exclude = item if isinstance(item, tuple) else (item, ())
            generated += config_options(cls, exclude)
        command.__signature__ = inspect.Signature([*own, *generated])  # type: ignore[attr-defined]
        return command

    return decorate


def given(flags: dict[str, Any], cls: type | None = None) -> dict[str, Any]:
    """The flags the user set (Typer passes unset ones as None), optionally only those of `cls`'s fields."""
    names = None if cls is None else {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in flags.items() if v is not None and (names is None or k in names)}
