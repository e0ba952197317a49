"""Training memory before training: a breakdown from the model's config alone (no weights loaded).

The parts are the ones `lorafit train` reports in summary.json's memory_breakdown, so an estimate
and a measured run can be read side by side:

- weights: the frozen base as stored (NF4/FP4 packed two per byte plus absmax constants, double-
  quantized or not; 16/32-bit dense), embeddings, norms and the rotary buffers;
- trainable, grads: LoRA matrices (fp32, as peft keeps them) or every parameter for full;
- optimizer_state: AdamW's two moments (+ step), or bitsandbytes 8-bit state with its block constants;
- activations_workspace: what autograd saves per token and layer (counted from the ops lorafit's
  path runs: RMSNorm, fused LoRA, SDPA or eager attention, SwiGLU, the fused chunked loss), plus
  the largest transient of the step (a loss chunk of logits, or under full gradient checkpointing a
  layer's recompute with its gradients); for full fine-tuning on CPU, what the peak holds beyond the
  gradients: both held at once (accumulating, fully checkpointed), else backward's or the optimizer
  step's (`full_cpu_peak`);
- runtime: on CPU, the resident size of the interpreter and libraries, measured in this process
  after importing the training stack; 0 on GPU, where the peak is the allocator's and the CUDA
  context is outside it.

The per-token saved-activation counts are checked against autograd's saved tensors on a tiny model
(tests/unit/test_estimate.py); the totals against measured peaks by bench/estimate_accuracy.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafit.base import matmul
from lorafit.base.config import ALL_LINEAR, TrainConfig
from lorafit.base.device import DTYPES, resolve_precision
from lorafit.base.errors import UserError
from lorafit.base.units import format_bytes

PARTS = ("runtime", "weights", "trainable", "grads", "optimizer_state", "activations_workspace")
# The fused loss's sizes (lorafit.training.loss reads them here, so the estimate counts what it allocates):
LOSS_CHUNK = 512  # rows of logits it builds at a time
WEIGHT_GRAD_SLICE = 1 << 20  # elements per fp32 add of the output layer's half-precision gradient product (4 MB)
BNB_BLOCK = 64  # bitsandbytes 4-bit block size
BNB_NESTED_BLOCK = 256  # double quantization: absmax values per second-level block
BNB_8BIT_MIN = 4096  # bitsandbytes keeps 32-bit state for parameters smaller than this
BNB_8BIT_BLOCK = 256
# CPU only, calibrated on 2026-11-23 (2-core x86, jemalloc, torch 2.13) from three LoRA points of
# bench/estimate_accuracy.py and checked on the others, and checked again on 2026-12-02 under mimalloc
# (the allocator the install brings; 17 points, all within 10%): RSS holds about 15% more than the live
# activations (allocator size classes and pages freed in backward but not yet returned), and
# ~128 MiB that the import-only runtime measurement misses (tokenizer, data, model objects).
CPU_ACTIVATION_OVERHEAD = 0.15
CPU_UNTRACKED = 128 * 2**20
# CPU full fine-tuning only, calibrated on 2026-12-03 (mimalloc, torch 2.13, fused AdamW) from 19 measured peaks of
# two models (SmolLM2-135M, Qwen2.5-0.5B; fp32 and bf16; checkpointing; gradient accumulation; all within 5.1%): the
# share of the activations' pages the allocator still holds at the optimizer step (it keeps freed pages, and the
# gradients' and the optimizer's large blocks do not fit in them). `full_cpu_peak` uses it.
CPU_STEP_KEPT_ACTIVATIONS = 0.65


# Projections by what they read: the attention input (the first norm's output), the MLP input (the second's)
ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj", "qkv_proj")
MLP_INPUTS = ("gate_proj", "up_proj", "gate_up_proj")
# Architectures whose q/k/v and gate/up are one Linear each (transformers' Phi3Attention.qkv_proj and
# Phi3MLP.gate_up_proj; Phi-3.5-mini and Phi-4-mini share the model type)
FUSED = ("phi3",)


@dataclass(frozen=True)
class Arch:
    """The shapes memory depends on, read from a transformers config."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    attention_bias: bool
    mlp_bias: bool
    fused: bool = False  # q/k/v in one qkv_proj, gate/up in one gate_up_proj (Phi-3)
    silu: bool = True  # SiLU-gated MLP, whose silu(gate) lorafit recomputes in backward (adapters.swiglu)

    def linear_params(self) -> int:
        """Weights of one decoder layer's projections."""
        return sum(i * o for _, i, o in self.linears())

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, in_features, out_features) of one decoder layer's projections, named as the model names
        them. Fused (Phi-3): qkv_proj writes q, k and v side by side (H + 2·KV heads), gate_up_proj gate
        and up (2·f), so LoRA on qkv_proj has A: d x r and B: r x (q + k + v)."""
        d, f, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.fused:
            return [("qkv_proj", d, q + 2 * kv), ("o_proj", q, d), ("gate_up_proj", d, 2 * f), ("down_proj", f, d)]
        return [
            ("q_proj", d, q),
            ("k_proj", d, kv),
            ("v_proj", d, kv),
            ("o_proj", q, d),
            ("gate_proj", d, f),
            ("up_proj", d, f),
            ("down_proj", f, d),
        ]

    def bias_params(self) -> int:
        """Bias elements per layer (Qwen2 has q/k/v biases)."""
        n = 0
        for name, _, out in self.linears():
            if (self.attention_bias and name in ATTENTION_INPUTS) or (
                self.mlp_bias and name in (*MLP_INPUTS, "down_proj")
            ):
                n += out
        return n


def arch_from_config(config: dict[str, Any]) -> Arch:
    """Shapes from a config.json mapping; a clear error for architectures the estimator does not model."""
    needed = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in needed if k not in config]
    if missing:
        raise UserError(f"model config lacks {missing}; the estimator models Llama/Qwen2/Mistral/Phi-3-style decoders")
    heads = config["num_attention_heads"]
    return Arch(
        hidden=config["hidden_size"],
        intermediate=config["intermediate_size"],
        layers=config["num_hidden_layers"],
        heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        vocab=config["vocab_size"],
        tied=bool(config.get("tie_word_embeddings", False)),
        attention_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
        mlp_bias=bool(config.get("mlp_bias", False)),
        fused=config.get("model_type") in FUSED,
        silu=config.get("hidden_act", "silu") in ("silu", "swish"),
    )


def model_config(spec: str) -> dict[str, Any]:
    """A model's config.json without loading (or materializing) its weights."""
    from lorafit.inputs import models

    if spec == "smollm2-135m":
        return json.loads((models.ARCH_DIR / "smollm2-135m.json").read_text())
    if spec.startswith("random:"):
        return models.arch_config(spec.split(":", 1)[1])
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError("no config.json in the model directory", file=str(path), field="model")
        return json.loads((path / "config.json").read_text())
    if path.suffix == ".gguf":
        return json.loads((Path(models.resolve(spec).location) / "config.json").read_text())
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(spec).to_dict()
    except OSError as e:
        raise UserError(f"cannot read the config of model '{spec}': {e}", field="model") from e


