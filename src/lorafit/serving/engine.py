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
    ignore_eos: bool = False


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
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shut down): nobody is listening
            self.cancelled.set()


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
        self.thread: threading.Thread | None = None
        self.on_batch: Any = None  # called with each batch size (metrics)

    def start(self) -> None:
        """Start the scheduler thread (again, after a stop); a no-op while it runs."""
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._run, name="lorafit-engine", daemon=True)
            self.thread.start()

    def stop(self) -> None:
        """Finish what is queued, then stop the scheduler thread."""
        if self.thread is not None and self.thread.is_alive():
            self.pending.put(None)
            self.thread.join(timeout=60)

    def submit(self, request: Request) -> None:
        self.pending.put(request)

    # ------------------------------------------------------------------ scheduler thread

    def _run(self) -> None:
        if self.mode == "batched":
            self._run_continuous()
            return
        while True:  # set-adapter: one request at a time
            request = self.pending.get()
            if request is None:
                return
            if request.cancelled.is_set():
                continue
            try:
                with self.registry.lock:
                    self.registry.ensure({request.adapter})
                    if request.adapter == BASE:
                        with self.model.disable_adapter():
                            self._decode_one(request)
                    else:
                        self.model.set_adapter(request.adapter)
                        self._decode_one(request)
            except Exception as e:  # a bad request must not stop the server
                _fail([request], e)

    def _run_continuous(self) -> None:
        """Continuous batching: new requests join the running batch between decode steps, finished
        ones leave it, so the batch stays full while requests come and go."""
        batch: Batch | None = None
        waiting: list[Request] = []
        stopping = False
        while True:
            idle = batch is None and not waiting
            if idle and stopping:
                return
            stopping |= self._collect(waiting, block=idle)
            waiting = [r for r in waiting if not r.cancelled.is_set()]
            admitted = self._admit(batch, waiting)
            try:
                with self.registry.lock:
                    if admitted:
                        batch = self._join(batch, admitted)
                    if batch is not None:
                        batch = self._step(batch)
            except Exception as e:
                _fail(admitted + (batch.rows if batch is not None else []), e)
                batch = None

    def _collect(self, waiting: list[Request], block: bool) -> bool:
        """Move queued requests to `waiting` (blocking for the first when idle, then waiting
        batch_wait for company); True when asked to stop."""
        deadline = None
        while len(waiting) < self.max_batch:
            try:
                if block and not waiting:
                    item = self.pending.get()
                    deadline = time.perf_counter() + self.batch_wait
                elif deadline is not None:
                    item = self.pending.get(timeout=max(0.0, deadline - time.perf_counter()))
                else:
                    item = self.pending.get_nowait()
            except queue.Empty:
                return False
            if item is None:
                return True
            waiting.append(item)
        return False

    def _admit(self, batch: Batch | None, waiting: list[Request]) -> list[Request]:
        """Take from `waiting` what fits: batch room, and adapters within --max-adapters."""
        rows = batch.rows if batch is not None else []
        adapters = {r.adapter for r in rows} - {BASE}
        admitted = []
        for r in list(waiting):
            if len(rows) + len(admitted) >= self.max_batch:
                break
            wanted = adapters | ({r.adapter} - {BASE})
            if len(wanted) > self.registry.max_resident:
                continue  # waits until rows of other adapters finish
            adapters = wanted
            admitted.append(r)
            waiting.remove(r)
        return admitted

    @torch.no_grad()
    def _join(self, batch: Batch | None, new: list[Request]) -> Batch | None:
        """Prefill the new requests together and merge them into the running batch."""
        in_batch = {r.adapter for r in (batch.rows if batch is not None else [])}
        try:
            self.registry.ensure(in_batch | {r.adapter for r in new})
        except AdapterError as e:
            _fail(new, e)
            return batch
        fresh = Batch.prefill(self, new)
        fresh = self._sample_and_prune(fresh)
        if fresh is None:
            return batch
        return fresh if batch is None else batch.merge(fresh)

    @torch.no_grad()
    def _step(self, batch: Batch) -> Batch | None:
        resident = set(self.registry.resident) | {BASE}
        for r in batch.rows:  # an adapter unloaded while in use ends its requests, not the server
            if r.adapter not in resident and not r.done:
                r.done = True
                r.emit(Event(finish_reason="error", error=AdapterError(f"adapter {r.adapter!r} was unloaded", 410)))
        batch = batch.select([i for i, r in enumerate(batch.rows) if not r.done])
        if batch is None:
            return None
        batch.forward(self)
        return self._sample_and_prune(batch)

    def _sample_and_prune(self, batch: Batch) -> Batch | None:
        logits = batch.logits
        for i, r in enumerate(batch.rows):
            if r.cancelled.is_set():
                r.done = True
            if r.done:
                continue
            token = _sample(logits[i], r.sampling, r.generator)
            batch.next_ids[i] = token
            self._advance(r, token)
        if self.on_batch is not None:
            self.on_batch(len(batch.rows))
        return batch.select([i for i, r in enumerate(batch.rows) if not r.done])

    @torch.no_grad()
    def _decode_one(self, request: Request) -> None:
        """The set-adapter baseline: one request, plain forwards with the KV cache."""
        batch = self._sample_and_prune(Batch.prefill(self, [request], adapter_names=False))
        while batch is not None:
            batch.forward(self, adapter_names=False)
            batch = self._sample_and_prune(batch)

    def _advance(self, r: Request, token: int) -> None:
        """Append a token to a request, emit the new text, and finish it on EOS, a stop string or length."""
        if r.first_token_at is None:
            r.first_token_at = time.perf_counter()
        if token in self.eos and not r.sampling.ignore_eos:
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


