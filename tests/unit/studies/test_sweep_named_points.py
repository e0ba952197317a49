"""Named sweep points (`points:` in a grid file): parsing in both forms, beside a grid or alone, their
errors, their run directories, and the sweep report labelling them by name."""

from __future__ import annotations

import re
import sys

import pytest

from lorafit.base.errors import UserError
from lorafit.reports import write_report
from lorafit.reports.sweep_points import series, sweep_rows, varied_keys
from lorafit.run.store import RunRecord, RunStore
from lorafit.run.summary import Summary
from lorafit.studies import sweep as sweep_module
from lorafit.studies.sweep import load_grid
from tests.helpers import TableReader

BASE = "name: s\nsteps: 2\nbase:\n  model: random:tiny\n  max_samples: 8\n"
AS_MAPPING = BASE + (
    "points:\n"
    "  paged-fp16: {optimizer: paged_adamw, precision: fp16}\n"
    "  adamw_bf16: {optimizer: adamw, precision: bf16}\n"
)
AS_LIST = BASE + (
    "points:\n"
    "  - name: paged-fp16\n    options: {optimizer: paged_adamw, precision: fp16}\n"
    "  - {name: adamw_bf16, optimizer: adamw, precision: bf16}\n"
)


def write(tmp_path, text: str):
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text", [AS_MAPPING, AS_LIST])
def test_named_points_run_as_named_runs(tmp_path, text):
    sweep = load_grid(write(tmp_path, text), tmp_path / "out")
    assert [(p.name, p.label) for p in sweep.points] == [("paged-fp16", "paged-fp16"), ("adamw_bf16", "adamw_bf16")]
    first, second = sweep.points
    assert (first.config.optimizer, first.config.precision) == ("paged_adamw", "fp16")
    assert (second.config.optimizer, second.config.precision) == ("adamw", "bf16")
    assert first.values == {"optimizer": "paged_adamw", "precision": "fp16"}
    for p in sweep.points:  # base options, the sweep's steps, a directory named after the point
        assert (p.config.model, p.config.max_samples, p.config.max_steps) == ("random:tiny", 8, 2)
        assert p.config.out == str(tmp_path / "out" / "points" / f"{p.name}-{p.id}") and p.stem == f"{p.name}-{p.id}"
    assert len({p.id for p in sweep.points}) == 2


def test_both_forms_and_reruns_give_the_same_points(tmp_path):
    mapping = load_grid(write(tmp_path, AS_MAPPING), tmp_path / "a")
    listed = load_grid(write(tmp_path, AS_LIST), tmp_path / "b")
    assert [p.id for p in mapping.points] == [p.id for p in listed.points]


def test_points_beside_a_grid_all_run_and_a_name_makes_its_own_point(tmp_path):
    text = BASE + "grid:\n  batch_size: [1, 2]\npoints:\n  one: {batch_size: 1}\n  wide: {batch_size: 2, lora_r: 4}\n"
    sweep = load_grid(write(tmp_path, text), tmp_path / "out")
    assert [p.label for p in sweep.points] == ["batch_size=1", "batch_size=2", "one", "wide"]
    assert [p.name for p in sweep.points] == [None, None, "one", "wide"]
    grid_one, named_one = sweep.points[0], sweep.points[2]
    assert grid_one.config.to_dict() | {"out": None} == named_one.config.to_dict() | {"out": None}
    assert grid_one.id != named_one.id  # the same options under a name are a point of their own
    assert grid_one.stem == grid_one.id and grid_one.config.out.endswith(f"points/{grid_one.id}")
    renamed = load_grid(write(tmp_path, text.replace("one:", "single:")), tmp_path / "out")
    assert renamed.points[0].id == grid_one.id and renamed.points[2].id != named_one.id
    alone = load_grid(write(tmp_path, BASE + "points:\n  one: {batch_size: 1}\n"), tmp_path / "out")
    assert [p.id for p in alone.points] == [named_one.id]


@pytest.mark.parametrize(
    ("points", "where", "message", "field"),
    [
        (
            "  fast: {batch_sise: 4}\n",
            "(points.fast)",
            "unknown option 'batch_sise'; did you mean 'batch_size'?",
            "batch_sise",
        ),
        ("  fast: {batch_size: four}\n", "(points.fast)", "batch_size must be an integer", "batch_size"),
        ("  fast: {out: somewhere}\n", "(points.fast)", "'out' is set by the sweep", "out"),
        ("  fast: {max_steps: 9}\n", "(points.fast)", "'max_steps' is set by the sweep", "max_steps"),
        ("  fast:\n", "(points.fast)", "point 'fast' sets no options", None),
        ("  fast: {}\n", "(points.fast)", "point 'fast' sets no options", None),
        ("  fast: 4\n", "(points.fast)", "point 'fast' must be a mapping of option: value", None),
        ("  fast: {batch_size: 0}\n", "", "point 'fast': batch_size must be >= 1", "batch_size"),
        ("  fast: {lora_r: 4}\n  fast: {lora_r: 8}\n", "", "'fast' is given twice (first on line 7)", "fast"),
        ("  - {name: fast, lora_r: 4}\n  - {name: fast, lora_r: 8}\n", "", "point name 'fast' is used twice", "points"),
        ("  - {name: fast}\n", "(points.fast)", "point 'fast' sets no options", None),
        ("  - {lora_r: 4}\n", "", "points[0] must be a mapping with a name", "points"),
        ("  - {name: f, options: {lora_r: 4}, seed: 1}\n", "", "both under options: and beside its name", "points"),
        ("  fast lane: {lora_r: 4}\n", "", "point name 'fast lane' must be 1-64 letters", "points"),
        ("  r=4: {lora_r: 4}\n", "", "point name 'r=4' must be 1-64 letters", "points"),
    ],
)
def test_bad_points_name_the_file_the_point_and_the_field(tmp_path, points, where, message, field):
    path = write(tmp_path, BASE + "points:\n" + points)
    with pytest.raises(UserError, match=re.escape(message)) as info:
        load_grid(path, tmp_path)
    assert info.value.file == f"{path} {where}".strip()
    assert info.value.field == field


