"""`lorafit compare` (from a study file), `eval` and `report` end to end on the tiny random model."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from lorafit.run.rundir import RunDir
from lorafit.run.runner import Finished
from lorafit.run.store import RunStore
from tests.helpers import TableReader, lorafit

EVAL_FLAGS = [
    "--ppl-max-tokens",
    "256",
    "--ppl-max-length",
    "64",
    "--ppl-stride",
    "32",
    "--gen-tokens",
    "4",
    "--gen-repeats",
    "1",
]


# One comparison serves every test here (a compare trains and evaluates five runs: the slowest
# fixture of the suite), so it runs as a study file: per-method options, and a flag over the file.
STUDY = """\
model: random:tiny
max_samples: 8
max_length: 128
methods:
  full: {batch_size: 3, learning_rate: 1.0e-5, lr_scheduler: constant}
  lora: {batch_size: 2, learning_rate: 1.0e-3}
  qlora: {}
"""


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    (root / "study.yaml").write_text(STUDY)
    out = root / "cmp"
    proc = lorafit(
        "compare", "--config", str(root / "study.yaml"), "--max-length", "96", "--out", str(out), *EVAL_FLAGS, "--json"
    )
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout.strip().splitlines()[-1])


def test_compare_stores_every_run_and_reports_their_numbers(compared):
    out, result = compared
    assert result["runs"] == ["base", "base-nf4", "full", "lora", "qlora"]
    with RunStore(out / "runs.sqlite") as store:
        records = {r.label: r for r in store.runs(group_name="cmp")}
    assert set(records) == {"base", "base-nf4", "full", "lora", "qlora"}
    assert all(r.status == "ok" for r in records.values())
    reader = TableReader()
    reader.feed((out / "report.html").read_text())
    head, *rows = reader.tables[0]
    cells = {row[0]: dict(zip(head, row, strict=True)) for row in rows}
    for method in ("full", "lora", "qlora"):
        r = records[method]
        shown = cells[method]
        assert float(shown["train tokens/s"]) == pytest.approx(r.summary.timing.tokens_per_s, abs=0.05)
        before, after = (float(x) for x in shown["perplexity"].split(" → "))
        base = records["base-nf4" if method == "qlora" else "base"]  # QLoRA against its 4-bit base
        assert before == pytest.approx(base.eval["perplexity"]["ppl"], abs=0.005)
        assert after == pytest.approx(r.eval["perplexity"]["ppl"], abs=0.005)
        assert r.eval["perplexity"]["tokens_scored"] == 255
        assert len(r.metrics) == r.summary.steps
        assert (out / method / "eval.json").is_file()
    # trainable share: full trains everything, LoRA and QLoRA the same small adapter
    assert records["full"].summary.params.trainable_pct == pytest.approx(100.0)
    assert records["lora"].summary.params.trainable_params == records["qlora"].summary.params.trainable_params
    assert records["qlora"].eval["size"]["memory_bytes"] < records["lora"].eval["size"]["memory_bytes"]
    assert records["base-nf4"].eval["size"]["memory_bytes"] < records["base"].eval["size"]["memory_bytes"]
    assert set(reader.charts) == {"six_panel", "radar", "memory_breakdown", "loss_curves"}
    assert (out / "report.md").read_text().startswith("# lorafit compare: random:tiny")


def test_each_method_trains_with_its_own_settings(compared):
    """The study file's per-method batch size, learning rate and schedule reach each run's stored
    config, its run directory's config.yaml and its step count; the flag wins over the file's length."""
    out, _ = compared
    with RunStore(out / "runs.sqlite") as store:
        runs = {r.label: r for r in store.runs(group_name="cmp") if r.kind == "train"}
    for method, batch, lr in (("lora", 2, 1e-3), ("full", 3, 1e-5)):
        stored, written = runs[method].config, RunDir(out / method).config()
        assert (stored["method"], stored["batch_size"], stored["learning_rate"]) == (method, batch, lr)
        assert (written.method, written.batch_size, written.learning_rate) == (method, batch, lr)
        assert stored["max_length"] == written.max_length == 96  # the flag over the file's 128
        assert runs[method].summary.steps == math.ceil(8 / batch)  # one epoch of 8 samples, its own batches
        assert runs[method].summary.data.samples == 8
    assert runs["full"].config["lr_scheduler"] == "constant" != runs["lora"].config["lr_scheduler"]  # lora: the default


def test_a_bad_study_stops_before_anything_runs_naming_file_method_and_key(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text("model: random:tiny\nmethods:\n  qlora: {batch_sise: 4}\n")
    proc = lorafit("compare", "--config", str(study), "--out", str(tmp_path / "cmp"), columns=400)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    message = f"{study} (methods.qlora), field 'batch_sise': unknown option 'batch_sise'; did you mean 'batch_size'?"
    assert message in proc.stderr
    assert not (tmp_path / "cmp").exists()


def test_report_from_store_with_filter_and_from_run_dirs(compared, tmp_path):
    out, _ = compared
    proc = lorafit(
        "report", "--store", str(out / "runs.sqlite"), "--filter", "kind=train", "--out", str(tmp_path / "a")
    )
    assert proc.returncode == 0, proc.stderr
    reader = TableReader()
    reader.feed((tmp_path / "a" / "report.html").read_text())
    assert [row[0] for row in reader.tables[0][1:]] == ["full", "lora", "qlora"]
    proc = lorafit("report", str(out / "base"), str(out / "lora"), "--out", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr
    assert "| lora |" in (tmp_path / "b" / "report.md").read_text()
    bad = lorafit("report", str(tmp_path / "nothing"))
    assert bad.returncode == 2 and "not a run directory" in bad.stderr


def test_eval_cli_writes_eval_json_into_the_run(compared):
    out, _ = compared
    run = out / "lora"
    (run / "eval.json").unlink()
    proc = lorafit("eval", "--run", str(run), *EVAL_FLAGS, "--no-gen", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads((run / "eval.json").read_text())["perplexity"] == result["perplexity"]
    assert "generation" not in result and result["method"] == "lora"
    bad = lorafit("eval", "--model", "random:tiny", "--ppl-stride", "128", "--ppl-max-length", "64")
    assert bad.returncode == 2 and "ppl_stride" in bad.stderr


def test_a_failed_or_oom_method_is_recorded_and_the_comparison_goes_on(tmp_path, monkeypatch):
    from lorafit.base.config import EvalConfig, TrainConfig
    from lorafit.studies import compare as cmp

    calls = []

    def fake(args):
        calls.append(args[0])
        if args[0] == "train" and "qlora.yaml" in args[-1]:
            return Finished(4, "oom", "out of memory: lorafit train exited with 4")
        if args[0] == "train":
            return Finished(0, "ok", None, {"status": "ok", "method": "lora", "tokens_per_s": 10.0, "steps": 1})
        return Finished(0, "ok", None, {"method": "x", "size": {}, "perplexity": {"ppl": 5.0}})

    monkeypatch.setattr(cmp, "run_lorafit", fake)
    cfg = TrainConfig(model="random:tiny", max_samples=4)
    result = cmp.compare(cfg, ["lora", "qlora"], EvalConfig(), out_dir=tmp_path / "c", log=lambda m: None, command=[])
    assert result["status"] == {"base": "ok", "base-nf4": "ok", "lora": "ok", "qlora": "oom"}
    assert calls == ["eval", "eval", "train", "eval", "train"]  # no eval of the run that did not fit
    assert "| qlora |" in (tmp_path / "c" / "report.md").read_text()
    with RunStore(tmp_path / "c" / "runs.sqlite") as store:
        stored = {r.label: r for r in store.runs()}
    assert stored["lora"].summary.timing.tokens_per_s == 10.0 and stored["qlora"].error.startswith("out of memory")


def test_subprocess_failures_are_classified(tmp_path):
    from lorafit.base.errors import is_out_of_memory
    from lorafit.run.runner import run_lorafit

    failed = run_lorafit(["train", "--model", "random:no-such-arch", "--out", str(tmp_path / "x")])
    assert (failed.status, failed.returncode, failed.result) == ("failed", 2, None)
    assert is_out_of_memory(RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: 9 GB"))
    assert is_out_of_memory(MemoryError()) and not is_out_of_memory(RuntimeError("shape mismatch"))


def test_eval_cli_reports_a_truncated_adapter_without_a_traceback(adapter_dir, tmp_path):
    cut = Path(shutil.copytree(adapter_dir, tmp_path / "cut"))
    weights = cut / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    proc = lorafit("eval", "--model", "random:tiny", "--adapter", str(cut), "--ppl", "none", "--no-gen")
    assert proc.returncode == 2
    assert "corrupted or truncated" in proc.stderr and "Traceback" not in proc.stderr