def _dtype_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def _nf4_bytes(n: int, double_quant: bool) -> int:
    """Packed 4-bit data plus constants, as bitsandbytes stores one weight of n elements."""
    blocks = math.ceil(n / BNB_BLOCK)
    code = 16 * 4  # the 16-value NF4/FP4 code book, fp32
    if not double_quant:
        return n // 2 + blocks * 4 + code
    nested = math.ceil(blocks / BNB_NESTED_BLOCK) * 4 + 256 * 4  # fp32 absmax of the absmax + 8-bit code
    return n // 2 + blocks + code + nested


def lora_targets(arch: Arch, cfg: TrainConfig) -> list[tuple[str, int, int]]:
    """The projections that get LoRA, resolved as training resolves them (adapters.methods.resolve_targets):
    the default (ALL_LINEAR) is every projection of the blocks, whatever the model names them."""
    if cfg.method == "full":
        return []
    linears = arch.linears()
    names = [name for name, _, _ in linears]
    targets = list(cfg.target_modules)
    if targets == list(ALL_LINEAR):
        return linears
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise UserError(
            f"target modules {unknown} are not among this model's decoder-block projections {names}, "
            "which the estimator counts LoRA on",
            field="target_modules",
        )
    return [lin for lin in linears if lin[0] in targets]


