"""The app's small parts: Host names, loopback, strict JSON, the metrics tail, static file names, sources."""

from __future__ import annotations

import json
import math

import pytest
from starlette.exceptions import HTTPException

from lorafit.base.errors import UserError
from lorafit.cli import ui as cli_ui
from lorafit.run.rundir import RunDir
from lorafit.ui import app


@pytest.mark.parametrize(
    ("header", "name"),
    [("localhost:7860", "localhost"), ("[::1]:80", "::1"), ("[::1]", "::1"), ("127.0.0.1", "127.0.0.1"),
     ("evil.example:7860", "evil.example"), ("localhost.evil.example", "localhost.evil.example")],
)  # fmt: skip
def test_host_name(header, name):
    assert app.host_name(header) == name


def test_loopback():
    assert all(app.is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"))
    assert not any(app.is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.2", "example.com"))


def test_json_has_no_nan():
    text = app.dumps({"a": [1.0, math.nan, {"b": math.inf}], "c": -math.inf})
    assert json.loads(text) == {"a": [1.0, None, {"b": None}], "c": None}


def test_metrics_tail_returns_whole_new_lines_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = app.MetricsTail(path)
    assert tail.read() == []  # not written yet
    path.write_text('{"step": 1}\n{"step": 2')  # the second row is still being written
    assert tail.read() == [{"step": 1}]
    with path.open("a") as f:
        f.write('}\n{"step": 3}\n')
    assert tail.read() == [{"step": 2}, {"step": 3}]
    assert tail.read() == []
    RunDir(tmp_path).truncate_metrics(2)  # a resume from step 2's checkpoint: the file replaced, rows 1 and 2 kept
    with path.open("a") as f:
        f.write('{"step": 3, "again": true}\n{"step": 4}\n')
    assert tail.read() == [{"step": 4}]  # rows of steps already sent are not sent again


@pytest.mark.parametrize("name", ["../app.py", "a/../../app.py", ".hidden", "vendor", "", "a\\..\\b", "nope.js"])
def test_static_file_refuses_anything_but_a_file_of_the_static_directory(tmp_path, monkeypatch, name):
    (tmp_path / "vendor").mkdir()
    (tmp_path / ".hidden").write_text("x")
    monkeypatch.setattr(app, "STATIC", tmp_path)
    with pytest.raises(HTTPException) as e:
        app.static_file(name)
    assert e.value.status_code == 404


def test_default_sources_are_what_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_ui.sources(None, []) == (None, [])
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs.sqlite").write_bytes(b"")
    assert cli_ui.sources(None, []) == (cli_ui.DEFAULT_STORE, [cli_ui.DEFAULT_RUNS])
    assert cli_ui.sources(None, [tmp_path / "runs", tmp_path / "runs"]) == (None, [tmp_path / "runs"])
    with pytest.raises(UserError) as e:
        cli_ui.sources(None, [tmp_path / "runs", tmp_path / "missing"])
    assert e.value.file == str(tmp_path / "missing")


def test_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("LORAFIT_API_KEY", "env-key")
    assert cli_ui.checked_key("0.0.0.0", None) == "env-key"
    assert cli_ui.checked_key("0.0.0.0", "flag") == "flag"
    monkeypatch.delenv("LORAFIT_API_KEY")
    assert cli_ui.checked_key("127.0.0.1", None) is None
    with pytest.raises(UserError):
        cli_ui.checked_key("::", None)
