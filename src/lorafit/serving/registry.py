"""Which adapters the server knows, which are resident, and where they may come from.

An adapter is registered by name and path; it is loaded into the PeftModel on first use and the
least recently used one is evicted beyond `max_adapters` (it reloads on demand). Paths must resolve
(symlinks followed) inside an allowed directory, hold `adapter_config.json` and
`adapter_model.safetensors` (pickle `.bin` files are refused), and names are plain identifiers. A
training run directory (config.yaml + adapter/) stands for its adapter/, as in `lorafit merge RUN_DIR`.
All model mutation happens under `lock`, which the engine also holds while it runs a batch, so an
adapter is never unloaded under a forward pass that uses it.

A QLoRA adapter was trained on a 4-bit base; its training run's config.yaml says which quant type.
Registering one (the run directory, or the adapter/ inside it) on a dense base or a base of another
quant type logs one warning naming it: it runs, but not on the base it was trained with. A bare
adapter directory does not record its base, so it is served without the check.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from lorafit.adapters.batched import BASE

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
log = logging.getLogger("lorafit.serve")


class AdapterError(Exception):
    """A request about adapters that cannot be served; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_adapter") -> None:
        super().__init__(message)
        self.message, self.status, self.code = message, status, code


def _inside_allowed(path: Path, allowed: list[Path]) -> Path:
    """`path` resolved (symlinks followed), if that lies inside an allowed directory."""
    try:
        resolved = path.expanduser().resolve()
    except (ValueError, OSError, RuntimeError) as e:  # a NUL byte, a symlink loop, an unknown ~user
        raise AdapterError(f"invalid adapter path {str(path)!r}: {e}", 400) from e
    if not any(resolved == root or resolved.is_relative_to(root) for root in allowed):
        raise AdapterError(f"adapter path {str(path)!r} is outside the allowed directories", 403, "forbidden_path")
    return resolved


def _run_adapter(run_dir: Path) -> Path:
    """The adapter/ of a training run directory, as `lorafit merge RUN_DIR` finds it."""
    from lorafit.base.errors import UserError
    from lorafit.run.rundir import RunDir

    try:
        _, weights = RunDir.open(run_dir).adapter()
    except UserError as e:
        raise AdapterError(f"{str(run_dir)!r}: {e.message}", 400) from e
    return weights


