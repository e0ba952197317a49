"""--report-to: a real tiny run logs to TensorBoard, MLflow and W&B at once, and each tracker's files,
read back with that tracker's own reader, hold metrics.jsonl's numbers at its steps, the config and
the summary; a missing extra, a tracker that cannot start and one that fails mid-run are handled."""

from __future__ import annotations

import json
import struct
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from lorafit.base.config import TrainConfig
from lorafit.base.errors import UserError
from lorafit.run.rundir import MetricsLog, RunDir
from lorafit.run.summary import Summary
from lorafit.training import trackers
from lorafit.training.loop import train
from tests.helpers import lorafit, metrics_rows

ALL = ["tensorboard", "mlflow", "wandb"]
STEPS = 3


def tiny(out: Path, **kw) -> TrainConfig:
    base = dict(model="random:tiny", data="alpaca", max_samples=8, batch_size=2, max_length=64, max_steps=STEPS)
    return TrainConfig(**{**base, "out": str(out), **kw})


def tracker_env(mp: pytest.MonkeyPatch, root: Path) -> None:
    """W&B offline with its files in `root`; MLflow and W&B on their defaults otherwise."""
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_DIR", str(root / "wandb-home"))
    mp.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        mp.delenv(name, raising=False)  # restored afterwards, even the one the MLflow tracker sets


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """One 3-step LoRA run reporting to all three trackers; (run directory, summary, metrics rows, config)."""
    root = tmp_path_factory.mktemp("trackers")
    cfg = tiny(root / "run", report_to=ALL)
    with pytest.MonkeyPatch.context() as mp:
        tracker_env(mp, root)
        (root / "wandb-home").mkdir()
        summary = train(cfg)
        yield RunDir(cfg.out), summary, metrics_rows(cfg.out), cfg


def numeric_fields(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}


# ---------------------------------------------------------------- TensorBoard


def event_accumulator(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_scalars_are_the_metrics_rows(logged):
    run, summary, rows, _ = logged
    acc = event_accumulator(run.path / "tensorboard")
    assert summary.ok and [row["step"] for row in rows] == [1, 2, 3]
    for key in numeric_fields(rows[0]):  # loss, lr, grad_norm, tokens, ..., memory_bytes
        events = acc.Scalars(key)
        assert [e.step for e in events] == [row["step"] for row in rows], key
        # TensorBoard keeps a scalar as float32: the row's number at that precision, exactly
        assert [e.value for e in events] == [float(np.float32(row[key])) for row in rows], key


def test_tensorboard_has_the_summary_and_the_config(logged):
    from tensorboard.plugins.hparams import plugin_data_pb2

    run, summary, rows, cfg = logged
    acc = event_accumulator(run.path / "tensorboard")
    last = acc.Scalars("summary/loss_last")
    assert [(e.step, e.value) for e in last] == [(rows[-1]["step"], float(np.float32(summary.losses.loss_last)))]
    assert acc.Scalars("summary/tokens_per_s")[0].value == float(np.float32(summary.timing.tokens_per_s))
    assert acc.Scalars("summary/peak_memory_bytes")[0].value == float(np.float32(summary.peak_bytes))
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["lora_r"].number_value == cfg.lora_r
    assert hparams["model"].string_value == "random:tiny"
    assert hparams["target_modules"].string_value == ",".join(cfg.target_modules)
    assert "_hparams_/session_end_info" in content  # ended ok


def test_tensorboard_resumed_run_replaces_the_steps_it_runs_again(tmp_path):
    """A resumed run logs again from its checkpoint: TensorBoard drops the earlier events from there on."""
    first = trackers.TensorBoard(tmp_path / "tensorboard", {"lr": 0.1})
    for step in (1, 2, 3, 4):
        first.log({"loss": float(step)}, step)
    first.writer.close()  # the crash: no finish
    again = trackers.TensorBoard(tmp_path / "tensorboard", {"lr": 0.1}, purge_step=3)
    for step in (3, 4, 5):
        again.log({"loss": 10.0 * step}, step)
    again.finish({}, 5, "ok")
    loss = event_accumulator(tmp_path / "tensorboard").Scalars("loss")
    assert [(e.step, e.value) for e in loss] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]


