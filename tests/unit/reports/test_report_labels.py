"""`lorafit report DIR...` labels each evaluation as `eval` named it, and shows every run's perplexity
before -> after against the base it was trained on: LoRA against the dense base, QLoRA against the
4-bit base of its own quantization."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorafit.base.errors import UserError
from lorafit.cli.main import app
from lorafit.reports.compare import build_rows
from lorafit.run.rundir import RunDir
from lorafit.run.store import RunRecord
from lorafit.run.summary import Summary
from tests.helpers import TableReader, trained_run_dir

EVAL = ["--ppl-max-tokens", "64", "--ppl-max-length", "32", "--ppl-stride", "16", "--no-gen"]


def invoke(*args: str) -> None:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output


def make_run(root: Path, adapter_dir: Path, **train) -> Path:
    """A finished run as training leaves it (config.yaml, adapter/, summary.json), then `lorafit eval --run`."""
    trained_run_dir(root, adapter_dir, precision=None, **train)
    RunDir(root).write_summary(Summary.from_dict({"schema_version": 2, "status": "ok", "method": train["method"]}))
    invoke("eval", "--run", str(root), *EVAL)
    return root


def ppl(directory: Path) -> float:
    return json.loads((directory / "eval.json").read_text())["perplexity"]["ppl"]


def report_cells(tmp_path: Path, *dirs: Path) -> dict[str, dict[str, str]]:
    invoke("report", *map(str, dirs), "--out", str(tmp_path / "report"))
    reader = TableReader()
    reader.feed((tmp_path / "report" / "report.html").read_text())
    head, *rows = reader.tables[0]
    return {row[0]: dict(zip(head, row, strict=True)) for row in rows}


def test_report_of_directories_shows_lora_and_qlora_against_their_own_bases(tmp_path, adapter_dir):
    base, nf4 = tmp_path / "base", tmp_path / "base-nf4"
    invoke("eval", "--model", "random:tiny", *EVAL, "--out", str(base))
    invoke("eval", "--model", "random:tiny", "--method", "qlora", *EVAL, "--out", str(nf4))
    qlora = make_run(tmp_path / "qlora", adapter_dir, method="qlora")
    lora = make_run(tmp_path / "lora", adapter_dir, method="lora")
    assert f"{ppl(base):.2f}" != f"{ppl(nf4):.2f}"  # 4-bit rounding shows: the test can tell the bases apart
    cells = report_cells(tmp_path, base, nf4, qlora, lora)
    assert list(cells) == ["base", "base-nf4", "qlora", "lora"]
    assert cells["qlora"]["perplexity"] == f"{ppl(nf4):.2f} → {ppl(qlora):.2f}"
    assert cells["lora"]["perplexity"] == f"{ppl(base):.2f} → {ppl(lora):.2f}"
    assert cells["base-nf4"]["perplexity"] == f"{ppl(nf4):.2f}"


def test_a_qlora_run_is_matched_with_the_4bit_base_of_its_quantization(tmp_path, adapter_dir):
    nf4, fp4 = tmp_path / "nf4", tmp_path / "fp4"
    invoke("eval", "--model", "random:tiny", "--method", "qlora", *EVAL, "--out", str(nf4))
    invoke("eval", "--model", "random:tiny", "--method", "qlora", "--quant-type", "fp4", "--no-double-quant", *EVAL,
           "--out", str(fp4))  # fmt: skip
    assert json.loads((fp4 / "eval.json").read_text())["quantization"] == {"quant_type": "fp4", "double_quant": False}
    qlora = make_run(tmp_path / "qlora", adapter_dir, method="qlora", quant_type="fp4", double_quant=False)
    assert f"{ppl(nf4):.2f}" != f"{ppl(fp4):.2f}"
    cells = report_cells(tmp_path, nf4, fp4, qlora)
    assert list(cells) == ["base-nf4", "base-fp4", "qlora"]
    assert cells["qlora"]["perplexity"] == f"{ppl(fp4):.2f} → {ppl(qlora):.2f}"


def test_eval_refuses_quantization_flags_without_a_4bit_base():
    result = CliRunner().invoke(app, ["eval", "--model", "random:tiny", "--quant-type", "fp4", "--ppl", "none"])
    assert isinstance(result.exception, UserError) and result.exception.field == "quant_type"
    assert "give --method qlora" in str(result.exception)


# ---------------------------------------------------------------- the rows, from stored records


def base_eval(label: str, ppl_value: float, quantization: dict | None = None) -> RunRecord:
    record = {"label": label, "method": "base", "perplexity": {"ppl": ppl_value}}
    if quantization is not None:
        record["quantization"] = quantization
    return RunRecord(label, "eval", "ok", {}, eval=record)


def trained(label: str, method: str, ppl_value: float, **config) -> RunRecord:
    summary = Summary.from_dict({"schema_version": 2, "status": "ok", "method": method})
    return RunRecord(label, "train", "ok", {"method": method, **config}, summary, {"perplexity": {"ppl": ppl_value}})


@pytest.mark.parametrize(
    ("config", "before"),
    [
        ({"quant_type": "fp4", "double_quant": False}, 12.0),
        ({"quant_type": "nf4", "double_quant": True}, 11.0),
        ({"quant_type": "nf4", "double_quant": False}, None),  # no base stored that way: n/a, not the dense one
    ],
)
def test_ppl_before_comes_from_the_base_of_the_same_quantization(config, before):
    records = [
        base_eval("base", 10.0),
        base_eval("base-nf4", 11.0, {"quant_type": "nf4", "double_quant": True}),
        base_eval("base-fp4", 12.0, {"quant_type": "fp4", "double_quant": False}),
        trained("qlora", "qlora", 9.0, **config),
    ]
    assert build_rows(records)[-1]["ppl_before"] == before


def test_an_older_4bit_base_evaluation_is_known_by_its_label():
    """eval.json before the quantization was recorded: "base-nf4" was always NF4 with double quantization."""
    records = [base_eval("base", 10.0), base_eval("base-nf4", 11.0), trained("qlora", "qlora", 9.0)]
    rows = build_rows(records)
    assert [r["ppl_before"] for r in rows] == [None, None, 11.0]
