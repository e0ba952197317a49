"""What the API's routes share: the engine, the options, the metrics and the requests in flight.

One `AppState` lives on `app.state.lorafit`; routes reach it through the `get_state` dependency, so
a test can build one around a stub engine and call a route function directly.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from lorafit.base.config import ServeConfig
from lorafit.serving.engine import Engine, Event, GenerationRequest
from lorafit.serving.errors import ApiError
from lorafit.serving.metrics import Metrics
from lorafit.serving.registry import AdapterRegistry
from lorafit.serving.sampling import Sampling


@dataclass
class AppState:
    engine: Engine
    cfg: ServeConfig
    base_name: str  # the base model's name in the API (`model` field)
    api_key: str | None  # None: no auth
    metrics: Metrics
    in_flight: int = 0  # requests submitted and not finished (their clients may still be reading)

    @classmethod
    def create(cls, engine: Engine, cfg: ServeConfig, base_name: str, api_key: str | None) -> AppState:
        metrics = Metrics(engine.registry)
        engine.on_batch = metrics.batch_size.observe
        return cls(engine, cfg, base_name, api_key, metrics)

    @property
    def registry(self) -> AdapterRegistry:
        return self.engine.registry

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def submit(self, adapter: str, ids: list[int], sampling: Sampling) -> GenerationRequest:
        """Hand a request to the engine, or refuse it (429) when `max_concurrent` are in flight;
        call on the event loop, then read its events with `events`."""
        if self.in_flight >= self.cfg.max_concurrent:
            raise ApiError(
                429,
                f"{self.in_flight} requests in flight (limit {self.cfg.max_concurrent}); retry later",
                "rate_limited",
                "rate_limit_error",
            )
        request = GenerationRequest(ids, adapter, sampling, asyncio.get_running_loop(), asyncio.Queue())
        self.in_flight += 1
        self.metrics.prompt_tokens.inc(len(ids))
        self.engine.submit(request)
        return request

    async def events(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """The request's events up to its final one; an engine error is raised here."""
        try:
            while True:
                event: Event = await request.events.get()
                if event.error is not None:
                    raise event.error
                yield event
                if event.finish_reason is not None:
                    self.metrics.completion_tokens.inc(event.completion_tokens)
                    if request.first_token_at is not None:
                        self.metrics.ttft.observe(request.first_token_at - request.submitted)
                    return
        finally:  # finished, failed, or the client went away: stop decoding for it
            request.cancelled.set()
            self.in_flight -= 1

    async def complete(self, request: GenerationRequest) -> tuple[str, str, int]:
        """(text, finish_reason, completion tokens) of a request, once it has finished."""
        text, reason, tokens = [], "stop", 0
        async for event in self.events(request):
            text.append(event.text)
            if event.finish_reason is not None:
                reason, tokens = event.finish_reason, event.completion_tokens
        return "".join(text), reason, tokens


def get_state(request: Request) -> AppState:
    """FastAPI dependency: the app's shared state."""
    return request.app.state.lorafit


State = Annotated[AppState, Depends(get_state)]  # a route parameter typed `State` receives the app's state
