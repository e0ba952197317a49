"""Every option of a training run, defined and validated in one place.

`TrainConfig` is the schema: the CLI builds its flags from these fields, YAML files map onto them,
and the resolved config is written next to every run. Unknown keys and wrong types are user
errors that name the key (and suggest the closest valid one).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorafit.base.errors import UserError
from lorafit.base.units import parse_bytes

METHODS = ("full", "lora", "qlora")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
OPTIMIZERS = ("adamw", "paged_adamw", "paged_adamw_8bit", "adamw_8bit")
SCHEDULERS = ("cosine", "linear", "constant")
QUANT_TYPES = ("nf4", "fp4")
DATA_FORMATS = ("auto", "alpaca", "chat", "sharegpt", "text")
TRACKERS = ("tensorboard", "mlflow", "wandb")
SERVE_QUANT = ("none", "nf4", "fp4")
DEVICES = ("auto", "cpu", "cuda")
ATTENTION = ("sdpa", "eager")
# The linear projections of a transformer block in Llama/Qwen/Mistral-style models; as the default target list it
# stands for the model's own linear layers (adapters.methods.resolve_targets: Phi-3's fused ones too).
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def opt(default: Any, help: str, choices: tuple[str, ...] | None = None, **kw: Any) -> Any:
    """A dataclass field carrying its CLI help text and allowed values."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class TrainConfig:
    """One training run: model, data, method, optimisation and measurement settings."""

    # model and data
    model: str = opt(
        "smollm2-135m",
        "Model: 'smollm2-135m' (built in), 'random:<arch>', a local HF directory, a .gguf file or a hub id.",
    )
    data: str = opt(
        "alpaca",
        "Data: 'alpaca', 'wikitext2' or 'wikitext2-train' (built in); a .json/.jsonl/.txt/.csv/.parquet/.arrow "
        "file; a `datasets` directory (save_to_disk); or a hub id (needs the network).",
    )
    data_format: str = opt(
        "auto",
        "Format of --data: alpaca (instruction/input/output), chat (messages), sharegpt (conversations with "
        "from/value), text (one field per sample); 'auto' decides from the fields.",
        DATA_FORMATS,
    )
    data_split: str = opt("train", "Split to read from a `datasets` directory or a hub id.")
    text_field: str | None = opt(None, "Field holding each sample's text for --data-format text (default: 'text').")
    prompt_field: str | None = opt(None, "Field holding the prompt (alpaca; default: 'instruction' + 'input').")
    response_field: str | None = opt(None, "Field holding the response (alpaca; default: 'output').")
    messages_field: str | None = opt(
        None, "Field holding the conversation (chat: 'messages', sharegpt: 'conversations' by default)."
    )
    max_samples: int | None = opt(None, "Use only the first N samples (all when unset).")
    max_length: int = opt(1024, "Longest sequence in tokens; longer samples are truncated (and counted).")
    packing: bool = opt(False, "Pack samples into rows of --max-length with no attention across samples.")
    train_on_prompt: bool = opt(False, "Also train on prompt tokens (by default only responses carry loss).")
    group_by_length: bool = opt(True, "Batch samples of similar length together so little compute goes to padding.")
    padding_free: bool = opt(
        True,
        "Lay a micro-batch's samples end to end in one row when padding them would waste a tenth or more of its "
        "tokens, and always with --packing (no block-diagonal mask); attention stays within each sample (SDPA "
        "once per sample). Off: pad to the longest; packed rows attend through their mask.",
    )
    # method
    method: str = opt("lora", "Fine-tuning method.", METHODS)
    lora_r: int = opt(16, "LoRA rank.")
    lora_alpha: float | None = opt(None, "LoRA alpha (default 2 x rank).")
    lora_dropout: float = opt(0.05, "Dropout on the LoRA input.")
    fused_lora: bool = opt(
        True,
        "Train LoRA through lorafit's fused branch (same function as peft, masks redrawn in backward: "
        "less memory, faster); off = peft's own forward.",
    )
    target_modules: list[str] = opt(
        list(ALL_LINEAR),
        "Modules that get LoRA adapters, comma-separated or repeated (default: every linear layer of the blocks, "
        "the model's own names: q/k/v/o and gate/up/down, or Phi-3's fused qkv_proj and gate_up_proj).",
    )
    quant_type: str = opt("nf4", "QLoRA 4-bit data type.", QUANT_TYPES)
    double_quant: bool = opt(True, "QLoRA double quantization (quantize the quantization constants).")
    fp32_unquantized: bool | None = opt(
        None,
        "QLoRA: cast the weights bitsandbytes leaves unquantized (embeddings, output layer, norms) to fp32, "
        "as peft's prepare_model_for_kbit_training does; off keeps them in the compute dtype (less memory). "
        "Unset: fp32 when computing in fp16 (whose range is narrow), the compute dtype in bf16 and fp32.",
    )
    # optimisation
    optimizer: str = opt("adamw", "Optimizer (paged_* and *_8bit come from bitsandbytes).", OPTIMIZERS)
    learning_rate: float = opt(2e-4, "Peak learning rate.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    lr_scheduler: str = opt("linear", "Learning-rate schedule after warm-up.", SCHEDULERS)
    warmup_steps: int = opt(0, "Optimizer steps of linear learning-rate warm-up (with every --lr-scheduler).")
    warmup_ratio: float = opt(
        0.0, "Warm-up as a fraction of the optimizer steps (the reference studies use 0.03); not with --warmup-steps."
    )
    max_grad_norm: float = opt(1.0, "Clip gradients to this global norm (0 disables).")
    batch_size: int = opt(4, "Sequences (or packed rows) per micro-batch.")
    grad_accum: int = opt(1, "Micro-batches per optimizer step.")
    epochs: int = opt(1, "Passes over the data (ignored when --max-steps is set).")
    max_steps: int | None = opt(None, "Stop after this many optimizer steps.")
    save_every: int = opt(
        0, "Write a checkpoint every N optimizer steps (0: only on SIGINT/SIGTERM); resume with --resume RUN_DIR."
    )
    keep_checkpoints: int = opt(2, "Checkpoints kept (the newest).")
    skip_nonfinite: bool = opt(
        False, "Skip an optimizer step whose loss is NaN/inf (counted in summary.json) instead of stopping the run."
    )
    precision: str = opt(
        "auto",
        "Compute precision; 'auto' = bf16 on GPUs of compute capability 8.0+, fp16 on older GPUs, fp32 on CPU "
        "(a run on a CPU with bf16 units suggests bf16).",
        PRECISIONS,
    )
    gradient_checkpointing: bool | None = opt(
        None,
        "Recompute activations in backward to save memory. Unset: the memory plan decides (--plan-memory); "
        "set either way, it wins over the plan.",
    )
    checkpoint_layers: int | None = opt(
        None,
        "With checkpointing, recompute only the first N decoder layers (selective checkpointing); unset: all.",
    )
    offload_activations: bool = opt(
        False,
        "CUDA, with checkpointing: keep the checkpointed layers' inputs in host memory until backward needs "
        "them (as Unsloth's offloaded checkpointing).",
    )
    plan_memory: bool = opt(
        True,
        "Before the first step, choose checkpointing (none, selective, full; offload on CUDA) and micro-batch x "
        "accumulation (same global batch) so the run is predicted to fit --memory-budget, or by default the "
        "device's memory (GPU) or available RAM (CPU); the fastest such plan wins. Off: run exactly as configured.",
    )
    chunked_loss: bool = opt(
        True, "Fused chunked cross-entropy on loss-carrying tokens only; never builds full logits."
    )
    attention: str = opt("sdpa", "Attention implementation.", ATTENTION)
    memory_budget: str | None = opt(
        None,
        "Memory this run may use, e.g. 8GB or 512MiB: on a GPU a hard cap "
        "(torch.cuda.set_per_process_memory_fraction), to emulate a smaller card; on CPU the run stops as out "
        "of memory when its peak RSS passes it. Exit code 4 either way.",
    )
    seed: int = opt(0, "Random seed (runs are reproducible on CPU).")
    device: str = opt("auto", "Where to train.", DEVICES)
    # measurement and output
    profile_warmup_steps: int = opt(1, "Micro-steps excluded from the timed window (warm-up).")
    profile_trace: bool = opt(
        False,
        "Write a PyTorch profiler trace (gzipped Chrome trace, trace.json.gz in the run directory) of the micro-steps "
        "right after warm-up; open it in Perfetto or chrome://tracing. Traced steps are left out of the timings.",
    )
    profile_trace_steps: int = opt(2, "How many micro-steps --profile-trace records.")
    out: str | None = opt(None, "Run directory (default runs/<time>-<method>).")
    report_to: list[str] = opt(
        [],
        "Also log every metrics row and the summary to these trackers, comma-separated or repeated: "
        "tensorboard, mlflow, wandb (each needs the lorafit extra of its name, installed with pip).",
    )

    def __post_init__(self) -> None:
        _check_choices(self)
        positive = ("max_length", "lora_r", "batch_size", "grad_accum", "epochs")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}", field=name)
        for name in ("max_samples", "max_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{name} must be >= 1 when set, got {value}", field=name)
        if self.learning_rate <= 0:
            raise UserError(f"learning_rate must be > 0, got {self.learning_rate}", field="learning_rate")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}", field="lora_dropout")
        if self.save_every < 0 or self.keep_checkpoints < 1:
            raise UserError("save_every must be >= 0 and keep_checkpoints >= 1", field="save_every")
        if self.profile_trace_steps < 1:
            raise UserError("profile_trace_steps must be >= 1", field="profile_trace_steps")
        if self.warmup_steps < 0 or self.profile_warmup_steps < 0:
            raise UserError("warmup_steps and profile_warmup_steps must be >= 0", field="warmup_steps")
        if not 0 <= self.warmup_ratio < 1:
            raise UserError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}", field="warmup_ratio")
        if self.warmup_ratio and self.warmup_steps:
            raise UserError("give --warmup-steps or --warmup-ratio, not both", field="warmup_ratio")
        if self.checkpoint_layers is not None and self.checkpoint_layers < 1:
            raise UserError(
                f"checkpoint_layers must be >= 1 when set, got {self.checkpoint_layers}", field="checkpoint_layers"
            )
        if self.checkpoint_layers or self.offload_activations:  # both are kinds of checkpointing
            if self.gradient_checkpointing is False:
                raise UserError(
                    "checkpoint_layers and offload_activations need checkpointing; drop --no-gradient-checkpointing",
                    field="gradient_checkpointing",
                )
            self.gradient_checkpointing = True
        if not self.target_modules:
            raise UserError("target_modules must name at least one module", field="target_modules")
        if self.lora_alpha is None:
            self.lora_alpha = 2.0 * self.lora_r
        if self.memory_budget is not None:
            parse_bytes(self.memory_budget, "memory_budget")
        for name in self.report_to:
            if name not in TRACKERS:
                raise UserError(f"report_to takes {', '.join(TRACKERS)}; got {name!r}", field="report_to")
        if len(set(self.report_to)) < len(self.report_to):
            raise UserError(f"report_to names a tracker twice: {', '.join(self.report_to)}", field="report_to")

    def upcasts_unquantized(self, precision: str) -> bool:
        """QLoRA keeps its unquantized weights in fp32: as --fp32-unquantized says, or unset only under fp16
        compute, whose 65,504 ceiling peft's fp32 cast guards against (the compute dtype is measured as good
        in bf16: docs/benchmarks/2026-12-02-cpu-qlora-unquantized.md)."""
        if self.method != "qlora":
            return False
        return self.fp32_unquantized if self.fp32_unquantized is not None else precision == "fp16"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class EvalConfig:
    """What `lorafit eval` (and `compare`, after each training) measures, and how."""

    ppl: str = opt(
        "wikitext2",
        "Perplexity text: 'wikitext2' (built-in test split), a .txt file, an Alpaca .json/.jsonl (its "
        "responses), or 'none' to skip.",
    )
    ppl_max_length: int = opt(1024, "Perplexity window length in tokens.")
    ppl_stride: int = opt(
        512,
        "Tokens the window moves each step; each token is scored once, with up to "
        "ppl_max_length - ppl_stride tokens of extra context.",
    )
    ppl_max_tokens: int = opt(
        16384,
        "Score only the first N tokens of the text; 0 = all (WikiText-2 test is ~300k tokens: minutes on a "
        "GPU, most of an hour on a laptop CPU).",
    )
    gen: bool = opt(True, "Measure generation speed: time to first token and decode tokens/s (KV cache, greedy).")
    gen_tokens: int = opt(64, "New tokens per generation.")
    gen_batch: int = opt(1, "Prompts generated together.")
    gen_repeats: int = opt(3, "Timed generations (after one warm-up); the median is reported.")
    device: str = opt("auto", "Where to evaluate.", DEVICES)
    precision: str = opt(
        "auto",
        "Compute precision; 'auto' = bf16 on GPUs of compute capability 8.0+, fp16 on older GPUs, fp32 on CPU. "
        "With --run, 'auto' means the run's own precision.",
        PRECISIONS,
    )

    def __post_init__(self) -> None:
        _check_choices(self)
        for name in ("ppl_max_length", "ppl_stride", "gen_tokens", "gen_batch", "gen_repeats"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}", field=name)
        if self.ppl_stride > self.ppl_max_length:
            raise UserError(
                f"ppl_stride ({self.ppl_stride}) must not exceed ppl_max_length ({self.ppl_max_length}), "
                "or tokens between windows would never be scored",
                field="ppl_stride",
            )
        if self.ppl_max_tokens == 1 or self.ppl_max_tokens < 0:
            raise UserError("ppl_max_tokens must be 0 (all) or >= 2", field="ppl_max_tokens")


