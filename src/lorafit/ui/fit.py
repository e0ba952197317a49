""" "Will it fit?": the estimator behind a form, answering as `lorafit estimate --json` does.

The form's fields are TrainConfig's, checked by `build_config` as the command line's flags are; the
estimate is `measurement.estimate.estimate` of that config, so the answer is the command's (on CPU the
runtime part is the resident size of the process that estimates, so it differs by that process's size).
A model is built in, `random:<arch>`, or a model directory under a run root or the directory the UI
started in (the estimator reads only its config.json); a hub id or any other path is refused.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from lorafit.base.config import METHODS, OPTIMIZERS, PRECISIONS, TrainConfig, build_config, flag_name
from lorafit.base.errors import UserError
from lorafit.base.units import parse_bytes

BUILT_IN = ("smollm2-135m",)
FORM_FIELDS = ("model", "method", "batch_size", "max_length", "precision", "optimizer", "gradient_checkpointing")
FORM_FIELDS += ("lora_r", "packing")


class FitRequest(BaseModel):
    """The form. Unset fields keep TrainConfig's defaults."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = TrainConfig.model
    method: str = TrainConfig.method
    batch_size: int = TrainConfig.batch_size
    max_length: int = TrainConfig.max_length
    precision: str = TrainConfig.precision
    optimizer: str = TrainConfig.optimizer
    gradient_checkpointing: bool = False
    lora_r: int = TrainConfig.lora_r
    packing: bool = TrainConfig.packing
    device: Literal["cpu", "cuda"] = "cpu"
    budget: str | None = None


def warm_up() -> None:
    """Import what the first CPU estimate measures the process after (transformers, peft, accelerate: ~10 s
    on a small machine), so the form's first answer is as quick as the next; run on a thread at start."""
    from lorafit.measurement.estimate import runtime_bytes

    runtime_bytes("cpu")


def model_names() -> list[str]:
    from lorafit.inputs.models import known_archs

    return [*BUILT_IN, *(f"random:{arch}" for arch in known_archs())]


def options() -> dict[str, Any]:
    """What the form offers, and its defaults (TrainConfig's; the device this machine would train on)."""
    from lorafit.base.device import device_type
    from lorafit.inputs.sources import BUILTIN_NAMES

    defaults = FitRequest().model_dump()
    defaults["device"] = device_type("auto")
    return {
        "models": model_names(),
        "methods": list(METHODS),
        "precisions": list(PRECISIONS),
        "optimizers": list(OPTIMIZERS),
        "devices": ["cpu", "cuda"],
        "data": list(BUILTIN_NAMES),  # the Train page's built-in data sets
        "defaults": defaults,
    }


def allowed_path(spec: str, allowed: list[Path]) -> Path | None:
    """`spec` as a path (relative: to the last of `allowed`, the working directory) when it lies under
    one of the `allowed` directories, else None. Nothing outside them is looked at."""
    if not spec.strip() or spec.startswith("random:"):
        return None
    path = Path(spec).expanduser()
    path = path.resolve() if path.is_absolute() else (allowed[-1] / path).resolve()
    return path if any(path.is_relative_to(root.resolve()) for root in allowed) else None


def check_model(spec: str, allowed: list[Path]) -> None:
    """A built-in or random: model, or a model directory under one of the `allowed` directories."""
    if spec in model_names():
        return
    path = allowed_path(spec, allowed)
    if path is not None and path.is_dir():
        return
    raise UserError(
        f"model {spec!r} is not one the UI estimates: use {', '.join(BUILT_IN)}, random:<arch>, or a model directory "
        "under a run root or the directory the UI started in",
        field="model",
    )


def config_of(form: FitRequest, allowed: list[Path]) -> TrainConfig:
    """The TrainConfig the form describes, checked as `lorafit estimate`'s flags are."""
    check_model(form.model, allowed)
    values: dict[str, Any] = {name: getattr(form, name) for name in FORM_FIELDS}
    if form.model not in model_names():
        values["model"] = str(allowed_path(form.model, allowed))
    values["gradient_checkpointing"] = True if form.gradient_checkpointing else None  # off: the plan decides
    values["device"] = form.device
    return build_config(None, values)


def train_command(cfg: TrainConfig, budget: str | None) -> str:
    """`lorafit train` with the form's options that differ from the defaults (and the budget as
    --memory-budget, so the memory plan keeps the run within it)."""
    default = TrainConfig()
    args = ["lorafit", "train"]
    for name in (*FORM_FIELDS, "device"):
        value = getattr(cfg, name)
        if value == getattr(default, name):
            continue
        flag = flag_name(name)
        args += [flag if value else f"--no-{flag[2:]}"] if isinstance(value, bool) else [flag, str(value)]
    if budget is not None:
        args += ["--memory-budget", budget]
    return shlex.join(args)


def fit(form: FitRequest, allowed: list[Path]) -> dict[str, Any]:
    """The estimate of the form's configuration, whether it fits the budget, the largest batch size and
    length that fit, and the command that trains it."""
    from lorafit.measurement import estimate as est

    cfg = config_of(form, allowed)
    budget_bytes = parse_bytes(form.budget, "budget") if form.budget else None
    estimate = est.estimate(cfg, form.device)
    answer: dict[str, Any] = {"estimate": estimate.to_dict(), "budget_bytes": budget_bytes, "fits": None}
    answer |= {"max_batch": None, "max_length": None}
    if budget_bytes is not None:
        answer["fits"] = estimate.total <= budget_bytes
        answer["max_batch"] = est.find_max(cfg, "batch", budget_bytes, form.device)
        answer["max_length"] = est.find_max(cfg, "length", budget_bytes, form.device)
    answer["command"] = train_command(cfg, form.budget or None)
    return answer
