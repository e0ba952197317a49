"""`lorafit sweep` with named points end to end on the tiny random model: each point runs under its
name (the store's label, its run directory), and the report labels it by name with what it sets."""

from __future__ import annotations

import json
from pathlib import Path

from lorafit.run.store import RunStore
from tests.helpers import TableReader, lorafit

GRID = """\
name: named
steps: 1
base: {model: random:tiny, max_samples: 4, max_length: 48, profile_warmup_steps: 0}
points:
  narrow: {batch_size: 1}
  wide: {batch_size: 2, lora_r: 4}
"""


def test_named_points_run_and_are_reported_under_their_names(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID)
    out = tmp_path / "out"
    proc = lorafit("sweep", str(grid), "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["label"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])}
    assert set(rows) == {"narrow", "wide"} and {r["status"] for r in rows.values()} == {"ok"}
    for name, batch, rank in (("narrow", 1, 16), ("wide", 2, 4)):
        row = rows[name]
        assert Path(row["run_dir"]).name == f"{name}-{row['id']}"
        assert (row["config"]["batch_size"], row["config"]["lora_r"]) == (batch, rank)
        assert row["summary"]["steps"] == 1 and (out / "points" / f"{name}-{row['id']}.log").is_file()
    with RunStore(out / "runs.sqlite") as store:
        assert sorted(r.label for r in store.runs(group_name="named")) == ["narrow", "wide"]
    reader = TableReader()
    reader.feed((out / "report.html").read_text())
    points, named = reader.tables[0], reader.tables[1]
    assert [row[0] for row in points[1:]] == ["narrow", "wide"]
    assert named[1:] == [
        ["narrow", "lora_r=16 lora_alpha=32.0 batch_size=1"],  # alpha follows the rank (2 x r)
        ["wide", "lora_r=4 lora_alpha=8.0 batch_size=2"],
    ]
    again = lorafit("sweep", str(grid), "--out", str(out))  # stored under their names: nothing runs again
    assert again.returncode == 0 and again.stderr.count("ok (stored)") == 2
