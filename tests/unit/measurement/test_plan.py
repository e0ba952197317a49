"""The memory planner: the fastest plan predicted to fit, the global batch kept, explicit options winning."""

from __future__ import annotations

import dataclasses

import pytest

from lorafit.base.config import TrainConfig
from lorafit.base.errors import UserError
from lorafit.measurement import estimate as est
from lorafit.measurement import flops
from lorafit.measurement import plan as planning

SMOL = est.model_config("smollm2-135m")


def lora(**kw) -> TrainConfig:
    return TrainConfig(**{"model": "smollm2-135m", "batch_size": 4, "max_length": 512, **kw})


def peak(cfg: TrainConfig) -> int:
    return est.estimate(cfg, "cpu", SMOL, runtime=0).total


def make_plan(cfg: TrainConfig, budget: int, device: str = "cpu") -> planning.MemoryPlan:
    return planning.plan(cfg, device, SMOL, runtime=0, budget=(budget, "test"))


def everything(p: planning.MemoryPlan) -> list[planning.PlanCandidate]:
    return [*([p.chosen] if p.chosen else []), *p.alternatives]


def test_a_budget_the_run_fits_keeps_it_as_configured():
    cfg = lora()
    p = make_plan(cfg, 10 * peak(cfg))
    c = p.chosen
    assert (c.checkpointing, c.batch_size, c.grad_accum) == ("none", 4, 1)
    assert c.relative_time == pytest.approx(1.0)


@pytest.mark.parametrize("fraction", [0.45, 0.6, 0.8])
def test_the_chosen_plan_fits_with_margin_and_nothing_fitting_is_faster(fraction):
    cfg = lora(grad_accum=2)
    budget = int(fraction * peak(cfg))
    p = make_plan(cfg, budget)
    c = p.chosen
    assert c is not None and c.fits
    assert c.predicted_peak_bytes * (1 + planning.MARGIN) <= budget
    assert c.predicted_peak_bytes == peak(planning.shaped(cfg, c.checkpointing, c.checkpoint_layers, c.batch_size))
    assert c.batch_size * c.grad_accum == 8  # the global batch is kept
    assert all(a.relative_time >= c.relative_time for a in p.alternatives if a.fits)
    assert all(a.why_not == ("slower" if a.fits else "over budget") for a in p.alternatives)


def test_selective_checkpointing_is_the_fewest_layers_that_fit():
    cfg = lora(batch_size=4)
    none, full = peak(cfg), peak(planning.shaped(cfg, "full", 30, 4))
    budget = int((none + full) / 2 * (1 + planning.MARGIN))
    p = make_plan(cfg, budget)
    selective = [c for c in everything(p) if c.checkpointing == "selective" and c.batch_size == 4]
    assert len(selective) == 1
    k = selective[0].checkpoint_layers
    assert 1 < k < 30
    assert peak(planning.shaped(cfg, "selective", k, 4)) * (1 + planning.MARGIN) <= budget
    assert peak(planning.shaped(cfg, "selective", k - 1, 4)) * (1 + planning.MARGIN) > budget


def test_peaks_and_times_order_the_checkpointing_modes():
    cfg = lora()
    peaks = [peak(planning.shaped(cfg, m, k, 4)) for m, k in [("none", 0), ("selective", 10), ("selective", 20)]]
    full = peak(planning.shaped(cfg, "full", 30, 4))
    assert peaks[0] > peaks[1] > peaks[2] > full
    arch = est.arch_from_config(SMOL)
    times = [planning.relative_time(arch, cfg, k, 4, "cpu") for k in (0, 10, 20, 30)]
    assert times == sorted(times) and times[0] == pytest.approx(1.0)
    # full checkpointing of a LoRA model reruns ~a forward of a ~2-forward step (frozen weights get no grads)
    assert 1.3 < times[-1] < 1.6


def test_nothing_fitting_is_said_and_the_leanest_applied():
    cfg = lora()
    p = make_plan(cfg, 10 * 2**20)
    assert p.chosen is None and "no plan is predicted to fit" in p.describe()
    applied = planning.apply(cfg, p)
    leanest = min(p.alternatives, key=lambda c: c.predicted_peak_bytes)
    assert (applied.batch_size, applied.gradient_checkpointing) == (leanest.batch_size, True)


@pytest.mark.parametrize(
    ("option", "modes"),
    [
        ({"gradient_checkpointing": True}, {("full", 30)}),
        ({"gradient_checkpointing": False}, {("none", 0)}),
        ({"checkpoint_layers": 7}, {("selective", 7)}),
    ],
)
def test_explicit_checkpointing_wins_and_the_micro_batch_is_still_planned(option, modes):
    cfg = lora(**option)
    p = make_plan(cfg, int(0.5 * peak(cfg)))
    assert {(c.checkpointing, c.checkpoint_layers) for c in everything(p)} == modes
    assert p.decided_by.startswith("--")
    assert {c.batch_size for c in everything(p)} == {4, 2, 1}


def test_offload_is_a_cuda_plan():
    cfg = lora()
    assert "offload" not in {c.checkpointing for c in everything(make_plan(cfg, 10**8))}


def test_micro_batches_divide_the_global_batch():
    assert planning.micro_batches(lora(batch_size=6, grad_accum=1)) == [6, 3, 2, 1]
    assert planning.micro_batches(lora(batch_size=4, grad_accum=3)) == [4, 3, 2, 1]


