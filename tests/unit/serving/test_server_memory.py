"""The server's memory on /metrics (what bench-serve reads next to throughput), and bench-serve's
--quantize list."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lorafit.adapters.methods import stored_weight_bytes
from lorafit.base.config import ServeConfig
from lorafit.base.errors import UserError
from lorafit.cli.ship import _bench_table, bench_quantize
from lorafit.inputs import models
from lorafit.measurement.host_memory import rss_bytes
from lorafit.serving.bench import LoadSpec, memory_gauges
from lorafit.serving.metrics import Metrics
from lorafit.serving.server import build


@pytest.fixture(scope="module")
def second_adapter(tmp_path_factory):
    """Another adapter for random:tiny, on every linear layer (so loading it changes the weight bytes)."""
    model = get_peft_model(models.load_model(models.resolve("random:tiny"), torch.float32), LoraConfig(r=8))
    out = tmp_path_factory.mktemp("second") / "b"
    model.save_pretrained(out)
    return out


def four_bit_layers(model) -> list:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def served(adapter_dir, quantize: str, allow: list[str] | None = None):
    cfg = ServeConfig(
        model="random:tiny", device="cpu", quantize=quantize, adapter=[f"one={adapter_dir}"], allow_dir=allow or []
    )
    engine, _ = build(cfg)
    return engine, Metrics(engine.registry)


def test_metrics_report_the_weights_as_stored_and_follow_adapter_loads(adapter_dir, second_adapter):
    dense, dense_metrics = served(adapter_dir, "none")
    four, four_metrics = served(adapter_dir, "nf4", [str(second_adapter.parent)])
    dense_mem, four_mem = memory_gauges(dense_metrics.render()), memory_gauges(four_metrics.render())
    assert dense_mem["weight_bytes"] == stored_weight_bytes(dense.model)
    assert four_mem["weight_bytes"] == stored_weight_bytes(four.model)
    # The 4-bit base stores its projections' weights in half a byte each instead of fp32's 4, plus
    # constants: an absmax per 64 weights (1 byte, double-quantized) and per layer a 16-entry fp32 code
    # and the nested quantization's 256-entry one (~1.1 KiB). On random:tiny's small projections
    # (2,048-8,192 weights) that still saves more than 3 of the 4 bytes per weight.
    quantized = sum(int(torch.Size(m.weight.quant_state.shape).numel()) for m in four_bit_layers(four.model))
    assert quantized == 2 * (3 * 64 * 128 + 2 * 64 * 64 + 2 * 64 * 32)  # both layers' seven projections
    assert dense_mem["weight_bytes"] - four_mem["weight_bytes"] > 3 * quantized
    before = four_mem["weight_bytes"]
    four.registry.register("two", second_adapter)
    with four.registry.lock:
        four.registry.ensure({"two"})
    lora_b = sum(p.numel() * p.element_size() for n, p in four.model.named_parameters() if ".two." in n)
    assert lora_b > 0
    assert memory_gauges(four_metrics.render())["weight_bytes"] == before + lora_b


def test_metrics_report_this_process_rss(adapter_dir):
    _, metrics = served(adapter_dir, "none")
    mem = memory_gauges(metrics.render())
    assert abs(mem["rss_bytes"] - rss_bytes()) < 64 * 2**20  # read moments apart in this same process
    assert mem["peak_rss_bytes"] >= mem["rss_bytes"] - 64 * 2**20
    assert not any(k.startswith("device_") for k in mem)  # CPU: no device gauges


def test_memory_gauges_reads_only_the_memory_lines():
    text = (
        "# HELP lorafit_process_resident_bytes RSS\n# TYPE lorafit_process_resident_bytes gauge\n"
        "lorafit_process_resident_bytes 1.2345678e+08\nlorafit_weight_bytes 4096.0\n"
        'lorafit_requests_total{route="/v1/completions",status="200"} 3.0\nlorafit_adapters_resident 2.0\n'
    )
    assert memory_gauges(text) == {"rss_bytes": 123456780, "weight_bytes": 4096}


def test_bench_quantize_list():
    assert bench_quantize("none, nf4") == ("none", "nf4")
    assert bench_quantize("fp4") == ("fp4",)
    for bad in ("none,int8", "", "nf4,nf4"):
        with pytest.raises(UserError) as e:
            bench_quantize(bad)
        assert e.value.field == "quantize"


def test_bench_table_puts_memory_next_to_throughput():
    from rich.console import Console

    def figures(tokens_per_s: float, weights: int) -> dict:
        keys = ["requests_per_s", "output_tokens_per_s"] + [
            f"{k}_p{q}_s" for k in ("latency", "ttft") for q in (50, 95, 99)
        ]
        row = dict.fromkeys(keys, 1.0) | {"output_tokens_per_s": tokens_per_s}
        return row | {"memory": {"weight_bytes": weights, "rss_ready_bytes": 3 * 2**30, "peak_rss_bytes": 2**31}}

    result = {"batched": figures(100.0, 2**30), "batched-nf4": figures(80.0, 2**28)}
    console = Console(width=200, record=True)
    console.print(_bench_table(result, "m", LoadSpec(), None, ("none", "nf4")))
    text = console.export_text()
    header = next(line for line in text.splitlines() if "batched" in line)
    assert header.index("batched") < header.index("batched-nf4")
    weights = next(line for line in text.splitlines() if "weights" in line)
    assert "1.00 GiB" in weights and "256.00 MiB" in weights
    assert "3.00 GiB" in next(line for line in text.splitlines() if "RSS when ready" in line)
