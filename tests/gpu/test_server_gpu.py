"""The bf16 server on CUDA against peft: a mixed-adapter batch (three adapters and the base in the same
forward passes) gives peft's greedy tokens and, logit for logit, peft's bf16 outputs within bf16 noise.

bf16 noise is measured, not assumed: `noise` is the largest |peft bf16 - peft fp32| logit difference on
the same sequences. The batched branch (other matmul shapes and order) may differ from peft bf16 by up to
2 x noise (each is within noise of fp32); so the server's greedy token may lose to peft's best by up to
4 x noise (`delta`), and wherever peft's own top two are further apart than delta it must be peft's token.
As in tests/integration/test_serve.py, the submitted requests are caught to read their token ids."""

from __future__ import annotations

import threading

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafit.adapters.batched import BASE
from lorafit.base.config import ServeConfig
from lorafit.inputs import models
from lorafit.serving.bench import synthetic_adapters
from lorafit.serving.server import BackgroundServer, make_app
from tests.gpu.common import record

MODEL = "random:smollm2-135m"
NAMES = ["adapter-0", "adapter-1", "adapter-2"]
PROMPTS = ["Tell me about the sea", "Write a list of fruits", "Why is the sky blue?", "Hello there, how are"]
TOKENS = 12


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory):
    """bench-serve's synthetic adapters (seeded, random A and B on every linear projection), with B 10x
    larger than bench-serve's so each adapter moves the logits well beyond bf16 noise."""
    out = synthetic_adapters(MODEL, len(NAMES), 8, tmp_path_factory.mktemp("adapters"))
    for name in NAMES:
        path = out / name / "adapter_model.safetensors"
        tensors = load_file(path)
        save_file({k: v * 10 if "lora_B" in k else v for k, v in tensors.items()}, path)
    return out


@pytest.fixture(scope="module")
def served(adapters_dir):
    """Four requests, one per adapter and one for the base, sent together to the bf16 CUDA server: each
    request's prompt and greedy token ids, and the server's engine (its model, batched branch installed)."""
    cfg = ServeConfig(
        model=MODEL, adapters=str(adapters_dir), port=0, device="cuda", precision="bf16", batch_wait_ms=500
    )
    app = make_app(cfg)
    engine = app.state.lorafit.engine
    submitted = []
    real_submit = engine.submit
    engine.submit = lambda request: (submitted.append(request), real_submit(request))[1]
    jobs = list(zip([*NAMES[:2], MODEL, NAMES[2]], PROMPTS))
    with BackgroundServer(cfg, app) as url:
        threads = [threading.Thread(target=_ask, args=(url, model, prompt)) for model, prompt in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        metrics = httpx.get(f"{url}/metrics").text
    done = {r.adapter: (r.prompt_ids, r.tokens) for r in submitted}
    return done, engine, metrics


def _ask(url: str, model: str, prompt: str) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True}
    httpx.post(f"{url}/v1/completions", json=body, timeout=120).raise_for_status()


def peft_model(adapters_dir, dtype: torch.dtype):
    from peft import PeftModel

    base = models.load_model(models.resolve(MODEL), dtype).to("cuda")
    model = PeftModel.from_pretrained(base, str(adapters_dir / NAMES[0]), adapter_name=NAMES[0])
    for name in NAMES[1:]:
        model.load_adapter(str(adapters_dir / name), adapter_name=name)
    return model.eval()


@torch.no_grad()
def logits(model, adapter: str, ids: list[int]) -> torch.Tensor:
    """Teacher-forced logits (fp32 copy) of `ids` through `adapter` (BASE: the adapters disabled)."""
    x = torch.tensor([ids], device="cuda")
    if adapter == BASE:
        with model.disable_adapter():
            return model(input_ids=x).logits[0].float()
    model.set_adapter(adapter)
    return model(input_ids=x).logits[0].float()


