"""What `eval` and `merge` load: a base model, a training run (its adapter or full model on its own base),
or a base + PEFT adapter directory, on the device and in the dtype `lorafit.base.device` chooses.

A run's own config says how its base was stored (4-bit for QLoRA: its quant type and double
quantization), and its summary the precision it computed in, so a run is measured on the base it was
trained on, as it was trained (issue 17, item 5: defaults here measured a different model).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorafit.adapters.files import load_adapter
from lorafit.adapters.methods import quantization_config
from lorafit.base.config import EvalConfig, TrainConfig
from lorafit.base.device import DTYPES, choose_device, resolve_precision
from lorafit.base.quiet import quiet_libraries
from lorafit.inputs import models
from lorafit.run.rundir import RunDir

PROMPTS = (
    "Give three tips for staying healthy.",
    "Explain what a large language model is in two sentences.",
    "Write a short poem about the sea.",
    "What is the capital of France, and why is it famous?",
)


@dataclass
class Subject:
    """The model being evaluated and where it came from."""

    label: str
    model: Any
    tokenizer: Any
    model_spec: str
    method: str  # base | full | lora | qlora
    weights_dirs: list[Path]  # directories whose files must be shipped to run it
    adapter_dir: Path | None = None
    precision: str = "fp32"  # what it computes in: fp32 | bf16 | fp16
    quantization: dict[str, Any] | None = None  # {"quant_type", "double_quant"} of a 4-bit base


def run_precision(run: RunDir, kind: str) -> str:
    """The precision a run computed in (its summary's, or its config's resolved for a device of `kind`),
    as it can run on a device of `kind`: through `base.device`'s rules (a bf16 run on an older GPU warns),
    except that an fp16 run on a CPU, which has no fp16, computes in fp32."""
    summary = run.summary()
    trained = summary.precision if summary is not None and summary.precision else run.config().precision
    if kind == "cpu" and trained == "fp16":
        return "fp32"
    return resolve_precision(trained, kind)


def eval_precision(requested: str, kind: str, run: RunDir | None = None) -> str:
    """The precision eval computes in: as asked; 'auto' with a run is the run's own (it is measured as it
    was trained), without one `base.device`'s rule for a device of `kind`."""
    if requested == "auto" and run is not None:
        return run_precision(run, kind)
    return resolve_precision(requested, kind)


def four_bit(cfg: TrainConfig) -> dict[str, Any]:
    """How a QLoRA base is stored, as eval.json and merge.json record it."""
    return {"quant_type": cfg.quant_type, "double_quant": cfg.double_quant}


def load_subject(
    model: str,
    cfg: EvalConfig,
    run: str | Path | None = None,
    adapter: str | Path | None = None,
    method: str | None = None,
    label: str | None = None,
    quant: TrainConfig | None = None,
) -> Subject:
    """Load a base model, a trained run (its adapter or full model) or a base + adapter directory.

    `method='qlora'` asks for a 4-bit base with a bare adapter directory, or, with neither, for the
    4-bit base alone (label "base-nf4" or "base-fp4": what a QLoRA adapter's quality is measured
    against), stored as `quant` says (its quant_type and double_quant; default TrainConfig's, as
    `train`). A run brings its own: its config's quantization and (with precision 'auto') its precision.
    """
    quiet_libraries()
    device = choose_device(cfg.device)
    opened = RunDir.open(run) if run is not None else None
    precision = eval_precision(cfg.precision, device.type, opened)
    dtype = DTYPES[precision]
    source = None
    stored_as = quant or TrainConfig(method="qlora")
    if opened is not None:
        stored_as, weights = opened.trained_weights()
        model, method = stored_as.model, stored_as.method
        if method == "full":
            source = models.ModelSource(str(weights), "hf_dir", str(weights))
        else:
            adapter = weights
    base_4bit = method == "qlora" and adapter is None and run is None  # the 4-bit base QLoRA trains on
    method = "base" if base_4bit else method or ("lora" if adapter is not None else "base")
    source = source or models.resolve(model)
    quantized = method == "qlora" or base_4bit
    quant_cfg = quantization_config(dataclasses.replace(stored_as, method="qlora"), dtype) if quantized else None
    loaded = models.load_model(source, dtype, quant_cfg)
    if adapter is not None:
        loaded = load_adapter(loaded, Path(adapter))
    if quant_cfg is None:
        loaded = loaded.to(device)
    loaded.eval()
    location = Path(source.location)
    default_label = method if run is not None or adapter is not None else "base"
    return Subject(
        label=label or (f"base-{stored_as.quant_type}" if base_4bit else default_label),
        model=loaded,
        tokenizer=models.load_tokenizer(source),
        model_spec=model,
        method=method,
        weights_dirs=[location if location.is_dir() else location.parent],
        adapter_dir=None if adapter is None else Path(adapter),
        precision=precision,
        quantization=four_bit(stored_as) if quantized else None,
    )


def prompt_batch(tokenizer: Any, batch: int) -> dict[str, torch.Tensor]:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    if tokenizer.chat_template:
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    else:
        texts = [f"### Instruction:\n{p}\n\n### Response:\n" for p in prompts]
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def dir_bytes(path: Path, suffixes: tuple[str, ...] = (".safetensors",)) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix in suffixes)