def test_the_resume_step_is_the_one_after_the_kept_rows(tmp_path):
    run = RunDir(tmp_path)
    assert trackers.resumed_after(run) is None  # a new run
    with run.metrics_log() as log:
        log.write({"step": 1, "loss": 2.0})
        log.write({"step": 2, "skipped": "non-finite loss"})
    assert trackers.resumed_after(run) == 3


# ---------------------------------------------------------------- MLflow


def test_mlflow_file_store_holds_the_rows_the_config_and_the_summary(logged, monkeypatch):
    from mlflow.tracking import MlflowClient

    run, summary, rows, cfg = logged
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(run.path / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("lorafit")
    [found] = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == run.path.name and found.info.status == "FINISHED"
    for key in numeric_fields(rows[0]):
        history = sorted(client.get_metric_history(found.info.run_id, key), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == [(row["step"], row[key]) for row in rows], key
    params = found.data.params
    assert params["lora_r"] == str(cfg.lora_r) and params["learning_rate"] == str(cfg.learning_rate)
    assert params["method"] == "lora" and params["report_to"] == "tensorboard,mlflow,wandb"
    assert "max_grad_norm" in params and "memory_budget" not in params  # None is not a parameter
    metrics = found.data.metrics  # the last value of each
    assert metrics["summary/loss_last"] == summary.losses.loss_last == rows[-1]["loss"]
    assert metrics["summary/steps"] == summary.steps == STEPS
    assert metrics["summary/mfu"] == summary.flops.mfu
    assert metrics["summary/peak_memory_bytes"] == summary.peak_bytes


# ---------------------------------------------------------------- W&B


def wandb_records(path: Path):
    """The records of a W&B run file (LevelDB's log format, W&B's header): its protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos = path.read_bytes(), 32768, 7
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    pending = b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # a block's padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full, first | middle, last
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(pending)


def items(logged) -> dict:
    """W&B's logged items by name (some are kept under a nested key), their JSON values read."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in logged}


def test_wandb_offline_run_holds_the_rows_the_config_and_the_summary(logged):
    run, summary, rows, cfg = logged
    [offline] = (run.path.parent / "wandb-home" / "wandb").glob("offline-run-*")  # WANDB_DIR's
    [run_file] = offline.glob("run-*.wandb")
    records = list(wandb_records(run_file))
    kinds = [r.WhichOneof("record_type") for r in records]
    [started] = [r.run for r in records if r.HasField("run")]
    assert started.display_name == run.path.name and started.project == "lorafit"
    config = items(started.config.update)
    assert config["lora_r"] == cfg.lora_r and config["model"] == "random:tiny"
    history = [items(r.history.item) for r in records if r.HasField("history")]
    assert [h["_step"] for h in history] == [row["step"] for row in rows]
    for logged_row, row in zip(history, rows):
        assert {k: logged_row[k] for k in numeric_fields(row)} == numeric_fields(row)
    final = {}
    for r in records:
        if r.HasField("summary"):
            final.update(items(r.summary.update))
    assert final["summary/loss_last"] == summary.losses.loss_last
    assert final["summary/trainable_params"] == summary.params.trainable_params
    assert kinds[-1] == "exit" and records[-1].exit.exit_code == 0


# ---------------------------------------------------------------- failures


@pytest.mark.parametrize("name", ALL)
def test_missing_extra_is_one_line_naming_it_before_anything_loads(tmp_path, monkeypatch, name):
    monkeypatch.setitem(sys.modules, trackers.MODULES[name], None)  # `import` now fails as if not installed
    with pytest.raises(UserError) as raised:
        train(tiny(tmp_path / "run", report_to=[name]))
    message = str(raised.value)
    assert message.startswith(f"field 'report_to': --report-to {name} needs the {name} extra: ")
    assert f"pip install 'lorafit[{name}]'" in message and "\n" not in message
    assert not (tmp_path / "run").exists()  # before the run directory, so before the data and the model


def test_cli_missing_extra_exits_with_the_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lorafit.cli.main import app

    monkeypatch.setitem(sys.modules, "wandb", None)
    args = ["train", "--model", "random:tiny", "--report-to", "tensorboard,wandb", "--out", str(tmp_path / "r")]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, UserError)
    assert "--report-to wandb needs the wandb extra: pip install 'lorafit[wandb]'" in str(result.exception)


def test_cli_unknown_tracker_is_a_config_error(tmp_path):
    done = lorafit("train", "--model", "random:tiny", "--report-to", "tb", "--out", str(tmp_path / "r"))
    assert done.returncode == 2
    assert "report_to takes tensorboard, mlflow, wandb; got 'tb'" in done.stderr
    assert not (tmp_path / "r").exists()


def test_tracker_that_cannot_start_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    run = RunDir(tmp_path)
    with pytest.raises(UserError, match="--report-to mlflow could not start"):
        trackers.tracked(run, tiny(tmp_path, report_to=["tensorboard", "mlflow"]))
    # the tracker opened before it is closed again, its session not ended ok
    content = event_accumulator(tmp_path / "tensorboard").PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in content and "_hparams_/session_end_info" not in content


def test_no_trackers_is_the_plain_metrics_log(tmp_path):
    log = trackers.tracked(RunDir(tmp_path), tiny(tmp_path))
    log.close()
    assert type(log) is MetricsLog
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_tracker_failing_mid_run_warns_once_and_training_goes_on(tmp_path, monkeypatch):
    """TensorBoard's writer raises from step 2 on: one warning, the run finishes, MLflow still gets every row."""
    from tensorboardX import SummaryWriter

    tracker_env(monkeypatch, tmp_path)
    logged_steps = []
    real_add_scalar = SummaryWriter.add_scalar

    def failing(self, tag, value, global_step=None, **kw):
        if global_step >= 2:
            raise OSError("disk full")
        logged_steps.append(global_step)
        real_add_scalar(self, tag, value, global_step=global_step, **kw)

    monkeypatch.setattr(SummaryWriter, "add_scalar", failing)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = train(tiny(tmp_path / "run", report_to=["tensorboard", "mlflow"]))
    mine = [w for w in caught if "--report-to" in str(w.message)]
    assert [str(w.message) for w in mine] == [
        "--report-to tensorboard failed (OSError: disk full); the run goes on without it"
    ]
    assert summary.ok and summary.steps == STEPS
    rows = metrics_rows(tmp_path / "run")
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert set(logged_steps) == {1}
    assert [e.step for e in event_accumulator(tmp_path / "run" / "tensorboard").Scalars("loss")] == [1]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "run" / "mlruns").resolve().as_uri())
    [found] = client.search_runs([client.get_experiment_by_name("lorafit").experiment_id])
    assert [m.step for m in client.get_metric_history(found.info.run_id, "loss")] == [1, 2, 3]
    assert (
        found.data.metrics["summary/loss_last"]
        == Summary.from_dict(json.loads((tmp_path / "run" / "summary.json").read_text())).losses.loss_last
    )


# ---------------------------------------------------------------- what is logged


def test_rows_are_flattened_to_their_numeric_fields():
    row = {"step": 7, "loss": 1.5, "tokens": 12, "skipped": "non-finite loss", "grad_norm": None, "fused": True,
           "memory": {"device": 3, "host": {"rss": 2.5}}}  # fmt: skip
    assert trackers.numeric(row) == {"loss": 1.5, "tokens": 12, "memory/device": 3, "memory/host/rss": 2.5}
    assert trackers.numeric({"step": 2, "skipped": "non-finite loss"}) == {}


def test_summary_figures_are_read_from_the_typed_summary():
    summary = Summary.cut_short("ok", "r")
    summary.steps, summary.timing.tokens_per_s, summary.flops.mfu = 4, 123.5, 0.25
    summary.energy.j_per_token = float("nan")  # not a figure
    assert trackers.figures(summary) == {"summary/steps": 4, "summary/tokens_per_s": 123.5, "summary/mfu": 0.25}
