"""Prometheus metrics of the server (its own registry, so tests and several apps do not collide)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, adapters: Any) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lorafit_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "lorafit_request_seconds", "Request latency by route", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram("lorafit_ttft_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("lorafit_prompt_tokens", "Prompt tokens received", registry=r)
        self.completion_tokens = Counter("lorafit_completion_tokens", "Tokens generated", registry=r)
        self.batch_size = Histogram(
            "lorafit_batch_rows",
            "Requests decoded together, per forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        resident = Gauge("lorafit_adapters_resident", "Adapters loaded in memory", registry=r)
        resident.set_function(lambda: len(adapters.resident))
        known = Gauge("lorafit_adapters_registered", "Adapters the server can serve", registry=r)
        known.set_function(lambda: len(adapters.paths))
        loads = Gauge("lorafit_adapter_loads", "Adapter loads so far (evicted ones reload)", registry=r)
        loads.set_function(lambda: adapters.loads)

    def render(self) -> str:
        return generate_latest(self.registry).decode()
