"""`lorafit eval`: perplexity, generation speed and size of a base model, a run or an adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lorafit.base.config import EvalConfig, TrainConfig
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
            help="'qlora' loads the base 4-bit as QLoRA trains it (see --quant-type, --double-quant): with --adapter, "
            "or alone to measure the quantized base (default: dense). --run needs none: a run uses its own."
        ),
    ] = None,
    quant_type: Annotated[
        str | None,
        typer.Option(help="With --method qlora: the 4-bit type of the base, nf4 or fp4 (default nf4, as train)."),
    ] = None,
    double_quant: Annotated[
        bool | None,
        typer.Option(
            "--double-quant/--no-double-quant",
            help="With --method qlora: double quantization of the 4-bit base (default on, as train).",
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
    trained on, stored and computed as it trained) or a base + PEFT adapter directory (--adapter DIR).
    Writes eval.json into the run directory, or into --out.
    """
    from lorafit.base.config import build_eval_config
    from lorafit.cli.console import print_eval
    from lorafit.run.rundir import RunDir
    from lorafit.studies.evaluate import evaluate
    from lorafit.studies.subject import load_subject

    if run is not None and adapter is not None:
        raise UserError("give --run or --adapter, not both", field="run")
    if method is not None and method not in ("lora", "qlora"):
        raise UserError("--method is lora (dense base) or qlora (4-bit base)", field="method")
    cfg = build_eval_config(flags)
    quant = four_bit_flags(method, quant_type, double_quant)
    subject = load_subject(model, cfg, run=run, adapter=adapter, method=method, quant=quant)
    result = evaluate(subject, cfg)
    target = out or run
    if target is not None:
        result["eval_json"] = str(RunDir(target).write_eval(result))
    print_eval(stderr_console, result)
    if json_out:
        print_json(result)


def four_bit_flags(method: str | None, quant_type: str | None, double_quant: bool | None) -> TrainConfig | None:
    """The 4-bit storage --quant-type / --double-quant ask for (None: train's defaults); they describe a
    4-bit base, so they need --method qlora (a run brings its own)."""
    asked = {k: v for k, v in (("quant_type", quant_type), ("double_quant", double_quant)) if v is not None}
    if not asked:
        return None
    if method != "qlora":
        raise UserError(
            "--quant-type and --double-quant describe a 4-bit base: give --method qlora", field="quant_type"
        )
    return TrainConfig(method="qlora", **asked)
