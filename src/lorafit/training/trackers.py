"""Experiment trackers (`--report-to tensorboard,mlflow,wandb`): every metrics.jsonl row and the summary,
also logged where users already look.

What each tracker gets, on rank 0 only:
- at the start, the run's config as hyperparameters (`hyperparameters`);
- each metrics.jsonl row at its optimizer step: the row's numeric fields under the same names (nested
  ones flattened with '/'), so a curve in a tracker is the same numbers as metrics.jsonl;
- at the end, the summary's scalar figures as `summary/<name>` at the last step (`figures`, read
  through `Summary`'s typed fields), and how the run ended.

The libraries are called directly, not through `accelerate.tracking`: Accelerate's TensorBoard tracker
writes hyperparameters into a separate timestamped sub-run, its W&B tracker takes the project from the
run name, and its MLflow tracker names the experiment "None" unless told; each tracker here is a few
lines with the run directory as its home.

A missing library is a `UserError` naming the extra (`require`, called before the model loads); a
tracker that cannot start is one too (nothing has been trained yet). A tracker that fails mid-run
does not stop the training: one warning, and the run goes on without it.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from lorafit.base.config import TrainConfig
from lorafit.base.errors import UserError
from lorafit.run.rundir import MetricsLog, RunDir
from lorafit.run.summary import Summary

# the module each tracker needs, and the extra that installs it
MODULES = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}
EXPERIMENT = "lorafit"  # MLflow experiment and W&B project, unless MLFLOW_EXPERIMENT_NAME / WANDB_PROJECT

Scalar = str | int | float | bool

# the summary's scalar figures, each read through a typed field of `Summary`
FIGURES: tuple[tuple[str, Callable[[Summary], float | int | None]], ...] = (
    ("steps", lambda s: s.steps),
    ("tokens_per_s", lambda s: s.timing.tokens_per_s),
    ("train_tokens_per_s", lambda s: s.timing.train_tokens_per_s),
    ("step_time_s", lambda s: s.timing.step_time_s.mean if s.timing.step_time_s else None),
    ("train_s", lambda s: s.timing.train_s),
    ("wall_s", lambda s: s.wall_s),
    ("peak_memory_bytes", lambda s: s.peak_bytes),
    ("energy_j", lambda s: s.energy.energy_j),
    ("j_per_token", lambda s: s.energy.j_per_token),
    ("avg_power_w", lambda s: s.energy.avg_power_w),
    ("flops_per_token", lambda s: s.flops.flops_per_token),
    ("flops_per_step", lambda s: s.flops.flops_per_step),
    ("achieved_flops_per_s", lambda s: s.flops.achieved_flops_per_s),
    ("mfu", lambda s: s.flops.mfu),
    ("hfu", lambda s: s.flops.hfu),
    ("trainable_params", lambda s: s.params.trainable_params),
    ("total_params", lambda s: s.params.total_params),
    ("trainable_pct", lambda s: s.params.trainable_pct),
    ("loss_first", lambda s: s.losses.loss_first),
    ("loss_last", lambda s: s.losses.loss_last),
    ("loss_mean", lambda s: s.losses.loss_mean),
    ("loss_token_mean", lambda s: s.losses.loss_token_mean),
)
SUMMARY_PREFIX = "summary/"


# ---------------------------------------------------------------- what is logged


def require(names: Iterable[str]) -> None:
    """Import each named tracker's library; a missing one is a one-line UserError naming its extra.
    Called on every rank before the data and the model load, so no rank waits on one that stopped."""
    for name in names:
        try:
            importlib.import_module(MODULES[name])
        except ImportError as e:
            raise UserError(
                f"--report-to {name} needs the {name} extra: pip install 'lorafit[{name}]' ({e})", field="report_to"
            ) from e


def numeric(row: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """A metrics row's numeric fields (not `step`: it is the index), nested ones flattened with '/'."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if not prefix and key == "step":
            continue
        if isinstance(value, dict):
            out.update(numeric(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out


def figures(summary: Summary) -> dict[str, float]:
    """The summary's scalar figures that the run has (a CPU run has no energy, for one), as
    `summary/<name>`."""
    values = {SUMMARY_PREFIX + name: get(summary) for name, get in FIGURES}
    return {k: v for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def hyperparameters(cfg: TrainConfig) -> dict[str, Scalar]:
    """The run's config as flat hyperparameters: lists joined with ',' (every tracker takes scalars),
    None left out (none of them can hold it)."""
    out: dict[str, Scalar] = {}
    for key, value in cfg.to_dict().items():
        if isinstance(value, (list, tuple)):
            out[key] = ",".join(str(v) for v in value)
        elif value is not None:
            out[key] = value
    return out


# ---------------------------------------------------------------- the trackers


class Tracker(Protocol):
    """One tracker's run: opened with the hyperparameters, then rows, then `finish` once."""

    name: str

    def log(self, values: dict[str, float], step: int) -> None: ...
    def finish(self, values: dict[str, float], step: int, status: str) -> None: ...


class TensorBoard:
    """Event files under <run_dir>/tensorboard (tensorboardX: the writer alone, no TensorFlow, no server).

    The config goes to the HParams plugin (experiment and session start), the session end is written
    when the run ended ok. A resumed run passes `purge_step`: TensorBoard then drops the earlier
    events from that step on, which the resumed run logs again."""

    name = "tensorboard"
    # tensorboardX writes from a thread and flushes the file every this many seconds (its default: 120);
    # `finish` drains it, so only a killed process loses the last seconds
    FLUSH_SECS = 5

    def __init__(self, logdir: Path, params: dict[str, Scalar], purge_step: int | None = None) -> None:
        from tensorboardX import SummaryWriter
        from tensorboardX.summary import hparams

        # a file of its own for the resumed part (the names have the time only to the second)
        suffix = f".resumed-at-{purge_step}" if purge_step is not None else ""
        self.writer = SummaryWriter(
            str(logdir), purge_step=purge_step, filename_suffix=suffix, flush_secs=self.FLUSH_SECS
        )
        experiment, start, self._end = hparams(params, dict.fromkeys(SUMMARY_PREFIX + n for n, _ in FIGURES))
        self.writer.file_writer.add_summary(experiment)
        self.writer.file_writer.add_summary(start)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)

    def finish(self, values: dict[str, float], step: int, status: str) -> None:
        self.log(values, step)
        self.writer.add_text("summary/status", status, global_step=step)
        if status == "ok":
            self.writer.file_writer.add_summary(self._end)
        self.writer.close()


class MLflow:
    """An MLflow run in experiment 'lorafit' (or MLFLOW_EXPERIMENT_NAME), named after the run directory.

    The tracking URI is MLFLOW_TRACKING_URI, else a file store in <run_dir>/mlruns. MLflow 3 keeps its
    file store only behind MLFLOW_ALLOW_FILE_STORE=true (its default is a SQLite database, whose schema
    migrations take tens of seconds to create, per run); lorafit sets that for its own default store."""

    name = "mlflow"
    PARAMS_PER_BATCH = 100  # MLflow's limits: 100 params per request, 6000 characters per value
    PARAM_CHARS = 6000

    def __init__(self, store: Path, run_name: str, params: dict[str, Scalar]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = store.resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self._experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT)
        self.run_id = self.client.create_run(experiment, run_name=run_name).info.run_id
        batch = [Param(k, str(v)[: self.PARAM_CHARS]) for k, v in params.items()]
        for i in range(0, len(batch), self.PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=batch[i : i + self.PARAMS_PER_BATCH])

    def _experiment(self, name: str) -> str:
        """The experiment's id, created when it does not exist (by another run at the same time: read again)."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def finish(self, values: dict[str, float], step: int, status: str) -> None:
        if values:
            self.log(values, step)
        ended = {"ok": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED")
        self.client.set_terminated(self.run_id, ended)


class WandB:
    """A W&B run in project 'lorafit' (or WANDB_PROJECT), named after the run directory, its files in the
    run directory unless WANDB_DIR says where. W&B reads its other variables itself: WANDB_MODE=offline
    logs with no network (`wandb sync` uploads later), WANDB_SILENT quiets it."""

    name = "wandb"

    def __init__(self, parent: Path, run_name: str, params: dict[str, Scalar]) -> None:
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or EXPERIMENT,
            name=run_name,
            dir=os.environ.get("WANDB_DIR") or str(parent),
            config=params,
        )

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def finish(self, values: dict[str, float], step: int, status: str) -> None:
        self.run.summary.update(values)  # W&B's own place for a run's final figures
        self.run.finish(exit_code=0 if status == "ok" else 1)


def open_tracker(name: str, run: RunDir, params: dict[str, Scalar]) -> Tracker:
    """Start one tracker; one that cannot start (a bad MLFLOW_TRACKING_URI, W&B not logged in) is a
    UserError before the first step."""
    try:
        where = run.tracker_dir(name)
        if name == "tensorboard":
            return TensorBoard(where, params, purge_step=resumed_after(run))
        if name == "mlflow":
            return MLflow(where, run.path.name, params)
        return WandB(where, run.path.name, params)
    except Exception as e:
        raise UserError(f"--report-to {name} could not start: {e}", field="report_to") from e


def resumed_after(run: RunDir) -> int | None:
    """The first step a resumed run logs again (None for a new run): the step after metrics.jsonl's last."""
    rows = run.metrics() if run.metrics_file.is_file() else []
    return rows[-1]["step"] + 1 if rows else None


# ---------------------------------------------------------------- the hook


class Tracked:
    """metrics.jsonl and the trackers side by side: `write` is MetricsLog's, `finish` logs the summary.

    A tracker that raises is dropped after one warning (and ended as failed, if it still can be);
    metrics.jsonl is written first, so it never misses a row."""

    def __init__(self, log: MetricsLog, trackers: list[Tracker]) -> None:
        self.log = log
        self.trackers = trackers
        self.step = 0  # the last optimizer step logged
        self.finished = False

    def write(self, row: dict[str, Any]) -> None:
        self.log.write(row)
        self.step = row["step"]
        values = numeric(row)
        if values:
            self._each(lambda t: t.log(values, self.step))

    def finish(self, summary: Summary) -> None:
        """Log the summary's figures at the last step and end each tracker's run as the run ended."""
        self._end(figures(summary), summary.status)

    def close(self) -> None:
        """Close metrics.jsonl; trackers not finished (the run ended before its summary) end as failed."""
        self.log.close()
        self._end({}, "failed")

    def _end(self, values: dict[str, float], status: str) -> None:
        if not self.finished:
            self.finished = True
            self._each(lambda t: t.finish(values, self.step, status))
            self.trackers = []

    def _each(self, call: Callable[[Tracker], None]) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as e:
                warnings.warn(
                    f"--report-to {tracker.name} failed ({type(e).__name__}: {e}); the run goes on without it",
                    UserWarning,
                    stacklevel=3,
                )
                self.trackers.remove(tracker)
                with contextlib.suppress(Exception):  # release what it holds (files, W&B's service)
                    tracker.finish({}, self.step, "failed")


def tracked(run: RunDir, cfg: TrainConfig) -> MetricsLog | Tracked:
    """The run's metrics log, with the trackers of `cfg.report_to` beside it (the plain log without any)."""
    log = run.metrics_log()
    if not cfg.report_to:
        return log
    params = hyperparameters(cfg)
    opened: list[Tracker] = []
    try:
        for name in cfg.report_to:
            opened.append(open_tracker(name, run, params))
    except BaseException:
        Tracked(log, opened).close()
        raise
    return Tracked(log, opened)


def finished(log: MetricsLog | Tracked | None, summary: Summary) -> Summary:
    """Log `summary` to the trackers beside `log` (if any) and end their runs; returns `summary`."""
    if isinstance(log, Tracked):
        log.finish(summary)
    return summary
