"""Soak: 2,000 requests, 16 in flight, over 8 adapters, half of them streaming, against a real
server on 127.0.0.1: no 5xx, and resident memory after warm-up grows by less than a stated bound.
Prints its figures as JSON (docs/reliability.md quotes them):

    .venv/bin/python -m pytest -s -m slow tests/integration/test_serve_soak.py
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import httpx
import psutil
import pytest

from lorafit.base.config import ServeConfig
from lorafit.serving.bench import synthetic_adapters
from lorafit.serving.server import BackgroundServer

REQUESTS, CONCURRENCY, ADAPTERS, WARMUP = 2000, 16, 8, 200
RSS_GROWTH_BOUND = 64 * 2**20  # bytes, after warm-up


async def _soak(url: str) -> dict:
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    rss: dict[str, int] = {}
    next_i = 0

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {"model": f"adapter-{i % ADAPTERS}", "prompt": f"request {i} says hello", "max_tokens": 4}
        body["temperature"] = 0
        started = time.perf_counter()
        if i % 2:
            async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
                async for _ in r.aiter_lines():
                    pass
                status = r.status_code
        else:
            status = (await client.post(f"{url}/v1/completions", json=body)).status_code
        latencies.append(time.perf_counter() - started)
        statuses[status] = statuses.get(status, 0) + 1

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal next_i
        while next_i < REQUESTS:
            i = next_i
            next_i += 1
            if i == WARMUP:
                rss["after_warmup"] = psutil.Process().memory_info().rss
            await one(client, i)

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=CONCURRENCY)) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(CONCURRENCY)))
        wall = time.perf_counter() - started
    rss["end"] = psutil.Process().memory_info().rss
    return {
        "requests": REQUESTS,
        "concurrency": CONCURRENCY,
        "adapters": ADAPTERS,
        "statuses": statuses,
        "requests_per_s": REQUESTS / wall,
        "latency_p50_s": statistics.median(latencies),
        "latency_p99_s": statistics.quantiles(latencies, n=100)[98],
        "rss_after_warmup_bytes": rss["after_warmup"],
        "rss_end_bytes": rss["end"],
        "rss_growth_bytes": rss["end"] - rss["after_warmup"],
    }


@pytest.mark.slow
def test_soak_no_5xx_and_bounded_memory(tmp_path):
    root = synthetic_adapters("random:tiny", ADAPTERS, 4, tmp_path / "adapters")
    cfg = ServeConfig(model="random:tiny", adapters=str(root), port=0, max_adapters=ADAPTERS)
    with BackgroundServer(cfg) as url:
        result = asyncio.run(_soak(url))
        result["in_flight_after"] = httpx.get(f"{url}/health").json()["requests_in_flight"]
    print(json.dumps(result))
    assert result["statuses"] == {200: REQUESTS}
    assert result["in_flight_after"] == 0
    assert result["rss_growth_bytes"] < RSS_GROWTH_BOUND
