"""What every request passes through: the body size limit, the bearer key, the access log and the
request metrics. The access log has no headers (no keys) and no prompt text."""

from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Any

from fastapi import Request

from lorafit.serving.errors import ApiError, error_body
from lorafit.serving.state import State, get_state

access_log = logging.getLogger("lorafit.access")


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


def authorize(request: Request, state: State) -> None:
    """FastAPI dependency: the bearer key, compared in constant time (no key configured: open)."""
    if state.api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
        raise ApiError(401, "missing or wrong API key (Authorization: Bearer <key>)", "invalid_api_key")


async def log_and_count(request: Request, call_next: Any) -> Any:
    """HTTP middleware: count and time each request by route and status, and log it as one JSON line."""
    started = time.perf_counter()
    response = await call_next(request)
    elapsed = time.perf_counter() - started
    route = request.url.path
    metrics = get_state(request).metrics
    metrics.requests.labels(route=route, status=str(response.status_code)).inc()
    metrics.latency.labels(route=route).observe(elapsed)
    line = {
        "method": request.method,
        "path": route,
        "status": response.status_code,
        "ms": round(1000 * elapsed, 1),
        "client": request.client.host if request.client else None,
    }
    access_log.info(json.dumps(line))
    return response
