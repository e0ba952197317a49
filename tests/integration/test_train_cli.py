"""End-to-end runs on the tiny random model: the run directory, summary.json figures and CLI behaviour."""

import gzip
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafit.base.errors import UserError
from lorafit.inputs import data
from lorafit.training import loop as train
from lorafit.training import loss as loss_module
from lorafit.training.signals import NonFiniteLoss
from tests.helpers import lorafit, metrics_rows


def test_cli_run_directory_and_json(tmp_path):
    out = tmp_path / "q1"
    proc = lorafit(
        "train",
        "--model",
        "random:tiny",
        "--method",
        "qlora",
        "--max-samples",
        "8",
        "--batch-size",
        "4",
        "--max-length",
        "128",
        "--out",
        str(out),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary == json.loads((out / "summary.json").read_text())
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "metrics.jsonl", "summary.json", "adapter"}
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    rows = metrics_rows(out)
    assert [r["step"] for r in rows] == [1, 2] and summary["steps"] == 2
    assert summary["status"] == "ok" and summary["method"] == "qlora"
    assert summary["tokens"] == sum(r["tokens"] for r in rows[summary["warmup_steps"] :])
    assert summary["tokens"] + sum(r["tokens"] for r in rows[: summary["warmup_steps"]]) == summary["data"]["tokens"]
    assert summary["tokens_per_s"] == pytest.approx(summary["tokens"] / summary["timed_s"])
    assert 0 < summary["mfu"] < 1 and summary["flops_per_token"] > 0
    assert summary["energy_j"] is None and summary["energy_unavailable_reason"]
    assert "train" in proc.stderr and "run directory" in proc.stderr  # progress and the summary table


