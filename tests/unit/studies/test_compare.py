"""`compare` evaluates the 4-bit base the QLoRA run trains on (its quantization), and the bases in the
precision the runs compute in. The subprocesses are stood in for: only their command lines are checked."""

from __future__ import annotations

from lorafit.base.config import EvalConfig, TrainConfig
from lorafit.studies import compare as cmp
from tests.helpers import fake_compare_runs


def run_compare(tmp_path, monkeypatch, **train):
    calls = fake_compare_runs(monkeypatch)
    cfg = TrainConfig(model="random:tiny", max_samples=4, **train)
    result = cmp.compare(cfg, ["lora", "qlora"], EvalConfig(), out_dir=tmp_path / "c", log=lambda m: None, command=[])
    return result, [c for c in calls if c[0] == "eval" and "--model" in c]


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_the_4bit_base_is_quantized_as_the_qlora_run_is(tmp_path, monkeypatch):
    result, (dense, four_bit) = run_compare(tmp_path, monkeypatch, quant_type="fp4", double_quant=False)
    assert result["runs"] == ["base", "base-fp4", "lora", "qlora"]
    assert (flag(four_bit, "--method"), flag(four_bit, "--quant-type")) == ("qlora", "fp4")
    assert "--no-double-quant" in four_bit and flag(four_bit, "--out") == str(tmp_path / "c" / "base-fp4")
    assert "--method" not in dense and "--quant-type" not in dense


def test_the_default_4bit_base_is_nf4_with_double_quant(tmp_path, monkeypatch):
    result, (_, four_bit) = run_compare(tmp_path, monkeypatch)
    assert result["runs"][:2] == ["base", "base-nf4"]
    assert flag(four_bit, "--quant-type") == "nf4" and "--double-quant" in four_bit


def test_the_bases_are_evaluated_in_the_training_precision(tmp_path, monkeypatch):
    _, bases = run_compare(tmp_path, monkeypatch, precision="bf16")
    assert [flag(b, "--precision") for b in bases] == ["bf16", "bf16"]
