"""`lorafit compare --config study.yaml`: shared options, each method's own on top, flags over both;
errors that name the file, the method and the key. The subprocesses are stood in for: only the
configs each run was given are checked."""

from __future__ import annotations

import re

import pytest
import yaml

from lorafit.base.errors import UserError
from lorafit.run.store import RunStore
from lorafit.studies import compare as cmp
from lorafit.studies.compare import load_study
from tests.helpers import fake_compare_runs

STUDY = """\
model: random:tiny
data: alpaca
max_samples: 64
lora_r: 8
ppl_max_tokens: 256
methods:
  full: {batch_size: 2, grad_accum: 8, learning_rate: 2.0e-5, optimizer: adamw}
  qlora: {batch_size: 4, grad-accum: 4, learning_rate: 2e-4, optimizer: paged_adamw_8bit, lora_r: 4}
"""


def write(tmp_path, text: str, name: str = "study.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_each_method_gets_the_shared_options_and_its_own(tmp_path):
    study = load_study(write(tmp_path, STUDY))
    assert study.methods == ["full", "qlora"]  # the file's order
    full, qlora = study.configs["full"], study.configs["qlora"]
    assert (full.method, full.batch_size, full.grad_accum, full.learning_rate, full.optimizer) == (
        "full",
        2,
        8,
        2e-5,
        "adamw",
    )
    assert (qlora.method, qlora.batch_size, qlora.grad_accum, qlora.learning_rate, qlora.optimizer) == (
        "qlora",
        4,
        4,
        2e-4,
        "paged_adamw_8bit",
    )
    for cfg in (full, qlora):
        assert (cfg.model, cfg.data, cfg.max_samples, cfg.out) == ("random:tiny", "alpaca", 64, None)
    # a derived default follows the method's own options: alpha = 2 x its rank, not the shared rank's
    assert (full.lora_r, full.lora_alpha) == (8, 16.0) and (qlora.lora_r, qlora.lora_alpha) == (4, 8.0)
    assert study.eval.ppl_max_tokens == 256 and study.eval.gen_tokens == 64  # file, then the default
    assert study.shared.model == "random:tiny" and study.notes == []


def test_flags_override_the_file_shared_and_per_method_with_a_note(tmp_path):
    path = write(tmp_path, STUDY)
    study = load_study(path, {"max_samples": 8, "batch_size": 1, "seed": None}, {"ppl_max_tokens": 128})
    assert [c.max_samples for c in study.configs.values()] == [8, 8]
    assert [c.batch_size for c in study.configs.values()] == [1, 1]  # the command line has the last word
    assert [c.optimizer for c in study.configs.values()] == ["adamw", "paged_adamw_8bit"]  # untouched
    assert study.eval.ppl_max_tokens == 128
    assert study.notes == [
        f"--batch-size 1 (command line) replaces full's batch_size: 2 from {path}",
        f"--batch-size 1 (command line) replaces qlora's batch_size: 4 from {path}",
    ]


def test_methods_flag_picks_methods_and_one_not_in_the_file_gets_the_shared_options(tmp_path):
    study = load_study(write(tmp_path, STUDY), methods="lora,qlora")
    assert study.methods == ["lora", "qlora"]
    lora = study.configs["lora"]
    assert (lora.batch_size, lora.grad_accum, lora.learning_rate, lora.lora_r) == (4, 1, 2e-4, 8)  # shared/defaults
    assert study.configs["qlora"].batch_size == 4


def test_methods_as_a_list_without_options_and_no_methods_at_all(tmp_path):
    listed = load_study(write(tmp_path, "model: random:tiny\nbatch_size: 3\nmethods: [qlora, full]\n"))
    assert listed.methods == ["qlora", "full"] and {c.batch_size for c in listed.configs.values()} == {3}
    empty_options = load_study(write(tmp_path, "methods:\n  lora:\n  full: {}\n"))
    assert empty_options.methods == ["lora", "full"]
    none = load_study(write(tmp_path, "model: random:tiny\nstore: s.sqlite\n"))
    assert none.methods == ["full", "lora", "qlora"] and none.store == "s.sqlite"
    assert load_study(None, {"model": "random:tiny"}).methods == ["full", "lora", "qlora"]


@pytest.mark.parametrize(
    ("text", "where", "message", "field"),
    [
        # a method's own options: the file and the method in the location, the key as the field
        ("methods:\n  qlora: {batch_sise: 4}\n", "(methods.qlora)", "did you mean 'batch_size'", "batch_sise"),
        ("methods:\n  full: {learning_rate: fast}\n", "(methods.full)", "must be a number", "learning_rate"),
        ("methods:\n  full: {optimizer: sgd}\n", "(methods.full)", "optimizer must be one of", "optimizer"),
        ("methods:\n  lora: {batch_size: 0}\n", "(methods.lora)", "batch_size must be >= 1", "batch_size"),
        ("methods:\n  lora: {model: random:tiny}\n", "(methods.lora)", "shared by every method", "model"),
        ("methods:\n  lora: {out: x}\n", "(methods.lora)", "set by compare", "out"),
        ("methods:\n  lora: {method: full}\n", "(methods.lora)", "set by compare", "method"),
        ("methods:\n  lora: {ppl: none}\n", "(methods.lora)", "shared by every method", "ppl"),
        ("methods:\n  lora: 4\n", "(methods.lora)", "must be a mapping", None),
        # the methods themselves
        ("methods:\n  qlor: {}\n", "", "unknown method 'qlor'; did you mean 'qlora'?", "methods.qlor"),
        ("methods:\n  lora: {}\n  lora: {lora_r: 4}\n", "", "'lora' is given twice (first on line 2)", "lora"),
        ("methods: [lora, dora]\n", "", "subset of full, lora, qlora", "methods"),
        ("methods: 3\n", "", "methods must be a mapping", "methods"),
        # shared options
        ("gen_token: 8\n", "", "did you mean 'gen_tokens'", "gen_token"),
        ("mehtods: [lora]\n", "", "did you mean 'methods'", "mehtods"),
        ("batch_size: many\n", "", "must be an integer", "batch_size"),
        ("method: lora\n", "", "list the methods under methods:", "method"),
        ("ppl_stride: 2048\n", "", "ppl_stride (2048) must not exceed", "ppl_stride"),
        ("- lora\n", "", "a study file is a mapping", None),
    ],
)
def test_bad_studies_name_the_file_the_method_and_the_key(tmp_path, text, where, message, field):
    path = write(tmp_path, text)
    with pytest.raises(UserError, match=re.escape(message)) as info:
        load_study(path)
    assert info.value.file == f"{path} {where}".strip()
    assert info.value.field == field


def test_a_bad_flag_is_blamed_on_the_command_line_not_the_file(tmp_path):
    with pytest.raises(UserError, match="batch_size must be >= 1") as info:
        load_study(write(tmp_path, STUDY), {"batch_size": 0})
    assert info.value.file == "command line"


def run_study(tmp_path, monkeypatch, text: str):
    calls = fake_compare_runs(monkeypatch)
    study = load_study(write(tmp_path, text))
    out = tmp_path / "c"
    result = cmp.compare(
        study.shared, study.methods, study.eval, out_dir=out, log=lambda m: None, command=[], configs=study.configs
    )
    return result, out, calls


def test_each_run_trains_and_is_stored_with_its_own_config(tmp_path, monkeypatch):
    result, out, calls = run_study(tmp_path, monkeypatch, STUDY)
    assert result["runs"] == ["base", "base-nf4", "full", "qlora"]
    trained = [c[-1] for c in calls if c[0] == "train"]
    assert trained == [str(out / "full.yaml"), str(out / "qlora.yaml")]
    written = {m: yaml.safe_load((out / f"{m}.yaml").read_text()) for m in ("full", "qlora")}
    with RunStore(out / "runs.sqlite") as store:
        stored = {r.label: r.config for r in store.runs() if r.kind == "train"}
    for method, (batch, accum, lr, optimizer) in {
        "full": (2, 8, 2e-5, "adamw"),
        "qlora": (4, 4, 2e-4, "paged_adamw_8bit"),
    }.items():
        for config in (written[method], stored[method]):  # what the run got is what the store says
            assert (config["method"], config["batch_size"], config["grad_accum"]) == (method, batch, accum)
            assert (config["learning_rate"], config["optimizer"]) == (lr, optimizer)
            assert config["out"] == str(out / method) and config["max_samples"] == 64
    evals = [c for c in calls if c[0] == "eval" and "--run" in c]
    assert all(c[c.index("--ppl-max-tokens") + 1] == "256" for c in evals)  # the file's eval options


def test_the_bases_follow_the_methods_own_quantization_and_precision(tmp_path, monkeypatch):
    text = (
        "model: random:tiny\nprecision: fp32\nmethods:\n  full: {precision: bf16}\n  lora: {precision: bf16}\n"
        "  qlora: {quant_type: fp4, double_quant: false, precision: fp16}\n"
    )
    result, out, calls = run_study(tmp_path, monkeypatch, text)
    dense, four_bit = [c for c in calls if c[0] == "eval" and "--model" in c]
    assert result["runs"][:2] == ["base", "base-fp4"]
    assert dense[dense.index("--precision") + 1] == "bf16"  # as full and lora train
    assert four_bit[four_bit.index("--quant-type") + 1] == "fp4" and "--no-double-quant" in four_bit
    assert four_bit[four_bit.index("--precision") + 1] == "fp16"  # as qlora trains


def test_dense_methods_that_disagree_leave_the_base_in_the_shared_precision(tmp_path, monkeypatch):
    text = "model: random:tiny\nprecision: fp32\nmethods:\n  full: {precision: bf16}\n  lora: {}\n"
    _, _, calls = run_study(tmp_path, monkeypatch, text)
    (dense,) = [c for c in calls if c[0] == "eval" and "--model" in c]
    assert dense[dense.index("--precision") + 1] == "fp32"


def test_a_baseline_names_one_of_the_methods(tmp_path):
    assert load_study(write(tmp_path, STUDY + "baseline: full\n")).baseline == "full"
    assert load_study(write(tmp_path, STUDY)).baseline is None
    with pytest.raises(UserError, match="baseline 'lora' is none of the methods: full, qlora") as e:
        load_study(write(tmp_path, STUDY + "baseline: lora\n"))
    assert e.value.field == "baseline" and e.value.file.endswith("study.yaml")


def test_the_report_is_measured_against_the_study_baseline(tmp_path, monkeypatch):
    fake_compare_runs(monkeypatch)
    study = load_study(write(tmp_path, STUDY + "baseline: qlora\n"))
    out = tmp_path / "c"
    cmp.compare(study.shared, study.methods, study.eval, out_dir=out, log=lambda m: None, configs=study.configs,
                baseline=study.baseline)  # fmt: skip
    assert "baseline: qlora;" in (out / "report.md").read_text()
