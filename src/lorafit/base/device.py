"""Where a command computes and in which dtype: decided here, once, for train, eval, merge, serve and estimate.

`--precision auto` means:
- CPU: fp32. bf16 is ~50x slower on CPUs without bf16 units; on one with AVX512-BF16 it trained SmolLM2
  1.5-2.1x faster with the same loss (docs/benchmarks/2026-12-03-cpu-bf16.md). Choosing it by the CPU's
  units is not done yet, so there it is an explicit `--precision bf16`, which a training run started with
  `auto` on such a CPU suggests (`precision_hint`);
- GPU of compute capability 8.0 or above (Ampere, Ada, Hopper, Blackwell): bf16, which these GPUs run
  on tensor cores at the fp16 rate and which needs no loss scaling;
- older GPU (Volta 7.0, Turing 7.5: V100, T4): fp16. These have fp16 tensor cores but no bf16 units;
  `torch.cuda.is_bf16_supported()` still answers True there because it counts emulation, which runs
  bf16 matmuls far below the fp16 tensor-core peak. Training in fp16 uses accelerate's loss scaling.
"""

from __future__ import annotations

import os
import warnings

import torch

from lorafit.base.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
BF16_MIN_CAPABILITY = (8, 0)  # Ampere: the first GPUs with bf16 tensor cores (CUDA C++ Programming Guide)


def matmul_dtype(device: torch.device, fallback: torch.dtype) -> torch.dtype:
    """The dtype a matmul on `device` runs in here: autocast's where autocast is on, else `fallback` (the
    operands' own). For code that turns autocast off to place its casts itself and must match it."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return fallback


def shared_threads(processes: int) -> dict[str, str]:
    """The environment that shares this machine's cores among `processes` torch processes running at once:
    OMP_NUM_THREADS = cores // processes (at least 1), or nothing when the user set OMP_NUM_THREADS.

    Why: each torch process starts a thread per core, and an idle OpenMP thread spin-waits for work on a
    core another process needs. Measured on 2 cores: two SmolLM2 QLoRA trainings side by side took 373 s
    each, against 62 s with one thread each (tests/unit/training/test_distributed.py)."""
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes))}


def cpu_bf16_units() -> str | None:
    """This CPU's bf16 matrix units, as torch's own CPU feature checks (cpuinfo) see them: "AMX" (Intel
    Sapphire Rapids and later), "AVX512-BF16" (Intel Cooper Lake, AMD Zen 4 and later), or None. oneDNN's
    bf16 matmuls run on these; without them bf16 is emulated, ~50x slower than fp32."""
    for units, check in (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported")):
        probe = getattr(torch.cpu, check, None)
        if probe is not None and probe():
            return units
    return None


def precision_hint(requested: str, kind: str) -> str | None:
    """A line for a run that `auto` put in fp32 on a CPU with bf16 units, where an explicit bf16 is likely
    faster (module docstring); None anywhere else, and when the user chose a precision."""
    if requested != "auto" or kind != "cpu":
        return None
    units = cpu_bf16_units()
    if units is None:
        return None
    return (
        f"this CPU has {units}: --precision bf16 may train faster (on a 2-core AMD EPYC with AVX512-BF16: "
        "1.5-2.1x, loss within 0.11%; docs/benchmarks/2026-12-03-cpu-bf16.md); auto computes in fp32 on CPUs"
    )


def device_type(requested: str = "auto") -> str:
    """'cuda' or 'cpu' for a --device of auto, cpu or cuda; cuda without a visible GPU is an error."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda asked for, but no CUDA GPU is visible", field="device")
    if requested == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return "cuda"


def choose_device(requested: str = "auto") -> torch.device:
    return torch.device(device_type(requested))


def bf16_supported(kind: str) -> bool:
    """Native bf16 (tensor cores) on this machine's GPU: compute capability >= 8.0; never on CPU.

    Deliberately not `torch.cuda.is_bf16_supported()`, which is also True where bf16 is emulated."""
    return kind == "cuda" and tuple(torch.cuda.get_device_capability()) >= BF16_MIN_CAPABILITY


def resolve_precision(requested: str, kind: str, bf16_ok: bool | None = None) -> str:
    """The precision a run uses on a device of `kind` ('cpu' or 'cuda').

    `auto`: fp32 on CPU; on a GPU bf16 where it is native (compute capability >= 8.0), else fp16.
    `bf16_ok` answers "is bf16 native" for a GPU that is not here (estimate); None asks this machine's GPU.

    Explicit choices are honoured, with two exceptions:
    - fp16 on CPU is refused (UserError): lorafit computes fp16 only on CUDA;
    - bf16 on a GPU below compute capability 8.0 runs emulated: allowed (e.g. to compare numerics with a
      run made on an A100) but slow, so it warns; on a GPU where torch cannot run bf16 at all it is refused.
    bf16 on CPU is allowed (slow on CPUs without bf16 units, exact where they have them)."""
    if requested == "auto":
        if kind != "cuda":
            return "fp32"
        return "bf16" if (bf16_supported(kind) if bf16_ok is None else bf16_ok) else "fp16"
    if kind == "cpu" and requested == "fp16":
        raise UserError(
            "precision fp16 needs a GPU (lorafit computes fp16 only on CUDA, with loss scaling for training); "
            "use fp32 or bf16",
            field="precision",
        )
    if requested == "bf16" and kind == "cuda" and bf16_ok is None:
        _check_bf16_on_this_gpu()
    return requested


def _check_bf16_on_this_gpu() -> None:
    """Warn (emulated) or refuse (unavailable) an explicit bf16 on a GPU below compute capability 8.0."""
    if bf16_supported("cuda"):
        return
    major, minor = torch.cuda.get_device_capability()
    if not torch.cuda.is_bf16_supported():
        raise UserError(
            f"precision bf16 is not available on this GPU (compute capability {major}.{minor}); use fp16 or fp32",
            field="precision",
        )
    warnings.warn(
        f"precision bf16 on a GPU of compute capability {major}.{minor} (< 8.0) is emulated, far slower than "
        "fp16; --precision auto would use fp16",
        UserWarning,
        stacklevel=3,
    )


def compute_dtype(requested: str, kind: str) -> torch.dtype:
    return DTYPES[resolve_precision(requested, kind)]
