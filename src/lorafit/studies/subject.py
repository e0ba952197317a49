"""What `eval` and `merge` load: a base model, a training run (its adapter or full model on its own base),
or a base + PEFT adapter directory, on the device and in the dtype `lorafit.base.device` chooses.

A run's own config says how its base was stored (4-bit for QLoRA), so a run is always measured on the
base it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorafit.adapters.files import load_adapter
from lorafit.adapters.methods import quantization_config
from lorafit.base.config import EvalConfig, TrainConfig
from lorafit.base.device import choose_device, compute_dtype
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


def load_subject(
    model: str,
    cfg: EvalConfig,
    run: str | Path | None = None,
    adapter: str | Path | None = None,
    method: str | None = None,
    label: str | None = None,
) -> Subject:
    """Load a base model, a trained run (its adapter or full model) or a base + adapter directory.

    `method='qlora'` asks for a 4-bit base with a bare adapter directory, or, with neither, for the
    4-bit base alone (label "base-nf4": what a QLoRA adapter's quality is measured against).
    """
    quiet_libraries()
    device = choose_device(cfg.device)
    dtype = compute_dtype("auto", device.type)
    source = None
    if run is not None:
        train_cfg, weights = RunDir.open(run).trained_weights()
        model, method = train_cfg.model, train_cfg.method
        if method == "full":
            source = models.ModelSource(str(weights), "hf_dir", str(weights))
        else:
            adapter = weights
    base_4bit = method == "qlora" and adapter is None and run is None  # the 4-bit base QLoRA trains on
    method = "base" if base_4bit else method or ("lora" if adapter is not None else "base")
    source = source or models.resolve(model)
    quant = quantization_config(TrainConfig(method="qlora"), dtype) if method == "qlora" or base_4bit else None
    base_dtype = dtype if method in ("lora", "qlora") else torch.float32 if device.type == "cpu" else dtype
    loaded = models.load_model(source, base_dtype, quant)
    if adapter is not None:
        loaded = load_adapter(loaded, Path(adapter))
    if quant is None:
        loaded = loaded.to(device)
    loaded.eval()
    location = Path(source.location)
    return Subject(
        label=label or (method if run is not None or adapter is not None else "base-nf4" if base_4bit else "base"),
        model=loaded,
        tokenizer=models.load_tokenizer(source),
        model_spec=model,
        method=method,
        weights_dirs=[location if location.is_dir() else location.parent],
        adapter_dir=None if adapter is None else Path(adapter),
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
