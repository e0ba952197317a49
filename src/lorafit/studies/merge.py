"""`lorafit merge`: fold a LoRA/QLoRA adapter into its base and save a plain transformers model.

The merge happens in fp32 on the unquantized base (peft's `merge_and_unload`); the result is saved
as safetensors in the chosen dtype with the tokenizer and config, loadable by
`AutoModelForCausalLM.from_pretrained` with no peft and no lorafit. The check (on by default)
reloads the saved model from disk and compares it, on a fixed prompt set, with the adapter applied
on the base: greedy outputs and the largest logit difference. A QLoRA adapter was trained on a 4-bit
base, so its merge is also compared with that model (4-bit base + adapter), loaded as the run trained
it: its quant type, double quantization and precision (computed in the run's own precision there, while
the merge and its check stay fp32): the distance says what shipping the merged model changes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from lorafit.adapters.files import check_adapter_files
from lorafit.base.config import EvalConfig, TrainConfig
from lorafit.base.device import DTYPE_NAMES, DTYPES
from lorafit.base.errors import UserError
from lorafit.run.rundir import RunDir, write_json_atomic
from lorafit.studies.subject import dir_bytes, four_bit, load_subject, prompt_batch, run_precision

CHECK_PROMPTS = 4
CHECK_TOKENS = 16


def locate(source: Path, model: str | None) -> tuple[Path, str, str]:
    """(adapter directory, base model spec, method) of a run directory or a PEFT adapter directory."""
    if RunDir.is_run(source):
        cfg, adapter = RunDir.open(source).adapter()
        return adapter, model or cfg.model, cfg.method
    config_file = source / "adapter_config.json"
    if not config_file.is_file():
        raise UserError("not a run directory (config.yaml) or a PEFT adapter (adapter_config.json)", file=str(source))
    check_adapter_files(source)
    try:
        adapter_config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"invalid JSON: {e.msg}", file=str(config_file), line=e.lineno) from e
    base = model or adapter_config.get("base_model_name_or_path")
    if not base:
        raise UserError("adapter_config.json names no base model; pass --model", file=str(config_file))
    return source, base, "lora"


@torch.no_grad()
def _outputs(model: Any, inputs: dict[str, torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 logits at the real prompt positions, greedy continuations) of a model on the prompt set."""
    model.eval()
    logits = model(**inputs).logits.float()[inputs["attention_mask"].bool()]
    out = model.generate(**inputs, max_new_tokens=CHECK_TOKENS, do_sample=False, pad_token_id=pad)
    return logits, out[:, inputs["input_ids"].shape[1] :]


def _compare(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    same = (a[1] == b[1]).all(dim=1)
    return {
        "max_abs_logit_diff": float((a[0] - b[0]).abs().max()),
        "greedy_equal": bool(same.all()),
        "greedy_equal_prompts": int(same.sum()),
        "prompts": int(same.numel()),
        "new_tokens": CHECK_TOKENS,
    }


def merge(source: Path, out: Path, dtype: str = "auto", check: bool = True, model: str | None = None) -> dict[str, Any]:
    """Merge the adapter of `source` into its base, save to `out`, and (check) verify the saved model.

    dtype 'auto' saves in the dtype the base is stored in (its config.json), else fp32."""
    if dtype != "auto" and dtype not in DTYPES:
        raise UserError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}", field="dtype")
    if out.exists() and any(out.iterdir()):
        raise UserError("output directory exists and is not empty", file=str(out))
    adapter, spec, method = locate(source, model)
    cpu = EvalConfig(device="cpu")  # merge in fp32: 16-bit merges round the update into the weights
    subject = load_subject(spec, cpu, adapter=adapter, method="lora", label="adapter")
    tokenizer = subject.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    inputs = prompt_batch(tokenizer, CHECK_PROMPTS) if check else None
    reference = _outputs(subject.model, inputs, pad) if inputs is not None else None
    merged = subject.model.merge_and_unload()
    if dtype == "auto":
        stored = getattr(torch, str(getattr(merged.config, "dtype", None) or "float32").replace("torch.", ""), None)
        dtype = DTYPE_NAMES.get(stored, "fp32")
    merged.to(DTYPES[dtype])
    tmp = out.with_name(out.name + ".partial")  # a crash leaves no half-written model at `out`
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        out.rmdir()
    tmp.replace(out)
    base_bytes = sum(dir_bytes(d) for d in subject.weights_dirs)  # where load_subject found the base
    del merged, subject
    result: dict[str, Any] = {
        "source": str(source),
        "adapter": str(adapter),
        "base_model": spec,
        "method": method,
        "dtype": dtype,
        "out": str(out),
        "disk_base_bytes": base_bytes,
        "disk_adapter_bytes": dir_bytes(adapter),
        "disk_bytes_after": dir_bytes(out),
    }
    result["disk_bytes_before"] = result["disk_base_bytes"] + result["disk_adapter_bytes"]
    if reference is not None:
        from transformers import AutoModelForCausalLM

        # what users will load: the saved directory, with plain transformers, computed in fp32
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        merged_outputs = _outputs(reloaded, inputs, pad)
        result["check"] = _compare(reference, merged_outputs)
        if method == "qlora":
            result["vs_trained_4bit"] = _vs_trained_4bit(RunDir(source), spec, adapter, inputs, pad, merged_outputs)
    write_json_atomic(out / "merge.json", result)
    return result


def _vs_trained_4bit(
    run: RunDir, spec: str, adapter: Path, inputs: dict[str, torch.Tensor], pad: int, merged: Any
) -> dict[str, Any]:
    """The merged model against the QLoRA run as it trained: its adapter on its own 4-bit base (the run's
    quant type and double quantization), computing in the run's precision on the CPU, as the merge; a run
    that trained in fp16, which `base.device` keeps to GPUs, is compared in fp32 (the result says which)."""
    cfg: TrainConfig = run.config()
    precision = run_precision(run, "cpu")
    as_trained = EvalConfig(device="cpu", precision=precision)
    trained = load_subject(spec, as_trained, adapter=adapter, method="qlora", label="qlora", quant=cfg)
    return {
        **_compare(_outputs(trained.model, inputs, pad), merged),
        "quantization": four_bit(cfg),
        "precision": precision,
    }
