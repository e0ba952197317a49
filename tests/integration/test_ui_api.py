"""`lorafit ui`'s JSON API over a run store and run directories written by the test (FastAPI's TestClient),
the live stream on a real server, and the command's refusal to expose runs without a key."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
import time
from collections import OrderedDict
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from lorafit.base.config import TrainConfig, build_config
from lorafit.base.errors import UserError
from lorafit.cli import main
from lorafit.measurement import estimate as est
from lorafit.reports.charts import CHARTS
from lorafit.reports.page import svg as real_svg
from lorafit.reports.sweep_points import sweep_rows
from lorafit.run.rundir import RunDir
from lorafit.run.store import RunRecord, RunStore
from lorafit.run.summary import Summary
from lorafit.ui import app as ui_app
from lorafit.ui import views as ui_views
from lorafit.ui.app import CSP, UiSettings, create_app
from tests.helpers import TableReader

GIB = 2**30


def summary(tps: float, peak_gib: float, loss: float, status: str = "ok", **more) -> Summary:
    return Summary.from_dict(
        {
            "schema_version": 3,
            "status": status,
            "method": "lora",
            "model": "random:tiny",
            "precision": "fp32",
            "steps": 2,
            "tokens_per_s": tps,
            "peak_memory": {"peak_bytes": int(peak_gib * GIB), "kind": "cpu_rss"},
            "memory_breakdown": {"runtime": 100, "weights": 200, "activations_workspace": 300},
            "mfu": 0.25,
            "j_per_token": 0.5,
            "loss_last": loss,
            "loss_mean": loss + 0.5,
            **more,
        }
    )


def sweep_point(batch: int, status: str, tps: float | None, peak_gib: float | None) -> RunRecord:
    config = TrainConfig(batch_size=batch, memory_budget="2GiB", out=f"x{batch}").to_dict()  # as a sweep stores it
    s = summary(tps, peak_gib, 2.0) if tps is not None else None
    return RunRecord(
        f"batch_size={batch}", "sweep", status, config, summary=s, group_name="grid1", created=10.0 + batch
    )


@pytest.fixture
def world(tmp_path):
    """A store (a LoRA run whose directory lies under the run root, a base evaluation, a sweep of four points)
    and a run root with a finished run, a running one and one whose summary.json is damaged."""
    root = tmp_path / "runs"
    lora_dir = RunDir(root / "lora-1")
    lora_dir.path.mkdir(parents=True)
    lora_dir.write_config(TrainConfig(model="random:tiny", out=str(lora_dir.path)))
    (lora_dir.path / "adapter").mkdir()
    rows = [{"step": 1, "loss": 3.0, "tokens_per_s": 90.0, "memory_bytes": 10}]
    rows.append({"step": 2, "loss": 2.5, "tokens_per_s": 95.0, "memory_bytes": 12})
    lora_dir.metrics_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"method": "lora", "model": "random:tiny"}
    lora = RunRecord("lora", "train", "ok", config, summary=summary(123.456, 1.5, 2.25), metrics=rows[:1],
                     run_dir=str(lora_dir.path), group_name="cmp", created=1.0)  # fmt: skip
    base = RunRecord("base", "eval", "ok", {}, eval={"method": "base", "perplexity": {"ppl": 13.5}}, created=2.0)
    points = [sweep_point(1, "ok", 100.0, 1.0), sweep_point(2, "ok", 180.0, 1.5)]
    points += [sweep_point(4, "ok", 300.0, 3.0), sweep_point(8, "oom", None, None)]
    with RunStore(tmp_path / "runs.sqlite") as db:
        for record in [lora, base, *points]:
            db.put(record)
    done = RunDir(root / "sub" / "done")
    done.path.mkdir(parents=True)
    done.write_config(TrainConfig(model="random:tiny", method="qlora", out=str(done.path)))
    done.write_summary(summary(50.0, 0.75, 1.75, method="qlora"))
    live = RunDir(root / "live")
    live.path.mkdir()
    live.write_config(TrainConfig(model="random:tiny", out=str(live.path)))
    (root / "bad").mkdir()
    (root / "bad" / "summary.json").write_text('{"status": "ok",\n oops}')
    settings = UiSettings(tmp_path / "runs.sqlite", [root], reports_dir=tmp_path / "reports", cwd=tmp_path)
    return {"tmp": tmp_path, "root": root, "settings": settings, "lora": lora, "base": base, "points": points,
            "done": done, "live": live}  # fmt: skip


def client(settings: UiSettings) -> TestClient:
    return TestClient(create_app(settings), base_url="http://localhost:7860")


def by_label(answer: dict) -> dict[str, dict]:
    return {r["label"]: r for r in answer["runs"]}


def test_runs_lists_store_and_directories_with_their_problems(world):
    answer = client(world["settings"]).get("/api/runs").json()
    runs = by_label(answer)
    assert set(runs) == {
        "lora",
        "base",
        "batch_size=1",
        "batch_size=2",
        "batch_size=4",
        "batch_size=8",
        "sub/done",
        "live",
    }  # fmt: skip  (lora-1 is the store's lora run: listed once)
    lora = runs["lora"]
    assert (lora["id"], lora["status"], lora["group"], lora["kind"]) == (world["lora"].id, "ok", "cmp", "train")
    assert lora["tokens_per_s"] == 123.456 and lora["peak_memory_bytes"] == int(1.5 * GIB)
    assert lora["loss"] == 2.25 and lora["mfu"] == 0.25 and lora["joules_per_token"] == 0.5
    assert lora["steps"] == 2  # live from its directory: the store holds one row
    assert runs["base"]["perplexity"] == 13.5 and runs["base"]["kind"] == "eval"
    assert runs["batch_size=8"]["status"] == "oom" and runs["batch_size=8"]["kind"] == "train"
    assert runs["sub/done"]["method"] == "qlora" and runs["sub/done"]["id"].startswith("d")
    assert runs["live"]["status"] == "running"
    bad = world["root"] / "bad" / "summary.json"
    assert [p["source"] for p in answer["problems"]] == [str(bad)]
    assert "invalid JSON" in answer["problems"][0]["message"] and "line 2" in answer["problems"][0]["message"]
    assert answer["sources"] == {"store": str(world["tmp"] / "runs.sqlite"), "roots": [str(world["root"])]}


@pytest.mark.parametrize("damage", ["not sqlite", "newer schema"])
def test_a_damaged_store_is_a_problem_not_a_crash(world, damage):
    store = world["tmp"] / "runs.sqlite"
    store.unlink()
    if damage == "not sqlite":
        store.write_text("this is no database " * 100)
    else:
        with sqlite3.connect(store) as db:
            db.execute("PRAGMA user_version = 99")
    answer = client(world["settings"]).get("/api/runs").json()
    assert [p["source"] for p in answer["problems"]][0] == str(store)
    assert ("newer" if damage == "newer schema" else "not a lorafit run store") in answer["problems"][0]["message"]
    assert {"lora-1", "sub/done", "live"} <= set(by_label(answer))  # the run root still shows


def test_run_detail_and_unknown_ids(world):
    c = client(world["settings"])
    detail = c.get(f"/api/runs/{world['lora'].id}").json()
    assert detail["summary"]["tokens_per_s"] == 123.456
    assert detail["memory_breakdown"][:3] == [
        {"part": "runtime", "bytes": 100},
        {"part": "weights", "bytes": 200},
        {"part": "trainable", "bytes": 0},
    ]
    assert detail["adapter"] == str(world["root"] / "lora-1" / "adapter")
    assert [r["step"] for r in detail["metrics"]] == [1, 2]
    base = c.get(f"/api/runs/{world['base'].id}").json()
    assert base["eval"]["perplexity"]["ppl"] == 13.5 and base["summary"] is None and base["adapter"] is None
    polled = c.get(f"/api/runs/{world['lora'].id}/metrics", params={"after": 1}).json()
    assert (polled["status"], polled["done"], [r["step"] for r in polled["rows"]]) == ("ok", True, [2])
    stream = c.get(f"/api/runs/{world['base'].id}/events").text  # stored only: what it has, then done
    assert stream == 'event: status\ndata: {"status": "ok"}\n\nevent: done\ndata: {"status": "ok"}\n\n'
    for bad in ("nope", "..%2F..%2Fetc%2Fpasswd", world["root"].name):
        r = c.get(f"/api/runs/{bad}")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"


def test_compare_shows_the_report_table_and_writes_the_report(world):
    c = client(world["settings"])
    ids = [world["base"].id, world["lora"].id]
    answer = c.post("/api/compare", json={"ids": ids, "baseline": None}).json()
    report = c.post("/api/compare/report", json={"ids": ids}).json()
    written = Path(report["path"])
    assert written.is_file() and written.parent.parent == world["tmp"] / "reports"
    reader = TableReader()  # the report `lorafit report` writes, and the page's table: the same cells
    reader.feed(written.read_text())
    head, *body = reader.tables[0]
    assert answer["table"] == {"head": head, "body": body}
    assert answer["labels"] == ["base", "lora"]
    cells = dict(zip(head, body[1], strict=True))
    assert cells["train tokens/s"] == "123.5" and cells["perplexity"] == "—"
    assert answer["improvement"]["body"][1][0] == "lora" and "baseline: lora" in answer["improvement"]["note"]
    assert set(answer["charts"]) == set(CHARTS) == set(answer["titles"])
    assert all(svg.startswith("<svg") for svg in answer["charts"].values())
    page = c.get(report["url"])
    assert page.status_code == 200 and page.text == written.read_text()
    assert page.headers["content-security-policy"] == CSP
    assert c.get(report["url"].replace("report.html", "config.yaml")).status_code == 404
    assert c.get("/api/reports/..%2F..%2Fruns/report.html").status_code == 404
    bad = c.post("/api/compare", json={"ids": ids, "baseline": "nope"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "baseline"
    assert c.post("/api/compare", json={"ids": []}).json()["error"]["field"] == "ids"


def test_sweeps(world):
    c = client(world["settings"])
    assert c.get("/api/sweeps").json() == {
        "sweeps": [{"name": "grid1", "points": 4, "ok": 3, "oom": 1, "failed": 0, "created": 11.0}]
    }
    sweep = c.get("/api/sweeps/grid1").json()
    ids = {p.label: p.id for p in world["points"]}
    pareto = {p["label"] for p in sweep["points"] if p["pareto"]}
    assert pareto == {"batch_size=1", "batch_size=2", "batch_size=4"}
    assert sweep["best"]["id"] == ids["batch_size=2"]  # batch 4 is faster but over the 2 GiB budget
    assert sweep["budget_bytes"] == 2 * GIB
    assert sweep["verdict"].startswith("Best configuration within the 2.00 GiB budget: batch_size=2 at 180.0")
    assert [p["settings"] for p in sweep["points"]] == [{"batch_size": b} for b in (1, 2, 4, 8)]
    assert len(sweep["table"]["body"]) == 4 == len(sweep_rows(world["points"]))
    assert "pareto" in sweep["charts"] and sweep["charts"]["pareto"].startswith("<svg")
    assert c.get("/api/sweeps/nope").status_code == 404


def test_compare_and_sweep_charts_are_drawn_again_only_when_a_run_changed(world, monkeypatch):
    drawings = []

    def counted(fig):  # noqa: ANN001, ANN202
        drawings.append(fig)
        return real_svg(fig)

    monkeypatch.setattr(ui_views, "svg", counted)
    monkeypatch.setattr(ui_views, "_drawn", OrderedDict())  # nothing kept from another test
    c = client(world["settings"])
    ids = [world["lora"].id, by_label(c.get("/api/runs").json())["sub/done"]["id"]]  # a store run, a run dir
    first = c.post("/api/compare", json={"ids": ids}).json()
    assert len(drawings) == len(CHARTS)
    assert c.post("/api/compare", json={"ids": ids}).json() == first  # the run dir read again, unchanged
    assert len(drawings) == len(CHARTS)
    c.post("/api/compare", json={"ids": ids, "baseline": "qlora"})  # another baseline: another answer
    assert len(drawings) == 2 * len(CHARTS)

    world["done"].write_summary(summary(77.0, 0.75, 1.75, method="qlora"))  # the run directory changed
    changed = c.post("/api/compare", json={"ids": ids}).json()
    assert len(drawings) == 3 * len(CHARTS) and changed["table"]["body"][1] != first["table"]["body"][1]
    with RunStore(world["tmp"] / "runs.sqlite") as db:  # the store row changed
        db.put(dataclasses.replace(world["lora"], summary=summary(99.0, 1.5, 2.25)))
    c.post("/api/compare", json={"ids": ids})
    assert len(drawings) == 4 * len(CHARTS)

    before = len(drawings)
    sweep = c.get("/api/sweeps/grid1").json()
    per_sweep = len(drawings) - before
    assert per_sweep == len(sweep["charts"]) > 0
    assert c.get("/api/sweeps/grid1").json() == sweep and len(drawings) == before + per_sweep
    with RunStore(world["tmp"] / "runs.sqlite") as db:  # a point's row changed
        db.put(dataclasses.replace(world["points"][0], summary=summary(150.0, 1.0, 2.0)))
    assert c.get("/api/sweeps/grid1").json() != sweep and len(drawings) == before + 2 * per_sweep


FORM = {"model": "random:tiny", "method": "lora", "batch_size": 2, "max_length": 256, "precision": "auto"}
FORM |= {"optimizer": "adamw", "gradient_checkpointing": True, "lora_r": 8, "packing": False}


def test_fit_answers_as_the_estimator(world):
    c = client(world["settings"])
    answer = c.post("/api/fit", json={**FORM, "device": "cuda", "budget": "700MB"}).json()
    cfg = build_config(None, {**FORM, "device": "cuda"})
    direct = est.estimate(cfg, "cuda")
    assert answer["estimate"] == direct.to_dict()
    assert answer["budget_bytes"] == 700 * 10**6 and answer["fits"] == (direct.total <= 700 * 10**6)
    assert answer["max_batch"] == est.find_max(cfg, "batch", 700 * 10**6, "cuda")
    assert answer["max_length"] == est.find_max(cfg, "length", 700 * 10**6, "cuda")
    assert answer["command"] == (
        "lorafit train --model random:tiny --batch-size 2 --max-length 256 --gradient-checkpointing --lora-r 8 "
        "--device cuda --memory-budget 700MB"
    )
    options = c.get("/api/fit/options").json()
    assert "random:tiny" in options["models"] and options["defaults"]["batch_size"] == TrainConfig().batch_size


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"method": "dora"}, "method"),
        ({"budget": "lots"}, "budget"),
        ({"device": "tpu"}, "device"),
        ({"model": "/etc"}, "model"),
        ({"model": "someone/hub-model"}, "model"),
        ({"lora_r": "many"}, "lora_r"),
        ({"batch": 2}, "batch"),
    ],
)
def test_fit_refuses_bad_fields_by_name(world, change, field):
    r = client(world["settings"]).post("/api/fit", json={**FORM, "device": "cuda", **change})
    assert r.status_code == 422 and r.json()["error"]["field"] == field


def test_fit_reads_a_model_directory_under_a_run_root(world):
    model = world["root"] / "my-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(est.model_config("random:tiny")))
    answer = client(world["settings"]).post("/api/fit", json={**FORM, "model": str(model), "device": "cuda"}).json()
    cfg = build_config(None, {**FORM, "model": "random:tiny", "device": "cuda"})
    assert answer["estimate"] == est.estimate(cfg, "cuda").to_dict()


def test_key_required_when_set(world):
    settings = world["settings"]
    settings.api_key = "s3cret"
    c = client(settings)
    assert c.get("/api/runs").status_code == 401
    assert c.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.post("/api/login", json={"key": "wrong"}).status_code == 401
    login = c.post("/api/login", json={"key": "s3cret"})
    assert login.status_code == 200 and "httponly" in login.headers["set-cookie"].lower()
    assert "s3cret" not in login.headers["set-cookie"]  # the cookie carries a session token, not the key
    assert c.get("/api/runs").status_code == 200  # the cookie
    assert TestClient(create_app(settings), base_url="http://localhost").get("/api/sweeps").status_code == 401


def test_host_guard_csp_and_static_files(world, tmp_path, monkeypatch):
    static = tmp_path / "static"
    (static / "vendor").mkdir(parents=True)
    (static / "app.js").write_text("console.log(1)")
    monkeypatch.setattr(ui_app, "STATIC", static)
    c = client(world["settings"])
    r = c.get("/api/runs", headers={"Host": "evil.example:7860"})
    assert r.status_code == 421 and r.headers["content-security-policy"] == CSP
    for host in ("127.0.0.1:7860", "[::1]:7860", "localhost"):
        assert c.get("/api/sweeps", headers={"Host": host}).status_code == 200
    exposed = UiSettings(world["settings"].store, [], host="0.0.0.0", api_key="k")
    assert (
        client(exposed).get("/api/sweeps", headers={"Host": "box.lan", "Authorization": "Bearer k"}).status_code == 200
    )
    missing = c.get("/")
    assert missing.status_code == 404 and "index.html" in missing.json()["error"]["message"]
    assert missing.headers["content-security-policy"] == CSP
    assert c.get("/static/app.js").text == "console.log(1)"
    (static / "index.html").write_text("<!doctype html><title>ui</title>")
    page = c.get("/")
    assert page.status_code == 200 and page.headers["content-security-policy"] == CSP and "<title>ui" in page.text
    (tmp_path / "secret.txt").write_text("no")
    for path in ("/static/%2e%2e/secret.txt", "/static/..%2Fsecret.txt", "/static/vendor", "/static/", "/static/.x"):
        assert c.get(path).status_code == 404, path


def test_live_stream_delivers_rows_appended_after_it_opened(world):
    """A real server: the stream sends the row written so far, then one appended while it is open, then
    `done` once summary.json appears."""
    live = world["live"]
    live.metrics_file.write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    config = uvicorn.Config(create_app(world["settings"]), host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    run_id = by_label(client(world["settings"]).get("/api/runs").json())["live"]["id"]
    events: list[tuple[str, dict]] = []
    try:
        with httpx.stream("GET", f"http://localhost:{port}/api/runs/{run_id}/events", timeout=10) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            name = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    events.append((name, json.loads(line[6:])))
                    if events[-1] == ("status", {"status": "running"}):
                        with live.metrics_file.open("a") as f:  # the stream is open: append a row
                            f.write(json.dumps({"step": 2, "loss": 2.0}) + "\n")
                    if events[-1][0] == "metrics" and events[-1][1]["step"] == 2:
                        live.write_summary(summary(10.0, 0.5, 2.0))
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert events == [
        ("metrics", {"step": 1, "loss": 3.0}),
        ("status", {"status": "running"}),
        ("metrics", {"step": 2, "loss": 2.0}),
        ("status", {"status": "ok"}),
        ("done", {"status": "ok"}),
    ]


def test_cli_refuses_a_network_host_without_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv("LORAFIT_API_KEY", raising=False)
    result = CliRunner().invoke(main.app, ["ui", "--host", "0.0.0.0", "--runs", str(tmp_path)])
    assert isinstance(result.exception, UserError) and result.exception.field == "host"
    assert "--api-key" in str(result.exception) and "0.0.0.0" in str(result.exception)
    missing = CliRunner().invoke(main.app, ["ui", "--store", str(tmp_path / "none.sqlite")])
    assert isinstance(missing.exception, UserError) and missing.exception.file == str(tmp_path / "none.sqlite")


def test_launch_starts_lorafit_train_under_the_first_root(world, monkeypatch):
    from lorafit.ui import launch

    started = []

    class FakeProcess:
        pid = 4321

        def __init__(self, argv, **kw):
            started.append(argv)

        def poll(self):
            return None

    monkeypatch.setattr(launch.subprocess, "Popen", FakeProcess)
    c = client(world["settings"])
    args = {"model": "random:tiny", "method": "lora", "max_steps": 2, "batch_size": 1, "data": "alpaca"}
    answer = c.post("/api/launch", json={"command": "train", "args": args}).json()
    out = Path(answer["run_dir"])
    assert out.parent == world["root"] and out.name.endswith("-lora") and answer["pid"] == 4321
    log = Path(answer["log"])  # the page shows where the child's output goes
    assert log.is_file() and log.name == f"{out.name}.log" and log.parent.name == "launches"
    argv = started[0]
    assert argv[1:4] == ["-m", "lorafit", "train"]
    assert [argv[argv.index(f) + 1] for f in ("--out", "--max-steps", "--batch-size")] == [str(out), "2", "1"]
    RunDir(out).path.mkdir()  # what train writes first: the run then shows under the id the launch gave
    RunDir(out).write_config(build_config(None, {**args, "out": str(out)}))
    assert by_label(c.get("/api/runs").json())[out.name]["id"] == answer["id"]


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"out": "/tmp/x"}, "out"),
        ({"bogus": 1}, "bogus"),
        ({"model": "/"}, "model"),
        ({"data": "/etc/passwd"}, "data"),
    ],
)
def test_launch_refuses_bad_options_by_name(world, args, field):
    r = client(world["settings"]).post("/api/launch", json={"command": "train", "args": args})
    assert r.status_code == 422 and r.json()["error"]["field"] == field


def test_cross_origin_writes_are_refused(world):
    c = client(world["settings"])
    body = {"ids": [world["lora"].id]}
    r = c.post("/api/compare/report", json=body, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and not (world["tmp"] / "reports").exists()
    same = c.post("/api/login", json={"key": ""}, headers={"Origin": "http://localhost:7860"})
    assert same.status_code == 200  # the page's own origin
