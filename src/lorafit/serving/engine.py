"""The generation engine: one base model, many adapters, requests batched across adapters.

A scheduler thread takes the requests that are waiting (up to `max_batch`, after waiting
`batch_wait_ms` for more to arrive), left-pads their prompts and decodes them together with the KV
cache. Each row names its adapter, and peft's mixed-adapter forward (`adapter_names=`) applies each
row's own LoRA in the same pass, so eight requests for eight adapters cost one forward per token,
not eight `set_adapter` round trips. Tokens go back to each request's asyncio queue as they are
produced (streaming); a request whose client went away is dropped from the batch.

`mode="set-adapter"` serves one request at a time after `set_adapter`, the usual pattern, for
side-by-side comparison (`lorafit bench-serve`).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from lorafit.serving.registry import BASE, AdapterError, AdapterRegistry


@dataclass
class Sampling:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Event:
    """What a request's queue receives: text deltas, then one final event with finish_reason set."""

    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: AdapterError | None = None


@dataclass
class Request:
    prompt_ids: list[int]
    adapter: str  # BASE or a registered name
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    # decoding state
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False
    generator: torch.Generator | None = None

    def emit(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        registry: AdapterRegistry,
        max_batch: int = 16,
        batch_wait_ms: float = 5.0,
        mode: str = "batched",
    ) -> None:
        self.model, self.tokenizer, self.registry = model, tokenizer, registry
        self.max_batch, self.batch_wait = max_batch, batch_wait_ms / 1000
        self.mode = mode
        self.device = next(model.parameters()).device
        self.eos = {t for t in [tokenizer.eos_token_id, getattr(model.config, "eos_token_id", None)] if t is not None}
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos), 0)
        self.pending: queue.Queue[Request | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="lorafit-engine", daemon=True)
        self.stopping = False
        self.on_batch: Any = None  # called with each batch size (metrics)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Finish what is queued, then stop the scheduler thread."""
        self.stopping = True
        self.pending.put(None)
        self.thread.join(timeout=60)

    def submit(self, request: Request) -> None:
        self.pending.put(request)

    # ------------------------------------------------------------------ scheduler thread

    def _run(self) -> None:
        while True:
            first = self.pending.get()
            if first is None:
                return
            batch = [first]
            if self.mode == "batched":
                deadline = time.perf_counter() + self.batch_wait
                while len(batch) < self.max_batch:
                    try:
                        item = self.pending.get(timeout=max(0.0, deadline - time.perf_counter()))
                    except queue.Empty:
                        break
                    if item is None:
                        self.pending.put(None)  # stop after this batch
                        break
                    batch.append(item)
            batch = [r for r in batch if not r.cancelled.is_set()]
            if not batch:
                continue
            try:
                with self.registry.lock:
                    if self.mode == "batched":
                        self._generate(batch)
                    else:
                        self._generate_set_adapter(batch[0])
            except AdapterError as e:
                for r in batch:
                    if not r.done:
                        r.emit(Event(finish_reason="error", error=e))
            except Exception as e:  # a bug must not kill the server: fail these requests, keep serving
                err = AdapterError(f"generation failed: {type(e).__name__}: {e}", 500, "internal_error")
                for r in batch:
                    if not r.done:
                        r.emit(Event(finish_reason="error", error=err))

    def _generate_set_adapter(self, request: Request) -> None:
        self.registry.ensure({request.adapter})
        if request.adapter == BASE:
            with self.model.disable_adapter():
                self._decode([request], adapter_names=None)
        else:
            self.model.set_adapter(request.adapter)
            self._decode([request], adapter_names=None)

    def _generate(self, batch: list[Request]) -> None:
        self.registry.ensure({r.adapter for r in batch})
        if self.on_batch is not None:
            self.on_batch(len(batch))
        self._decode(batch, adapter_names=[r.adapter for r in batch])

    @torch.no_grad()
    def _decode(self, batch: list[Request], adapter_names: list[str] | None) -> None:
        from transformers import DynamicCache

        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):  # left padding: every row's next token is at the end
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
            if r.sampling.seed is not None:
                r.generator = torch.Generator().manual_seed(r.sampling.seed)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        extra = {} if adapter_names is None else {"adapter_names": adapter_names}
        cache = DynamicCache()
        steps = max(r.sampling.max_tokens for r in batch)
        for _ in range(steps):
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                **extra,
            )
            logits = out.logits[:, -1, :].float().cpu()
            next_ids = torch.full((len(batch),), self.pad, dtype=torch.long)
            for i, r in enumerate(batch):
                if r.done:
                    continue
                if r.cancelled.is_set():
                    r.done = True
                    continue
                token = _sample(logits[i], r.sampling, r.generator)
                next_ids[i] = token
                self._advance(r, token)
            if all(r.done for r in batch):
                return
            ids = next_ids[:, None].to(self.device)
            mask = torch.cat([mask, torch.ones((len(batch), 1), dtype=mask.dtype, device=self.device)], dim=1)
            positions = positions[:, -1:] + 1

    def _advance(self, r: Request, token: int) -> None:
        """Append a token to a request, emit the new text, and finish it on EOS, a stop string or length."""
        if r.first_token_at is None:
            r.first_token_at = time.perf_counter()
        if token in self.eos:
            self._finish(r, "stop")
            return
        r.tokens.append(token)
        text = self.tokenizer.decode(r.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            delta = ""
        else:
            delta, r.text = text[len(r.text) :], text
        hit = next((s for s in r.sampling.stop if s and s in r.text), None)
        if hit is not None:
            cut = r.text.index(hit)
            emitted = len(r.text) - len(delta)
            delta = r.text[emitted:cut] if cut > emitted else ""
            r.text = r.text[:cut]
            if delta:
                r.emit(Event(text=delta))
            self._finish(r, "stop")
            return
        if delta:
            r.emit(Event(text=delta))
        if len(r.tokens) >= r.sampling.max_tokens:
            self._finish(r, "length")

    def _finish(self, r: Request, reason: str) -> None:
        r.done = True
        r.emit(Event(finish_reason=reason, completion_tokens=len(r.tokens)))


def _sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0; otherwise temperature, nucleus (top_p) and a seeded draw."""
    if sampling.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < sampling.top_p  # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
