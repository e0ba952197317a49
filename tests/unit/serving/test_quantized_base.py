"""`serve --quantize nf4|fp4`: the base is loaded 4-bit through bitsandbytes, as QLoRA trains on it, and
mixed-adapter batches over its Linear4bit layers take lorafit's batched branch and equal plain peft,
one request at a time with set_adapter, on the same 4-bit base.

Tolerance of the logit comparisons (fp32 compute): both paths use the same 4-bit weights, which
bitsandbytes dequantizes and multiplies the same way (peft's own mixed batch equals set_adapter
bit for bit here). The batched branch folds the scaling into B, zero-pads ranks and sums in `bmm`,
where peft computes B(A x) * scaling per adapter: the same fp32 sums in another order, each rounding
~1e-7 relative, through two layers. Measured: at most 2.0e-6 (nf4) and 1.5e-6 (fp4) on logits of
magnitude ~0.75, so TOL = 1e-5 (the dense test's bound, tests/unit/adapters/test_batched_lora.py)
leaves a 5x margin; the adapters move logits by ~1.1, five orders of magnitude above it, so the
comparison tells a wrong adapter (or a row's adapter applied to another row) from rounding.

In bf16 (the GPU serving precision) both paths add an fp32 LoRA update rounded to bf16 to a bf16
base output; when the two fp32 updates differ in their last bits, the rounding can land one bf16
ulp apart (2^-8 = 0.0039 for values in [0.5, 1)), in any of the layers, the KV cache carrying it to
later steps: BF16_TOL = 2^-6, four ulps. Measured over 6 decode steps: at most 0.0039 (one ulp) in
bf16, and 2.8e-7 (nf4) and 4.2e-7 (fp4) in fp32; the adapters' effect (~1.1) is 70x the bf16 bound.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from lorafit.adapters.methods import quantization_config
from lorafit.base.config import ServeConfig, TrainConfig
from lorafit.inputs import models
from lorafit.inputs.models import release_checkpoint
from lorafit.serving.kv_batch import DecodeBatch
from lorafit.serving.registry import BASE
from lorafit.serving.server import build
from tests.helpers import stacked_forward

TOL = 1e-5  # see the module docstring
BF16_TOL = 2**-6  # four bf16 ulps at |logit| < 1: see the module docstring


def four_bit_layers(model) -> list:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory) -> dict[str, Path]:
    """Three adapters for random:tiny with random (not zero) B, of different ranks and targets, so each
    moves the logits well above the comparison's tolerance."""
    out = tmp_path_factory.mktemp("adapters")
    base = models.load_model(models.resolve("random:tiny"), torch.float32)
    configs = {
        "x1": LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        "x2": LoraConfig(r=8, lora_alpha=32, target_modules=["k_proj", "down_proj"], init_lora_weights=False),
        "x3": LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False),
    }
    for i, (name, config) in enumerate(configs.items()):
        torch.manual_seed(100 + i)
        model = get_peft_model(base, config)
        model.save_pretrained(out / name)
        base = model.unload()
    return {name: out / name for name in configs}


def reference_model(quant: str, adapters: dict[str, Path], dtype: torch.dtype = torch.float32):
    """Plain transformers + peft on its own 4-bit load of the same base, quantized as QLoRA training
    quantizes it (`quantization_config` of a default qlora TrainConfig: double quantization on)."""
    source = models.resolve("random:tiny")
    training = quantization_config(TrainConfig(method="qlora", quant_type=quant), dtype)
    base = models.load_model(source, dtype, training)
    names = list(adapters)
    model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    return model.eval()


@pytest.mark.parametrize("quant, precision, dtype", [("nf4", "fp32", torch.float32), ("fp4", "bf16", torch.bfloat16)])
def test_server_loads_the_base_in_4bit(adapter_dir, quant, precision, dtype):
    cfg = ServeConfig(
        model="random:tiny", device="cpu", precision=precision, quantize=quant, adapter=[f"one={adapter_dir}"]
    )
    engine, _ = build(cfg)
    layers = four_bit_layers(engine.model)
    assert len(layers) == 2 * 7  # every projection of both decoder layers (the output layer stays dense)
    lora_layers = [m for m in engine.model.modules() if hasattr(m, "lora_A") and m.lora_A]
    assert lora_layers and all(hasattr(m, "_lorafit_peft_forward") for m in lora_layers)  # batched branch on
    for layer in layers:
        state = layer.weight.quant_state
        assert state.quant_type == quant
        assert state.nested  # double quantization, as QLoRA trains
        assert layer.compute_dtype == dtype  # the serving precision
    with torch.no_grad():
        logits = engine.model(input_ids=torch.tensor([[1, 2, 3]]), adapter_names=["one"]).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()


def test_dense_base_unless_asked(adapter_dir):
    engine, _ = build(ServeConfig(model="random:tiny", device="cpu", adapter=[f"one={adapter_dir}"]))
    assert four_bit_layers(engine.model) == []