@dataclass
class ServeConfig:
    """`lorafit serve`: one base model, many LoRA adapters, an OpenAI-compatible API."""

    model: str = opt("smollm2-135m", "Base model (same specs as train).")
    adapters: str | None = opt(
        None, "Directory whose subdirectories are PEFT adapters (name = subdirectory); registered at start."
    )
    adapter: list[str] = opt([], "Extra adapters as NAME=PATH, comma-separated or repeated.")
    allow_dir: list[str] = opt(
        [],
        "Directories adapters may be loaded from at run time (comma-separated or repeated); --adapters and "
        "the directories of --adapter are always allowed.",
    )
    served_name: str | None = opt(None, "Model name of the base in the API (default: the --model spec).")
    host: str = opt("127.0.0.1", "Address to bind; 0.0.0.0 exposes the server to the network.")
    port: int = opt(8000, "Port to listen on (0: any free port).")
    api_key: str | None = opt(None, "Bearer key required on every /v1 request (default: env LORAFIT_API_KEY).")
    max_adapters: int = opt(8, "Adapters resident in memory at once; the least recently used is evicted.")
    max_batch: int = opt(16, "Requests decoded together in one forward pass.")
    batch_wait_ms: float = opt(5.0, "How long the scheduler waits for more requests before starting a batch.")
    max_prompt_tokens: int = opt(2048, "Longest prompt accepted, in tokens.")
    max_tokens_limit: int = opt(1024, "Largest max_tokens a request may ask for.")
    max_body_bytes: int = opt(1_000_000, "Largest request body accepted.")
    max_concurrent: int = opt(64, "Requests in flight at once; more get 429.")
    mode: str = opt(
        "batched",
        "batched: requests that arrive together share forward passes, whatever their adapters; set-adapter: "
        "one request at a time with set_adapter (the usual pattern, for comparison).",
        ("batched", "set-adapter"),
    )
    device: str = opt("auto", "Where to run the model.", DEVICES)
    precision: str = opt(
        "auto",
        "Compute precision; 'auto' = bf16 on GPUs of compute capability 8.0+, fp16 on older GPUs, fp32 on CPU.",
        PRECISIONS,
    )
    quantize: str = opt(
        "none",
        "Load the base in 4-bit through bitsandbytes (nf4 or fp4), shared by every adapter; QLoRA adapters then "
        "run on the base they were trained with.",
        SERVE_QUANT,
    )

    def __post_init__(self) -> None:
        _check_choices(self)
        for name in ("max_adapters", "max_batch", "max_prompt_tokens", "max_tokens_limit", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}", field=name)
        if self.max_concurrent < 1:
            raise UserError(f"max_concurrent must be >= 1, got {self.max_concurrent}", field="max_concurrent")
        if not 0 <= self.port < 65536:
            raise UserError(f"port must be in 0..65535 (0: any free port), got {self.port}", field="port")
        for item in self.adapter:
            if "=" not in item:
                raise UserError(f"--adapter takes NAME=PATH, got {item!r}", field="adapter")


