"""What a model is worth after training: perplexity, generation speed and size.

- Perplexity uses the standard sliding window: windows of `max_length` tokens start every `stride`
  tokens, and each token is scored exactly once, in the first window that reaches it, with all the
  context that window holds (with stride == max_length, a window's first token has none and is not
  scored). Only the logits of scored tokens are computed.
- Generation speed is greedy decoding with the KV cache on fixed prompts: time to first token
  (prefill + one token) and decode tokens/s of the tokens after it, medians of timed repeats.
- Size is what must be shipped (bytes on disk), what sits in memory, and the compression against
  the same model stored in fp16.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lorafit.adapters.methods import count_params, stored_weight_bytes
from lorafit.base.config import EvalConfig
from lorafit.base.errors import UserError
from lorafit.inputs import data
from lorafit.studies.subject import Subject, dir_bytes, prompt_batch


def perplexity_text(spec: str, tokenizer: Any) -> tuple[str, str]:
    """(text, description) to score: built-in WikiText-2 test, a text file, or an Alpaca set's responses."""
    if spec == "wikitext2":
        test = data.BUILTIN["wikitext2"].parent / "test.txt"  # training uses valid.txt; never score on it
        return test.read_text(encoding="utf-8"), "wikitext2 test"
    path = Path(spec)
    if not path.is_file():
        raise UserError("perplexity text not found (use 'wikitext2', a .txt file or an Alpaca file)", file=spec)
    if path.suffix in (".json", ".jsonl"):
        records, _, fmt = data.load_records(spec)
        if fmt != "alpaca":
            raise UserError(f"perplexity on a {fmt} file: only Alpaca responses or plain text", file=spec)
        return "\n\n".join(r.fields["output"] for r in records), f"{path.name} responses"  # type: ignore[union-attr]
    return path.read_text(encoding="utf-8"), path.name


@torch.no_grad()
def perplexity(model: Any, ids: torch.Tensor, max_length: int, stride: int) -> dict[str, Any]:
    """Sliding-window perplexity of the 1-D token ids: exp(mean NLL) over every token but the first."""
    device = next(model.parameters()).device
    n = ids.numel()
    if n < 2:
        raise UserError("perplexity needs at least 2 tokens of text", field="ppl")
    nll = 0.0
    scored = windows = 0
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        first = max(prev_end, begin + 1)  # first position scored in this window
        keep = end - first + 1  # logits of positions first-1 .. end-1; the last one predicts nothing here
        out = model(input_ids=ids[begin:end][None].to(device), logits_to_keep=keep, use_cache=False)
        logits = out.logits[0, :-1].float()
        nll += float(F.cross_entropy(logits, ids[first:end].to(device), reduction="sum"))
        scored += end - first
        windows += 1
        prev_end = end
        if end == n:
            break
    mean = nll / scored
    return {"ppl": math.exp(mean), "nll_mean": mean, "tokens_scored": scored, "windows": windows}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generation_speed(model: Any, tokenizer: Any, new_tokens: int, batch: int, repeats: int) -> dict[str, Any]:
    """Greedy decoding with KV cache: median time to first token and decode tokens/s."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in prompt_batch(tokenizer, batch).items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def timed(n: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(
            **inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=pad
        )
        _sync(device)
        assert out.shape[1] == inputs["input_ids"].shape[1] + n
        return time.perf_counter() - t0

    timed(min(new_tokens, 4))  # warm-up
    first = [timed(1) for _ in range(repeats)]
    whole = [timed(new_tokens) for _ in range(repeats)]
    ttft, total = statistics.median(first), statistics.median(whole)
    decode_s = total - ttft
    return {
        "prompt_tokens": int(inputs["attention_mask"].sum()),
        "batch": batch,
        "new_tokens": new_tokens,
        "ttft_s": ttft,
        "total_s": total,
        "decode_tokens_per_s": batch * (new_tokens - 1) / decode_s if new_tokens > 1 and decode_s > 0 else None,
        "tokens_per_s": batch * new_tokens / total,
        "repeats": repeats,
    }


def size(subject: Subject) -> dict[str, Any]:
    """Parameters, bytes to ship, bytes in memory, and compression against the fp16 model."""
    trainable_like = 0
    if subject.adapter_dir is not None:
        trainable_like = sum(p.numel() for n, p in subject.model.named_parameters() if "lora_" in n)
    _, total = count_params(subject.model)
    base_params = total - trainable_like
    base_disk = sum(dir_bytes(d) for d in subject.weights_dirs)
    adapter_disk = dir_bytes(subject.adapter_dir) if subject.adapter_dir is not None else 0
    memory = stored_weight_bytes(subject.model)
    fp16 = base_params * 2
    return {
        "total_params": total,
        "adapter_params": trainable_like,
        "disk_bytes": base_disk + adapter_disk,
        "disk_base_bytes": base_disk,
        "disk_adapter_bytes": adapter_disk,
        "memory_bytes": memory,
        "fp16_bytes": fp16,
        "compression_vs_fp16": fp16 / memory if memory else None,
    }


def evaluate(subject: Subject, cfg: EvalConfig) -> dict[str, Any]:
    """All measurements of one model; the dict written as eval.json."""
    result: dict[str, Any] = {
        "label": subject.label,
        "model": subject.model_spec,
        "method": subject.method,
        "adapter": None if subject.adapter_dir is None else str(subject.adapter_dir),
        "settings": asdict(cfg),
        "device": str(next(subject.model.parameters()).device),
        "precision": subject.precision,
        "quantization": subject.quantization,
        "size": size(subject),
    }
    if cfg.ppl != "none":
        text, what = perplexity_text(cfg.ppl, subject.tokenizer)
        ids = torch.tensor(subject.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        total = ids.numel()
        if cfg.ppl_max_tokens:
            ids = ids[: cfg.ppl_max_tokens]
        result["perplexity"] = {
            "text": what,
            "max_length": cfg.ppl_max_length,
            "stride": cfg.ppl_stride,
            "text_tokens": total,
            **perplexity(subject.model, ids, cfg.ppl_max_length, cfg.ppl_stride),
        }
    if cfg.gen:
        subject.model.config.use_cache = True
        result["generation"] = generation_speed(
            subject.model, subject.tokenizer, cfg.gen_tokens, cfg.gen_batch, cfg.gen_repeats
        )
    return result
