"""Method set-up: what is trainable and how the base is stored. One training loop serves all three.

- full: every weight trains;
- lora: base frozen in the compute dtype, low-rank adapters (peft) on the target projections;
- qlora: base linear weights stored 4-bit by bitsandbytes (NF4/FP4, double quantization), LoRA on top.
"""

from __future__ import annotations

from typing import Any

import torch

from lorafit.base.config import ALL_LINEAR, TrainConfig
from lorafit.base.errors import UserError


def quantization_config(cfg: TrainConfig, compute_dtype: torch.dtype) -> Any:
    """BitsAndBytesConfig for QLoRA, or None for the other methods."""
    if cfg.method != "qlora":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def base_dtype(method: str, precision: str) -> torch.dtype:
    """Dtype the base weights are loaded in.

    Frozen bases (LoRA/QLoRA) are stored in the compute dtype. Full fine-tuning keeps fp32 master
    weights and gets half precision through autocast, so updates never underflow.
    """
    if method == "full" or precision == "fp32":
        return torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float16


def apply_method(model: Any, cfg: TrainConfig) -> Any:
    """Make the loaded model trainable as `cfg.method` says; returns the model to train. Its SiLU-gated MLPs
    keep two tensors for backward instead of three (`adapters.swiglu`, same gradients), and its RMSNorms
    multiply by a frozen weight in place (`adapters.norms`, same values)."""
    from lorafit.adapters import norms, swiglu

    swiglu.install(model)
    norms.install(model)
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        if cfg.gradient_checkpointing:
            enable_checkpointing(model)
        return model
    from peft import LoraConfig, get_peft_model

    targets = resolve_targets(model, cfg.target_modules)
    if cfg.method == "qlora":
        prepare_kbit_base(model, cfg)
    elif cfg.gradient_checkpointing:
        enable_checkpointing(model)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if cfg.gradient_checkpointing:
        model.get_base_model().disable_input_require_grads()  # peft hooks them again: see enable_checkpointing
    if cfg.fused_lora:
        from lorafit.adapters import fused as fused_lora

        fused_lora.install(model)
    return model


def resolve_targets(model: Any, targets: list[str]) -> list[str]:
    """The module names LoRA wraps, checked against the model.

    The default, ALL_LINEAR (Llama's seven projection names), stands for every linear layer of the decoder
    blocks, which is what peft's 'all-linear' targets (every Linear but the output layer). A model that
    lacks some of those names gets its own: Phi-3's fused qkv_proj and gate_up_proj with o_proj and
    down_proj. An explicit list must name linear layers (or embeddings, which peft also adapts) that the
    model has; anything else is an error naming what is missing and what the model has, before peft
    sees it (peft raises on a non-linear module such as `mlp`, or on a name nothing matches)."""
    linear = _names(model, torch.nn.Linear)
    head = _output_layer(model)
    blocks = [name for name in linear if name != head]
    if list(targets) == list(ALL_LINEAR) and not set(ALL_LINEAR) <= set(blocks):
        return blocks
    missing = [t for t in targets if t not in linear and t not in _names(model, torch.nn.Embedding)]
    if missing:
        raise UserError(
            f"target modules {missing} are not linear layers of this model, which has {linear}",
            field="target_modules",
        )
    return list(targets)


def _names(model: Any, kind: type) -> list[str]:
    """Distinct names of the model's modules of `kind`, in module order; a name is the last part of a
    module's path, as peft matches targets. bitsandbytes' Linear4bit is a torch Linear."""
    names: list[str] = []
    for path, module in model.named_modules():
        name = path.rsplit(".", 1)[-1]
        if isinstance(module, kind) and name not in names:
            names.append(name)
    return names


def _output_layer(model: Any) -> str | None:
    """The output layer's name (lm_head), which 'all-linear' leaves out."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((path.rsplit(".", 1)[-1] for path, m in model.named_modules() if m is head), None)


def prepare_kbit_base(model: Any, cfg: TrainConfig) -> Any:
    """Freeze a 4-bit base and keep what bitsandbytes left unquantized in the compute dtype, unless
    `cfg.fp32_unquantized` asks for fp32.

    This is peft's `prepare_model_for_kbit_training` (peft 0.21, utils/other.py) less its unconditional
    cast of every fp16/bf16 parameter that is not `Params4bit` to fp32: the embeddings, the output layer,
    the norms and any biases. They are frozen, so fp32 buys no update precision; it only adds 2 bytes per
    element: 2.10 GB on Llama-3-8B, 0.47 GB on Qwen2.5-1.5B (tied embeddings), 26-37% of the frozen
    weights of every QLoRA model lorafit ships the shapes of. It also makes the residual
    stream fp32 (a Linear4bit returns its input's dtype), so activations grow too. The matmuls run in the
    compute dtype under autocast either way, and HF's RMSNorm normalizes in fp32 internally either way.
    Measured (docs/benchmarks/2026-12-02-cpu-qlora-unquantized.md, SmolLM2-135M, bf16, 16 steps): the
    training peak is 18% lower in the compute dtype; the loss differs by 0.19% at step 1, at most 1.3%
    on any step and 0.12% on the mean, in no consistent direction. Hence the default: compute dtype,
    except under fp16 (not measured; its narrow range is what peft's cast guards against).

    The rest of peft's preparation is kept: the base is frozen; gradient checkpointing (lorafit's own
    switch, not forced on as peft's default is) is non-reentrant, which needs no input-grad hook
    (`enable_checkpointing` removes the one transformers adds); after a cast the CUDA cache is emptied, so the freed
    half-precision copies are not held as reserved memory."""
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.upcasts_unquantized("fp16" if model.dtype == torch.float16 else str(model.dtype)):
        for p in model.parameters():
            if p.dtype in (torch.float16, torch.bfloat16) and p.__class__.__name__ != "Params4bit":
                p.data = p.data.to(torch.float32)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    return model


def enable_checkpointing(model: Any) -> None:
    """Non-reentrant activation checkpointing in every decoder layer, without the input-grad hook.

    transformers (and peft's PeftModel, for unquantized bases) hook the input embeddings to require grad
    whenever checkpointing is on, since reentrant checkpointing gives no gradient to a block whose inputs
    do not require it. The non-reentrant kind needs no such input, and with frozen embeddings nothing
    before the first block trains, so the hook's only effect is backward through the first block's
    frozen projections into the embeddings: a layer's worth of input gradients per step, for nothing.
    The hook is removed here and again after peft wraps the model; trained embeddings (full fine-tuning)
    get their gradients as before."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.disable_input_require_grads()


def count_params(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their logical element count."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        # bitsandbytes Params4bit packs two 4-bit values per uint8 element
        if p.__class__.__name__ == "Params4bit":
            n = int(torch.Size(p.quant_state.shape).numel()) if getattr(p, "quant_state", None) else n * 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def stored_weight_bytes(model: Any) -> int:
    """Bytes the weights take as stored: packed 4-bit data plus quantization constants, or dense tensors."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:
            total += _quant_state_bytes(state)
    for b in model.buffers():
        total += b.numel() * b.element_size()
    return total


def _quant_state_bytes(state: Any) -> int:
    n = state.absmax.numel() * state.absmax.element_size()
    if getattr(state, "code", None) is not None:
        n += state.code.numel() * state.code.element_size()
    nested = getattr(state, "state2", None)
    if nested is not None:
        n += _quant_state_bytes(nested)
    return n
