"""The run directory: config.yaml, metrics.jsonl, summary.json, adapter/ (or model/).

Files are written atomically (temp file + rename), so a crash never leaves half a summary.json.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from lorafit.base.errors import UserError


def default_run_dir(method: str) -> Path:
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{method}"


def prepare_run_dir(path: Path) -> Path:
    """Create the run directory, refusing to overwrite an earlier run and checking it is writable."""
    if (path / "summary.json").exists():
        raise UserError(f"{path} already holds a run (summary.json); choose another --out", field="out")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write the run directory {path}: {e.strerror}", field="out") from e
    return path


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temp file + rename, so readers never see a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; run files are meant to be shared and read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl, oldest first. Rows are appended and flushed one by one, so only the
    last can be cut short (by a killed process); it is left out."""
    rows: list[dict[str, Any]] = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


class MetricsLog:
    """Appends one JSON row per optimizer step to metrics.jsonl, flushed so a crash keeps every row."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
