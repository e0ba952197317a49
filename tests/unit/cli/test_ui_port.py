"""`lorafit ui --port 0`: the port is chosen before the address is printed, so the printed URL is served."""

from __future__ import annotations

import re
import socket

import uvicorn

from lorafit.cli import ui


def test_port_zero_prints_the_port_it_serves(monkeypatch, capsys, tmp_path):
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: served.update(host=host, port=port))
    monkeypatch.chdir(tmp_path)  # no runs.sqlite or runs/ here
    ui.ui_command(store=None, runs=None, host="127.0.0.1", port=0, api_key=None, reports_dir=tmp_path / "r")
    printed = re.search(r"http://127\.0\.0\.1:(\d+)/", capsys.readouterr().err.replace("\n", ""))
    assert printed and int(printed.group(1)) == served["port"] > 0
    with socket.socket() as s:  # and nothing else holds it
        s.bind(("127.0.0.1", served["port"]))