def weights_bytes(arch: Arch, cfg: TrainConfig, precision: str) -> int:
    """The weights that do not train, as stored: the frozen base (LoRA matrices are `trainable`)."""
    d = arch.hidden
    body = arch.linear_params()
    # QLoRA with --fp32-unquantized (as peft's prepare_model_for_kbit_training): what is not quantized is fp32
    dense = 4 if cfg.upcasts_unquantized(precision) else _dtype_bytes(precision)
    embed = arch.vocab * d * dense
    head = 0 if arch.tied else arch.vocab * d * dense
    norms = (2 * arch.layers + 1) * d * dense
    biases = arch.layers * arch.bias_params() * dense
    rotary = 2 * (arch.head_dim // 2) * 4  # inv_freq and original_inv_freq buffers, fp32
    if cfg.method == "full":  # every parameter trains: it is counted as trainable
        return rotary
    if cfg.method == "qlora":
        per_layer = sum(_nf4_bytes(i * o, cfg.double_quant) for _, i, o in arch.linears())
        layers = arch.layers * per_layer
    else:
        layers = arch.layers * body * dense
    return layers + embed + head + norms + biases + rotary


def trainable_params(arch: Arch, cfg: TrainConfig) -> int:
    """Trainable elements: LoRA A and B per targeted projection, or the whole model for full."""
    return sum(_param_sizes(arch, cfg))


def optimizer_state_bytes(cfg: TrainConfig, arch: Arch, element_bytes: int) -> int:
    """AdamW: two moments in the parameter's dtype and a step counter per tensor; 8-bit: one byte
    per moment plus block absmax and a 256-value code book, 32-bit for tensors under 4,096 elements."""
    sizes = _param_sizes(arch, cfg)
    if not cfg.optimizer.endswith("8bit"):
        return sum(2 * n * element_bytes + 4 for n in sizes)
    total = 0
    for n in sizes:
        if n < BNB_8BIT_MIN:
            total += 2 * n * 4
        else:
            total += 2 * n + 2 * 256 * 4 + 2 * math.ceil(n / BNB_8BIT_BLOCK) * 4
    return total


def _param_sizes(arch: Arch, cfg: TrainConfig) -> list[int]:
    """Element count of every trainable tensor."""
    if cfg.method == "full":
        d = arch.hidden
        layer = [i * o for _, i, o in arch.linears()] + [d, d]
        if arch.attention_bias:
            layer += [o for n, _, o in arch.linears() if n in ATTENTION_INPUTS]
        head = [] if arch.tied else [arch.vocab * d]
        return layer * arch.layers + [arch.vocab * d, d] + head
    return [n for _, i, o in lora_targets(arch, cfg) for n in (cfg.lora_r * i, cfg.lora_r * o)] * arch.layers


def saved_per_token(arch: Arch, cfg: TrainConfig, seq_len: int) -> dict[str, int]:
    """Elements autograd keeps per token for backward: per decoder layer, and once for the model.

    Per layer (no checkpointing): each RMSNorm's input and rsqrt (2d + 2); the inputs of projections
    that train something (d, d, f); attention's tensors (see `attention_saved`); SwiGLU's gate and up
    (2f; Phi-3's gate and up are halves of one gate_up_proj output, the same 2f; silu(gate) is recomputed
    in backward, `adapters.swiglu`: another f for other activations, which keep their output); LoRA's rank-r
    intermediate per projection (the fused path regenerates dropout masks instead of keeping them;
    peft's own path keeps the dropped input and its mask). With checkpointing, a layer keeps only
    its input (d).

    Attention's tensors and LoRA's intermediates are in the compute dtype even where the residual stream is
    fp32 (QLoRA with fp32 unquantized weights under bf16/fp16: SDPA and the LoRA branch cast their inputs,
    the 4-bit layers return fp32): `layer_compute_dtype` of `layer`.

    What is fp32 in every precision is counted apart (`layer_fp32`, `final_norm_fp32`): transformers'
    RMSNorm (Llama, Qwen2, Mistral, Phi-3; `adapters.norms`) squares and scales `x.to(float32)`, so it keeps
    an fp32 copy of its input (under bf16 or fp16 compute twice the size of x) and an fp32 rsqrt; SDPA's
    log-sum-exp is fp32 too. Measured with autograd's saved-tensor hooks under bf16 autocast on CPU
    (SmolLM2-135M: two fp32 (tokens x 576) tensors per layer; tests/unit/measurement/test_estimate.py).
    """
    d, f = arch.hidden, arch.intermediate
    lora = sum(cfg.lora_r for _ in lora_targets(arch, cfg))
    dropped = 0
    if cfg.method != "full" and not cfg.fused_lora and cfg.lora_dropout > 0:
        dropped = sum(i for _, i, _ in lora_targets(arch, cfg))  # + a 1-byte mask each, see activation_bytes
    full = cfg.method == "full"
    targets = {name for name, _, _ in lora_targets(arch, cfg)}
    # a projection keeps its input only when something of it trains (a frozen one needs just its weight)
    keeps = {name: full or name in targets for name, _, _ in arch.linears()}
    inputs = d * any(keeps.get(name, False) for name in ATTENTION_INPUTS)  # input norm's output
    inputs += d * any(keeps.get(name, False) for name in MLP_INPUTS) + f * keeps["down_proj"]
    attention = attention_saved(arch, cfg.attention, seq_len, keeps["o_proj"])
    # the MLP's gate and up (and the activation's output where it is not SiLU); norms that train also keep
    # their normalized input for the weight's gradient (their fp32 input and rsqrt: layer_fp32)
    mlp = 2 * f if arch.silu else 3 * f
    layer = inputs + attention + mlp + lora + dropped + (2 * d if full else 0)
    return {
        "layer": layer,
        "layer_compute_dtype": attention + lora,  # of `layer`: cast to the compute dtype, also from fp32 inputs
        "layer_fp32": 2 * d + 2 + (arch.heads if cfg.attention != "eager" else 0),
        "layer_checkpointed": d,
        "dropped_mask_bytes": dropped,
        "final_norm": d if full else 0,
        "final_norm_fp32": d + 1,
    }


def attention_saved(arch: Arch, attention: str, seq_len: int, o_proj_trains: bool) -> int:
    """Elements per token the attention of one layer keeps (H heads, KV kv heads of hd; T the length).

    SDPA keeps q, k, v, its output and the log-sum-exp: (2H + KV)·hd, plus v's storage (and H fp32 elements,
    counted in `saved_per_token`'s layer_fp32): v is a
    view of its projection's output, so it keeps that whole storage, KV·hd of v_proj or (H + 2·KV)·hd
    of a fused qkv_proj (Phi-3). Eager keeps q, and k and v at every head (repeat_kv's copies, or
    matmul's contiguous copies of k and v where KV = H), 3H·hd, and the probabilities, H·T.
    o_proj's input, kept when o_proj trains, is the attention output laid out (b, t, H·hd): a copy
    under eager (its matmul writes (b, H, t, hd)). Under SDPA the output follows q's layout (measured on
    CPU; on CUDA the flash kernel allocates it `empty_like` its q, flash-attention's mha_fwd): (b, t, H, hd)
    where q is a view of q_proj's output, so no copy, but (b, H, t, hd) where Phi-3's rotary concatenates
    q, so a copy. (CUDA's memory-efficient kernel, taken with an explicit mask, always writes (b, t, H, hd):
    there Phi-3 keeps H·hd less per token and layer than counted here, about 5% of a layer.)"""
    h, kv, hd = arch.heads, arch.kv_heads, arch.head_dim
    v_storage = (h + 2 * kv) * hd if arch.fused else kv * hd
    output_copy = h * hd if o_proj_trains and (attention == "eager" or arch.fused) else 0
    if attention == "eager":
        return 3 * h * hd + output_copy + h * seq_len
    return h * hd + kv * hd + v_storage + h * hd + output_copy


def checkpointed_layers(arch: Arch, cfg: TrainConfig) -> int:
    """Decoder layers that recompute in backward: all with checkpointing, the first --checkpoint-layers."""
    if not cfg.gradient_checkpointing:
        return 0
    return arch.layers if cfg.checkpoint_layers is None else min(cfg.checkpoint_layers, arch.layers)


def activation_bytes(
    arch: Arch,
    cfg: TrainConfig,
    batch_size: int,
    seq_len: int,
    precision: str,
    offload: bool = False,
    device: str = "cpu",
) -> dict[str, int]:
    """Saved activations of one micro-batch of batch_size x seq_len tokens (all real, all carrying
    loss: the worst case), computed in `precision`, and the largest transient on top of them. `offload`: the
    checkpointed layers' inputs wait in host memory, not on the device."""
    compute = _dtype_bytes(precision)
    # the residual stream is fp32 where the weights it passes through are: QLoRA with fp32 embeddings (a
    # Linear4bit returns its input's dtype: all activations fp32 but what is cast) and full fine-tuning's
    # fp32 master weights under bf16/fp16 autocast (matmul outputs in the compute dtype, norms fp32)
    s = 4 if cfg.upcasts_unquantized(precision) else compute
    master = cfg.method == "full" and compute < 4
    r = 4 if master else s
    tokens = batch_size * seq_len
    loss_tokens = batch_size * (seq_len - 1)
    per = saved_per_token(arch, cfg, seq_len)
    layer_bytes, weight_copies = saved_layer_bytes(arch, per, s, compute, master)
    checkpointed = checkpointed_layers(arch, cfg)
    if checkpointed:  # the first k layers keep their input; the others everything
        kept = 0 if offload else checkpointed * per["layer_checkpointed"] * r
        layers = (kept + (arch.layers - checkpointed) * layer_bytes) * tokens
        layers += (arch.layers - checkpointed) * weight_copies
        # Under full checkpointing the last layer's backward, at the peak's time (everything saved is still
        # held), recomputes its activations and forms their gradients: ~2 layers' worth (checked on two
        # CPU points: docs/benchmarks/2026-12-02-cpu-estimate-accuracy.md). Under selective checkpointing
        # the first layers recompute after the later ones freed theirs: never at the peak.
        recompute = 2 * layer_bytes * tokens + weight_copies if checkpointed == arch.layers else 0
    else:
        # an adapter's first layer gets an input that needs no gradient (frozen embeddings): its input
        # norm keeps only its output (checkpointed, it keeps its input, counted above)
        first_layer_discount = (arch.hidden + 1) * 4 if cfg.method != "full" else 0
        layers = arch.layers * (layer_bytes * tokens + weight_copies) - first_layer_discount * tokens
        recompute = 0
    rotary = 2 * seq_len * arch.head_dim * r
    final = (per["final_norm"] * r + per["final_norm_fp32"] * 4) * tokens
    # fused loss: the gradient of the loss rows' hidden states (formed in the forward) and a bool mask
    loss_saved = loss_tokens * arch.hidden * r + batch_size * (seq_len - 1)
    if cfg.method == "full":  # the output layer's fp32 gradient, also formed in the forward; token ids
        loss_saved += arch.vocab * arch.hidden * 4 + tokens * 8
    # transient while the loss runs: the final hidden states and their gathered loss rows, and its buffers
    loss_transient = (tokens + loss_tokens) * arch.hidden * r + loss_buffers(arch, cfg, loss_tokens, precision, device)
    saved = layers + rotary + final + loss_saved
    return {
        "saved": saved,
        "per_layer_per_token": layer_bytes,
        "loss_transient": loss_transient,
        "recompute_transient": recompute,
        "total": saved + max(loss_transient, recompute),
    }


def saved_layer_bytes(arch: Arch, per: dict[str, int], s: int, compute: int, master: bool) -> tuple[int, int]:
    """A decoder layer's saved bytes per token (`saved_per_token`'s counts at `s` bytes, the compute dtype's
    `compute` for what is cast to it, fp32 for what stays fp32), and per layer the weight copies autocast
    makes of fp32 master weights (`master`: full fine-tuning under bf16/fp16), 0 otherwise."""
    cast = per["layer_compute_dtype"]
    per_token = (per["layer"] - cast) * s + cast * compute + per["layer_fp32"] * 4 + per["dropped_mask_bytes"]
    if not master:
        return per_token, 0
    return per_token + autocast_master_bytes(arch, s), arch.linear_params() * s  # copies kept by their matmuls


def autocast_master_bytes(arch: Arch, s: int) -> int:
    """Bytes per token and layer that full fine-tuning's fp32 master weights under bf16/fp16 autocast keep
    beyond `saved_per_token`'s count at `s` bytes: the norms' normalized inputs (kept for their weights'
    gradients) are fp32, and autocast casts the fp32 norm output once per projection that reads it (q, k
    and v each; gate and up each; one for a fused qkv_proj or gate_up_proj), each cast kept by its matmul.
    Measured with autograd's saved-tensor hooks (tests/unit/measurement/test_estimate.py)."""
    names = [name for name, _, _ in arch.linears()]
    casts = sum(name in ATTENTION_INPUTS for name in names) + sum(name in MLP_INPUTS for name in names)
    return 2 * arch.hidden * (4 - s) + (casts - 2) * arch.hidden * s


def loss_buffers(arch: Arch, cfg: TrainConfig, loss_tokens: int, precision: str, device: str = "cpu") -> int:
    """What `training.loss` allocates for a call, computing in `precision`: one chunk of fp32 logits; in
    bf16/fp16 also a half-precision chunk (the product, then the probabilities), the output layer's
    half-precision copy where its weight is fp32 (full fine-tuning's master weights, QLoRA's fp32 unquantized
    weights), and training that layer a (V, d) half-precision product for its gradient (fp32 accumulates in
    place) and one fp32 slice it is added in (WEIGHT_GRAD_SLICE elements). In fp32 on a CPU whose products go
    through oneDNN, also one block of logits that oneDNN returns before it is copied into the chunk's buffer
    (`base.matmul.linear_into`)."""
    half = precision in ("bf16", "fp16")
    weight = arch.vocab * arch.hidden
    rows = min(loss_tokens, LOSS_CHUNK)
    total = rows * arch.vocab * (4 + (2 if half else 0))
    if matmul.onednn_runs(device, DTYPES[precision]):
        total += matmul.into_block_bytes(rows, arch.vocab)
    if half and (cfg.method == "full" or cfg.upcasts_unquantized(precision)):
        total += weight * 2
    if half and cfg.method == "full":
        total += weight * 2 + min(weight, WEIGHT_GRAD_SLICE) * 4
    return total


def full_cpu_peak(activations: int, grads: int, held_together: bool) -> int:
    """Gradients and activations together at full fine-tuning's CPU peak (RSS under mimalloc).

    Where `held_together` (gradient accumulation: a later micro-batch's activations come on top of the gradients
    the earlier ones left, which go only after the optimizer step; full checkpointing: the activations are mostly a
    layer's recompute and the loss's buffers, made while the gradients grow, not freed for them), their sum.
    Otherwise the larger of:

    - backward's: the activations. Gradients are formed as activations are freed, layer by layer from the
      last, and take the freed pages (within 1.9% where activations are over 3x the gradients);
    - the optimizer step's: the gradients and the part of the activations' pages the allocator keeps but cannot
      use for the gradients' and the optimizer's large blocks (CPU_STEP_KEPT_ACTIVATIONS, calibrated). The step
      itself (torch's fused AdamW) allocates nothing beyond its state.

    Counting both as held at once everywhere erred from -8.6% to +17.9% (Qwen2.5-0.5B, docs/benchmarks/
    2026-12-03-cpu-estimate-accuracy.md)."""
    if held_together:
        return activations + grads
    return max(activations, grads + int(CPU_STEP_KEPT_ACTIVATIONS * activations))


def runtime_bytes(device: str) -> tuple[int, str]:
    """What the process holds besides the model: measured here, on CPU, after importing the stack."""
    if device != "cpu":
        return gpu_runtime_bytes()
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from lorafit.measurement.host_memory import rss_bytes

    return rss_bytes() + CPU_UNTRACKED, (
        "resident size of this process after importing torch, transformers, peft and accelerate, "
        f"+ {format_bytes(CPU_UNTRACKED, digits=0)} for tokenizer, data and model objects (calibrated)"
    )


# What a PyTorch process holds on a GPU outside its allocator: the CUDA context with lazily loaded
# kernels (CUDA >= 11.7, PyTorch's default) and library handles. An assumption where no GPU is here to
# measure it; every GPU run records its own figure as peak_memory.outside_allocator_bytes.
GPU_CONTEXT_ASSUMED = 512 * 2**20


def gpu_runtime_bytes() -> tuple[int, str]:
    """The device memory outside PyTorch's allocator: measured on this GPU when there is one, else assumed."""
    import torch

    if torch.cuda.is_available():
        from lorafit.measurement.device_memory import DeviceMemory

        torch.cuda.init()
        meter = DeviceMemory.open(torch.device("cuda"))
        return meter.outside_at_start, f"CUDA context and libraries measured on this GPU ({meter.source})"
    return GPU_CONTEXT_ASSUMED, (
        f"CUDA context and libraries assumed {format_bytes(GPU_CONTEXT_ASSUMED, digits=0)} (no GPU here to measure "
        "it); the peak is device-level: the allocator's reserved peak plus this"
    )


@dataclass
class Estimate:
    parts: dict[str, int]
    activations: dict[str, int]
    trainable_params: int
    batch_size: int
    max_length: int
    precision: str
    notes: list[str]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total": self.total}


def estimate(
    cfg: TrainConfig, device: str = "cpu", config: dict[str, Any] | None = None, runtime: int | None = None
) -> Estimate:
    """The memory breakdown of training `cfg` on `device` (cpu or cuda), at its batch size and max length."""
    arch = arch_from_config(config if config is not None else model_config(cfg.model))
    precision = resolve_precision(cfg.precision, device, bf16_ok=True)  # estimates assume a bf16-capable GPU
    notes = []
    if runtime is None:
        runtime, why = runtime_bytes(device)
        notes.append(f"runtime: {why}")
    n_trainable = trainable_params(arch, cfg)
    element = 4  # LoRA matrices and full fine-tuning's master weights are fp32
    offload = bool(cfg.offload_activations and cfg.gradient_checkpointing) and device != "cpu"
    act = activation_bytes(arch, cfg, cfg.batch_size, cfg.max_length, precision, offload, device)
    if offload:
        notes.append("offloaded checkpointing: the checkpointed layers' inputs are in host memory, not counted here")
    if device == "cpu":
        act["total"] = int(act["total"] * (1 + CPU_ACTIVATION_OVERHEAD))
        notes.append(f"activations on CPU: + {CPU_ACTIVATION_OVERHEAD:.0%} allocator overhead in RSS (calibrated)")
    parts = {
        "runtime": runtime,
        "weights": weights_bytes(arch, cfg, precision),
        "trainable": n_trainable * element,
        "grads": n_trainable * element,
        "optimizer_state": optimizer_state_bytes(cfg, arch, element),
        "activations_workspace": act["total"],
    }
    if cfg.optimizer.startswith("paged") and device != "cpu":
        notes.append("paged optimizer state lives in CUDA unified memory: it is outside the allocator's peak")
        parts["optimizer_state"] = 0
    if cfg.method == "full" and device == "cpu" and cfg.optimizer == "adamw":  # measured with torch's AdamW only
        held_together = cfg.grad_accum > 1 or checkpointed_layers(arch, cfg) == arch.layers  # selective: unmeasured
        together = full_cpu_peak(act["total"], parts["grads"], held_together)
        parts["activations_workspace"] = together - parts["grads"]
        notes.append(
            "full fine-tuning on CPU: with gradient accumulation or full checkpointing, gradients and activations are "
            "held at once; otherwise the peak is backward's (activations, the gradients in the pages it frees) or "
            f"the optimizer step's (gradients and {CPU_STEP_KEPT_ACTIVATIONS:.0%} of the activations' pages, "
            "calibrated), whichever is larger; activations_workspace is what it holds beyond the gradients"
        )
    elif cfg.method == "full":
        notes.append(
            "full fine-tuning: gradients and activations are counted as held at once, though backward frees "
            "activations as it forms gradients: an upper bound (not yet measured on a GPU or with bitsandbytes' "
            "optimizers)"
        )
    if cfg.packing:
        notes.append("packing: rows are full by construction, so the worst case here is the typical case")
    else:
        notes.append("activations assume every row is max_length real tokens (the worst case)")
    return Estimate(parts, act, n_trainable, cfg.batch_size, cfg.max_length, precision, notes)


STEP = {"batch": 1, "length": 64}  # granularity of --find-max: whole samples, 64-token lengths


def largest_fitting(fits: Any, start: int, step: int, limit: int = 1 << 20) -> int | None:
    """Largest multiple of `step` in [step, limit] with fits(n), for fits true up to some n and false
    after: doubles from `start` until a miss, then bisects. None when even `step` does not fit."""
    low, high = 0, None  # largest known fit, smallest known miss
    x = max(step, start // step * step)
    while high is None or high - low > step:
        if x > limit:
            high = limit + step
        elif fits(x):
            low = x
        else:
            high = x
        if high is None:
            x = low * 2
        else:
            x = max(step, (low + high) // 2 // step * step)
            if x <= low or x >= high:
                break
    return low or None


def find_max(cfg: TrainConfig, what: str, budget: int, device: str) -> int | None:
    """Largest batch size or max length whose estimate fits the budget (None if even the smallest does not)."""
    config = model_config(cfg.model)
    runtime, _ = runtime_bytes(device)
    key = "batch_size" if what == "batch" else "max_length"

    def fits(value: int) -> bool:
        return estimate(dataclasses.replace(cfg, **{key: value}), device, config, runtime).total <= budget

    return largest_fitting(fits, STEP[what], STEP[what])
