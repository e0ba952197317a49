"""`--help` that stays readable in a narrow terminal.

Typer's rich help puts each option in a table of four columns (flag, negative flag, type, help). The
flag columns cannot wrap (`--no-gradient-checkpointing` is one word), so at 80 columns the help column
is squeezed to ~20 characters, long words are folded mid-word and flags are cut with an ellipsis.
Below `WIDE_COLUMNS` a command's help is laid out as a list instead, as man pages do: each flag on its
own line and its help under it, wrapped at spaces only, across the whole width.
"""

from __future__ import annotations

import inspect
import shutil
import textwrap
from typing import Any

import typer.core

WIDE_COLUMNS = 150  # from here on Typer's table has room for every flag and a help column of ~75 characters
INDENT = 6  # help text under its flag


def _wrap(text: str, width: int, indent: int) -> str:
    """Wrap at spaces only: a flag, path or default value is never split or cut."""
    pad = " " * indent
    return textwrap.fill(
        text,
        width=width,
        initial_indent=pad,
        subsequent_indent=pad,
        break_long_words=False,
        break_on_hyphens=False,
    )


def _plain(text: str) -> str:
    """Help texts are written for rich markup: `\\[` is a literal bracket."""
    return " ".join(text.replace("\\[", "[").split())


def _paragraphs(text: str) -> list[str]:
    return [_plain(p) for p in text.split("\n\n") if p.strip()]


def reflow(doc: str | None) -> str | None:
    """A command's docstring as help: each paragraph one line, so the terminal (not the source file's
    line breaks) decides where it wraps; Typer's rich help keeps a docstring's single line breaks."""
    if doc is None:
        return None
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(doc).split("\n\n") if p.strip())


class NarrowAwareCommand(typer.core.TyperCommand):
    """A Typer command whose help is a list (not a table) when the terminal is narrower than WIDE_COLUMNS."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        columns = shutil.get_terminal_size().columns
        if columns >= WIDE_COLUMNS:
            super().format_help(ctx, formatter)
            return
        width = max(columns - 1, 40)
        usage = f"Usage: {ctx.command_path} {' '.join(self.collect_usage_pieces(ctx))}"
        lines = [_wrap(usage, width, 1), ""]
        for paragraph in _paragraphs(self.help or ""):
            lines += [_wrap(paragraph, width, 1), ""]
        arguments = [p for p in self.get_params(ctx) if isinstance(p, typer.core.TyperArgument)]
        if arguments:
            lines.append("Arguments:")
            for arg in arguments:
                lines.append(f"  {arg.metavar or arg.name.upper()}")
                help_text = getattr(arg, "help", None)
                if help_text:
                    lines.append(_wrap(_plain(help_text), width, INDENT))
            lines.append("")
        lines.append("Options:")
        for param in self.get_params(ctx):
            record = None if isinstance(param, typer.core.TyperArgument) else param.get_help_record(ctx)
            if record is None:
                continue
            flags, help_text = record
            lines.append(f"  {flags}")
            if help_text:
                lines.append(_wrap(_plain(help_text), width, INDENT))
        formatter.write("\n".join(lines) + "\n")
