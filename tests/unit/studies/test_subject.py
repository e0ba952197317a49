"""What eval, merge and compare load: a run on the base it was trained on (its own 4-bit settings), in
the precision it was trained in."""

from __future__ import annotations

import pytest
import torch

from lorafit.base.config import EvalConfig, TrainConfig
from lorafit.studies.subject import load_subject
from tests.helpers import trained_run_dir


def four_bit_layers(model) -> list:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_a_qlora_run_is_measured_on_its_own_4bit_base(tmp_path, adapter_dir, loads):
    run = trained_run_dir(tmp_path / "q", adapter_dir, "bf16", method="qlora", quant_type="fp4", double_quant=False)
    subject = load_subject("ignored-for-runs", EvalConfig(device="cpu"), run=run.path)
    (dtype, quant), *_ = loads
    assert (quant.bnb_4bit_quant_type, quant.bnb_4bit_use_double_quant) == ("fp4", False)
    assert quant.bnb_4bit_compute_dtype == torch.bfloat16 == dtype  # the run trained in bf16
    layers = four_bit_layers(subject.model)
    assert layers and {m.weight.quant_state.quant_type for m in layers} == {"fp4"}
    assert not any(m.weight.quant_state.nested for m in layers)  # no double quantization
    assert subject.method == "qlora" and subject.precision == "bf16"
    assert subject.quantization == {"quant_type": "fp4", "double_quant": False}


def test_the_default_4bit_run_keeps_nf4_with_double_quant(tmp_path, adapter_dir, loads):
    run = trained_run_dir(tmp_path / "q", adapter_dir, "fp32", method="qlora")
    subject = load_subject("ignored-for-runs", EvalConfig(device="cpu"), run=run.path)
    (dtype, quant), *_ = loads
    assert (quant.bnb_4bit_quant_type, quant.bnb_4bit_use_double_quant, dtype) == ("nf4", True, torch.float32)
    assert all(m.weight.quant_state.nested for m in four_bit_layers(subject.model))


@pytest.mark.parametrize(
    ("recorded", "asked", "expected"),
    [
        ("bf16", "auto", torch.bfloat16),  # auto with a run: the precision the run trained in
        ("bf16", "fp32", torch.float32),  # asked for: as asked
        (None, "auto", torch.float32),  # no summary: the config's 'auto', on this CPU fp32
    ],
)
def test_eval_of_a_run_computes_in_the_runs_precision(tmp_path, adapter_dir, loads, recorded, asked, expected):
    run = trained_run_dir(tmp_path / "l", adapter_dir, recorded, method="lora")
    subject = load_subject("ignored-for-runs", EvalConfig(device="cpu", precision=asked), run=run.path)
    assert [dtype for dtype, _ in loads] == [expected]
    base = subject.model.get_base_model().model.layers[0].self_attn.o_proj.weight
    assert base.dtype == expected
    assert subject.precision == {torch.float32: "fp32", torch.bfloat16: "bf16"}[expected]


def test_a_base_without_a_run_computes_in_the_asked_precision(loads):
    load_subject("random:tiny", EvalConfig(device="cpu", precision="bf16"))
    load_subject("random:tiny", EvalConfig(device="cpu"))  # auto on a CPU: fp32
    assert [dtype for dtype, _ in loads] == [torch.bfloat16, torch.float32]


def test_the_4bit_base_alone_takes_the_asked_quantization_and_names_it(loads):
    fp4 = TrainConfig(method="qlora", quant_type="fp4", double_quant=False)
    subject = load_subject("random:tiny", EvalConfig(device="cpu"), method="qlora", quant=fp4)
    (_, quant), *_ = loads
    assert (quant.bnb_4bit_quant_type, quant.bnb_4bit_use_double_quant) == ("fp4", False)
    assert (subject.label, subject.method) == ("base-fp4", "base")
    assert {m.weight.quant_state.quant_type for m in four_bit_layers(subject.model)} == {"fp4"}
    default = load_subject("random:tiny", EvalConfig(device="cpu"), method="qlora")
    assert default.label == "base-nf4" and default.quantization == {"quant_type": "nf4", "double_quant": True}


def test_an_fp16_run_is_evaluated_in_fp32_on_a_cpu(tmp_path, adapter_dir, loads):
    """fp16 is GPU-only: a run trained in fp16 (on a T4, say) and evaluated on a CPU computes in fp32."""
    run = trained_run_dir(tmp_path / "l", adapter_dir, "fp16", method="lora")
    subject = load_subject("ignored-for-runs", EvalConfig(device="cpu"), run=run.path)
    assert subject.precision == "fp32" and [dtype for dtype, _ in loads] == [torch.float32]
