"""The memory plan in a real run: chosen before the first step, applied, recorded; refused when nothing fits."""

from __future__ import annotations

import json

import pytest
import yaml

from lorafit.base.config import TrainConfig
from lorafit.base.errors import MemoryBudgetExceeded
from lorafit.measurement import estimate as est
from lorafit.measurement import plan as planning
from lorafit.run.rundir import RunDir
from lorafit.training import loop as train
from tests.helpers import lorafit, metrics_rows


def budget_between_plain_and_checkpointed(cfg: TrainConfig) -> int:
    """A budget the configured run misses and full checkpointing at the same micro-batch fits."""
    config, (runtime, _) = est.model_config(cfg.model), est.runtime_bytes("cpu")
    plain = est.estimate(cfg, "cpu", config, runtime).total
    full = est.estimate(planning.shaped(cfg, "full", 2, cfg.batch_size), "cpu", config, runtime).total
    assert full < plain
    return int((plain + full) / 2 * (1 + planning.MARGIN))


def test_a_planned_run_fits_learns_the_same_and_records_its_plan(tiny_cfg, tmp_path, monkeypatch):
    common = dict(max_length=512, max_steps=2, max_samples=8, data="wikitext2", packing=True, lora_dropout=0.0)
    cfg = tiny_cfg(**common, batch_size=4, out=str(tmp_path / "planned"))
    budgets = []

    def between(device: str, processes: int) -> tuple[int, str]:  # with the runtime the plan measures now
        budgets.append(budget_between_plain_and_checkpointed(cfg))
        return budgets[-1], "available RAM"

    monkeypatch.setattr(planning, "default_budget", between)
    summary = train.train(cfg)
    (budget,) = budgets
    chosen = summary.memory_plan.chosen
    assert chosen is not None and chosen.predicted_peak_bytes * (1 + planning.MARGIN) <= budget
    assert (chosen.checkpointing, chosen.batch_size) != ("none", 4)  # the plain run did not fit
    assert chosen.batch_size * chosen.grad_accum == 4
    assert summary.memory_plan.peak_row_tokens == 512  # packed rows: all max_length
    # the run ran as planned: its config, the HFU count of recomputed layers, the plan file
    saved = yaml.safe_load(RunDir(summary.run_dir).config_file.read_text())
    assert (saved["batch_size"], saved["grad_accum"]) == (chosen.batch_size, chosen.grad_accum)
    assert saved["gradient_checkpointing"] == (chosen.checkpointing != "none")
    assert (summary.flops.hfu > summary.flops.mfu) == (chosen.checkpointing != "none")
    written = json.loads(RunDir(summary.run_dir).summary_file.read_text())["memory_plan"]
    assert written["budget_source"] == "available RAM" and written == summary.memory_plan.to_dict()
    # the same global batch and samples learn the same as the run as configured
    plain = train.train(tiny_cfg(**common, batch_size=4, plan_memory=False, out=str(tmp_path / "plain")))
    assert plain.memory_plan is None
    planned_losses = [r["loss"] for r in metrics_rows(summary.run_dir)]
    assert planned_losses == pytest.approx([r["loss"] for r in metrics_rows(plain.run_dir)], rel=1e-4)
    # --resume (and --plan --resume) reads the plan it ran with
    assert RunDir(summary.run_dir).read_plan() == summary.memory_plan


