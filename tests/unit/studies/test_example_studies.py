"""examples/studies/: one file per reference study, each read through the parser `lorafit sweep` or
`lorafit compare --config` uses (nothing trains), so a renamed option or a changed default cannot
leave an example that no longer loads; and each still says what its study says."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafit.inputs.models import known_archs
from lorafit.studies.compare import load_study
from lorafit.studies.sweep import load_grid

EXAMPLES = Path(__file__).parents[3] / "examples" / "studies"


def arch(model: str) -> str:
    return model.removeprefix("random:")


def test_every_reference_study_has_its_example():
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == [
        "lora-vs-qlora-llama-3-8b.yaml",
        "qlora-report-tinyllama.yaml",
        "rtx4060-qwen2.5-1.5b.yaml",
    ]


def test_rtx4060_sweep_runs_its_three_named_configurations(tmp_path):
    sweep = load_grid(EXAMPLES / "rtx4060-qwen2.5-1.5b.yaml", tmp_path)
    named = {p.name: (p.config.optimizer, p.config.precision) for p in sweep.points}
    assert named == {
        "adamw-fp16": ("adamw", "fp16"),
        "paged-adamw-fp16": ("paged_adamw", "fp16"),
        "paged-adamw-bf16": ("paged_adamw", "bf16"),
    }
    for p in sweep.points:
        assert p.config.model == "random:qwen2.5-1.5b" and arch(p.config.model) in known_archs()
        assert (p.config.data, p.config.memory_budget) == ("alpaca", "8GB")


def test_lora_vs_qlora_guide_gives_each_method_its_batch(tmp_path):
    study = load_study(EXAMPLES / "lora-vs-qlora-llama-3-8b.yaml")
    assert study.methods == ["lora", "qlora"]
    assert {m: c.batch_size for m, c in study.configs.items()} == {"lora": 1, "qlora": 4}
    for cfg in study.configs.values():  # the guide's script, shared by both
        assert arch(cfg.model) == "llama-3-8b" and arch(cfg.model) in known_archs()
        assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (64, 16.0, 0.1)
        assert (cfg.max_length, cfg.precision, cfg.optimizer, cfg.lr_scheduler) == (
            1024,
            "bf16",
            "paged_adamw",
            "constant",
        )
        assert (cfg.learning_rate, cfg.weight_decay, cfg.max_grad_norm) == (2e-4, 0.001, 0.3)
        assert (cfg.data_format, cfg.text_field, cfg.memory_budget) == ("text", "text", "24GB")
        assert len(cfg.target_modules) == 7 and cfg.warmup_ratio == 0.0  # "constant" has no warm-up
        assert not cfg.plan_memory  # the batch the guide found to fit, as given


@pytest.mark.parametrize(
    ("method", "batch", "accum", "lr", "optimizer"),
    [("full", 2, 4, 2e-5, "adamw"), ("qlora", 4, 2, 2e-4, "paged_adamw_8bit")],
)
def test_qlora_report_gives_each_method_its_table_3_column(method, batch, accum, lr, optimizer):
    study = load_study(EXAMPLES / "qlora-report-tinyllama.yaml")
    assert study.methods == ["full", "qlora"]
    cfg = study.configs[method]
    assert (cfg.batch_size, cfg.grad_accum, cfg.learning_rate, cfg.optimizer) == (batch, accum, lr, optimizer)
    assert (cfg.max_steps, cfg.warmup_steps, cfg.precision, cfg.max_length) == (500, 100, "fp16", 512)
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.quant_type, cfg.double_quant) == (
        16,
        32.0,
        0.05,
        "nf4",
        True,
    )
    assert arch(cfg.model) == "tinyllama-1.1b" and arch(cfg.model) in known_archs()
    assert not cfg.plan_memory  # Table 3's batch x accumulation as given, not re-split by a plan
    assert (study.eval.gen_tokens, study.eval.ppl_max_tokens) == (50, 0)
