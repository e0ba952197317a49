"""A QLoRA run trained with --quant-type fp4 --no-double-quant is evaluated, merged and reported on that
4-bit base, not on the default NF4 one (issue 17, item 5), end to end through the CLI."""

from __future__ import annotations

import json

import pytest

from tests.helpers import TableReader, lorafit

EVAL = ["--ppl-max-tokens", "64", "--ppl-max-length", "32", "--ppl-stride", "16", "--no-gen"]
FP4 = {"quant_type": "fp4", "double_quant": False}


@pytest.fixture(scope="module")
def fp4_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("fp4") / "qlora"
    train = ["train", "--model", "random:tiny", "--method", "qlora", "--quant-type", "fp4", "--no-double-quant"]
    proc = lorafit(*train, "--max-samples", "8", "--max-length", "64", "--max-steps", "2", "--out", str(run))
    assert proc.returncode == 0, proc.stderr
    return run


def test_eval_merge_and_report_use_the_runs_own_4bit_base(fp4_run, tmp_path):
    proc = lorafit("eval", "--run", str(fp4_run), *EVAL, "--json")
    assert proc.returncode == 0, proc.stderr
    evaluation = json.loads((fp4_run / "eval.json").read_text())
    summary = json.loads((fp4_run / "summary.json").read_text())
    assert evaluation["quantization"] == FP4 and evaluation["precision"] == summary["precision"]

    proc = lorafit("merge", str(fp4_run), "--out", str(tmp_path / "merged"), "--dtype", "fp32", "--json")
    assert proc.returncode == 0, proc.stderr
    trained = json.loads((tmp_path / "merged" / "merge.json").read_text())["vs_trained_4bit"]
    assert trained["quantization"] == FP4 and trained["prompts"] == 4

    base = tmp_path / "base-fp4"
    four_bit = ["--method", "qlora", "--quant-type", "fp4", "--no-double-quant"]
    proc = lorafit("eval", "--model", "random:tiny", *four_bit, *EVAL, "--out", str(base))
    assert proc.returncode == 0, proc.stderr
    proc = lorafit("report", str(base), str(fp4_run), "--out", str(tmp_path / "report"))
    assert proc.returncode == 0, proc.stderr
    reader = TableReader()
    reader.feed((tmp_path / "report" / "report.html").read_text())
    head, *rows = reader.tables[0]
    cells = {row[0]: dict(zip(head, row, strict=True)) for row in rows}
    before = json.loads((base / "eval.json").read_text())["perplexity"]["ppl"]
    assert list(cells) == ["base-fp4", "qlora"]
    assert cells["qlora"]["perplexity"] == f"{before:.2f} → {evaluation['perplexity']['ppl']:.2f}"