def test_a_duplicate_point_name_is_refused_with_its_line(tmp_path):
    path = write(tmp_path, BASE + "points:\n  fast: {lora_r: 4}\n  slow: {lora_r: 2}\n  fast: {lora_r: 8}\n")
    with pytest.raises(UserError) as info:
        load_grid(path, tmp_path)
    assert (info.value.line, str(info.value).split(":")[0]) == (9, str(path))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (BASE + "points: [1, 2]\n", "points[0] must be a mapping with a name"),
        (BASE + "points: fast\n", "points must be a mapping of name: options"),
        (BASE + "points: {}\n", "grid a non-empty mapping of option: [values] or points a non-empty mapping"),
        (BASE + "grid:\n  batch_size: [2, 2]\n", "points 'batch_size=2' and 'batch_size=2' are the same point"),
    ],
)
def test_bad_points_sections(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(UserError, match=re.escape(message)) as info:
        load_grid(path, tmp_path)
    assert info.value.file == str(path)


def test_a_named_point_logs_and_runs_under_its_name(tmp_path, monkeypatch):
    sweep = load_grid(write(tmp_path, BASE + "points:\n  fast: {lora_r: 4}\n"), tmp_path / "out")
    seen = []

    def command(config_file):
        seen.append(config_file)
        return [sys.executable, "-c", "import sys; print('ran', file=sys.stderr)"]

    monkeypatch.setattr(sweep_module, "point_command", command)
    with RunStore(tmp_path / "runs.sqlite") as store:
        results = sweep_module.run_sweep(sweep, store, tmp_path / "out")
        (stored,) = store.runs(group_name="s")
    (point,) = sweep.points
    assert seen == [tmp_path / "out" / "points" / f"fast-{point.id}.yaml"]
    assert (tmp_path / "out" / "points" / f"fast-{point.id}.log").read_text().strip() == "ran"
    assert (stored.id, stored.label, results[point.id].label) == (point.id, "fast", "fast")
    assert stored.run_dir == str(tmp_path / "out" / "points" / f"fast-{point.id}")


# ---------------------------------------------------------------- the sweep report


def record(label: str, batch: int, optimizer: str, tps: float) -> RunRecord:
    config = {"batch_size": batch, "max_length": 256, "optimizer": optimizer, "precision": "fp16", "out": "x"}
    summary = Summary.from_dict(
        {"status": "ok", "tokens_per_s": tps, "peak_memory": {"peak_bytes": 2**30 * batch, "kind": "cuda"}}
    )
    return RunRecord(label, "sweep", "ok", config, summary=summary)


RECORDS = [
    record("batch_size=1", 1, "adamw", 100.0),
    record("batch_size=2", 2, "adamw", 150.0),
    record("paged", 2, "paged_adamw", 190.0),
    record("baseline", 1, "adamw", 90.0),
]


def test_named_points_are_their_own_series_under_their_names():
    rows = sweep_rows(RECORDS)
    assert [r["named"] for r in rows] == [False, False, True, True]
    assert varied_keys(rows) == ["batch_size", "optimizer"]
    groups = series(rows, "batch_size", varied_keys(rows))
    assert {name: [r["label"] for r in g] for name, g in groups.items()} == {
        "optimizer=adamw": ["batch_size=1", "batch_size=2"],
        "paged": ["paged"],
        "baseline": ["baseline"],
    }


def test_the_sweep_report_labels_named_points_by_name_with_what_they_set(tmp_path):
    html_path, md_path = write_report(RECORDS, tmp_path, "named")
    text = html_path.read_text()
    assert "Best configuration: paged at 190.0 tokens/s" in text
    reader = TableReader()
    reader.feed(text)
    points, named = reader.tables[0], reader.tables[1]
    assert [row[0] for row in points[1:]] == ["batch_size=1", "batch_size=2", "paged", "baseline"]
    assert named == [
        ["point", "settings"],
        ["paged", "batch_size=2 optimizer=paged_adamw"],
        ["baseline", "batch_size=1 optimizer=adamw"],
    ]
    assert 'data-chart="choice_optimizer"' in text
    md = md_path.read_text()
    assert "## Named points" in md and "| paged | batch_size=2 optimizer=paged_adamw |" in md
    grid_only, _ = write_report(RECORDS[:2], tmp_path / "grid", "grid")
    assert "Named points" not in grid_only.read_text()