def check_adapter_dir(path: Path, allowed: list[Path]) -> Path:
    """The resolved adapter directory, if it is inside an allowed directory and safe to load. A training
    run directory (config.yaml + adapter/) stands for its adapter/, checked the same way."""
    from lorafit.adapters.files import check_adapter_files
    from lorafit.base.errors import UserError
    from lorafit.run.rundir import RunDir

    resolved = _inside_allowed(path, allowed)
    if RunDir.is_run(resolved):
        resolved = _inside_allowed(_run_adapter(resolved), allowed)  # adapter/ may be a link leading out
    try:
        check_adapter_files(resolved)
    except UserError as e:
        raise AdapterError(f"{str(path)!r}: {e.message}", 400) from e
    try:
        json.loads((resolved / "adapter_config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{str(path)!r}: adapter_config.json is not valid JSON ({e})", 400) from e
    return resolved


def trained_quantization(given: Path, resolved: Path) -> str | None:
    """The quant type ('nf4' | 'fp4') of the 4-bit base a QLoRA adapter was trained on, from the config.yaml
    of its training run: the run directory `given`, or the run holding `resolved` as its adapter/. None
    for a LoRA run and for an adapter directory outside a run (it does not record its base)."""
    import yaml

    from lorafit.run.rundir import RunDir

    for run in (given, resolved.parent):
        if RunDir.is_run(run):
            try:
                config = RunDir(run).config_dict()
            except (OSError, UnicodeDecodeError, yaml.YAMLError):  # unreadable: unchecked, as a bare directory
                return None
            if not isinstance(config, dict) or config.get("method") != "qlora":
                return None
            return str(config.get("quant_type") or "nf4")  # TrainConfig's default when the file omits it
    return None


def base_mismatch(name: str, trained: str | None, served: str) -> str | None:
    """The warning for a QLoRA adapter served on another base than the 4-bit one it was trained on."""
    if trained is None or trained == served:
        return None
    base = "a dense (16/32-bit) base" if served == "none" else f"a {served} 4-bit base"
    return (
        f"adapter {name!r} is a QLoRA adapter trained on a {trained} 4-bit base and is served on {base}: "
        f"its outputs shift from what was trained; serve it with --quantize {trained}"
    )


class AdapterRegistry:
    def __init__(self, model: Any, allowed: list[Path], max_resident: int, base_quant: str = "none") -> None:
        self.model = model  # a PeftModel (with a placeholder adapter) or None before the first load
        self.allowed = [p.expanduser().resolve() for p in allowed]
        self.max_resident = max_resident
        self.paths: dict[str, Path] = {}
        self.resident: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.lock = threading.RLock()
        self.loads = 0
        self.evictions = 0
        self.version = 0  # bumped whenever the resident set changes
        self.on_change: list[Any] = []  # called (with `lock` held) after each change
        self.base_quant = base_quant  # how the served base is stored: none | nf4 | fp4
        self.warned: set[str] = set()  # adapters already warned about (once each)

    def register(self, name: str, path: Path) -> None:
        """Make an adapter known (validated now, loaded on first use)."""
        if not NAME.match(name) or name == BASE:
            raise AdapterError(f"invalid adapter name {name!r}: letters, digits, '.', '_', '-' (max 64)", 400)
        resolved = check_adapter_dir(path, self.allowed)
        with self.lock:
            if name in self.paths and self.paths[name] != resolved:
                self.unload(name)
            self.paths[name] = resolved
        self._check_base(name, path, resolved)

    def _check_base(self, name: str, path: Path, resolved: Path) -> None:
        """Warn (once per adapter name) when a QLoRA adapter is not served on its own 4-bit base."""
        trained = trained_quantization(_inside_allowed(path, self.allowed), resolved)
        warning = base_mismatch(name, trained, self.base_quant)
        if warning is not None and name not in self.warned:
            self.warned.add(name)
            log.warning(warning)

    def unload(self, name: str) -> None:
        """Forget an adapter (and free its weights); unknown names are an error."""
        with self.lock:
            if name not in self.paths:
                raise AdapterError(f"adapter {name!r} is not loaded", 404, "adapter_not_found")
            self._evict(name)
            del self.paths[name]

    def ensure(self, names: set[str]) -> None:
        """Load the named adapters (LRU order updated); call with `lock` held."""
        wanted = [n for n in names if n != BASE]
        for name in wanted:
            if name not in self.paths:
                raise AdapterError(f"adapter {name!r} is not loaded", 404, "model_not_found")
        if len(wanted) > self.max_resident:
            raise AdapterError(f"a batch needs {len(wanted)} adapters but --max-adapters is {self.max_resident}", 503)
        for name in wanted:
            if name in self.resident:
                self.resident.move_to_end(name)
                continue
            while len(self.resident) >= self.max_resident:
                victim = next(n for n in self.resident if n not in wanted)
                self._evict(victim)
                self.evictions += 1
            self._load(name)

    def _load(self, name: str) -> None:
        from lorafit.adapters.files import load_adapter
        from lorafit.base.errors import UserError

        path = check_adapter_dir(self.paths[name], self.allowed)  # the directory may have changed since
        try:
            load_adapter(self.model, path, name)
        except UserError as e:
            raise AdapterError(f"cannot load adapter {name!r}: {e.message}", 400) from e
        self.resident[name] = None
        self.loads += 1
        self._changed()

    def _evict(self, name: str) -> None:
        if name in self.resident:
            self.model.delete_adapter(name)
            del self.resident[name]
            self._changed()

    def _changed(self) -> None:
        self.version += 1
        for callback in self.on_change:
            callback()
