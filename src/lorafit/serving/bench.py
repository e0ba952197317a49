"""`lorafit bench-serve`: a load generator on loopback, against lorafit's batched server and, with
`--baseline set-adapter`, the same server serving one request at a time with `set_adapter`.

Each server runs in its own process (`lorafit serve`), so the client's event loop does not share a
GIL with it. Requests go round-robin over K adapters (`model` = adapter name), stream their tokens
(time to first token is the first chunk with text) and generate exactly `--max-tokens` tokens
(`ignore_eos`), so both servers do the same work. Without `--adapters-dir`, K synthetic adapters
(random LoRA weights, rank `--rank` on all linear projections) are written to a temporary directory:
their values do not change what serving them costs.

`quantize` runs every server mode once per base: 'none' (dense, in the serving precision) and/or
'nf4' / 'fp4' (`lorafit serve --quantize`), on the same adapters and load, one server process each.
Next to throughput each run reports the server's memory from its /metrics: RSS once ready (base and
preloaded adapters in) and after the warm-up request, its high-water RSS over the load, the bytes its
weights take as stored and, on CUDA, the allocator's device-memory peaks. A run's keys are its mode
('batched', 'set-adapter') for the dense base and `<mode>-<quant>` for a 4-bit one.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafit.run.runner import lorafit_command

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "small",
    "birds",
    "sing",
    "about",
    "rivers",
    "and",
    "hills",
]


@dataclass
class LoadSpec:
    requests: int = 64
    concurrency: int = 8
    adapters: int = 8
    prompt_words: int = 32
    max_tokens: int = 32


def synthetic_adapters(model_spec: str, k: int, rank: int, out: Path) -> Path:
    """K PEFT adapters with random weights for `model_spec` (seeded), in out/adapter-<i>."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lorafit.inputs import models

    base = models.load_model(models.resolve(model_spec), torch.float32)  # loaded once, LoRA added and removed
    for i in range(k):
        torch.manual_seed(1000 + i)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False)
        model = get_peft_model(base, config)
        with torch.no_grad():  # small updates: a realistic adapter nudges, it does not replace
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.01)
        model.save_pretrained(out / f"adapter-{i}")
        base = model.unload()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`lorafit serve` in a subprocess, ready when /health answers."""

    def __init__(
        self, model: str, adapters_dir: Path, mode: str, max_batch: int, log: Path, quantize: str = "none"
    ) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        options = {
            "--model": model,
            "--adapters": str(adapters_dir),
            "--port": str(self.port),
            "--mode": mode,
            "--max-batch": str(max_batch),
            "--max-adapters": "64",
            "--max-concurrent": "1024",
            "--quantize": quantize,
        }
        cmd = lorafit_command("serve", *(part for pair in options.items() for part in pair))
        env = {k: v for k, v in os.environ.items() if k != "LORAFIT_API_KEY"}
        self.log = log.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def __enter__(self) -> ServerProcess:
        import httpx

        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server did not start in 300 s")

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def _one(client: Any, url: str, model: str, prompt: str, max_tokens: int) -> dict[str, float]:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {await response.aread()!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif ttft is None and any(c.get("text") for c in chunk["choices"]):
                ttft = time.perf_counter() - started
    return {"latency_s": time.perf_counter() - started, "ttft_s": ttft or float("nan"), "tokens": tokens}


async def _load(url: str, spec: LoadSpec, names: list[str]) -> dict[str, Any]:
    import httpx

    prompt = " ".join(WORDS[i % len(WORDS)] for i in range(spec.prompt_words))
    results: list[dict[str, float]] = []
    next_index = 0

    async def worker(client: Any) -> None:
        nonlocal next_index
        while next_index < spec.requests:
            i = next_index
            next_index += 1
            results.append(await _one(client, url, names[i % len(names)], prompt, spec.max_tokens))

    async with httpx.AsyncClient(timeout=600) as client:
        await _one(client, url, names[0], prompt, 2)  # warm-up
        warm = memory_gauges((await client.get(f"{url}/metrics")).text)
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(spec.concurrency)))
        wall = time.perf_counter() - started
    return {**_summary(results, wall), "memory": {"rss_warm_bytes": warm.get("rss_bytes", 0)}}


def _pct(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _summary(results: list[dict[str, float]], wall: float) -> dict[str, Any]:
    latency = [r["latency_s"] for r in results]
    ttft = [r["ttft_s"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {
        "requests": len(results),
        "wall_s": wall,
        "requests_per_s": len(results) / wall,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall,
        **{f"latency_p{q}_s": _pct(latency, q) for q in (50, 95, 99)},
        **{f"ttft_p{q}_s": _pct(ttft, q) for q in (50, 95, 99)},
    }


MEMORY_GAUGES = {  # /metrics gauge -> key in a run's "memory"
    "lorafit_process_resident_bytes": "rss_bytes",
    "lorafit_process_peak_resident_bytes": "peak_rss_bytes",
    "lorafit_weight_bytes": "weight_bytes",
    "lorafit_device_allocated_bytes": "device_allocated_bytes",
    "lorafit_device_peak_allocated_bytes": "device_peak_allocated_bytes",
    "lorafit_device_peak_reserved_bytes": "device_peak_reserved_bytes",
}


def memory_gauges(metrics_text: str) -> dict[str, int]:
    """The memory gauges of a /metrics page (Prometheus text format), by their MEMORY_GAUGES keys; the
    device ones only where the server runs on CUDA."""
    found: dict[str, int] = {}
    for line in metrics_text.splitlines():
        name, _, value = line.partition(" ")
        if name in MEMORY_GAUGES:
            found[MEMORY_GAUGES[name]] = int(float(value))
    return found


def server_memory(url: str) -> dict[str, int]:
    import httpx

    return memory_gauges(httpx.get(f"{url}/metrics", timeout=30).text)


def _measured(url: str, spec: LoadSpec, names: list[str]) -> dict[str, Any]:
    """The load's figures and the server's memory: its RSS when ready (before any request), after the
    warm-up request (a dense base's weights are pages of the mapped checkpoint, resident only once a
    forward pass has read them, so this is the first figure comparable across bases), after the load,
    its high-water RSS (reset when the model was in, so it covers the requests), and the rest."""
    ready = server_memory(url)
    figures = asyncio.run(_load(url, spec, names))
    figures["memory"] = {"rss_ready_bytes": ready.get("rss_bytes", 0), **figures["memory"], **server_memory(url)}
    return figures


def run_key(mode: str, quantize: str) -> str:
    """A run's key in the result: its mode on the dense base, `<mode>-<quant>` on a 4-bit one."""
    return mode if quantize == "none" else f"{mode}-{quantize}"


