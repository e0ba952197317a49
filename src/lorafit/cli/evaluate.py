"""`lorafit eval`: perplexity, generation speed and size of a base model, a run or an adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lorafit.base.config import EvalConfig
from lorafit.base.errors import UserError
from lorafit.cli.console import stderr_console
from lorafit.cli.options import JsonOut, config_flags, print_json


@config_flags(EvalConfig)
def eval_command(
    model: Annotated[
        str, typer.Option(help="Base model (as for train); ignored with --run, which knows its own.")
    ] = "smollm2-135m",
    run: Annotated[Path | None, typer.Option(help="A training run directory to evaluate.")] = None,
    adapter: Annotated[Path | None, typer.Option(help="A PEFT adapter directory to evaluate on --model.")] = None,
    method: Annotated[
        str | None,
        typer.Option(
            help="'qlora' loads the base 4-bit (NF4) as QLoRA trains it: with --adapter, or alone to measure the "
            "quantized base (default: dense)."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Where eval.json goes (default: the run directory; none for a base model).")
    ] = None,
    json_out: JsonOut = False,
    **flags: Any,
) -> None:
    """Measure a model: perplexity (sliding window), generation speed (TTFT, decode tokens/s) and size.

    Evaluates the base --model, a training run (--run DIR: its adapter or full model on the base it was
    trained on) or a base + PEFT adapter directory (--adapter DIR). Writes eval.json into the run
    directory, or into --out.
    """
    from lorafit.base.config import build_eval_config
    from lorafit.cli.console import print_eval
    from lorafit.run.rundir import RunDir
    from lorafit.studies.evaluate import evaluate
    from lorafit.studies.subject import load_subject

    if run is not None and adapter is not None:
        raise UserError("give --run or --adapter, not both", field="run")
    if method is not None and method not in ("lora", "qlora"):
        raise UserError("--method is lora (dense base) or qlora (4-bit NF4 base)", field="method")
    cfg = build_eval_config(flags)
    subject = load_subject(model, cfg, run=run, adapter=adapter, method=method)
    result = evaluate(subject, cfg)
    target = out or run
    if target is not None:
        result["eval_json"] = str(RunDir(target).write_eval(result))
    print_eval(stderr_console, result)
    if json_out:
        print_json(result)
