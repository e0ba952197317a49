"""The OpenAI-compatible HTTP API on FastAPI: completions, chat completions (streaming as server-sent
events), models, adapter load/unload, health and Prometheus metrics.

`create_app` assembles it: the routes (`routes`) over one shared state (`state.AppState`), the
error handlers (`errors`), streaming (`streaming`) and what every request passes through
(`middleware`). Security defaults: a bearer key (constant-time compare) on every /v1 route and
/metrics when one is set; request bodies, prompt length, max_tokens, n and requests in flight are
bounded; errors use the OpenAI error shape; the access log has no headers (no keys) and no prompt text.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from lorafit.base.config import ServeConfig
from lorafit.serving.engine import Engine
from lorafit.serving.errors import install_error_handlers
from lorafit.serving.middleware import BodyLimit, log_and_count
from lorafit.serving.routes import router
from lorafit.serving.state import AppState


def create_app(engine: Engine, cfg: ServeConfig, base_name: str, api_key: str | None) -> FastAPI:
    """The API over `engine`; the engine's scheduler runs while the app does (its lifespan)."""
    return app_for(AppState.create(engine, cfg, base_name, api_key))


def app_for(state: AppState) -> FastAPI:
    """The API over a prepared state (tests build one around a stub engine)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        yield
        await asyncio.to_thread(state.engine.stop)  # after uvicorn has let in-flight requests finish

    app = FastAPI(title="lorafit serve", lifespan=lifespan)
    app.state.engine = state.engine
    app.state.lorafit = state
    install_error_handlers(app)
    app.middleware("http")(log_and_count)
    app.include_router(router)
    app.add_middleware(BodyLimit, limit=state.cfg.max_body_bytes)
    return app
