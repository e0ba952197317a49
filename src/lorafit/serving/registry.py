"""Which adapters the server knows, which are resident, and where they may come from.

An adapter is registered by name and path; it is loaded into the PeftModel on first use and the
least recently used one is evicted beyond `max_adapters` (it reloads on demand). Paths must resolve
(symlinks followed) inside an allowed directory, hold `adapter_config.json` and
`adapter_model.safetensors` (pickle `.bin` files are refused), and names are plain identifiers. A
training run directory (config.yaml + adapter/) stands for its adapter/, as in `lorafit merge RUN_DIR`.
All model mutation happens under `lock`, which the engine also holds while it runs a batch, so an
adapter is never unloaded under a forward pass that uses it.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from lorafit.adapters.batched import BASE

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


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


class AdapterRegistry:
    def __init__(self, model: Any, allowed: list[Path], max_resident: int) -> None:
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

    def register(self, name: str, path: Path) -> None:
        """Make an adapter known (validated now, loaded on first use)."""
        if not NAME.match(name) or name == BASE:
            raise AdapterError(f"invalid adapter name {name!r}: letters, digits, '.', '_', '-' (max 64)", 400)
        resolved = check_adapter_dir(path, self.allowed)
        with self.lock:
            if name in self.paths and self.paths[name] != resolved:
                self.unload(name)
            self.paths[name] = resolved

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
