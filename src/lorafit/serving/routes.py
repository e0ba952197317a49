"""The API's routes, each a module-level function over the app state (`State`, a FastAPI dependency):
completions, chat completions, models, adapter load/unload, health and Prometheus metrics.

Limits are checked here, before a request reaches the engine: the model must exist, n is 1,
max_tokens and the prompt length are bounded (`ServeConfig`).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from lorafit.serving import schemas
from lorafit.serving.errors import ApiError
from lorafit.serving.middleware import authorize
from lorafit.serving.registry import BASE, AdapterError
from lorafit.serving.sampling import Sampling
from lorafit.serving.schemas import envelope, usage_of
from lorafit.serving.state import AppState, State
from lorafit.serving.streaming import chat_chunks, completion_chunks, sse

router = APIRouter()
AUTHORIZED = [Depends(authorize)]
# completions answer JSON, or server-sent events with stream=true: both go in the OpenAPI schema
STREAMING: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {}, "text/event-stream": {}}, "description": "JSON, or SSE when streaming"}
}


@router.get("/health")
def health(state: State) -> dict:
    return {
        "status": "ok",
        "model": state.base_name,
        "adapters_resident": len(state.registry.resident),
        "requests_in_flight": state.in_flight,
    }


@router.get("/metrics", dependencies=AUTHORIZED, response_class=PlainTextResponse)
def prometheus(state: State) -> PlainTextResponse:
    return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/models", dependencies=AUTHORIZED)
def list_models(state: State) -> dict:
    """The base model, then each registered adapter (its `parent` is the base)."""
    created, base = int(time.time()), state.base_name
    data = [{"id": base, "object": "model", "created": created, "owned_by": "lorafit"}]
    data += [
        {"id": name, "object": "model", "created": created, "owned_by": "lorafit", "parent": base, "root": base}
        for name in sorted(state.registry.paths)
    ]
    return {"object": "list", "data": data}


@router.post("/v1/completions", dependencies=AUTHORIZED, responses=STREAMING)
async def completions(body: schemas.CompletionRequest, state: State) -> Any:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise ApiError(400, "one prompt per request", "unsupported_parameter", param="prompt")
    adapter = resolve_model(state, body.model)
    ids = check_prompt(state, state.tokenizer(prompts[0], add_special_tokens=False)["input_ids"])
    request = state.submit(adapter, ids, sampling_of(state, body, 16))
    rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if body.stream:
        return sse(completion_chunks(state, request, body, rid, created))
    text, reason, tokens = await state.complete(request)
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
    return envelope(rid, "text_completion", created, body.model, [choice], usage_of(len(ids), tokens))


@router.post("/v1/chat/completions", dependencies=AUTHORIZED, responses=STREAMING)
async def chat(body: schemas.ChatRequest, state: State) -> Any:
    adapter = resolve_model(state, body.model)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    ids = check_prompt(state, chat_prompt(state.tokenizer, messages))
    request = state.submit(adapter, ids, sampling_of(state, body, min(256, state.cfg.max_tokens_limit)))
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if body.stream:
        return sse(chat_chunks(state, request, body, rid, created))
    text, reason, tokens = await state.complete(request)
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
    return envelope(rid, "chat.completion", created, body.model, [choice], usage_of(len(ids), tokens))


@router.post("/v1/load_lora_adapter", dependencies=AUTHORIZED)
def load_adapter(body: schemas.LoadAdapterRequest, state: State) -> dict:
    """Register and load an adapter now, so a bad one is refused here rather than on first use."""
    registry = state.registry
    with registry.lock:  # waits for a running batch
        registry.register(body.lora_name, Path(body.lora_path))
        try:
            registry.ensure({body.lora_name})
        except AdapterError:
            registry.unload(body.lora_name)
            raise
    return {"loaded": body.lora_name}


@router.post("/v1/unload_lora_adapter", dependencies=AUTHORIZED)
def unload_adapter(body: schemas.UnloadAdapterRequest, state: State) -> dict:
    state.registry.unload(body.lora_name)
    return {"unloaded": body.lora_name}


def resolve_model(state: AppState, name: str) -> str:
    """The engine's adapter name for a request's `model`: BASE for the base model's name."""
    if name == state.base_name:
        return BASE
    if name in state.registry.paths:
        return name
    raise ApiError(404, f"model {name!r} does not exist; GET /v1/models lists them", "model_not_found", param="model")


def sampling_of(state: AppState, body: schemas._Sampled, default_max: int) -> Sampling:
    if body.n != 1:
        raise ApiError(400, "n > 1 is not supported", "unsupported_parameter", param="n")
    wanted = body.max_completion_tokens or body.max_tokens or default_max
    limit = state.cfg.max_tokens_limit
    if wanted > limit:
        raise ApiError(
            400, f"max_tokens {wanted} is over the server limit {limit}", "max_tokens_limit", param="max_tokens"
        )
    return Sampling(wanted, body.temperature, body.top_p, body.stops(), body.seed, body.ignore_eos)


def check_prompt(state: AppState, ids: list[int]) -> list[int]:
    if not ids:
        raise ApiError(400, "empty prompt", "empty_prompt", param="prompt")
    limit = state.cfg.max_prompt_tokens
    if len(ids) > limit:
        raise ApiError(
            400, f"prompt is {len(ids)} tokens; the limit is {limit}", "context_length_exceeded", param="prompt"
        )
    return ids


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation with the model's chat template (a plain transcript without one)."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return tokenizer(text, add_special_tokens=False)["input_ids"]
