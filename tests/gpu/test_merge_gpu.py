"""`lorafit merge` of a QLoRA adapter trained on the GPU in bf16: the merged model, loaded with plain
transformers in bf16 on CUDA, gives the logits of the adapter on its base within bf16 tolerance.

As tests/integration/test_merge.py on CPU, with the tolerance measured: `noise` is how far peft's bf16
adapter-on-base is from its fp32 one on the same tokens; the merged bf16 model (W + BA rounded to bf16
once) may be twice that far from the fp32 adapter-on-base."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorafit.inputs import models
from tests.gpu.common import record
from tests.helpers import lorafit

MODEL = "random:tiny"


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    """A QLoRA run trained on the GPU hard enough (lr 1e-2, 16 steps) that the adapter changes outputs."""
    run = tmp_path_factory.mktemp("qlora") / "run"
    proc = lorafit(
        "train", "--model", MODEL, "--method", "qlora", "--device", "cuda", "--precision", "bf16",
        "--max-samples", "8", "--max-length", "64", "--max-steps", "16", "--learning-rate", "1e-2",
        "--out", str(run), "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def adapter_on_base(run, dtype: torch.dtype):
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(models.resolve(MODEL).location, dtype=dtype).to("cuda")
    return PeftModel.from_pretrained(base, str(run / "adapter")).eval()


def test_qlora_merge_equals_adapter_on_base_in_bf16(qlora_run, tmp_path):
    proc = lorafit("merge", str(qlora_run), "--out", str(tmp_path / "m"), "--dtype", "bf16", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["method"] == "qlora" and result["check"]["greedy_equal"], result["check"]
    ids = torch.randint(5, 4000, (2, 24), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    expected32 = logits(adapter_on_base(qlora_run, torch.float32), ids)
    expected16 = logits(adapter_on_base(qlora_run, torch.bfloat16), ids)
    base = AutoModelForCausalLM.from_pretrained(models.resolve(MODEL).location, dtype=torch.float32).to("cuda")
    plain = logits(base.eval(), ids)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16).to("cuda").eval()
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    got = logits(merged, ids)
    noise = float((expected16 - expected32).abs().max())
    moved = float((expected32 - plain).abs().max())
    diff = float((got - expected32).abs().max())
    record("qlora_merge", {"noise": noise, "adapter_moves": moved, "merged_vs_fp32": diff, "merge": result})
    assert moved > 8 * noise, f"the adapter moves the logits by {moved:.4f}, no more than bf16 noise {noise:.4f}"
    assert diff <= 2 * noise + 1e-3, f"merged bf16 is {diff:.4f} from adapter-on-base (bf16 noise {noise:.4f})"