def test_config_file_with_flag_override(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: random:tiny\nmethod: lora\nmax_samples: 4\nmax_length: 96\nlearning_rate: 0.5\n")
    out = tmp_path / "r"
    proc = lorafit("train", "--config", str(cfg), "--learning-rate", "1e-3", "--lora-r", "4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    resolved = (out / "config.yaml").read_text()
    assert "learning_rate: 0.001" in resolved and "lora_r: 4" in resolved and "lora_alpha: 8.0" in resolved
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "{bad}"], "bad.jsonl:1: invalid JSON"),
        (["--method", "qlorax"], "method must be one of"),
        (["--config", "{yaml}"], "did you mean 'batch_size'"),
        (["--precision", "fp16"], "fp16 needs a GPU"),
        (["--model", "random:nope"], "unknown architecture"),
    ],
)
def test_user_errors_exit_2_without_traceback(tmp_path, args, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("batch_sise: 2\n")
    args = [a.replace("{bad}", str(bad)).replace("{yaml}", str(yaml_file)) for a in args]
    proc = lorafit("train", "--model", "random:tiny", "--out", str(tmp_path / "r"), *args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_refuses_to_overwrite_a_run(tmp_path, tiny_cfg):
    cfg = tiny_cfg(max_steps=1)
    train.train(cfg)
    with pytest.raises(Exception, match="already holds a run"):
        train.train(tiny_cfg(max_steps=1))


@pytest.mark.parametrize(("method", "lr", "drop"), [("full", 3e-3, 1.0), ("lora", 3e-2, 0.05)])
def test_loss_decreases(tiny_cfg, method, lr, drop):
    # a random tiny model has a random frozen head, so LoRA alone moves its loss slowly
    summary = train.train(
        tiny_cfg(
            method=method,
            max_samples=8,
            max_steps=12,
            learning_rate=lr,
            lora_dropout=0.0,
            max_length=96,
            epochs=20,
        )
    )
    assert summary.losses.loss_last < summary.losses.loss_first - drop


@pytest.mark.parametrize("packing", [False, True])
def test_seeded_runs_are_reproducible(tiny_cfg, tmp_path, packing):
    def run(name: str) -> tuple[list[float], dict]:
        cfg = tiny_cfg(
            max_samples=12,
            batch_size=3,
            max_length=96,
            max_steps=4,
            learning_rate=1e-2,
            packing=packing,
            seed=7,
            out=str(tmp_path / name),
        )
        train.train(cfg)
        losses = [row["loss"] for row in metrics_rows(tmp_path / name)]
        return losses, load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")

    (la, wa), (lb, wb) = run("a"), run("b")
    assert la == lb
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_packing_trains_on_every_token_once(tiny_cfg, tiny_tokenizer):
    """What the steps consumed (metrics.jsonl, counted from each micro-batch) is what the data holds,
    counted here from the samples: every real token once, and in packed rows no sample's first
    token predicted from its neighbour, so the loss tokens are the same as without packing (with
    --train-on-prompt every first token has a label that packing must drop)."""
    common = dict(max_samples=12, max_length=256, train_on_prompt=True)
    plain = train.train(tiny_cfg(**common, out=tiny_cfg().out + "-plain"))
    packed = train.train(tiny_cfg(**common, packing=True, out=tiny_cfg().out + "-packed"))
    samples, _ = data.build_samples("alpaca", tiny_tokenizer, 256, train_on_prompt=True, max_samples=12)
    tokens = sum(len(s.input_ids) for s in samples)
    loss_tokens = sum(len(s.input_ids) - 1 for s in samples)  # every token but a sample's first is a target
    for run in (plain, packed):
        rows = metrics_rows(run.run_dir)
        assert sum(r["tokens"] for r in rows) == run.data.tokens == tokens
        assert sum(r["loss_tokens"] for r in rows) == run.data.loss_tokens == loss_tokens
        assert all(r["tokens"] <= 4 * 256 for r in rows)  # batch_size rows of at most max_length
    assert packed.steps < plain.steps  # fewer, fuller rows


@pytest.mark.parametrize(("method", "dropout"), [("lora", 0.0), ("lora", 0.1), ("qlora", 0.1), ("full", 0.0)])
def test_gradient_checkpointing_changes_memory_not_learning(tiny_cfg, tmp_path, method, dropout):
    """With dropout the recomputed forward must draw the same masks (RNG state restored)."""

    def losses(name: str, checkpointing: bool) -> list[float]:
        cfg = tiny_cfg(
            method=method,
            max_length=96,
            max_steps=3,
            learning_rate=1e-2,
            lora_dropout=dropout,
            gradient_checkpointing=checkpointing,
            out=str(tmp_path / name),
        )
        train.train(cfg)
        return [row["loss"] for row in metrics_rows(tmp_path / name)]

    assert losses("plain", False) == pytest.approx(losses("ckpt", True), rel=1e-5)


def test_gradient_accumulation_groups_micro_batches(tiny_cfg):
    summary = train.train(tiny_cfg(max_samples=8, batch_size=2, grad_accum=2))
    rows = metrics_rows(summary.run_dir)
    assert summary.steps == len(rows) == 2  # 4 micro-batches of 2 -> 2 optimizer steps
    assert sum(r["tokens"] for r in rows) == summary.data.tokens


def test_bf16_path_runs_on_cpu(tiny_cfg):
    """The GPU default precision: frozen base stored bf16, fp32 adapters, bf16 autocast."""
    summary = train.train(tiny_cfg(precision="bf16", max_steps=2))
    assert summary.precision == "bf16" and summary.steps == 2
    assert all(math.isfinite(x) for x in (summary.losses.loss_first, summary.losses.loss_last))
    assert "bfloat16" in summary.flops.peak_flops_source


def test_profile_trace_is_written_and_traced_steps_are_not_timed(tiny_cfg):
    summary = train.train(tiny_cfg(max_samples=16, profile_trace=True, profile_trace_steps=2))
    timing = summary.timing
    assert timing.trace.endswith("trace.json.gz")
    trace = json.loads(gzip.decompress(Path(timing.trace).read_bytes()))
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any("mm" in n for n in names) and "ProfilerStep" not in names
    assert timing.traced_steps == 2 and timing.warmup_steps == 3  # 1 warm-up + 2 traced
    assert timing.timed_steps == 1
    rows = metrics_rows(summary.run_dir)
    assert timing.tokens == rows[-1]["tokens"]  # only the last micro-step is timed


def test_run_files_are_readable_by_others(tiny_cfg):
    summary = train.train(tiny_cfg(max_steps=1))
    assert (Path(summary.run_dir) / "summary.json").stat().st_mode & 0o777 == 0o644


def test_non_finite_loss_stops_before_the_update_and_keeps_a_record(tiny_cfg, monkeypatch):
    real = loss_module.causal_lm_loss
    calls = []

    def third_is_nan(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(loss_module, "causal_lm_loss", third_is_nan)
    cfg = tiny_cfg(max_samples=16, batch_size=2, lr_scheduler="constant")
    weights = {}
    real_setup = train.setup

    def keep_model(c, loaded=None):
        s = real_setup(c, loaded)
        weights["model"] = s.peft_model
        return s

    monkeypatch.setattr(train, "setup", keep_model)
    with pytest.raises(NonFiniteLoss, match="loss is nan at step 3") as e:
        train.train(cfg)
    # the weights are those after step 2: training the same two steps again gives the same adapter
    after_two = {  # peft saves adapter weights under their names without the adapter name
        n.replace(".default", ""): p.detach().clone() for n, p in weights["model"].named_parameters() if p.requires_grad
    }
    monkeypatch.setattr(loss_module, "causal_lm_loss", real)
    check = train.train(
        tiny_cfg(max_samples=16, batch_size=2, max_steps=2, lr_scheduler="constant", out=cfg.out + "-two")
    )
    saved = load_file(Path(check.saved) / "adapter_model.safetensors")
    assert saved.keys() == after_two.keys()
    assert all(torch.equal(saved[k], after_two[k]) for k in saved)
    assert e.value.exit_code == 3
    record = json.loads((Path(cfg.out) / "summary.json").read_text())
    assert record["status"] == "failed" and "NonFiniteLoss" in record["error"]
    assert [row["step"] for row in metrics_rows(cfg.out)] == [1, 2]  # the good steps are kept


def test_help_version_and_archs():
    assert lorafit("--version").stdout.strip() == "lorafit 0.1.0"
    assert lorafit("archs").stdout.split() == sorted(
        ["llama-3-8b", "mistral-7b", "phi-3-mini", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "smollm2-135m"]
        + ["tiny", "tinyllama-1.1b"]
    )
    text = lorafit("train", "--help", columns=250).stdout
    for flag in ("--method", "--lora-r", "--packing", "--profile-trace", "--config", "--json"):
        assert flag in text
    assert "[default: 16]" in text  # defaults are shown


@pytest.mark.parametrize(
    ("choice", "recorded"),
    [
        ("auto", "mimalloc (MIMALLOC_PURGE_DELAY=-1, MIMALLOC_ALLOW_THP=0)"),  # the install brings it (cmeel-mimalloc)
        ("system", "system (glibc malloc)"),
        ("jemalloc", "jemalloc (MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1)"),
    ],
)
def test_allocator_choice_is_applied_and_recorded(tmp_path, monkeypatch, choice, recorded):
    from lorafit.base.allocator import find_jemalloc

    if choice == "jemalloc" and find_jemalloc() is None:
        pytest.skip("no system jemalloc on this machine (apt-get install libjemalloc2)")
    monkeypatch.setenv("LORAFIT_ALLOCATOR", choice)
    for key in ("MIMALLOC_PURGE_DELAY", "MIMALLOC_ALLOW_THP", "MALLOC_CONF", "LD_PRELOAD", "_LORAFIT_REEXEC"):
        monkeypatch.delenv(key, raising=False)
    args = ["--model", "random:tiny", "--max-samples", "4", "--max-length", "64", "--json"]
    proc = lorafit("train", *args, "--out", str(tmp_path / "a"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["allocator"] == recorded


def test_an_unknown_or_missing_allocator_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("_LORAFIT_REEXEC", raising=False)
    monkeypatch.setenv("LORAFIT_ALLOCATOR", "tcmalloc")
    proc = lorafit("train", "--model", "random:tiny", "--out", str(tmp_path / "a"))
    assert proc.returncode == 2 and "LORAFIT_ALLOCATOR must be one of auto, mimalloc, jemalloc, system" in proc.stderr
    monkeypatch.setenv("LORAFIT_ALLOCATOR", "mimalloc")
    monkeypatch.setenv("LORAFIT_MIMALLOC", str(tmp_path / "missing.so"))
    proc = lorafit("train", "--model", "random:tiny", "--out", str(tmp_path / "b"))
    assert proc.returncode == 2 and "no libmimalloc was found" in proc.stderr


def test_skip_nonfinite_drops_the_step_and_counts_it(tiny_cfg, monkeypatch):
    real = loss_module.causal_lm_loss
    calls = []

    def third_is_inf(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("inf") if len(calls) == 3 else loss

    monkeypatch.setattr(loss_module, "causal_lm_loss", third_is_inf)
    summary = train.train(tiny_cfg(max_samples=16, batch_size=2, max_steps=5, skip_nonfinite=True))
    assert summary.status == "ok" and summary.nonfinite_skipped_steps == [3]
    assert summary.steps == 4  # the optimizer stepped 4 times
    rows = metrics_rows(summary.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[2] == {"step": 3, "skipped": "non-finite loss"}
    weights = load_file(Path(summary.saved) / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_not_enough_disk_is_refused_before_training(tiny_cfg, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 2**20, 2**20))
    cfg = tiny_cfg(max_steps=2)
    with pytest.raises(UserError, match="not enough disk space: the run writes about") as info:
        train.train(cfg)
    assert info.value.file == cfg.out
    record = json.loads((Path(cfg.out) / "summary.json").read_text())
    assert record["status"] == "failed" and "disk space" in record["error"]
    assert metrics_rows(cfg.out) == []  # stopped before the first step


def test_out_of_disk_mid_run_leaves_whole_files(tiny_cfg, monkeypatch):
    import errno as errno_module

    from lorafit.training import checkpoint

    def full_disk(*args, **kwargs):
        raise OSError(errno_module.ENOSPC, "No space left on device", "checkpoints/.tmp-step-00000002")

    monkeypatch.setattr(checkpoint, "save", full_disk)
    cfg = tiny_cfg(max_steps=4, save_every=2)
    with pytest.raises(OSError):
        train.train(cfg)
    record = json.loads((Path(cfg.out) / "summary.json").read_text())  # whole JSON
    assert record["status"] == "failed" and "No space left" in record["error"]
    assert [r["step"] for r in metrics_rows(cfg.out)] == [1, 2]