@pytest.fixture(scope="module")
def reference(served, adapters_dir):
    """peft's bf16 and fp32 logits at each generated position of each served request, and the bf16 noise."""
    done, _, _ = served
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        model = peft_model(adapters_dir, dtype)
        for adapter, (prompt, tokens) in done.items():
            seq = prompt + tokens
            out.setdefault(adapter, {})[dtype] = logits(model, adapter, seq[:-1])[len(prompt) - 1 :]
        if dtype == torch.float32:  # the base's logits on each adapter's sequence: do the adapters matter?
            for adapter, (prompt, tokens) in done.items():
                out[adapter]["base"] = logits(model, BASE, (prompt + tokens)[:-1])[len(prompt) - 1 :]
        del model
        torch.cuda.empty_cache()
    noise = max(float((r[torch.bfloat16] - r[torch.float32]).abs().max()) for r in out.values())
    return out, noise


def test_the_four_requests_shared_forward_passes(served):
    done, _, metrics = served
    assert set(done) == {*NAMES, BASE} and all(len(tokens) == TOKENS for _, tokens in done.values())
    rows = {
        line.split('le="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("lorafit_batch_rows_bucket")
    }
    assert rows["2.0"] < rows["+Inf"], rows  # some forward pass decoded 3 or 4 requests together


def test_bf16_mixed_adapter_server_gives_peft_greedy_tokens(served, reference):
    done, _, _ = served
    ref, noise = reference
    delta = 4 * noise
    found = {"noise": noise, "delta": delta, "requests": {}}
    for adapter, (_, tokens) in done.items():
        bf16 = ref[adapter][torch.bfloat16]
        top2 = bf16.topk(2, dim=-1).values
        margins = (top2[:, 0] - top2[:, 1]).tolist()
        losses = [float(bf16[k].max() - bf16[k, t]) for k, t in enumerate(tokens)]
        greedy = bf16.argmax(-1).tolist()
        found["requests"][adapter] = {"tokens": tokens, "peft_greedy": greedy, "margins": margins, "gaps": losses}
        for k, t in enumerate(tokens):
            assert losses[k] <= delta, (
                f"{adapter} token {k}: {t} is {losses[k]:.4f} below peft's best (delta {delta:.4f})"
            )
            if margins[k] > delta:
                assert t == greedy[k], f"{adapter} token {k}: server {t}, peft {greedy[k]} (margin {margins[k]:.4f})"
    clear = sum(m > delta for r in found["requests"].values() for m in r["margins"])
    found["clear_positions"] = clear
    record("server_greedy", found)
    assert clear > 0, f"no position where peft's top two are more than delta={delta:.4f} apart: nothing was compared"


def test_adapters_move_the_logits_beyond_bf16_noise(served, reference):
    """Otherwise the tests above could not tell one adapter from another."""
    done, _, _ = served
    ref, noise = reference
    for adapter in NAMES:
        moved = float((ref[adapter][torch.float32] - ref[adapter]["base"]).abs().max())
        assert moved > 8 * noise, f"{adapter} moves the logits by {moved:.4f}, bf16 noise is {noise:.4f}"


def test_batched_bf16_forward_equals_peft_logits(served, reference, adapters_dir):
    """The server's model (batched LoRA branch) on one mixed batch of equal-length rows, against peft bf16
    row by row: within 2 x the bf16 noise."""
    _, engine, _ = served
    _, noise = reference
    names = [NAMES[0], BASE, NAMES[2], NAMES[1]]
    ids = torch.randint(5, 4000, (len(names), 24), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        got = engine.model(input_ids=ids, adapter_names=names).logits.float()
    model = peft_model(adapters_dir, torch.bfloat16)
    worst = 0.0
    for i, name in enumerate(names):
        expected = logits(model, name, ids[i].tolist())
        worst = max(worst, float((got[i] - expected).abs().max()))
    record("batched_forward", {"worst_abs_logit_diff": worst, "noise": noise})
    assert worst <= 2 * noise + 1e-3, f"batched forward differs from peft bf16 by {worst:.4f} (noise {noise:.4f})"
