"""The generation engine: one base model, many adapters, requests batched across adapters.

A scheduler thread takes the requests that are waiting (up to `max_batch`, after waiting
`batch_wait_ms` for more to arrive), left-pads their prompts and decodes them together with the KV
cache. Each row names its adapter, and peft's mixed-adapter forward (`adapter_names=`) applies each
row's own LoRA in the same pass, so eight requests for eight adapters cost one forward per token,
not eight `set_adapter` round trips. Tokens go back to each request's asyncio queue as they are
produced (streaming); a request whose client went away is dropped from the batch.

The KV cache of the rows decoded together is `kv_batch.DecodeBatch`; how a token is drawn is
`sampling`; this module is the scheduler: who joins the batch, when, and what each request is told.

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

from lorafit.serving.kv_batch import DecodeBatch
from lorafit.serving.registry import BASE, AdapterError, AdapterRegistry
from lorafit.serving.sampling import Sampling, sample


@dataclass
class Event:
    """What a request's queue receives: text deltas, then one final event with finish_reason set."""

    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: AdapterError | None = None


@dataclass
class GenerationRequest:
    """One completion being generated: its prompt, adapter and options, the queue its events go to
    (on the server's event loop), and its decoding state."""

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
    """The scheduler thread and the model it owns; the API submits requests and reads their queues."""

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
        self.eos = {t for t in [tokenizer.eos_token_id, getattr(model.config, "eos_token_id", None)] if t is not None}
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos), 0)
        self.pending: queue.Queue[GenerationRequest | None] = queue.Queue()
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

    def submit(self, request: GenerationRequest) -> None:
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
        batch: DecodeBatch | None = None
        waiting: list[GenerationRequest] = []
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

    def _collect(self, waiting: list[GenerationRequest], block: bool) -> bool:
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

    def _admit(self, batch: DecodeBatch | None, waiting: list[GenerationRequest]) -> list[GenerationRequest]:
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
    def _join(self, batch: DecodeBatch | None, new: list[GenerationRequest]) -> DecodeBatch | None:
        """Prefill the new requests together and merge them into the running batch."""
        in_batch = {r.adapter for r in (batch.rows if batch is not None else [])}
        try:
            self.registry.ensure(in_batch | {r.adapter for r in new})
        except AdapterError as e:
            _fail(new, e)
            return batch
        for r in new:
            r.generator = r.sampling.generator()
        fresh = DecodeBatch.prefill(self.model, new, self.pad)
        fresh = self._sample_and_prune(fresh)
        if fresh is None:
            return batch
        return fresh if batch is None else batch.merge(fresh)

    @torch.no_grad()
    def _step(self, batch: DecodeBatch) -> DecodeBatch | None:
        resident = set(self.registry.resident) | {BASE}
        for r in batch.rows:  # an adapter unloaded while in use ends its requests, not the server
            if r.adapter not in resident and not r.done:
                r.done = True
                r.emit(Event(finish_reason="error", error=AdapterError(f"adapter {r.adapter!r} was unloaded", 410)))
        batch = batch.select([i for i, r in enumerate(batch.rows) if not r.done])
        if batch is None:
            return None
        batch.forward(self.model)
        return self._sample_and_prune(batch)

    def _sample_and_prune(self, batch: DecodeBatch) -> DecodeBatch | None:
        logits = batch.logits
        for i, r in enumerate(batch.rows):
            if r.cancelled.is_set():
                r.done = True
            if r.done:
                continue
            token = sample(logits[i], r.sampling, r.generator)
            batch.next_ids[i] = token
            self._advance(r, token)
        if self.on_batch is not None:
            self.on_batch(len(batch.rows))
        return batch.select([i for i, r in enumerate(batch.rows) if not r.done])

    @torch.no_grad()
    def _decode_one(self, request: GenerationRequest) -> None:
        """The set-adapter baseline: one request, plain forwards with the KV cache."""
        request.generator = request.sampling.generator()
        batch = self._sample_and_prune(DecodeBatch.prefill(self.model, [request], self.pad, adapter_names=False))
        while batch is not None:
            batch.forward(self.model, adapter_names=False)
            batch = self._sample_and_prune(batch)

    def _advance(self, r: GenerationRequest, token: int) -> None:
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

    def _finish(self, r: GenerationRequest, reason: str) -> None:
        r.done = True
        r.emit(Event(finish_reason=reason, completion_tokens=len(r.tokens)))


def _fail(requests: list[GenerationRequest], error: Exception) -> None:
    if not isinstance(error, AdapterError):
        error = AdapterError(f"generation failed: {type(error).__name__}: {error}", 500, "internal_error")
    for r in requests:
        if not r.done:
            r.done = True
            r.emit(Event(finish_reason="error", error=error))
