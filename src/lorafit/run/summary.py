"""The run record: what summary.json holds, as one typed `Summary` made of typed parts.

summary.json is flat (one JSON object of ~50 keys, the layout users and scripts read); the type
groups those keys into parts (timing, energy, memory, FLOPs, parameters, losses, data,
environment). `Summary.to_dict()` writes the flat JSON exactly as lorafit always has, key for key
and in the same order; `Summary.from_dict()` reads it back. Every reader of a run goes through
this type, so a key is named in one place.

Keys that older lorafit versions did not write (e.g. `processes` before scale-out) come back as
None and are left out again by `to_dict()`, so an old record round-trips unchanged. A version-1
record's `step_time_s` (a micro-step's time then) is read as `micro_step_time_s` and written back
where it was. A record
cut short (a run that failed before its first summary) holds only status, run_dir and error.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from lorafit.base.errors import UserError
from lorafit.base.jsonable import from_json_object, optional_key, to_json_object
from lorafit.inputs.data import DataStats
from lorafit.measurement.figures import (
    Energy,
    Flops,
    Memory,
    RankFigures,
    Timing,
)
from lorafit.measurement.plan import MemoryPlan

# The layout below. Version 1 (records without `schema_version`) kept the micro-step time under
# `step_time_s`; version 2 keeps the optimizer step's there and the micro-step's under `micro_step_time_s`;
# version 3 adds `memory_plan` (the checkpointing and micro-batch chosen to fit the memory budget).
SCHEMA_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)


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
    matmul: str | None = optional_key()  # cpu: library of lorafit's fp32 products, "onednn" or "blas" (base.matmul)


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
    "schema_version", "status", "run_dir", "model", "method", "precision", "optimizer", "optimizer_paged", "steps",
    "processes", "global_batch_size",
    "timed_steps", "warmup_steps", "traced_steps", "trace", "tokens", "loss_tokens", "timed_s", "tokens_per_s",
    "step_time_s", "micro_step_time_s",
    "energy_j", "j_per_token", "avg_power_w", "energy_unavailable_reason", "energy_source",
    "train_s", "train_tokens_per_s", "energy_counters",
    "peak_memory", "memory_breakdown", "memory_plan",
    "flops_per_token", "flops_per_step", "total_model_flops", "total_tokens", "model_flops", "achieved_flops_per_s",
    "peak_flops_per_s", "peak_flops_source", "mfu", "hfu",
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
    schema_version: int = SCHEMA_VERSION
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
    memory_plan: MemoryPlan | None = optional_key()  # how the run was shaped to fit its budget (absent: not planned)
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
        record = {"schema_version": SCHEMA_VERSION, "status": status, "run_dir": run_dir}
        return cls.from_dict({**record, **({"error": error} if error else {})})

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
        if self.schema_version == 1:  # written back as it was read
            flat.pop("schema_version")
            flat["step_time_s"] = flat.pop("micro_step_time_s", None)
        for key in ("absent", *self.absent):
            flat.pop(key, None)
        return {k: flat[k] for k in KEY_ORDER if k in flat}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "summary.json") -> Summary:
        """Read summary.json's object; keys it lacks are None (and stay out of `to_dict()`)."""
        version = data.get("schema_version", 1)
        if version not in READABLE_VERSIONS:
            raise UserError(
                f"summary schema v{version} is newer than v{SCHEMA_VERSION}, the newest this lorafit reads; "
                "use the lorafit version that wrote it",
                file=where,
            )
        if "status" not in data:
            raise UserError("not a run summary: no 'status'", file=where)
        rest = dict(data)
        rest["schema_version"] = version
        if version == 1 and "step_time_s" in rest:  # v1's step time was the micro-step's
            rest["micro_step_time_s"] = rest.pop("step_time_s")
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
        absent = frozenset(k for k in KEY_ORDER if k not in data and k not in ("error", "schema_version"))
        return cls(**vars(summary), **parts, absent=absent)


def _record_fields() -> type:
    """The record's own (non-part) fields as a dataclass, to read them with `from_json_object`."""
    own = [(f.name, f.type, f) for f in dataclasses.fields(Summary) if f.name not in PARTS and f.name != "absent"]
    return dataclasses.make_dataclass("_Record", own, namespace={"__module__": __name__})


_Record = _record_fields()
