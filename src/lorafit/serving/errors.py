"""Errors the API answers with, in the OpenAI error shape: `{"error": {message, type, param, code}}`,
so OpenAI clients raise their usual exceptions with lorafit's message."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from lorafit.serving.registry import AdapterError


class ApiError(Exception):
    """A request the API refuses: `status` is the HTTP status, `code` and `param` the OpenAI fields."""

    def __init__(
        self, status: int, message: str, code: str, kind: str = "invalid_request_error", param: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.kind, self.param = status, message, code, kind, param


def error_body(message: str, code: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def api_error(request: Request, e: ApiError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.code, e.kind, e.param), status_code=e.status)


async def adapter_error(request: Request, e: AdapterError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.code), status_code=e.status)


async def invalid_request(request: Request, e: RequestValidationError) -> JSONResponse:
    """A body that fails its schema: 400 (OpenAI's status, not FastAPI's 422), naming the first bad field."""
    first = e.errors()[0] if e.errors() else {}
    where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    message = f"{where}: {first.get('msg', 'invalid request')}"
    return JSONResponse(error_body(message, "invalid_request", param=where), 400)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, api_error)  # type: ignore[arg-type]
    app.add_exception_handler(AdapterError, adapter_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, invalid_request)  # type: ignore[arg-type]