def test_splitting_a_step_into_micro_batches_changes_no_update(tiny_cfg, tmp_path):
    """Samples of unequal length, grouped by length: a step holds the same samples however it is split, and
    each micro-batch weighs by its loss tokens, so the losses and the trained adapter are the same."""
    import safetensors.torch

    common = dict(max_samples=16, max_steps=3, lora_dropout=0.0, learning_rate=1e-2, plan_memory=False)
    whole = train.train(tiny_cfg(**common, batch_size=4, out=str(tmp_path / "whole")))
    split = train.train(tiny_cfg(**common, batch_size=1, grad_accum=4, out=str(tmp_path / "split")))
    rows = [metrics_rows(s.run_dir) for s in (whole, split)]
    assert [r["loss_tokens"] for r in rows[0]] == [r["loss_tokens"] for r in rows[1]]
    assert [r["loss"] for r in rows[1]] == pytest.approx([r["loss"] for r in rows[0]], rel=1e-5)
    weights = [safetensors.torch.load_file(f"{s.saved}/adapter_model.safetensors") for s in (whole, split)]
    for name, tensor in weights[0].items():
        assert tensor.sub(weights[1][name]).abs().max() < 1e-5, name


def test_selective_checkpointing_recomputes_only_its_layers_and_learns_the_same(tiny_cfg, tmp_path):
    common = dict(max_length=96, max_steps=2, lora_dropout=0.1, learning_rate=1e-2, plan_memory=False)
    plain = train.train(tiny_cfg(**common, gradient_checkpointing=False, out=str(tmp_path / "plain")))
    selective = train.train(tiny_cfg(**common, checkpoint_layers=1, out=str(tmp_path / "selective")))
    full = train.train(tiny_cfg(**common, gradient_checkpointing=True, out=str(tmp_path / "full")))
    losses = [[r["loss"] for r in metrics_rows(s.run_dir)] for s in (plain, selective, full)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and losses[2] == pytest.approx(losses[0], rel=1e-5)
    # HFU counts the recomputed forward: one of two layers' worth for selective
    extra = [s.flops.hfu / s.flops.mfu - 1 for s in (plain, selective, full)]
    assert extra[0] == pytest.approx(0.0, abs=1e-9)
    assert 0 < extra[1] < extra[2]


def test_an_explicit_budget_nothing_fits_is_refused_before_any_loading(tiny_cfg, tmp_path):
    cfg = tiny_cfg(memory_budget="1MB", out=str(tmp_path / "run"))
    with pytest.raises(MemoryBudgetExceeded, match="no plan is predicted to fit"):  # exit code 4 in the CLI
        train.train(cfg)
    assert not (tmp_path / "run").exists()


def test_train_plan_shows_the_plan_and_trains_nothing(tmp_path):
    out = tmp_path / "run"
    result = lorafit("train", "--plan", "--json", "--model", "smollm2-135m", "--batch-size", "4",
                     "--max-length", "512", "--memory-budget", "2GB", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout.strip().splitlines()[-1])
    assert shown["budget_bytes"] == 2 * 10**9 and shown["budget_source"] == "--memory-budget 2GB"
    chosen = shown["chosen"]
    assert chosen["predicted_peak_bytes"] * 1.1 <= 2 * 10**9
    assert "memory plan:" in result.stderr and "over budget" in result.stderr
    assert not out.exists()


def test_offloaded_checkpointing_gives_the_gradients_of_the_plain_run(tiny_model):
    """The offload path's recompute (RNG and autocast restored, gradients pushed through) on CPU, where
    the host copy is a plain copy: the CUDA-only part is where the copy lands."""
    import torch

    from lorafit.adapters import checkpointing
    from lorafit.adapters.methods import apply_method

    def gradients(**kw) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = apply_method(
            type(tiny_model)(tiny_model.config), TrainConfig(model="random:tiny", lora_dropout=0.2, **kw)
        )
        model.load_state_dict(tiny_model.state_dict(), strict=False)
        model.train()
        assert checkpointing.restrict(model, TrainConfig(model="random:tiny", **kw)) == (1.0 if kw else 0.0)
        ids = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(2)  # the dropout masks
        model(input_ids=ids, labels=ids).loss.backward()
        return [p.grad for p in model.parameters() if p.requires_grad]

    plain = gradients()
    offloaded = gradients(gradient_checkpointing=True, offload_activations=True)
    assert len(plain) == len(offloaded) > 0
    for a, b in zip(plain, offloaded, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
