"""API routes alone: each is a module-level function over an `AppState`, so these tests call them (or
a minimal app built from the state) with a stub engine: no model, no uvicorn, no process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lorafit.base.config import ServeConfig
from lorafit.serving import routes
from lorafit.serving.api import app_for
from lorafit.serving.engine import Event, GenerationRequest
from lorafit.serving.errors import ApiError
from lorafit.serving.registry import BASE, AdapterRegistry
from lorafit.serving.schemas import ChatRequest, CompletionRequest
from lorafit.serving.state import AppState


class StubTokenizer:
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) for c in text]}


class StubEngine:
    """Answers every request at once with the words of REPLY, then finish_reason "length"."""

    REPLY = ["Hello", " there"]

    def __init__(self) -> None:
        self.registry = AdapterRegistry(None, [], max_resident=2)
        self.registry.paths["a1"] = Path("/adapters/a1")
        self.tokenizer = StubTokenizer()
        self.on_batch = None
        self.submitted: list[GenerationRequest] = []

    def submit(self, request: GenerationRequest) -> None:
        self.submitted.append(request)
        for word in self.REPLY:
            request.emit(Event(text=word))
        request.emit(Event(finish_reason="length", completion_tokens=len(self.REPLY)))

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


@pytest.fixture
def state() -> AppState:
    cfg = ServeConfig(model="base", api_key="k", max_tokens_limit=8, max_prompt_tokens=30)
    return AppState.create(StubEngine(), cfg, "base", "k")  # type: ignore[arg-type]


def test_health_and_models_read_the_state(state):
    assert routes.health(state) == {"status": "ok", "model": "base", "adapters_resident": 0, "requests_in_flight": 0}
    models = routes.list_models(state)["data"]
    assert [m["id"] for m in models] == ["base", "a1"] and models[1]["parent"] == "base"


def test_a_completion_routes_to_its_adapter_and_counts_usage(state):
    body = CompletionRequest(model="a1", prompt="hi", max_tokens=5, temperature=0)
    answer = asyncio.run(routes.completions(body, state))
    assert answer["object"] == "text_completion"
    assert answer["choices"][0]["text"] == "Hello there" and answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    (request,) = state.engine.submitted
    assert request.adapter == "a1" and request.sampling.max_tokens == 5 and request.prompt_ids == [104, 105]
    assert state.in_flight == 0 and request.cancelled.is_set()  # finished: the engine stops decoding it


def test_a_chat_on_the_base_model(state):
    body = ChatRequest(model="base", messages=[{"role": "user", "content": "yo"}])
    answer = asyncio.run(routes.chat(body, state))
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "Hello there"}
    assert state.engine.submitted[0].adapter == BASE
    assert state.engine.submitted[0].sampling.max_tokens == 8  # min(256, max_tokens_limit)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (dict(model="nope", prompt="hi"), 404, "model"),
        (dict(model="a1", prompt="hi", max_tokens=9), 400, "max_tokens"),
        (dict(model="a1", prompt="hi", n=2), 400, "n"),
        (dict(model="a1", prompt="x" * 31), 400, "prompt"),
        (dict(model="a1", prompt=""), 400, "prompt"),
        (dict(model="a1", prompt=["a", "b"]), 400, "prompt"),
    ],
)
def test_refused_completions_never_reach_the_engine(state, body, status, param):
    with pytest.raises(ApiError) as info:
        asyncio.run(routes.completions(CompletionRequest(**body), state))
    assert (info.value.status, info.value.param) == (status, param)
    assert state.engine.submitted == [] and state.in_flight == 0


def test_too_many_in_flight_is_429(state):
    state.in_flight = state.cfg.max_concurrent
    with pytest.raises(ApiError) as info:
        asyncio.run(routes.completions(CompletionRequest(model="a1", prompt="hi", max_tokens=2), state))
    assert info.value.status == 429 and info.value.code == "rate_limited"


def test_the_app_built_from_the_state_checks_keys_and_answers_openai_errors(state):
    client = TestClient(app_for(state))
    assert client.get("/health").status_code == 200
    assert client.get("/v1/models").json()["error"]["code"] == "invalid_api_key"
    auth = {"Authorization": "Bearer k"}
    assert client.get("/v1/models", headers=auth).status_code == 200
    missing = client.post("/v1/completions", json={"prompt": "hi"}, headers=auth)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "model"
    streamed = client.post(
        "/v1/completions", json={"model": "a1", "prompt": "hi", "max_tokens": 2, "stream": True}, headers=auth
    )
    lines = [line for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and '"Hello"' in lines[0]
    big = client.post("/v1/completions", content=b"x" * 1_000_001, headers=auth)
    assert big.status_code == 413
