"""The run directory: config.yaml, metrics.jsonl, summary.json, eval.json, adapter/ (or model/), checkpoints/.

`RunDir` owns the layout: every module that creates, opens or reads a run goes through it, so a file
name lives in one place. Files are written atomically (temp file + rename), so a crash never leaves
half a summary.json.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafit.base.errors import UserError

if TYPE_CHECKING:
    from lorafit.base.config import TrainConfig
    from lorafit.measurement.plan import MemoryPlan
    from lorafit.run.summary import Summary


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

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RunDir:
    """One run's directory. `RunDir.create` starts a new run; `RunDir.open` reads an existing one."""

    CONFIG = "config.yaml"
    SUMMARY = "summary.json"
    PLAN = "plan.json"  # the memory plan chosen before the first step (a resumed run reads it back)
    METRICS = "metrics.jsonl"
    EVAL = "eval.json"
    ADAPTER = "adapter"
    MODEL = "model"  # full fine-tuning saves the whole model
    CHECKPOINTS = "checkpoints"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    @classmethod
    def create(cls, path: str | Path | None, method: str) -> RunDir:
        """A new run directory (default runs/<time>-<method>); refuses one that already holds a run."""
        return cls(prepare_run_dir(Path(path) if path else default_run_dir(method)))

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """An existing training run (it has config.yaml); a clear error otherwise."""
        run = cls(path)
        if not run.config_file.is_file():
            raise UserError(f"not a run directory (no {cls.CONFIG})", file=str(run.path))
        return run

    @staticmethod
    def is_run(path: str | Path) -> bool:
        return (Path(path) / RunDir.CONFIG).is_file()

    # ------------------------------------------------------------ files

    @property
    def config_file(self) -> Path:
        return self.path / self.CONFIG

    @property
    def summary_file(self) -> Path:
        return self.path / self.SUMMARY

    @property
    def metrics_file(self) -> Path:
        return self.path / self.METRICS

    @property
    def eval_file(self) -> Path:
        return self.path / self.EVAL

    def tracker_dir(self, tracker: str) -> Path:
        """Where a tracker of --report-to writes: tensorboard/ (event files), mlruns/ (MLflow's file store),
        or the run directory itself for W&B (which makes its own wandb/ in it)."""
        return {"tensorboard": self.path / "tensorboard", "mlflow": self.path / "mlruns", "wandb": self.path}[tracker]

    def weights_dir(self, method: str) -> Path:
        """Where training saves what it trained: adapter/ (LoRA, QLoRA) or model/ (full)."""
        return self.path / (self.MODEL if method == "full" else self.ADAPTER)

    def trained_weights(self) -> tuple[TrainConfig, Path]:
        """(config, adapter/ or model/) of a finished run; a clear error when training did not finish."""
        cfg = self.config()
        weights = self.weights_dir(cfg.method)
        if not weights.is_dir():
            raise UserError(f"run has no {weights.name}/ (did training finish?)", file=str(self.path))
        return cfg, weights

    def adapter(self) -> tuple[TrainConfig, Path]:
        """(config, adapter/) of a finished LoRA or QLoRA run, for merge and serve; a full fine-tune has none."""
        if self.config().method == "full":
            raise UserError(
                "a full fine-tune has no adapter: its model/ is already a plain transformers model",
                file=str(self.path),
            )
        return self.trained_weights()

    # ------------------------------------------------------------ reading

    def config(self) -> TrainConfig:
        from lorafit.base.config import build_config

        return build_config(self.config_file)

    def config_dict(self) -> dict[str, Any]:
        """config.yaml as written (for the run store), {} when the run has none."""
        import yaml

        if not self.config_file.is_file():
            return {}
        return yaml.safe_load(self.config_file.read_text(encoding="utf-8")) or {}

    def summary(self) -> Summary | None:
        """summary.json (None before the run wrote one; it is written atomically, so whole or absent)."""
        from lorafit.run.summary import Summary

        data = _read_json(self.summary_file)
        return None if data is None else Summary.from_dict(data, where=str(self.summary_file))

    def evaluation(self) -> dict[str, Any] | None:
        return _read_json(self.eval_file)

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.metrics_file)

    # ------------------------------------------------------------ writing

    def write_config(self, cfg: TrainConfig) -> None:
        from lorafit.base.config import dump_yaml

        dump_yaml(cfg, self.config_file)

    def write_plan(self, memory_plan: MemoryPlan) -> None:
        write_json_atomic(self.path / self.PLAN, memory_plan.to_dict())

    def read_plan(self) -> MemoryPlan | None:
        from lorafit.measurement.plan import read

        return read(self.path / self.PLAN)

    def write_summary(self, summary: Summary) -> None:
        write_json_atomic(self.summary_file, summary.to_dict())

    def write_eval(self, result: dict[str, Any]) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.eval_file, result)
        return self.eval_file

    def metrics_log(self) -> MetricsLog:
        return MetricsLog(self.metrics_file)

    def truncate_metrics(self, last_step: int) -> None:
        """Keep the metrics rows up to `last_step` (a checkpoint's); the steps after it run again."""
        if self.metrics_file.is_file():
            kept = [row for row in self.metrics() if row["step"] <= last_step]
            write_text_atomic(self.metrics_file, "".join(json.dumps(row) + "\n" for row in kept))


def _read_json(path: Path) -> Any:
    """A JSON file's content, None when it does not exist; invalid JSON is a UserError with the line."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"invalid JSON: {e.msg}", file=str(path), line=e.lineno) from e
