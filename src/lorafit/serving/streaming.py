"""Streamed answers as server-sent events: one `data: {chunk}` per text delta, an optional usage
chunk, then `data: [DONE]`, as OpenAI streams them. Once the headers are sent an error cannot change
the status, so it travels as the stream's last event."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from lorafit.serving.engine import GenerationRequest
from lorafit.serving.errors import error_body
from lorafit.serving.registry import AdapterError
from lorafit.serving.schemas import _Sampled, envelope, usage_of
from lorafit.serving.state import AppState


def sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n".encode()
        except AdapterError as e:  # headers are sent: the error travels as the stream's last event
            yield f"data: {json.dumps(error_body(e.message, e.code))}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def completion_chunks(
    state: AppState, request: GenerationRequest, body: _Sampled, rid: str, created: int
) -> AsyncIterator[dict]:
    """`text_completion` chunks of a /v1/completions stream."""
    async for event in state.events(request):
        choice = {"index": 0, "text": event.text, "logprobs": None, "finish_reason": event.finish_reason}
        yield envelope(rid, "text_completion", created, body.model, [choice])
        if event.finish_reason is not None and body.include_usage():
            usage = usage_of(len(request.prompt_ids), event.completion_tokens)
            yield envelope(rid, "text_completion", created, body.model, [], usage)


async def chat_chunks(
    state: AppState, request: GenerationRequest, body: _Sampled, rid: str, created: int
) -> AsyncIterator[dict]:
    """`chat.completion.chunk`s of a /v1/chat/completions stream: the first delta names the role."""
    first = True
    async for event in state.events(request):
        delta = {"role": "assistant", "content": event.text} if first else {"content": event.text}
        if event.finish_reason is not None and not event.text:
            delta = {}
        first = False
        choice = {"index": 0, "delta": delta, "finish_reason": event.finish_reason}
        yield envelope(rid, "chat.completion.chunk", created, body.model, [choice])
        if event.finish_reason is not None and body.include_usage():
            usage = usage_of(len(request.prompt_ids), event.completion_tokens)
            yield envelope(rid, "chat.completion.chunk", created, body.model, [], usage)