def test_batched_branch_runs_over_linear4bit_and_equals_peft(lora_dirs):
    model = reference_model("nf4", lora_dirs)
    names = ["x1", BASE, "x3", "x2", "x1"]
    ids = torch.randint(5, 4000, (len(names), 12))
    with torch.no_grad():
        one_at_a_time = []
        for i, name in enumerate(names):
            if name == BASE:
                with model.disable_adapter():
                    one_at_a_time.append(model(input_ids=ids[i : i + 1]).logits)
            else:
                model.set_adapter(name)
                one_at_a_time.append(model(input_ids=ids[i : i + 1]).logits)
        expected = torch.cat(one_at_a_time)
        got, base_only, calls = stacked_forward(model, ids, names)
    assert calls == 2 * 7  # every LoRA projection (all Linear4bit) took the stacked path
    torch.testing.assert_close(got, expected, rtol=TOL, atol=TOL)
    assert (got - base_only).abs().max() > 0.1  # the adapters matter here, far above the tolerance


class Row:
    def __init__(self, prompt_ids: list[int], adapter: str) -> None:
        self.prompt_ids, self.adapter = prompt_ids, adapter


@pytest.mark.parametrize(
    "quant, precision, tol",
    [("nf4", "fp32", TOL), ("fp4", "fp32", TOL), ("nf4", "bf16", BF16_TOL)],
)
def test_served_mixed_batch_equals_set_adapter_one_request_at_a_time(lora_dirs, quant, precision, tol):
    """The server's model (4-bit base, batched branch) decoding a left-padded mixed batch with its KV
    cache: every row's logits at every step within `tol` of peft's set_adapter on its own prompt, and
    the greedy tokens equal."""
    cfg = ServeConfig(
        model="random:tiny",
        device="cpu",
        precision=precision,
        quantize=quant,
        adapter=[f"{n}={p}" for n, p in lora_dirs.items()],
    )
    engine, _ = build(cfg)
    reference = reference_model(quant, lora_dirs, torch.bfloat16 if precision == "bf16" else torch.float32)
    rows = [Row([5, 9, 300, 41, 7], "x1"), Row([77, 3000], "x2"), Row([8, 8, 8, 1200], BASE), Row([12, 13, 14], "x3")]
    steps = 6
    with torch.no_grad(), engine.registry.lock:
        batch = DecodeBatch.prefill(engine.model, rows, engine.pad)
        served_logits, served_tokens = [batch.logits], [batch.logits.argmax(-1)]
        for _ in range(steps - 1):
            batch.next_ids = served_tokens[-1]
            batch.forward(engine.model)
            served_logits.append(batch.logits)
            served_tokens.append(batch.logits.argmax(-1))
    for i, row in enumerate(rows):
        ids = torch.tensor([row.prompt_ids])
        with torch.no_grad():
            if row.adapter == BASE:
                with reference.disable_adapter():
                    out = reference.generate(input_ids=ids, max_new_tokens=steps, do_sample=False, **_scores())
            else:
                reference.set_adapter(row.adapter)
                out = reference.generate(input_ids=ids, max_new_tokens=steps, do_sample=False, **_scores())
        expected_tokens = out.sequences[0, ids.shape[1] :].tolist()
        assert [int(t[i]) for t in served_tokens] == expected_tokens, row.adapter
        for step in range(steps):
            torch.testing.assert_close(served_logits[step][i], out.logits[step][0].float(), rtol=tol, atol=tol)


def _scores() -> dict:
    return {"return_dict_in_generate": True, "output_logits": True, "pad_token_id": 0, "eos_token_id": None}


def file_mapped(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process that map the file at `path` (/proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and Path(fields[5]) == path:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def in_checkpoint(model, checkpoint: Path) -> list[str]:
    ranges = file_mapped(checkpoint)
    return [
        n
        for n, t in [*model.named_parameters(), *model.named_buffers()]
        if any(a <= t.data_ptr() < b for a, b in ranges)
    ]


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads /proc/self/maps (Linux)")
def test_4bit_base_keeps_nothing_in_the_checkpoint_file(adapter_dir):
    """The weights bitsandbytes leaves unquantized are copied out of the mapped safetensors file, so the
    file's pages (all read while quantizing) are not held in the server's RSS; a dense base keeps them
    mapped (they are its weights)."""
    checkpoint = Path(models.resolve("random:tiny").location) / "model.safetensors"
    dense, _ = build(ServeConfig(model="random:tiny", device="cpu", adapter=[f"one={adapter_dir}"]))
    assert "base_model.model.model.embed_tokens.weight" in in_checkpoint(dense.model, checkpoint)
    four, _ = build(ServeConfig(model="random:tiny", device="cpu", quantize="nf4", adapter=[f"one={adapter_dir}"]))
    assert in_checkpoint(four.model, checkpoint) == []


def test_release_checkpoint_keeps_tied_weights_tied(tiny_model):
    tiny_model.lm_head.weight = tiny_model.model.embed_tokens.weight
    before = tiny_model.lm_head.weight.detach().clone()
    copied = release_checkpoint(tiny_model)
    assert copied == len({t.data_ptr() for t in [*tiny_model.parameters(), *tiny_model.buffers()]})
    assert tiny_model.lm_head.weight is tiny_model.model.embed_tokens.weight
    assert tiny_model.lm_head.weight.data_ptr() == tiny_model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(tiny_model.lm_head.weight, before)
