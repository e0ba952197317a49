"""What several test files share: the CLI in a subprocess, a run's metrics rows, the report's tables.

Tests import these from here, never from one another.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any


def lorafit(*args: str, columns: int = 80) -> subprocess.CompletedProcess:
    """`lorafit ARGS` in a subprocess with this interpreter, output captured, at a terminal width of `columns`."""
    env = {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run([sys.executable, "-m", "lorafit", *args], capture_output=True, text=True, env=env)


def metrics_rows(run_dir: str | Path) -> list[dict]:
    """The per-step rows a run wrote to metrics.jsonl."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


class TableReader(HTMLParser):
    """Cells of the first <table> under #comparison, and the data-chart images."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.charts: dict[str, str] = {}
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img" and "data-chart" in a:
            self.charts[a["data-chart"]] = a["src"]

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None


def trained_run_dir(root: Path, adapter_dir: Path, precision: str | None = "fp32", **train):
    """A finished LoRA/QLoRA run as training leaves it, without training: config.yaml, adapter/ (copied
    from `adapter_dir`) and, with a precision, a summary.json that records it."""
    import shutil

    from lorafit.base.config import TrainConfig
    from lorafit.run.rundir import RunDir
    from lorafit.run.summary import Summary

    run = RunDir(root)
    run.path.mkdir(parents=True)
    run.write_config(TrainConfig(model="random:tiny", out=str(root), **train))
    shutil.copytree(adapter_dir, run.path / "adapter")
    if precision is not None:
        record = {"schema_version": 2, "status": "ok", "method": train.get("method"), "precision": precision}
        run.write_summary(Summary.from_dict(record))
    return run


# Phi-3 and Mistral at toy sizes, with grouped-query attention (2 kv heads of 4), so q, k and v differ in
# size inside Phi-3's fused qkv_proj
SHRUNK = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4}
SHRUNK |= {"num_key_value_heads": 2, "vocab_size": 4096}


def stacked_forward(model, ids, names: list[str]) -> tuple[Any, Any, int]:
    """Install the batched LoRA branch on peft `model` (adapters x1, x2, x3 resident) and run `ids`, row i
    through adapter names[i]: (logits, the same rows all through the base, how many layers took the stacked
    path). Call under torch.no_grad()."""
    from lorafit.adapters import batched as batched_lora
    from lorafit.serving.registry import BASE, AdapterRegistry

    registry = AdapterRegistry(model, [Path("/")], max_resident=8)
    registry.resident.update({"x1": None, "x2": None, "x3": None})
    batched_lora.install(model, registry)
    calls = 0
    original = batched_lora._layer_stacks

    def counting(layer, stacks):
        nonlocal calls
        calls += 1
        return original(layer, stacks)

    batched_lora._layer_stacks = counting
    try:
        got = model(input_ids=ids, adapter_names=names).logits
    finally:
        batched_lora._layer_stacks = original
    base_only = model(input_ids=ids, adapter_names=[BASE] * len(names)).logits
    return got, base_only, calls


def fake_compare_runs(monkeypatch) -> list[list[str]]:
    """Stand in for compare's subprocesses: each training ends ok, each evaluation gives perplexity 5;
    returns the list their command lines are appended to."""
    from lorafit.run.runner import Finished
    from lorafit.studies import compare as cmp

    calls: list[list[str]] = []

    def fake(args: list[str]) -> Finished:
        calls.append(args)
        if args[0] == "train":
            return Finished(0, "ok", None, {"schema_version": 2, "status": "ok", "method": "lora", "steps": 1})
        return Finished(0, "ok", None, {"method": "base", "size": {}, "perplexity": {"ppl": 5.0}})

    monkeypatch.setattr(cmp, "run_lorafit", fake)
    return calls


def saved_bytes(model, inputs: dict, labels) -> tuple[int, Any]:
    """Bytes of the distinct storages autograd saves for backward in one causal-LM loss (parameters left
    out), and the loss, not yet backpropagated."""
    import torch

    from lorafit.training.loss import causal_lm_loss

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        loss = causal_lm_loss(base, inputs, labels, True)
    return sum(seen.values()), loss


def counted_flops(run) -> int:
    """FLOPs torch's FlopCounterMode sees in `run()` (forward and backward), attention on SDPA's math backend
    (its fused CPU kernel is not in the counter's table). In-place `addmm_` (the fused LoRA branch's frozen
    matmul, `adapters.fused.frozen_linear`) counts as `addmm`: the counter's table has only the latter; oneDNN's
    linear (`base.matmul`, lorafit's fp32 products on a CPU where oneDNN runs them) as the matmul it is, with
    a product's last rows on the BLAS, never recomputed as the last 64 again (`base.matmul.row_blocks`): the
    counter would count the overlap, which the model's FLOPs do not."""
    import math
    from unittest import mock

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from lorafit.base import matmul

    def addmm_flops(bias_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    def onednn_linear_flops(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
        rows = math.prod(x_shape[:-1])
        return 2 * rows * x_shape[-1] * weight_shape[0]

    counter = FlopCounterMode(
        display=False,
        custom_mapping={
            torch.ops.aten.addmm_: addmm_flops,
            torch.ops.mkldnn._linear_pointwise: onednn_linear_flops,
        },
    )
    matmul.cpu_backend()  # `auto` times both libraries at the first product: not inside the count
    with counter, sdpa_kernel(SDPBackend.MATH), mock.patch.object(matmul, "BLAS_TAIL_BELOW", matmul.ONEDNN_ROWS[-1]):
        run()
    return counter.get_total_flops()


def run_samples(model, tokenizer, samples) -> None:
    """One causal-LM training pass per sample (no padding reaches the FLOP counter)."""
    import torch

    from lorafit.inputs import data
    from lorafit.training.loss import causal_lm_loss

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for s in samples:
        one = data.collate([[s]], tokenizer.pad_token_id, packed=False)
        causal_lm_loss(base, one.model_inputs(torch.device("cpu")), one.labels, fused=True).backward()
