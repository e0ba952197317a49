"""Host memory allocator: mimalloc from the install (the cmeel-mimalloc wheel), jemalloc on request.

glibc's malloc raises its mmap threshold after the first large free (up to 32 MiB), so later tensors
come from the heap and freed activations stay resident. On this 2-core CPU, a gradient-checkpointed
LoRA step of SmolLM2-135M (batch 4 x 512) peaked at 3.39 GB of RSS on glibc and 1.65 GB on mimalloc
at the same speed; the demo's QLoRA run 5.49 GB and 4.56 GB, 15% faster
(docs/benchmarks/2026-12-02-cpu-allocators.md, `bench/allocators.py`). A fixed glibc mmap threshold
(GLIBC_TUNABLES) is as lean but 40% slower: every large block is mapped and page-faulted anew.

mimalloc runs with purging off (MIMALLOC_PURGE_DELAY=-1): freed pages are kept for reuse, as
lorafit's jemalloc settings do, which was 7-10% faster than purging for 2-5% more RSS. It also runs
without transparent huge pages (MIMALLOC_ALLOW_THP=0): mimalloc asks the kernel for them, and where the
kernel compacts memory to find them on first touch (defrag "madvise", the common default) a fresh GiB
took 0.3-1.2 s instead of 0.2 s, varying with how fragmented the machine's memory was. On the LoRA
benchmark (SmolLM2-135M, batch 4, 8 steps, AVX-512 CPU) the first step, which reaches the peak, lost
4 s to it: without huge pages the run is 15% faster without checkpointing (207.7 vs 181.0 tokens/s,
median of 3) and as fast with it (154.6 vs 154.0, median of 6), with 1-2% less RSS
(docs/benchmarks/2026-12-03-cpu-allocators-thp.md). It comes with
`pip install lorafit` on Linux, so every install measures with the same allocator. An allocator can
only be chosen before the process starts, so the CLI re-executes itself once with it preloaded.

LORAFIT_ALLOCATOR=auto (mimalloc, else jemalloc, else glibc) | mimalloc | jemalloc | system;
LORAFIT_MIMALLOC / LORAFIT_JEMALLOC name the libraries.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

from lorafit.base.errors import UserError

# freed pages kept for reuse (no page-fault cost), never handed back mid-run
SETTINGS = {
    "mimalloc": {"MIMALLOC_PURGE_DELAY": "-1", "MIMALLOC_ALLOW_THP": "0"},
    "jemalloc": {"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"},
}
CHOICES = ("auto", "mimalloc", "jemalloc", "system")
SEARCH = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
)


def find_jemalloc() -> str | None:
    named = os.environ.get("LORAFIT_JEMALLOC")
    if named:
        return named if Path(named).is_file() else None
    for path in SEARCH:
        if Path(path).is_file():
            return path
    return ctypes.util.find_library("jemalloc")


def find_mimalloc() -> str | None:
    """mimalloc as the cmeel-mimalloc wheel installs it (site-packages/cmeel.prefix/lib), or as named by
    LORAFIT_MIMALLOC."""
    named = os.environ.get("LORAFIT_MIMALLOC")
    if named:
        return named if Path(named).is_file() else None
    for entry in sys.path:
        candidate = Path(entry) / "cmeel.prefix" / "lib" / "libmimalloc.so.3"
        if candidate.is_file():
            return str(candidate)
    return None


FINDERS = {"mimalloc": find_mimalloc, "jemalloc": find_jemalloc}


def active_allocator() -> str:
    """Which allocator this process runs on (read from its own memory map) and with which settings."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    for name, settings in SETTINGS.items():
        if f"lib{name}" in maps:
            given = ", ".join(f"{k}={os.environ[k]}" for k in settings if k in os.environ)
            return f"{name} ({given})" if given else name
    tunables = os.environ.get("GLIBC_TUNABLES")
    return f"system (glibc malloc, {tunables})" if tunables else "system (glibc malloc)"


def choose_allocator(choice: str) -> tuple[str, str] | None:
    """(name, library) to preload for LORAFIT_ALLOCATOR=`choice`, or None for the system's."""
    if choice not in CHOICES:
        raise UserError(f"LORAFIT_ALLOCATOR must be one of {', '.join(CHOICES)}; got {choice!r}")
    if choice == "system":
        return None
    for name in ("mimalloc", "jemalloc") if choice == "auto" else (choice,):
        library = FINDERS[name]()
        if library is not None:
            return name, library
    if choice != "auto":
        raise UserError(f"LORAFIT_ALLOCATOR={choice}, but no lib{choice} was found (set LORAFIT_{choice.upper()})")
    return None


def reexec_with_allocator(argv: list[str] | None = None) -> None:
    """Restart this command with the chosen allocator preloaded, once: `python -m lorafit ARGS`, or `python ARGV`
    for a script that runs lorafit in its own process (bench/peak_phases.py)."""
    if not sys.platform.startswith("linux") or os.environ.get("_LORAFIT_REEXEC"):
        return
    if any(f"lib{name}" in os.environ.get("LD_PRELOAD", "") for name in SETTINGS):
        return  # the user preloaded one
    chosen = choose_allocator(os.environ.get("LORAFIT_ALLOCATOR", "auto"))
    if chosen is None:
        return
    name, library = chosen
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (library, env.get("LD_PRELOAD")) if p)
    for key, value in SETTINGS[name].items():
        env.setdefault(key, value)
    env["_LORAFIT_REEXEC"] = "1"  # never loop, even if the preload fails
    os.execve(sys.executable, [sys.executable, *(argv or ["-m", "lorafit", *sys.argv[1:]])], env)
