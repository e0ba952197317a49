import pytest

from lorafit.base.config import TrainConfig, build_config
from lorafit.base.errors import UserError


def test_flags_override_file(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("method: qlora\nlearning_rate: 2e-4\nlora_r: 8\n")
    cfg = build_config(f, {"learning_rate": 1e-4, "batch_size": None})
    assert (cfg.method, cfg.learning_rate, cfg.lora_r, cfg.batch_size) == ("qlora", 1e-4, 8, 4)


def test_lora_alpha_defaults_to_twice_rank():
    assert TrainConfig(lora_r=8).lora_alpha == 16
    assert TrainConfig(lora_r=8, lora_alpha=4).lora_alpha == 4


def test_unknown_key_suggests_closest(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("lerning_rate: 0.1\n")
    with pytest.raises(UserError) as e:
        build_config(f)
    assert "learning_rate" in str(e.value) and str(f) in str(e.value) and e.value.field == "lerning_rate"


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        ("batch_size: four\n", "batch_size"),
        ("packing: 3\n", "packing"),
        ("method: lorax\n", "method"),
        ("lora_r: 0\n", "lora_r"),
        ("target_modules: 7\n", "target_modules"),
    ],
)
def test_wrong_values_name_the_field(tmp_path, yaml_text, field):
    f = tmp_path / "run.yaml"
    f.write_text(yaml_text)
    with pytest.raises(UserError) as e:
        build_config(f)
    assert e.value.field == field


def test_invalid_yaml_names_line(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("method: lora\nbatch_size: [1,\n")
    with pytest.raises(UserError) as e:
        build_config(f)
    assert e.value.file == str(f) and e.value.line is not None


def test_fp16_on_cpu_is_refused():
    from lorafit.base.device import resolve_precision

    with pytest.raises(UserError, match="fp16 needs a GPU"):
        resolve_precision(TrainConfig(precision="fp16").precision, "cpu")
    assert resolve_precision(TrainConfig().precision, "cpu") == "fp32"
    assert resolve_precision(TrainConfig().precision, "cuda", bf16_ok=True) == "bf16"
    assert resolve_precision("auto", "cuda", bf16_ok=False) == "fp16"
