"""The command line as a new user meets it: list flags, config <-> flags, library noise, narrow --help."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorafit.base.config import EvalConfig, ServeConfig, TrainConfig, to_flags
from lorafit.cli.main import app
from lorafit.cli.options import field_help


class Captured(Exception):
    """Raised by a stand-in for the library function a command calls, carrying the config it got."""

    def __init__(self, cfg: object) -> None:
        super().__init__("captured")
        self.cfg = cfg


def _raise_captured(cfg: object, *args: object, **kwargs: object) -> None:
    raise Captured(cfg)


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, list(args), env=env)


def built_config(*args: str):
    """The config a command built from `args`, without running anything."""
    result = invoke(*args)
    assert isinstance(result.exception, Captured), result.output
    return result.exception.cfg


@pytest.fixture
def no_side_effects(monkeypatch):
    """train, eval and serve stop right after building their config."""
    import lorafit.serving.server as server
    import lorafit.studies.subject as subject
    import lorafit.training.loop as loop

    monkeypatch.setattr(loop, "train", _raise_captured)
    monkeypatch.setattr(server, "serve", _raise_captured)
    monkeypatch.setattr(subject, "load_subject", lambda model, cfg, **kw: _raise_captured(cfg))


# ---------------------------------------------------------------- list flags accumulate


@pytest.mark.parametrize(
    "args",
    [
        ["--adapter", "a1=/p1", "--adapter", "a2=/p2"],  # repeated, as vLLM's --lora-modules
        ["--adapter", "a1=/p1,a2=/p2"],  # comma-separated
        ["--adapter", "a1=/p1", "--adapter", "a2=/p2,", "--model", "random:tiny"],
    ],
)
def test_serve_adapter_flags_accumulate(no_side_effects, args):
    cfg = built_config("serve", *args)
    assert isinstance(cfg, ServeConfig)
    assert cfg.adapter == ["a1=/p1", "a2=/p2"]


def test_every_list_flag_accumulates(no_side_effects):
    train = built_config("train", "--target-modules", "q_proj", "--target-modules", "v_proj,o_proj")
    assert train.target_modules == ["q_proj", "v_proj", "o_proj"]
    serve = built_config("serve", "--allow-dir", "/a", "--allow-dir", "/b,/c")
    assert serve.allow_dir == ["/a", "/b", "/c"]


def test_list_flag_overrides_the_config_file(no_side_effects, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("target_modules: [q_proj, k_proj]\nlora_r: 8\n")
    cfg = built_config("train", "--config", str(config), "--target-modules", "v_proj", "--target-modules", "o_proj")
    assert cfg.target_modules == ["v_proj", "o_proj"] and cfg.lora_r == 8


# ---------------------------------------------------------------- config -> flags -> config


def _changed(cls: type, **values: object):
    return dataclasses.replace(cls(), **values)


@pytest.mark.parametrize(
    ("command", "cfg"),
    [
        (
            "train",
            _changed(
                TrainConfig,
                method="qlora",
                lora_r=4,
                lora_alpha=3.0,
                learning_rate=1e-3,
                packing=True,
                fused_lora=False,
                target_modules=["q_proj", "v_proj"],
                max_steps=7,
                memory_budget="8GB",
                out="runs/x",
            ),
        ),
        ("eval", _changed(EvalConfig, ppl="none", gen=False, gen_tokens=5, ppl_stride=256, device="cpu")),
        ("serve", _changed(ServeConfig, adapter=["a=/p", "b=/q"], allow_dir=["/d"], port=0, mode="set-adapter")),
    ],
)
def test_to_flags_is_the_inverse_of_the_flags(no_side_effects, command, cfg):
    assert built_config(command, *to_flags(cfg)) == cfg


def test_to_flags_leaves_unset_fields_out():
    flags = to_flags(TrainConfig(max_steps=None, lora_r=8))
    assert "--max-steps" not in flags and flags[flags.index("--lora-r") + 1] == "8"
    assert "--no-packing" in flags and "--fused-lora" in flags
    assert "--device" not in to_flags(EvalConfig(), exclude=("device",))


# ---------------------------------------------------------------- --help at 80 columns


def _words(text: str) -> set[str]:
    return set(re.sub(r"[│╭╮╰╯─]", " ", text.replace("\\[", "[")).split())


@pytest.mark.parametrize("columns", [80, 100, 149, 150, 200])  # both layouts (cli.help.WIDE_COLUMNS)
def test_train_help_breaks_no_word(columns):
    result = invoke("train", "--help", env={"COLUMNS": str(columns)})
    assert result.exit_code == 0
    text = result.output
    shown = _words(text)
    assert "…" not in text
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in shown, flag
        missing = _words(field_help(f)) - shown
        assert not missing, f"{flag}: {missing} split across lines"
    assert max(len(line) for line in text.splitlines()) <= columns


# ---------------------------------------------------------------- runs and the console read typed summaries

BENCH = Path(__file__).resolve().parents[3] / "docs" / "benchmarks" / "2026-11-23-cpu-compare-smollm2" / "lora"


@pytest.fixture
def store_with_a_run(tmp_path):
    from lorafit.run.store import RunRecord, RunStore
    from lorafit.run.summary import Summary

    summary = Summary.from_dict(json.loads((BENCH / "summary.json").read_text()))
    record = RunRecord("lora", "train", "ok", {}, summary=summary, group_name="g", eval={"perplexity": {"ppl": 9.5}})
    with RunStore(tmp_path / "runs.sqlite") as store:
        store.put(record)
    return tmp_path / "runs.sqlite", summary


def test_print_summary_names_the_cpu_matmul_library_where_recorded(store_with_a_run):
    import dataclasses

    from rich.console import Console

    from lorafit.cli.console import print_summary

    _, summary = store_with_a_run
    device = summary.environment.device
    assert device.type == "cpu" and device.matmul is None  # recorded before the library was
    texts = []
    for matmul in (None, "onednn"):
        environment = dataclasses.replace(summary.environment, device=dataclasses.replace(device, matmul=matmul))
        console = Console(record=True, width=200)
        print_summary(console, dataclasses.replace(summary, environment=environment))
        texts.append(console.export_text())
    assert "cpu matmul" not in texts[0]
    assert "cpu matmul    │ onednn (lorafit's fp32 products" in texts[1]


def test_runs_export_reads_the_typed_summary(store_with_a_run):
    path, summary = store_with_a_run
    rows = list(csv.DictReader(io.StringIO(invoke("runs", "export", "--store", str(path)).output)))
    assert rows[0]["tokens_per_s"] == str(summary.timing.tokens_per_s)
    assert rows[0]["peak_bytes"] == str(summary.peak_bytes) and rows[0]["ppl"] == "9.5"
    exported = json.loads(invoke("runs", "export", "--store", str(path), "--json").output)
    assert exported[0]["summary"] == summary.to_dict()  # summary.json's layout, not the typed parts
    assert "GiB" in invoke("runs", "list", "--store", str(path), env={"COLUMNS": "200"}).output


def test_print_summary_shows_every_part(store_with_a_run):
    from rich.console import Console

    from lorafit.cli.console import print_summary

    _, summary = store_with_a_run
    console = Console(record=True, width=200)
    print_summary(console, summary)
    text = console.export_text()
    for row in ("data", "loss", "tokens/s", "peak memory", "memory parts", "trainable", "MFU", "energy", "saved"):
        assert f"│ {row}" in text or f"{row} " in text, row
    assert f"{summary.timing.tokens_per_s:.1f} real tokens/s" in text
