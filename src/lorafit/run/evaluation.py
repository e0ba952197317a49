"""eval.json, typed: what `lorafit eval` (`studies.evaluate.evaluate`) records of a model or a run.

The reports read evaluations through `Evaluation.from_dict` only, never by string key. eval.json has no
schema version, so reading is lenient: a key an older lorafit did not write, or a value of the wrong
kind, reads as None (shown as missing), never as a guess.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass
class EvalSize:
    """`studies.evaluate.size`: parameters (4-bit weights at their logical count) and bytes."""

    total_params: int | None = None
    adapter_params: int | None = None
    disk_bytes: float | None = None
    disk_base_bytes: float | None = None
    disk_adapter_bytes: float | None = None
    memory_bytes: float | None = None
    fp16_bytes: float | None = None
    compression_vs_fp16: float | None = None


@dataclass
class EvalPerplexity:
    """`studies.evaluate.perplexity` and the text it scored."""

    ppl: float | None = None
    nll_mean: float | None = None
    tokens_scored: int | None = None
    windows: int | None = None
    text: str | None = None
    max_length: int | None = None
    stride: int | None = None
    text_tokens: int | None = None


@dataclass
class EvalGeneration:
    """`studies.evaluate.generation_speed`: `batch` prompts, `new_tokens` each, greedy with KV cache;
    `total_s` is the median time of a whole generation (prefill included), `tokens_per_s` its tokens over it."""

    prompt_tokens: int | None = None
    batch: int | None = None
    new_tokens: int | None = None
    ttft_s: float | None = None
    total_s: float | None = None
    decode_tokens_per_s: float | None = None
    tokens_per_s: float | None = None
    repeats: int | None = None


@dataclass
class EvalQuantization:
    """How a 4-bit base was stored (present only for one)."""

    quant_type: str | None = None
    double_quant: bool | None = None


@dataclass
class Evaluation:
    """eval.json (`studies.evaluate.evaluate`), typed. Read leniently: eval.json has no schema version,
    so a key an older lorafit did not write, or a value of the wrong kind, reads as None (shown "—")."""

    label: str | None = None
    model: str | None = None
    method: str | None = None
    adapter: str | None = None
    settings: dict[str, Any] | None = None
    device: str | None = None
    precision: str | None = None
    quantization: EvalQuantization | None = None
    size: EvalSize = field(default_factory=EvalSize)
    perplexity: EvalPerplexity = field(default_factory=EvalPerplexity)
    generation: EvalGeneration = field(default_factory=EvalGeneration)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Evaluation:
        return _read(cls, data or {})


def _read(cls: type[T], data: dict[str, Any]) -> T:
    """`data` as the dataclass `cls`: each field by its type, unknown keys ignored."""
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: _value(hints[f.name], data.get(f.name)) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


def _value(tp: Any, value: Any) -> Any:
    """`value` if it is of type `tp` (an optional nested dataclass: None unless given; a required one:
    empty when absent); None otherwise. bool is not a number here; NaN and infinities are missing."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    optional = len(args) < len(typing.get_args(tp))
    kind = args[0] if optional else tp
    if dataclasses.is_dataclass(kind):
        if isinstance(value, dict):
            return _read(kind, value)  # type: ignore[arg-type]
        return None if optional else kind()  # type: ignore[operator]
    if kind in (int, float):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return value if number and math.isfinite(value) else None
    if typing.get_origin(kind) is dict:
        return value if isinstance(value, dict) else None
    return value if isinstance(value, kind) else None