def _check_choices(cfg: Any) -> None:
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices and value not in choices:
            raise UserError(f"{f.name} must be one of {', '.join(choices)}; got {value!r}", field=f.name)


def field_names(cls: type = TrainConfig) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for annotations like `int | None` or `list[str]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved type hints of a config class, once: `typing.get_type_hints` takes ~2 ms a call, and
    reports and `lorafit ui` check every stored option of every run through `coerce`."""
    return typing.get_type_hints(cls)


def coerce(name: str, value: Any, source: str, cls: type = TrainConfig) -> Any:
    """Check one value against the field's type; YAML and CLI values both go through here."""
    hints = field_types(cls)
    if name not in hints:
        raise unknown_key(name, source, cls)
    tp, optional = base_type(hints[name])
    if value is None:
        if optional:
            return None
        raise UserError(f"{name} cannot be empty", file=source, field=name)
    where = {"file": source, "field": name}
    if typing.get_origin(tp) is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{name} must be a list of strings, got {value!r}", **where)
        # `--adapter a=P --adapter b=Q` and `--adapter a=P,b=Q` mean the same, as in vLLM's --lora-modules
        return [part.strip() for v in value for part in v.split(",") if part.strip()]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{name} must be true or false, got {value!r}", **where)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{name} must be an integer, got {value!r}", **where)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{name} must be a number, got {value!r}", **where)
    if tp is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise UserError(f"{name} must be a string, got {value!r}", **where)
    return value


def unknown_key(name: str, source: str, cls: type = TrainConfig) -> UserError:
    close = difflib.get_close_matches(name, field_names(cls), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return UserError(f"unknown option '{name}'{hint}", file=source, field=name)


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML config file into {field: value}, with errors that name the file and key."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot read config: {e.strerror}", file=str(path)) from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        raise UserError(f"invalid YAML: {e}", file=str(path), line=None if line is None else line + 1) from e
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError("a config file must be a mapping of option: value", file=str(path))
    return {key.replace("-", "_"): coerce(key.replace("-", "_"), v, str(path)) for key, v in raw.items()}


def build_config(config_file: Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """File values first, then explicit overrides (CLI flags) on top."""
    values: dict[str, Any] = load_yaml(config_file) if config_file else {}
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = coerce(key, value, "command line")
    return TrainConfig(**values)


def build_eval_config(overrides: dict[str, Any] | None = None) -> EvalConfig:
    """EvalConfig from CLI flags (unset ones keep their defaults)."""
    values = {k: coerce(k, v, "command line", EvalConfig) for k, v in (overrides or {}).items() if v is not None}
    return EvalConfig(**values)


def flag_name(field_name: str) -> str:
    """The command-line flag of a config field: `lora_r` -> `--lora-r`."""
    return "--" + field_name.replace("_", "-")


def to_flags(cfg: Any, exclude: tuple[str, ...] = ()) -> list[str]:
    """The command-line flags that rebuild `cfg` (a TrainConfig, EvalConfig or ServeConfig): the inverse of
    the CLI's flags -> config, for studies that rerun lorafit in a subprocess. Unset (None) fields are left
    out, so they keep their defaults; a list becomes one flag per item."""
    flags: list[str] = []
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), flag_name(f.name)
        if f.name in exclude or value is None:
            continue
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            for item in value:
                flags += [flag, str(item)]
        else:
            flags += [flag, str(value)]
    return flags


def dump_yaml(cfg: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
