""" "Will it fit?": the form's answer is the estimator's, its command trains what was estimated, and a model
outside the run roots and the working directory is refused."""

from __future__ import annotations

import json
import shlex

import pytest
from typer.testing import CliRunner

from lorafit.base.config import build_config
from lorafit.base.errors import UserError
from lorafit.measurement import estimate as est
from lorafit.ui.fit import FitRequest, config_of, fit


def test_cpu_estimate_equals_the_estimator_but_for_the_process_size(tmp_path):
    form = FitRequest(model="random:tiny", method="qlora", batch_size=3, max_length=128, lora_r=4, device="cpu")
    answer = fit(form, [tmp_path])
    direct = est.estimate(build_config(None, {"model": "random:tiny", "method": "qlora", "batch_size": 3,
                                              "max_length": 128, "lora_r": 4, "device": "cpu"}), "cpu")  # fmt: skip
    direct_dict = direct.to_dict()
    for part in (answer["estimate"]["parts"], direct_dict["parts"]):
        part.pop("runtime")  # the resident size of the process that estimates (this one, measured twice)
    assert {k: v for k, v in answer["estimate"].items() if k != "total"} == {
        k: v for k, v in direct_dict.items() if k != "total"
    }
    assert answer["fits"] is None and answer["max_batch"] is None


def test_the_command_trains_the_estimated_configuration(tmp_path, monkeypatch):
    """The command's flags, parsed by `lorafit train`'s own flag parsing, give the config that was estimated."""
    import lorafit.training.loop as loop
    from lorafit.cli import main

    form = FitRequest(model="random:tiny", method="full", batch_size=2, max_length=64, precision="bf16")
    form = form.model_copy(update={"optimizer": "adamw_8bit", "gradient_checkpointing": True, "packing": True})
    form = form.model_copy(update={"lora_r": 16, "device": "cuda"})
    answer = fit(form, [tmp_path])
    args = shlex.split(answer["command"])
    assert args[:2] == ["lorafit", "train"] and "--lora-r" not in args  # 16 is the default: left out
    seen = []
    monkeypatch.setattr(loop, "train", lambda cfg, *a, **k: seen.append(cfg) or (_ for _ in ()).throw(SystemExit(0)))
    CliRunner().invoke(main.app, args[1:])
    assert len(seen) == 1, "lorafit train did not parse the command"
    assert est.estimate(seen[0], "cuda").to_dict() == answer["estimate"]


@pytest.mark.parametrize("spec", ["../outside", "/", "someone/hub-model", "random:nope", ""])
def test_models_outside_the_allowed_directories_are_refused(tmp_path, spec):
    inside = tmp_path / "root"
    inside.mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "config.json").write_text(json.dumps(est.model_config("random:tiny")))
    with pytest.raises(UserError) as e:
        config_of(FitRequest(model=spec), [inside])
    assert e.value.field == "model"


def test_a_relative_model_directory_is_read_from_the_working_directory(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(est.model_config("random:tiny")))
    cfg = config_of(FitRequest(model="m", device="cuda"), [tmp_path / "runs", tmp_path])
    assert cfg.model == str(tmp_path / "m")
