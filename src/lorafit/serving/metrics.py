"""Prometheus metrics of the server (its own registry, so tests and several apps do not collide).

Besides the request counters, the server's memory: its resident memory (RSS) and high-water RSS, the
bytes its weights take as stored (a 4-bit base packs two weights per byte plus its quantization
constants) and, on CUDA, what PyTorch's allocator holds. `lorafit bench-serve` reads them to put
memory next to throughput. The peaks are reset once the model and the preloaded adapters are in
(`server.build`), so they cover serving, not the load's transient copies.
"""

from __future__ import annotations

from typing import Any

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from lorafit.measurement.host_memory import peak_rss_bytes, rss_bytes

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
        self._memory(adapters)

    def _memory(self, adapters: Any) -> None:
        r = self.registry
        Gauge("lorafit_process_resident_bytes", "Resident memory (RSS) of the server process", registry=r).set_function(
            rss_bytes
        )
        Gauge(
            "lorafit_process_peak_resident_bytes",
            "High-water RSS of the server process since the model and preloaded adapters were loaded",
            registry=r,
        ).set_function(peak_rss_bytes)
        weights = Gauge(
            "lorafit_weight_bytes",
            "Bytes the model's weights take as stored: the base (4-bit packed + constants under --quantize) and "
            "the resident adapters",
            registry=r,
        )
        model = getattr(adapters, "model", None)
        if model is not None:  # counted when the resident set changes, not under a running forward pass
            from lorafit.adapters.methods import stored_weight_bytes

            weights.set(stored_weight_bytes(model))
            adapters.on_change.append(lambda: weights.set(stored_weight_bytes(model)))
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for name, what, read in (
                ("allocated", "Device memory PyTorch's allocator holds in tensors now", torch.cuda.memory_allocated),
                ("peak_allocated", "Peak of it since the model was loaded", torch.cuda.max_memory_allocated),
                (
                    "peak_reserved",
                    "Peak device memory the allocator reserved since then",
                    torch.cuda.max_memory_reserved,
                ),
            ):
                Gauge(f"lorafit_device_{name}_bytes", what, registry=r).set_function(read)

    def render(self) -> str:
        return generate_latest(self.registry).decode()
