"""`merge` compares a QLoRA merge with the 4-bit model as the run trained it: its quantization, its precision."""

from __future__ import annotations

import torch

from lorafit.studies.merge import merge
from tests.helpers import trained_run_dir


def test_the_4bit_comparison_loads_the_runs_own_quantization_and_precision(tmp_path, adapter_dir, loads):
    run = trained_run_dir(tmp_path / "q", adapter_dir, "bf16", method="qlora", quant_type="fp4", double_quant=False)
    result = merge(run.path, tmp_path / "merged", dtype="fp32")
    dense, four_bit = loads  # the merge itself (fp32, dense), then the model as trained
    assert dense == (torch.float32, None)
    dtype, quant = four_bit
    assert (quant.bnb_4bit_quant_type, quant.bnb_4bit_use_double_quant) == ("fp4", False)
    assert dtype == quant.bnb_4bit_compute_dtype == torch.bfloat16
    trained = result["vs_trained_4bit"]
    assert trained["quantization"] == {"quant_type": "fp4", "double_quant": False}
    assert trained["precision"] == "bf16" and trained["prompts"] == 4
