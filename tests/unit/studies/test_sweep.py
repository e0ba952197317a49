"""Grid files: expansion, point ids, validation errors; sizes; how a point's exit becomes a status."""

from __future__ import annotations

import signal

import pytest

from lorafit.base.errors import EXIT_OUT_OF_MEMORY, UserError
from lorafit.base.units import parse_bytes
from lorafit.run.runner import describe_failure
from lorafit.studies.sweep import load_grid

GRID = """\
name: g
steps: 2
base:
  model: random:tiny
  max-samples: 8
grid:
  method: [lora, qlora]
  batch_size: [1, 2, 4]
"""


def write(tmp_path, text: str):
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return path


def test_grid_expands_to_every_combination_with_stable_ids(tmp_path):
    sweep = load_grid(write(tmp_path, GRID), tmp_path / "out")
    assert sweep.name == "g" and sweep.steps == 2
    assert [p.label for p in sweep.points] == [
        f"method={m} batch_size={b}" for m in ("lora", "qlora") for b in (1, 2, 4)
    ]
    for p in sweep.points:
        assert p.config.max_steps == 2 and p.config.max_samples == 8 and p.config.model == "random:tiny"
        assert p.config.method == p.values["method"] and p.config.batch_size == p.values["batch_size"]
        assert p.config.out == str(tmp_path / "out" / "points" / p.id)
    assert len({p.id for p in sweep.points}) == 6
    again = load_grid(write(tmp_path, GRID), tmp_path / "elsewhere")  # same options, other directory
    assert [p.id for p in again.points] == [p.id for p in sweep.points]
    budget = load_grid(write(tmp_path, GRID), tmp_path / "out", memory_budget="8GB")
    assert all(p.config.memory_budget == "8GB" for p in budget.points)
    assert not {p.id for p in budget.points} & {p.id for p in sweep.points}  # a budget makes other points


def test_scalar_grid_value_and_default_name(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("grid:\n  lora_r: 8\n")
    sweep = load_grid(path, tmp_path)
    assert sweep.name == "mine" and sweep.steps == 3 and [p.config.lora_r for p in sweep.points] == [8]


@pytest.mark.parametrize(
    ("text", "message", "field"),
    [
        ("grid:\n  batch_sise: [1]\n", "did you mean 'batch_size'", "batch_sise"),
        ("base:\n  lr: 1\ngrid:\n  lora_r: [8]\n", "unknown option 'lr'", "lr"),
        ("grid:\n  batch_size: [1, two]\n", "batch_size", "batch_size"),
        ("grid:\n  method: [lora, qlora4]\n", "point method=qlora4", "method"),
        ("grid:\n  batch_size: [0]\n", "batch_size must be >= 1", "batch_size"),
        ("grid:\n  out: [a]\n", "set by the sweep", "out"),
        ("steps: 0\ngrid:\n  lora_r: [8]\n", "steps must be an integer", "steps"),
        ("grids:\n  lora_r: [8]\n", "unknown key 'grids'", "grids"),
        ("base: {}\n", "non-empty mapping", None),
        ("- a\n- b\n", "a grid file is a mapping", None),
        ("grid: [1\n", "invalid YAML", None),
        ("grid:\n  lora_r: [8]\nmemory_budget: lots\n", "size like 8GB", "memory_budget"),
    ],
)
def test_bad_grids_name_the_file_and_field(tmp_path, text, message, field):
    path = write(tmp_path, text)
    with pytest.raises(UserError, match=message) as info:
        load_grid(path, tmp_path)
    assert str(path) in str(info.value)
    if field is not None:
        assert info.value.field == field


def test_missing_grid_file(tmp_path):
    with pytest.raises(UserError, match="cannot read grid"):
        load_grid(tmp_path / "nope.yaml", tmp_path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8GB", 8 * 10**9), ("8 GiB", 8 * 2**30), ("512MiB", 512 * 2**20), ("1.5gb", 1_500_000_000), ("100", 100)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text, "memory_budget") == expected


@pytest.mark.parametrize("text", ["", "GB", "8 GB extra", "-1GB", "0", "8XB"])
def test_parse_bytes_refuses(text):
    with pytest.raises(UserError) as info:
        parse_bytes(text, "memory_budget")
    assert info.value.field == "memory_budget"


def test_exit_status_of_a_point():
    assert describe_failure(EXIT_OUT_OF_MEMORY, "MemoryBudgetExceeded: ...") == (
        "oom",
        "out of memory: MemoryBudgetExceeded: ...",
    )
    assert describe_failure(EXIT_OUT_OF_MEMORY, "out of memory: peak RSS") == ("oom", "out of memory: peak RSS")
    assert describe_failure(-signal.SIGKILL, "")[0] == "oom"
    status, error = describe_failure(-signal.SIGSEGV, "")
    assert status == "failed" and "SIGSEGV" in error
    status, error = describe_failure(1, "Traceback: boom")
    assert status == "failed" and error == "exit 1: Traceback: boom"


def test_shipped_example_grids_load(tmp_path):
    from pathlib import Path

    examples = sorted((Path(__file__).parents[3] / "examples" / "sweeps").glob("*.yaml"))
    sizes = {p.stem: len(load_grid(p, tmp_path).points) for p in examples}
    assert sizes == {"cpu-smollm2": 8, "rtx4060-qwen2.5-1.5b": 160}
