import pytest

from lorafit.base.errors import UserError
from lorafit.inputs import models


def test_random_arch_has_real_shapes_and_a_usable_tokenizer(tiny_source, tiny_tokenizer):
    assert tiny_source.kind == "random"
    ids = tiny_tokenizer("Hello, world!")["input_ids"]
    assert tiny_tokenizer.decode(ids) == "Hello, world!"
    assert tiny_tokenizer.chat_template and tiny_tokenizer.pad_token_id is not None
    assert set(models.known_archs()) >= {
        "qwen2.5-0.5b",
        "qwen2.5-1.5b",
        "qwen2.5-7b",
        "llama-3-8b",
        "tinyllama-1.1b",
        "smollm2-135m",
        "tiny",
    }


def test_shipped_arch_configs_match_published_shapes():
    import json

    shapes = {name: json.loads((models.ARCH_DIR / f"{name}.json").read_text()) for name in models.known_archs()}
    assert (shapes["llama-3-8b"]["hidden_size"], shapes["llama-3-8b"]["num_hidden_layers"]) == (4096, 32)
    assert shapes["qwen2.5-1.5b"]["vocab_size"] == 151936 and shapes["tinyllama-1.1b"]["vocab_size"] == 32000
    # the shipped tokenizer's ids must fit every architecture's embedding table
    tok_size = len(models.load_tokenizer(models.ModelSource("tok", "hf_dir", str(models.TOKENIZER_DIR))))
    assert all(cfg["vocab_size"] >= tok_size for cfg in shapes.values())


def test_local_directory_and_hub_ids(tiny_source, tmp_path):
    assert models.resolve(tiny_source.location) == models.ModelSource(
        tiny_source.location, "hf_dir", tiny_source.location
    )
    assert models.resolve("HuggingFaceTB/SmolLM2-135M").kind == "hub"
    with pytest.raises(UserError, match="no config.json"):
        models.resolve(str(tmp_path))
    with pytest.raises(UserError, match="unknown model"):
        models.resolve("./not-here")
    with pytest.raises(UserError, match="unknown architecture"):
        models.resolve("random:gpt-9")


def test_gguf_that_is_not_a_model_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(UserError, match="cannot load .* as a GGUF language model"):
        models.resolve(str(fake))
    assert not (tmp_path / "cache" / "models" / "fake").exists()  # nothing half-written in the cache
    with pytest.raises(UserError, match="GGUF file not found"):
        models.resolve(str(tmp_path / "missing.gguf"))


def test_a_random_models_tokenizer_needs_no_weights(tmp_path, monkeypatch, tiny_source):
    """Planning `random:llama-3-8b` reads its data with the shipped tokenizer: nothing is built or cached."""
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "cache"))
    source = models.tokenizer_source("random:llama-3-8b")
    tokenizer = models.load_tokenizer(source)
    assert not (tmp_path / "cache").exists()
    built = models.load_tokenizer(tiny_source)  # the tokenizer a materialized random model carries
    text = "LoRA adapters, 4-bit bases and budgets."
    assert tokenizer(text)["input_ids"] == built(text)["input_ids"]
    with pytest.raises(UserError, match="unknown architecture 'llama-9'"):
        models.tokenizer_source("random:llama-9")


@pytest.mark.parametrize(("dtype_name", "kept"), [("float32", False), ("bfloat16", True)])
def test_a_4bit_model_computes_in_its_compute_dtype_on_every_cpu(tiny_source, dtype_name, kept):
    """bitsandbytes switches a Linear4bit to a bf16 kernel outside training on CPUs with AVX512-BF16, whatever
    the compute dtype. Loaded by lorafit in fp32, its evaluation forward is the fp32 product with the
    dequantized weight (as on CPUs without it); in bf16 bitsandbytes' fast kernel is kept where it exists."""
    import bitsandbytes as bnb
    import torch
    from bitsandbytes.functional import dequantize_4bit, has_avx512bf16

    from lorafit.adapters.methods import quantization_config
    from lorafit.base.config import TrainConfig

    dtype = getattr(torch, dtype_name)
    model = models.load_model(tiny_source, dtype, quantization_config(TrainConfig(method="qlora"), dtype)).eval()
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.support_avx512bf16_for_cpu == (kept and has_avx512bf16()) for m in layers)
    if dtype == torch.float32:
        layer = layers[0]
        x = torch.randn(3, layer.in_features)
        expected = x @ dequantize_4bit(layer.weight.data, layer.weight.quant_state).t()
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)  # after the first call too