@pytest.mark.parametrize(
    ("method", "targets", "fused"),
    [
        ("lora", ["q_proj", "v_proj", "up_proj"], True),
        ("full", ["q_proj", "v_proj", "up_proj"], True),
        ("lora", ["q_proj", "down_proj"], True),  # down_proj wrapped, its frozen matmul last: not recomputed
        ("lora", ["q_proj", "down_proj"], False),  # peft's forward: down_proj's base matmul is recomputed
        ("qlora", ["q_proj", "down_proj"], True),  # the 4-bit base's dequantized matmul last, likewise
    ],
)
def test_the_shape_from_the_config_is_the_loaded_models(tiny_model, method, targets, fused):
    """The planner's FLOPs come from the config alone; they must be the loaded model's."""
    from lorafit.adapters.methods import apply_method

    cfg = TrainConfig(model="random:tiny", method=method, target_modules=targets, fused_lora=fused)
    arch = est.arch_from_config(tiny_model.config.to_dict())
    measured = flops.model_shape(apply_method(tiny_model, cfg))
    from_config = planning.model_shape(arch, cfg)
    assert dataclasses.replace(from_config, first_inputs_grad=measured.first_inputs_grad) == measured


def test_an_unset_checkpointing_resolves_to_off_without_a_planner():
    assert planning.resolved(lora()).gradient_checkpointing is False
    assert planning.resolved(lora(checkpoint_layers=3)).gradient_checkpointing is True


def test_checkpoint_layers_alone_is_checkpointing_everywhere():
    """--checkpoint-layers without --gradient-checkpointing: the estimate is the selective run's, not a plain one."""
    alone, explicit = lora(checkpoint_layers=10), lora(gradient_checkpointing=True, checkpoint_layers=10)
    assert alone.gradient_checkpointing is True
    assert peak(alone) == peak(explicit) < peak(lora())


def cuda_plan(cfg: TrainConfig, budget: int) -> planning.MemoryPlan:
    return planning.plan(cfg, "cuda", SMOL, runtime=0, budget=(budget, "test"))


def test_on_cuda_offload_is_the_last_resort():
    cfg = lora(max_length=2048)
    cuda_peak = lambda c: est.estimate(c, "cuda", SMOL, runtime=0).total  # noqa: E731
    full, offload = (cuda_peak(planning.shaped(cfg, m, 30, 1)) for m in ("full", "offload"))
    assert offload < full
    roomy = cuda_plan(cfg, int(full * 1.2))
    assert roomy.chosen.checkpointing != "offload"
    assert "offload" in {c.checkpointing for c in roomy.alternatives}
    tight = cuda_plan(cfg, int((offload + full) / 2 * (1 + planning.MARGIN)))
    assert tight.chosen.checkpointing == "offload"  # nothing on the device fits: full at micro-batch 1 did not


def test_offload_keeps_the_layers_asked_for():
    cfg = lora(offload_activations=True, checkpoint_layers=12)
    p = cuda_plan(cfg, 10**12)
    assert {(c.checkpointing, c.checkpoint_layers) for c in everything(p)} == {("offload", 12)}
    assert planning.apply(cfg, p).checkpoint_layers == 12


def test_offload_on_the_cpu_is_refused():
    with pytest.raises(UserError, match="offload-activations"):
        make_plan(lora(offload_activations=True), 10**12)


def test_a_cgroup_limit_bounds_the_default_budget(tmp_path):
    (tmp_path / "memory.max").write_text("8000000000\n")
    (tmp_path / "memory.current").write_text("3000000000\n")
    assert planning.cgroup_room(tmp_path) == 5 * 10**9
    (tmp_path / "memory.max").write_text("max\n")
    assert planning.cgroup_room(tmp_path) is None
    assert planning.cgroup_room(tmp_path / "absent") is None


def test_the_default_cpu_budget_is_this_process_share_of_available_ram(monkeypatch):
    import psutil

    from lorafit.measurement import host_memory

    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("VM", (), {"available": 12 * 10**9})())
    monkeypatch.setattr(host_memory, "rss_bytes", lambda: 10**9)
    assert planning.default_budget("cpu") == (13 * 10**9, "available RAM")
    assert planning.default_budget("cpu", processes=4) == (4 * 10**9, "available RAM / 4 processes")


def test_peaks_are_estimated_at_the_datas_longest_row():
    """Rows shorter than max_length: every candidate's peak is the estimator's at the longest row, so a budget
    the short data fits without checkpointing runs plain, where max_length rows would need a split step."""
    cfg = lora(max_length=1024)
    short = dataclasses.replace(cfg, max_length=300)
    budget = int(peak(short) * (1 + planning.MARGIN)) + 1
    worst = make_plan(cfg, budget)
    p = planning.plan(cfg, "cpu", SMOL, runtime=0, budget=(budget, "test"), longest_row=300)
    assert (p.chosen.checkpointing, p.chosen.batch_size) == ("none", 4)
    assert p.chosen.predicted_peak_bytes == peak(short) and p.peak_row_tokens == 300
    assert worst.chosen.checkpointing != "none" or worst.chosen.batch_size < 4
    assert worst.peak_row_tokens == 1024


def test_a_longest_row_past_max_length_is_cut_to_it():
    cfg = lora(max_length=256)
    p = planning.plan(cfg, "cpu", SMOL, runtime=0, budget=(10 * peak(cfg), "test"), longest_row=4096)
    assert p.peak_row_tokens == 256 and p.chosen.predicted_peak_bytes == peak(cfg)
