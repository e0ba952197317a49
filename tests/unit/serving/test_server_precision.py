"""`serve --precision`: the base is loaded in the dtype asked for (through base.device, as train does)."""

import pytest
import torch

from lorafit.base.config import ServeConfig
from lorafit.base.errors import UserError
from lorafit.serving.server import build


def base_dtypes(model) -> set[torch.dtype]:
    return {p.dtype for name, p in model.named_parameters() if "lora_" not in name}


@pytest.mark.parametrize(
    "precision, dtype", [("auto", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16)]
)
def test_server_loads_the_base_in_the_precision_asked(adapter_dir, precision, dtype):
    cfg = ServeConfig(model="random:tiny", device="cpu", precision=precision, adapter=[f"one={adapter_dir}"])
    engine, _ = build(cfg)
    assert base_dtypes(engine.model) == {dtype}
    with torch.no_grad():  # the model computes in that dtype with the adapter's batched branch installed
        logits = engine.model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()


def test_server_refuses_fp16_on_cpu():
    with pytest.raises(UserError) as e:
        build(ServeConfig(model="random:tiny", device="cpu", precision="fp16"))
    assert e.value.field == "precision"