def _fail(requests: list[Request], error: Exception) -> None:
    if not isinstance(error, AdapterError):
        error = AdapterError(f"generation failed: {type(error).__name__}: {error}", 500, "internal_error")
    for r in requests:
        if not r.done:
            r.done = True
            r.emit(Event(finish_reason="error", error=error))


class Batch:
    """Rows being decoded together: their KV cache, attention mask and positions, left-aligned so
    every row's next token is in the last column."""

    def __init__(self, rows: list[Request], cache: Any, mask: torch.Tensor, positions: torch.Tensor) -> None:
        self.rows, self.cache, self.mask, self.positions = rows, cache, mask, positions
        self.logits = torch.empty(0)
        self.next_ids = torch.zeros(len(rows), dtype=torch.long)

    @classmethod
    def prefill(cls, engine: Engine, rows: list[Request], adapter_names: bool = True) -> Batch:
        from transformers import DynamicCache

        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), engine.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
            if r.sampling.seed is not None:
                r.generator = torch.Generator().manual_seed(r.sampling.seed)
        ids, mask = ids.to(engine.device), mask.to(engine.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        batch = cls(rows, DynamicCache(), mask, positions[:, -1:])
        extra = {"adapter_names": [r.adapter for r in rows]} if adapter_names else {}
        out = engine.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=batch.cache,
            use_cache=True,
            **extra,
        )
        batch.logits = out.logits[:, -1, :].float().cpu()
        return batch

    def forward(self, engine: Engine, adapter_names: bool = True) -> None:
        """One decode step: feed each row's last sampled token."""
        device = engine.device
        self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=device)], 1)
        self.positions = self.positions + 1
        extra = {"adapter_names": [r.adapter for r in self.rows]} if adapter_names else {}
        out = engine.model(
            input_ids=self.next_ids[:, None].to(device),
            attention_mask=self.mask,
            position_ids=self.positions,
            past_key_values=self.cache,
            use_cache=True,
            **extra,
        )
        self.logits = out.logits[:, -1, :].float().cpu()

    def select(self, keep: list[int]) -> Batch | None:
        """The rows at `keep` (None when empty), with left padding no row needs any more trimmed."""
        if not keep:
            return None
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, device=self.mask.device)
            self.rows = [self.rows[i] for i in keep]
            self.mask = self.mask.index_select(0, index)
            self.positions = self.positions.index_select(0, index)
            self.next_ids = self.next_ids.index_select(0, index.cpu())
            self.logits = self.logits.index_select(0, index.cpu())
            for layer in self.cache.layers:
                layer.keys = layer.keys.index_select(0, index)
                layer.values = layer.values.index_select(0, index)
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else 0
        if start > 0:  # drop columns that are padding in every row
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, start:]
                layer.values = layer.values[:, :, start:]
        return self

    def merge(self, other: Batch) -> Batch:
        """This batch and `other` as one: the shorter one is padded on the left."""
        width = max(self.mask.shape[1], other.mask.shape[1])

        def pad(t: torch.Tensor, dim_from_end: int) -> torch.Tensor:
            missing = width - t.shape[-dim_from_end]
            if missing == 0:
                return t
            spec = [0, 0] * (dim_from_end - 1) + [missing, 0]
            return torch.nn.functional.pad(t, spec)

        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([pad(mine.keys, 2), pad(theirs.keys, 2)], 0)
            mine.values = torch.cat([pad(mine.values, 2), pad(theirs.values, 2)], 0)
        self.mask = torch.cat([pad(self.mask, 1), pad(other.mask, 1)], 0)
        self.positions = torch.cat([self.positions, other.positions], 0)
        self.next_ids = torch.cat([self.next_ids, other.next_ids], 0)
        self.logits = torch.cat([self.logits, other.logits], 0)
        self.rows = self.rows + other.rows
        return self