def run(
    model: str,
    spec: LoadSpec,
    adapters_dir: Path | None = None,
    baseline: str | None = None,
    rank: int = 16,
    max_batch: int = 16,
    quantize: tuple[str, ...] = ("none",),
) -> dict[str, Any]:
    """Load-test lorafit's batched server (and the baseline, when asked) on the same adapters, over each
    base in `quantize`."""
    with tempfile.TemporaryDirectory(prefix="lorafit-bench-serve-") as work:
        work_dir = Path(work)
        if adapters_dir is None:
            adapters_dir = synthetic_adapters(model, spec.adapters, rank, work_dir / "adapters")
        names = sorted(p.name for p in adapters_dir.iterdir() if (p / "adapter_config.json").is_file())
        if len(names) < spec.adapters:
            raise ValueError(f"{adapters_dir} holds {len(names)} adapters, fewer than --adapters {spec.adapters}")
        names = names[: spec.adapters]
        result: dict[str, Any] = {"model": model, "load": spec.__dict__, "adapters": names, "quantize": list(quantize)}
        for quant in quantize:
            for mode in ["batched"] + ([baseline] if baseline else []):
                key = run_key(mode, quant)
                log = work_dir / f"{key}.log"
                with ServerProcess(model, adapters_dir, mode, max_batch, log, quant) as server:
                    result[key] = _measured(server.url, spec, names)
            if baseline:
                result[run_key("speedup_tokens_per_s", quant)] = (
                    result[run_key("batched", quant)]["output_tokens_per_s"]
                    / result[run_key(baseline, quant)]["output_tokens_per_s"]
                )
        if "none" in quantize:
            result["vs_dense"] = vs_dense(result, [q for q in quantize if q != "none"])
    return result


def vs_dense(result: dict[str, Any], quants: list[str]) -> dict[str, dict[str, float]]:
    """Each 4-bit base's batched run against the dense one: ratios of weight bytes, RSS after warm-up, peak RSS
    and output tokens/s (below 1: smaller or slower)."""
    dense = result["batched"]
    ratios: dict[str, dict[str, float]] = {}
    for quant in quants:
        four = result[run_key("batched", quant)]
        ratios[quant] = {
            key: four["memory"][key] / dense["memory"][key]
            for key in ("weight_bytes", "rss_warm_bytes", "peak_rss_bytes", "device_peak_reserved_bytes")
            if dense["memory"].get(key) and key in four["memory"]
        }
        ratios[quant]["output_tokens_per_s"] = four["output_tokens_per_s"] / dense["output_tokens_per_s"]
    return ratios
