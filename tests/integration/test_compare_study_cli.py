"""`lorafit compare --config study.yaml` end to end on the tiny random model: two methods, each with its
own batch size and learning rate, a flag over the file's shared option; each run's stored config, its
run directory's config.yaml and its summary say it trained as its method was told."""

from __future__ import annotations

import json
import math

from lorafit.run.rundir import RunDir
from lorafit.run.store import RunStore
from tests.helpers import TableReader, lorafit

STUDY = """\
model: random:tiny
data: alpaca
max_samples: 6
max_length: 96
profile_warmup_steps: 0
ppl: none
gen: false
methods:
  lora: {batch_size: 2, learning_rate: 1.0e-3}
  full: {batch_size: 3, learning_rate: 1.0e-5, optimizer: adamw}
"""


def test_each_method_trains_with_its_own_settings(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text(STUDY)
    out = tmp_path / "cmp"
    proc = lorafit("compare", "--config", str(study), "--max-length", "48", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["runs"] == ["base", "lora", "full"] and set(result["status"].values()) == {"ok"}
    with RunStore(out / "runs.sqlite") as store:
        runs = {r.label: r for r in store.runs(group_name="cmp") if r.kind == "train"}
    for method, batch, lr in (("lora", 2, 1e-3), ("full", 3, 1e-5)):
        stored, written = runs[method].config, RunDir(out / method).config()
        assert (stored["method"], stored["batch_size"], stored["learning_rate"]) == (method, batch, lr)
        assert (written.method, written.batch_size, written.learning_rate) == (method, batch, lr)
        assert stored["max_length"] == written.max_length == 48  # the flag over the file's 96
        summary = runs[method].summary
        assert summary.steps == math.ceil(6 / batch)  # one epoch of 6 samples in batches of its own size
        assert summary.data.samples == 6
    reader = TableReader()
    reader.feed((out / "report.html").read_text())
    assert [row[0] for row in reader.tables[0][1:]] == ["base", "lora", "full"]


def test_a_bad_study_stops_before_anything_runs_naming_file_method_and_key(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text("model: random:tiny\nmethods:\n  qlora: {batch_sise: 4}\n")
    proc = lorafit("compare", "--config", str(study), "--out", str(tmp_path / "cmp"), columns=400)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    message = f"{study} (methods.qlora), field 'batch_sise': unknown option 'batch_sise'; did you mean 'batch_size'?"
    assert message in proc.stderr
    assert not (tmp_path / "cmp").exists()
