"""The server under faults keeps serving everyone else: a client that disconnects mid-stream, an
adapter unloaded while a request uses it, an adapter directory removed, a malformed adapter."""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import pytest

from lorafit.base.config import ServeConfig
from lorafit.serving.bench import synthetic_adapters
from lorafit.serving.server import BackgroundServer

LONG = {"max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults") / "adapters"
    synthetic_adapters("random:tiny", 4, 4, root)
    cfg = ServeConfig(model="random:tiny", adapters=str(root), port=0, max_adapters=2, max_tokens_limit=256)
    with BackgroundServer(cfg) as url:
        yield url, root


def ok(url: str, model: str) -> str:
    r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def wait_idle(url: str) -> None:
    deadline = time.time() + 30
    while httpx.get(f"{url}/health").json()["requests_in_flight"] != 0:
        assert time.time() < deadline, "a request stayed in flight"
        time.sleep(0.05)


def test_client_disconnect_mid_stream(server):
    url, _ = server
    body = {"model": "adapter-0", "prompt": "Hi", **LONG}
    with httpx.Client(timeout=60) as client, client.stream("POST", f"{url}/v1/completions", json=body) as r:
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
        assert json.loads(first[6:])["choices"]
    # leaving the block closed the connection after one chunk of 200
    wait_idle(url)  # the server noticed and stopped decoding for it
    assert ok(url, "adapter-1")


def test_adapter_unloaded_while_in_use_ends_only_its_requests(server):
    url, root = server
    lines: list[str] = []
    started = threading.Event()

    def stream() -> None:
        with httpx.stream(
            "POST", f"{url}/v1/completions", json={"model": "adapter-2", "prompt": "Hi", **LONG}, timeout=60
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
                    started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(30)
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "adapter-2"}).status_code == 200
    reader.join(60)
    assert lines[-1] == "[DONE]"
    last = json.loads(lines[-2])
    assert "error" in last and "unloaded" in last["error"]["message"]
    assert len(lines) < 200  # it stopped early
    assert ok(url, "adapter-0")
    missing = httpx.post(f"{url}/v1/completions", json={"model": "adapter-2", "prompt": "Hi"})
    assert missing.status_code == 404
    wait_idle(url)


def test_removed_directory_and_malformed_adapter(server):
    url, root = server
    for name in ("adapter-0", "adapter-1"):  # make adapter-3 non-resident (max_adapters=2)
        ok(url, name)
    shutil.rmtree(root / "adapter-3")
    gone = httpx.post(f"{url}/v1/completions", json={"model": "adapter-3", "prompt": "Hi", "max_tokens": 2})
    assert gone.status_code == 400 and "adapter_config.json" in gone.json()["error"]["message"]
    bad = root / "bad"
    shutil.copytree(root / "adapter-0", bad)
    (bad / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(bad)})
    assert r.status_code == 400 and "corrupted or truncated" in r.json()["error"]["message"]
    assert "bad" not in [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
    assert ok(url, "adapter-0") and ok(url, "adapter-1")


def test_unusable_adapter_paths_are_a_400_not_a_crash(server):
    """Found by the schemathesis fuzz: a NUL byte in lora_path made Path.resolve raise (HTTP 500)."""
    url, root = server
    for path in ("\u0000", f"{root}/adapter-0\u0000x", "~no-such-user-xyz/adapter"):
        r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "odd", "lora_path": path})
        assert r.status_code in (400, 403), (path, r.status_code, r.text)
        assert "error" in r.json()
    assert ok(url, "adapter-0")
