"""The run record: what summary.json holds, as one typed `Summary` made of typed parts.

summary.json is flat (one JSON object of ~50 keys, the layout users and scripts read); the type
groups those keys into parts (timing, energy, memory, FLOPs, parameters, losses, data,
environment). `Summary.to_dict()` writes the flat JSON exactly as lorafit always has, key for key
and in the same order; `Summary.from_dict()` reads it back. Every reader of a run goes through
this type, so a key is named in one place.

Keys that older lorafit versions did not write (e.g. `processes` before scale-out) come back as
None and are left out again by `to_dict()`, so an old record round-trips unchanged. A record
cut short (a run that failed before its first summary) holds only status, run_dir and error.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lorafit.base.errors import UserError
from lorafit.inputs.data import DataStats

SCHEMA_VERSION = 1  # the layout below; records without `schema_version` are version 1

T = TypeVar("T")


def optional_key(**kw: Any) -> Any:
    """A key written only when it has a value (e.g. `energy_source` only when energy was measured)."""
    return field(default=None, metadata={"omit_if_none": True}, **kw)


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return to_json_object(value)
    if isinstance(value, list):
        return [_encode(v) for v in value]
    return value


def to_json_object(obj: Any) -> dict[str, Any]:
    """A dataclass as the JSON object it stands for: fields in order, optional keys only when set."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None and f.metadata.get("omit_if_none"):
            continue
        out[f.name] = _encode(value)
    return out


def _decode(tp: Any, value: Any) -> Any:
    """`value` (parsed JSON) as type `tp`: nested dataclasses and lists of them are built, the rest kept."""
    if value is None:
        return None
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        tp = args[0]
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return from_json_object(tp, value)
    if typing.get_origin(tp) is list and isinstance(value, list):
        (item,) = typing.get_args(tp)
        return [_decode(item, v) for v in value]
    return value


def from_json_object(cls: type[T], data: dict[str, Any], where: str = "summary.json") -> T:
    """A dataclass from its JSON object; keys it does not know are an error naming them."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"unknown key(s) {unknown} in {cls.__name__}", file=where)
    return cls(**{k: _decode(hints[k], v) for k, v in data.items()})


# ---------------------------------------------------------------- the parts


@dataclass
class StepTime:
    """Seconds per micro-step over the timed steps."""

    mean: float
    p50: float


@dataclass
class Timing:
    """Throughput over the timed micro-steps (after warm-up and traced steps) and over all steps."""

    timed_steps: int | None = None
    warmup_steps: int | None = None
    traced_steps: int | None = None
    trace: str | None = None  # the profiler trace file, when --profile-trace recorded one
    tokens: int | None = None  # real (non-padding) tokens in the timed steps, all processes
    loss_tokens: int | None = None
    timed_s: float | None = None
    tokens_per_s: float | None = None
    step_time_s: StepTime | None = None
    train_s: float | None = None  # every step, warm-up included
    train_tokens_per_s: float | None = None


@dataclass
class Energy:
    """Joules over the timed window: NVML on GPUs, RAPL on CPUs; otherwise null with the reason."""

    energy_j: float | None = None
    j_per_token: float | None = None
    avg_power_w: float | None = None
    energy_unavailable_reason: str | None = optional_key()
    energy_source: str | None = optional_key()
    energy_counters: int | None = optional_key()  # several processes: counters summed (a host's RAPL once)


@dataclass
class PeakMemory:
    """The peak of the training window: allocated bytes on a GPU, RSS on a CPU."""

    kind: str  # cuda | cpu_rss
    max_allocated_bytes: int | None = optional_key()
    max_reserved_bytes: int | None = optional_key()
    peak_bytes: int = 0  # several processes: the largest rank's
    window: str | None = optional_key()
    process_peak_bytes: int | None = optional_key()
    rank0_peak_bytes: int | None = optional_key()
    per_rank_peak_bytes: list[int] | None = optional_key()


@dataclass
class MemoryBreakdown:
    """Parts of the peak (see `training.summarize.memory_breakdown`); they add up to it."""

    runtime: int = 0
    weights: int = 0
    trainable: int = 0
    grads: int = 0
    optimizer_state: int = 0
    activations_workspace: int = 0

    def items(self) -> list[tuple[str, int]]:
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]


@dataclass
class Memory:
    peak_memory: PeakMemory | None = None
    memory_breakdown: MemoryBreakdown | None = None


@dataclass
class Flops:
    """Analytic FLOPs of the timed steps over a peak FLOP/s (measurement.flops)."""

    flops_per_token: float | None = None
    model_flops: float | None = None
    achieved_flops_per_s: float | None = None
    peak_flops_per_s: float | None = None
    peak_flops_source: str | None = None
    mfu: float | None = None
    hfu: float | None = None


@dataclass
class Parameters:
    trainable_params: int | None = None
    total_params: int | None = None
    trainable_pct: float | None = None


@dataclass
class Losses:
    """Per optimizer step; `loss_token_mean` weighs steps by loss tokens (independent of batching)."""

    loss_first: float | None = None
    loss_last: float | None = None
    loss_mean: float | None = None
    loss_token_mean: float | None = None
    loss_path: str | None = None  # fused_chunked | full_logits


@dataclass
class DeviceInfo:
    type: str
    name: str
    count: int | None = optional_key()  # cuda
    threads: int | None = optional_key()  # cpu
    cores: int | None = optional_key()  # cpu


@dataclass
class RankFigures:
    """One process's own figures in a multi-process run (`measurement.meter.rank_measurements`)."""

    rank: int
    host: str
    device: str
    tokens: int
    loss_tokens: int
    timed_s: float
    tokens_per_s: float | None
    train_s: float
    energy_j: float | None
    energy_source: str | None
    energy_unavailable_reason: str | None
    avg_power_w: float | None
    peak_flops_per_s: float
    train_tokens: int
    peak_bytes: int


