"""The OpenAI-compatible HTTP API on FastAPI: completions, chat completions (streaming as server-sent
events), models, adapter load/unload, health and Prometheus metrics.

Security defaults: a bearer key (constant-time compare) on every /v1 route and /metrics when one is
set; request bodies, prompt length, max_tokens, n and requests in flight are bounded; errors use
the OpenAI error shape; the access log has no headers (no keys) and no prompt text.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from lorafit.base.config import ServeConfig
from lorafit.serving import schemas
from lorafit.serving.engine import Engine, Event, Sampling
from lorafit.serving.engine import Request as GenRequest
from lorafit.serving.metrics import Metrics
from lorafit.serving.registry import BASE, AdapterError

access_log = logging.getLogger("lorafit.access")
# completions answer JSON, or server-sent events with stream=true: both go in the OpenAPI schema
STREAMING: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {}, "text/event-stream": {}}, "description": "JSON, or SSE when streaming"}
}


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, code: str, kind: str = "invalid_request_error", param: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.kind, self.param = status, message, code, kind, param


def error_body(message: str, code: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class BodyLimit:
    """ASGI middleware: answer 413 when a request body passes `limit` bytes (declared or streamed)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send: Any) -> None:
        body = json.dumps(error_body(f"request body over {self.limit} bytes", "request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def create_app(engine: Engine, cfg: ServeConfig, base_name: str, api_key: str | None) -> FastAPI:
    registry = engine.registry
    tokenizer = engine.tokenizer
    metrics = Metrics(registry)
    engine.on_batch = metrics.batch_size.observe
    in_flight = 0

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)  # after uvicorn has let in-flight requests finish

    app = FastAPI(title="lorafit serve", lifespan=lifespan)
    app.state.engine = engine

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer <key>)", "invalid_api_key")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.code, e.kind, e.param), status_code=e.status)

    @app.exception_handler(AdapterError)
    async def _adapter_error(request: Request, e: AdapterError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return JSONResponse(
            error_body(f"{where}: {first.get('msg', 'invalid request')}", "invalid_request", param=where), 400
        )

    @app.middleware("http")
    async def _log_and_count(request: Request, call_next: Any) -> Any:
        started = time.perf_counter()
        response = await call_next(request)
        elapsed = time.perf_counter() - started
        route = request.url.path
        metrics.requests.labels(route=route, status=str(response.status_code)).inc()
        metrics.latency.labels(route=route).observe(elapsed)
        access_log.info(
            json.dumps(
                {
                    "method": request.method,
                    "path": route,
                    "status": response.status_code,
                    "ms": round(1000 * elapsed, 1),
                    "client": request.client.host if request.client else None,
                }
            )
        )
        return response

    def resolve_model(name: str) -> str:
        if name == base_name:
            return BASE
        if name in registry.paths:
            return name
        raise ApiError(
            404, f"model {name!r} does not exist; GET /v1/models lists them", "model_not_found", param="model"
        )

    def sampling_of(body: schemas._Sampled, default_max: int) -> Sampling:
        if body.n != 1:
            raise ApiError(400, "n > 1 is not supported", "unsupported_parameter", param="n")
        wanted = body.max_completion_tokens or body.max_tokens or default_max
        if wanted > cfg.max_tokens_limit:
            raise ApiError(
                400,
                f"max_tokens {wanted} is over the server limit {cfg.max_tokens_limit}",
                "max_tokens_limit",
                param="max_tokens",
            )
        return Sampling(wanted, body.temperature, body.top_p, body.stops(), body.seed, body.ignore_eos)

    def check_prompt(ids: list[int]) -> list[int]:
        if not ids:
            raise ApiError(400, "empty prompt", "empty_prompt", param="prompt")
        if len(ids) > cfg.max_prompt_tokens:
            raise ApiError(
                400,
                f"prompt is {len(ids)} tokens; the limit is {cfg.max_prompt_tokens}",
                "context_length_exceeded",
                param="prompt",
            )
        return ids

    async def run(adapter: str, ids: list[int], sampling: Sampling) -> GenRequest:
        nonlocal in_flight
        if in_flight >= cfg.max_concurrent:
            raise ApiError(
                429,
                f"{in_flight} requests in flight (limit {cfg.max_concurrent}); retry later",
                "rate_limited",
                "rate_limit_error",
            )
        loop = asyncio.get_running_loop()
        request = GenRequest(ids, adapter, sampling, loop, asyncio.Queue())
        in_flight += 1
        metrics.prompt_tokens.inc(len(ids))
        engine.submit(request)
        return request

    async def events(request: GenRequest) -> AsyncIterator[Event]:
        nonlocal in_flight
        try:
            while True:
                event: Event = await request.events.get()
                if event.error is not None:
                    raise event.error
                yield event
                if event.finish_reason is not None:
                    metrics.completion_tokens.inc(event.completion_tokens)
                    if request.first_token_at is not None:
                        metrics.ttft.observe(request.first_token_at - request.submitted)
                    return
        finally:  # finished, failed, or the client went away: stop decoding for it
            request.cancelled.set()
            in_flight -= 1

    async def complete(request: GenRequest) -> tuple[str, str, int]:
        text, reason, tokens = [], "stop", 0
        async for event in events(request):
            text.append(event.text)
            if event.finish_reason is not None:
                reason, tokens = event.finish_reason, event.completion_tokens
        return "".join(text), reason, tokens

    def sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk)}\n\n".encode()
            except AdapterError as e:  # headers are sent: the error travels as the stream's last event
                yield f"data: {json.dumps(error_body(e.message, e.code))}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    def health() -> dict:
        return {
            "status": "ok",
            "model": base_name,
            "adapters_resident": len(registry.resident),
            "requests_in_flight": in_flight,
        }

    @app.get("/metrics", dependencies=[Depends(authorize)], response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    def list_models() -> dict:
        created = int(time.time())
        data = [{"id": base_name, "object": "model", "created": created, "owned_by": "lorafit"}]
        data += [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "lorafit",
                "parent": base_name,
                "root": base_name,
            }
            for name in sorted(registry.paths)
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/completions", dependencies=[Depends(authorize)], responses=STREAMING)
    async def completions(body: schemas.CompletionRequest) -> Any:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "one prompt per request", "unsupported_parameter", param="prompt")
        adapter = resolve_model(body.model)
        ids = check_prompt(tokenizer(prompts[0], add_special_tokens=False)["input_ids"])
        request = await run(adapter, ids, sampling_of(body, 16))
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:

            async def chunks() -> AsyncIterator[dict]:
                async for event in events(request):
                    choice = {"index": 0, "text": event.text, "logprobs": None, "finish_reason": event.finish_reason}
                    yield envelope(rid, "text_completion", created, body.model, [choice])
                    if event.finish_reason is not None and body.include_usage():
                        usage = usage_of(len(ids), event.completion_tokens)
                        yield envelope(rid, "text_completion", created, body.model, [], usage)

            return sse(chunks())
        text, reason, tokens = await complete(request)
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return envelope(rid, "text_completion", created, body.model, [choice], usage_of(len(ids), tokens))

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)], responses=STREAMING)
    async def chat(body: schemas.ChatRequest) -> Any:
        adapter = resolve_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids = check_prompt(chat_prompt(tokenizer, messages))
        request = await run(adapter, ids, sampling_of(body, min(256, cfg.max_tokens_limit)))
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:

            async def chunks() -> AsyncIterator[dict]:
                first = True
                async for event in events(request):
                    delta = {"role": "assistant", "content": event.text} if first else {"content": event.text}
                    if event.finish_reason is not None and not event.text:
                        delta = {}
                    first = False
                    choice = {"index": 0, "delta": delta, "finish_reason": event.finish_reason}
                    yield envelope(rid, "chat.completion.chunk", created, body.model, [choice])
                    if event.finish_reason is not None and body.include_usage():
                        usage = usage_of(len(ids), event.completion_tokens)
                        yield envelope(rid, "chat.completion.chunk", created, body.model, [], usage)

            return sse(chunks())
        text, reason, tokens = await complete(request)
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
        return envelope(rid, "chat.completion", created, body.model, [choice], usage_of(len(ids), tokens))

    @app.post("/v1/load_lora_adapter", dependencies=[Depends(authorize)])
    def load_adapter(body: schemas.LoadAdapterRequest) -> dict:
        with registry.lock:  # waits for a running batch; loads now so a bad adapter is refused here
            registry.register(body.lora_name, Path(body.lora_path))
            try:
                registry.ensure({body.lora_name})
            except AdapterError:
                registry.unload(body.lora_name)
                raise
        return {"loaded": body.lora_name}

    @app.post("/v1/unload_lora_adapter", dependencies=[Depends(authorize)])
    def unload_adapter(body: schemas.UnloadAdapterRequest) -> dict:
        registry.unload(body.lora_name)
        return {"unloaded": body.lora_name}

    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)
    return app


def envelope(rid: str, kind: str, created: int, model: str, choices: list, usage: dict | None = None) -> dict:
    """An OpenAI response object (or stream chunk); a usage-only chunk has no choices."""
    out = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices}
    if usage is not None:
        out["usage"] = usage
    return out


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict:
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation with the model's chat template (a plain transcript without one)."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return tokenizer(text, add_special_tokens=False)["input_ids"]
