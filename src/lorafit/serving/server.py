"""Building the server from a ServeConfig, and running it with uvicorn."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from lorafit.base.config import ServeConfig, TrainConfig
from lorafit.base.device import compute_dtype, device_type
from lorafit.base.errors import UserError
from lorafit.base.quiet import quiet_libraries
from lorafit.inputs import models
from lorafit.run.rundir import RunDir
from lorafit.serving.engine import Engine
from lorafit.serving.registry import AdapterError, AdapterRegistry

log = logging.getLogger("lorafit.serve")
PLACEHOLDER = "lorafit-none"  # a zero LoRA that makes the base a PeftModel before any adapter loads
GRACEFUL_SHUTDOWN_S = 30


def _adapter_specs(cfg: ServeConfig) -> tuple[dict[str, Path], list[Path]]:
    """({name: path} to register at start, allowed directories). Subdirectories of --adapters that are
    PEFT adapters or training runs are candidates; one that fails the checks is skipped with a warning,
    an explicit --adapter is not."""
    specs: dict[str, Path] = {}
    allowed = [Path(d) for d in cfg.allow_dir]
    if cfg.adapters:
        root = Path(cfg.adapters)
        if not root.is_dir():
            raise UserError("adapters directory not found", file=str(root), field="adapters")
        allowed.append(root)
        for sub in sorted(p for p in root.iterdir() if (p / "adapter_config.json").is_file() or RunDir.is_run(p)):
            specs[sub.name] = sub
    for item in cfg.adapter:
        name, _, path = item.partition("=")
        specs[name.strip()] = Path(path.strip())
        allowed.append(Path(path.strip()).parent)
    return specs, allowed


def base_quantization(cfg: ServeConfig, dtype: torch.dtype) -> Any:
    """The BitsAndBytesConfig of `--quantize nf4|fp4` (None for 'none'): the 4-bit base QLoRA trains on,
    built by the same function training uses (`adapters.methods.quantization_config`, with TrainConfig's
    default double quantization), computing in the serving dtype."""
    from lorafit.adapters.methods import quantization_config

    if cfg.quantize == "none":
        return None
    return quantization_config(TrainConfig(method="qlora", quant_type=cfg.quantize), dtype)


def load_base(cfg: ServeConfig, source: models.ModelSource, dtype: torch.dtype, device: torch.device) -> Any:
    """The base model on `device`: dense in `dtype`, or with its linear layers 4-bit (bitsandbytes
    Linear4bit; embeddings, norms and the output layer stay in `dtype`). `.to(device)` after a 4-bit
    load is a no-op where `models.load_model` already placed it (CUDA) and moves the packed weights
    otherwise (bitsandbytes >= 0.43.2 moves Params4bit between devices)."""
    quantization = base_quantization(cfg, dtype)
    base = models.load_model(source, dtype, quantization).to(device)  # a 4-bit load copies out of the file
    base.config.use_cache = True
    return base


def build(cfg: ServeConfig) -> tuple[Engine, str]:
    """Load the base model, register (and preload) adapters, and make the engine."""
    from peft import LoraConfig, get_peft_model

    from lorafit.measurement.host_memory import reset_peak_rss

    quiet_libraries()
    kind = device_type(cfg.device)
    dtype = compute_dtype(cfg.precision, kind)  # auto: bf16 on GPUs of compute capability 8.0+, else fp16; CPU fp32
    device = torch.device(kind)
    source = models.resolve(cfg.model)
    tokenizer = models.load_tokenizer(source)
    base = load_base(cfg, source, dtype, device)
    present = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
    target = [m for m in ("q_proj", "v_proj") if m in present] or "all-linear"
    model = get_peft_model(base, LoraConfig(r=1, target_modules=target), adapter_name=PLACEHOLDER)
    model.eval()
    specs, allowed = _adapter_specs(cfg)
    registry = AdapterRegistry(model, allowed, cfg.max_adapters, cfg.quantize)
    if cfg.mode == "batched":
        from lorafit.adapters import batched as batched_lora

        batched_lora.install(model, registry)
    explicit = {item.partition("=")[0].strip() for item in cfg.adapter}
    try:
        for name, path in specs.items():
            try:
                registry.register(name, path)
            except AdapterError as e:
                if name in explicit:
                    raise
                log.warning("skipping adapter %s: %s", name, e.message)
        specs = {name: path for name, path in specs.items() if name in registry.paths}
        with registry.lock:
            for name in list(specs)[: cfg.max_adapters]:
                registry.ensure({name})
    except AdapterError as e:
        raise UserError(e.message, field="adapters") from e
    engine = Engine(model, tokenizer, registry, cfg.max_batch, cfg.batch_wait_ms, cfg.mode)
    reset_peak_rss()  # the peaks /metrics reports cover serving, not the load's transient copies
    if kind == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return engine, cfg.served_name or cfg.model


def make_app(cfg: ServeConfig) -> Any:
    from lorafit.serving.api import create_app

    engine, name = build(cfg)
    return create_app(engine, cfg, name, cfg.api_key or os.environ.get("LORAFIT_API_KEY") or None)


def _uvicorn_config(app: Any, cfg: ServeConfig) -> Any:
    import uvicorn

    return uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level="info",
        access_log=False,  # lorafit.access logs each request as JSON, without headers
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )


def serve(cfg: ServeConfig) -> None:
    """Run until SIGINT/SIGTERM; in-flight requests finish (up to 30 s) before the engine stops."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    uvicorn.Server(_uvicorn_config(make_app(cfg), cfg)).run()


class BackgroundServer:
    """A real uvicorn server on a thread (tests and bench-serve): `with BackgroundServer(cfg) as url:`."""

    def __init__(self, cfg: ServeConfig, app: Any = None) -> None:
        import uvicorn

        self.cfg = cfg
        self.server = uvicorn.Server(_uvicorn_config(app or make_app(cfg), cfg))
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://{self.cfg.host}:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=GRACEFUL_SHUTDOWN_S + 10)