@dataclass
class Processes:
    """How the run was spread over processes (a single process is 1 of kind NO)."""

    num_processes: int
    kind: str
    backend: str | None
    launcher: str
    per_rank: list[RankFigures] | None = optional_key()


@dataclass
class Environment:
    device: DeviceInfo | None = None
    distributed: Processes | None = None
    allocator: str | None = None
    versions: dict[str, str] | None = None


# ---------------------------------------------------------------- the record

# summary.json's keys, in the order lorafit writes them; each belongs to one part (or the record)
KEY_ORDER = (
    "status", "run_dir", "model", "method", "precision", "optimizer", "optimizer_paged", "steps", "processes",
    "global_batch_size",
    "timed_steps", "warmup_steps", "traced_steps", "trace", "tokens", "loss_tokens", "timed_s", "tokens_per_s",
    "step_time_s",
    "energy_j", "j_per_token", "avg_power_w", "energy_unavailable_reason", "energy_source",
    "train_s", "train_tokens_per_s", "energy_counters",
    "peak_memory", "memory_breakdown",
    "flops_per_token", "model_flops", "achieved_flops_per_s", "peak_flops_per_s", "peak_flops_source", "mfu", "hfu",
    "trainable_params", "total_params", "trainable_pct",
    "loss_first", "loss_last", "loss_mean", "loss_token_mean", "loss_path",
    "data", "saved", "wall_s", "device", "distributed", "allocator", "versions",
    "resumed_from_step", "nonfinite_skipped_steps", "error",
)  # fmt: skip
PARTS = ("timing", "energy", "memory", "flops", "params", "losses", "environment")


@dataclass
class Summary:
    """One run's record (summary.json). `status`: running | ok | failed | oom | interrupted."""

    status: str
    run_dir: str | None = None
    model: str | None = None
    method: str | None = None
    precision: str | None = None
    optimizer: str | None = None
    optimizer_paged: bool | None = None  # bitsandbytes pages optimizer state only on CUDA
    steps: int | None = None  # optimizer steps that updated the weights
    processes: int | None = None
    global_batch_size: int | None = None
    saved: str | None = None  # the adapter/ or model/ directory
    wall_s: float | None = None
    resumed_from_step: int | None = None  # timings cover only the steps this process ran
    nonfinite_skipped_steps: list[int] | None = None
    error: str | None = optional_key()
    data: DataStats | None = None
    timing: Timing = field(default_factory=Timing)
    energy: Energy = field(default_factory=Energy)
    memory: Memory = field(default_factory=Memory)
    flops: Flops = field(default_factory=Flops)
    params: Parameters = field(default_factory=Parameters)
    losses: Losses = field(default_factory=Losses)
    environment: Environment = field(default_factory=Environment)
    # keys the source record did not have (older lorafit, or a run cut short): not written back
    absent: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    @classmethod
    def cut_short(cls, status: str, run_dir: str, error: str | None = None) -> Summary:
        """The record of a run that ended before it had figures: status, run directory and error."""
        return cls.from_dict({"status": status, "run_dir": run_dir, **({"error": error} if error else {})})

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def peak_bytes(self) -> int | None:
        peak = self.memory.peak_memory
        return peak.peak_bytes if peak is not None else None

    def to_dict(self) -> dict[str, Any]:
        """summary.json's object, exactly as lorafit writes it."""
        flat = to_json_object(self)
        for part in PARTS:
            flat.update(flat.pop(part))
        for key in ("absent", *self.absent):
            flat.pop(key, None)
        return {k: flat[k] for k in KEY_ORDER if k in flat}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "summary.json") -> Summary:
        """Read summary.json's object; keys it lacks are None (and stay out of `to_dict()`)."""
        version = data.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise UserError(
                f"summary schema v{version} is not v{SCHEMA_VERSION}, the one this lorafit reads; "
                "use the lorafit version that wrote it",
                file=where,
            )
        if "status" not in data:
            raise UserError("not a run summary: no 'status'", file=where)
        rest = dict(data)
        parts = {}
        for name in PARTS:
            tp = typing.get_type_hints(cls)[name]
            keys = {f.name for f in dataclasses.fields(tp)}
            parts[name] = from_json_object(tp, {k: rest.pop(k) for k in list(rest) if k in keys}, where)
        own = {f.name for f in dataclasses.fields(cls)} - set(PARTS) - {"absent"}
        unknown = sorted(set(rest) - own)
        if unknown:
            raise UserError(f"unknown summary key(s) {unknown}", file=where)
        summary = from_json_object(_Record, rest, where)
        absent = frozenset(k for k in KEY_ORDER if k not in data and k != "error")
        return cls(**vars(summary), **parts, absent=absent)


def _record_fields() -> type:
    """The record's own (non-part) fields as a dataclass, to read them with `from_json_object`."""
    own = [(f.name, f.type, f) for f in dataclasses.fields(Summary) if f.name not in PARTS and f.name != "absent"]
    return dataclasses.make_dataclass("_Record", own, namespace={"__module__": __name__})


_Record = _record_fields()
