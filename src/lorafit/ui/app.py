"""The `lorafit ui` web app: the page (static files) and its JSON API over the runs, on FastAPI.

Security as `lorafit serve`'s: with a key, every /api request needs `Authorization: Bearer KEY` or the
HttpOnly session cookie POST /api/login sets (both compared in constant time); bound to loopback, a
request whose Host is not localhost, 127.0.0.1 or [::1] is refused (DNS rebinding); every response
carries a Content-Security-Policy that allows nothing but this origin (and data: images), so the page
makes no external request. Requests name runs, sweeps and reports by id, never by path.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import math
import os
import secrets
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from lorafit.base.errors import UserError
from lorafit.ui import views
from lorafit.ui.catalog import Catalog, Run
from lorafit.ui.fit import FitRequest
from lorafit.ui.launch import LaunchRequest

STATIC = Path(__file__).parent / "static"
CSP = "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'"
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
COOKIE = "lorafit_ui_session"
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
POLL_S = 0.5  # how often the live stream looks at metrics.jsonl
PING_S = 15.0  # a comment line this often keeps proxies from closing an idle stream
REPORT_FILES = {"report.html": "text/html; charset=utf-8", "report.md": "text/markdown; charset=utf-8"}


@dataclass
class UiSettings:
    """What `lorafit ui` was started with. `cwd`: the working directory (model directories under it may
    be estimated; relative paths are resolved against it)."""

    store: Path | None = None
    roots: list[Path] = field(default_factory=list)
    host: str = "127.0.0.1"
    api_key: str | None = None
    reports_dir: Path = Path("ui-reports")
    cwd: Path = field(default_factory=Path.cwd)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: only this machine can connect."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name of a Host header, without its port: `[::1]:7860` -> `::1`, `localhost:7860` -> `localhost`."""
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rpartition(":")[0] if ":" in header else header


def same_origin(headers: Headers) -> bool:
    """A request that changes something (writes a report, starts a run) comes from this server's own page:
    a browser names the page's origin in Origin, which must be this Host (no Origin: not a browser's)."""
    origin = headers.get("origin")
    return origin is None or urlsplit(origin).netloc == headers.get("host", "")


def finite(value: Any) -> Any:
    """`value` with NaN and infinities as None: JSON has no such numbers, and the page parses strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value: Any) -> str:
    return json.dumps(finite(value), default=str, allow_nan=False)


class Json(JSONResponse):
    """Every JSON answer: non-finite numbers as null."""

    def render(self, content: Any) -> bytes:
        return dumps(content).encode()


def error(status: int, message: str, kind: str, field_name: str | None = None) -> Json:
    body: dict[str, Any] = {"message": message, "type": kind}
    if field_name is not None:
        body["field"] = field_name
    return Json({"error": body}, status_code=status)


class Auth:
    """The API key (None: open) and the session token the login cookie carries."""

    def __init__(self, key: str | None) -> None:
        self.key = key
        self.session = secrets.token_urlsafe(32)

    def allows(self, headers: Headers) -> bool:
        if self.key is None:
            return True
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key.encode()):
            return True
        cookies: SimpleCookie = SimpleCookie()
        try:
            cookies.load(headers.get("cookie", ""))
        except Exception:  # a malformed Cookie header is no session
            return False
        morsel = cookies.get(COOKIE)
        return morsel is not None and hmac.compare_digest(morsel.value.encode(), self.session.encode())

    def check_key(self, key: str) -> bool:
        return self.key is None or hmac.compare_digest(key.encode(), self.key.encode())


class Guard:
    """ASGI middleware around the whole app: the Host check, the key on /api, and the security headers
    on every response (errors included)."""

    def __init__(self, app: Any, auth: Auth, loopback: bool) -> None:
        self.app, self.auth, self.loopback = app, auth, loopback

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_secured(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        headers = Headers(scope=scope)
        if self.loopback and host_name(headers.get("host", "")) not in LOCAL_NAMES:
            refused = error(421, "this server answers only to localhost, 127.0.0.1 or [::1]", "host_not_allowed")
            return await refused(scope, receive, send_secured)
        if scope.get("method") not in ("GET", "HEAD") and not same_origin(headers):
            refused = error(403, "cross-origin request refused", "cross_origin")
            return await refused(scope, receive, send_secured)
        path = scope.get("path", "")
        if path.startswith("/api/") and path != "/api/login" and not self.auth.allows(headers):
            denied = error(401, "missing or wrong API key (Authorization: Bearer <key>, or log in)", "invalid_api_key")
            return await denied(scope, receive, send_secured)
        await self.app(scope, receive, send_secured)


# ---------------------------------------------------------------- request bodies


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CompareRequest(Strict):
    ids: list[str] = Field(min_length=1)
    baseline: str | None = None


class LoginRequest(Strict):
    key: str


# ---------------------------------------------------------------- the live stream


class MetricsTail:
    """New rows of a metrics.jsonl since the last read (whole lines only: the last may still be written)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.last_step, self.inode = path, 0, None, None

    def read(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as f:
                st = os.fstat(f.fileno())
                if st.st_ino != self.inode or st.st_size < self.offset:  # rewritten (a resume keeps the rows
                    self.offset, self.inode = 0, st.st_ino  # up to its checkpoint, replacing the file)
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        rows = []
        for line in data[:end].splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            step = row.get("step") if isinstance(row, dict) else None
            if isinstance(step, int) and self.last_step is not None and step <= self.last_step:
                continue  # already sent before the file was rewritten
            self.last_step = step if isinstance(step, int) else self.last_step
            rows.append(row)
        return rows


def sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {dumps(data)}\n\n"


async def live_events(run: Run, request: Request) -> AsyncIterator[str]:
    """Every metrics row (those written so far, then each new one), status changes, and `done` once the run
    has its summary.json or is not running."""
    if run.dir is None:  # a stored run without its directory: all it has
        for row in run.metrics:
            yield sse("metrics", row)
        yield sse("status", {"status": run.entry.status})
        yield sse("done", {"status": run.entry.status})
        return
    tail, status, quiet_since = MetricsTail(run.dir.metrics_file), None, time.monotonic()
    while True:
        now = await run_in_threadpool(views.status_of, run)  # before the rows: rows come before the summary
        rows = await run_in_threadpool(tail.read)
        for row in rows:
            yield sse("metrics", row)
        if now != status:
            status = now
            yield sse("status", {"status": status})
        if status != "running":
            yield sse("done", {"status": status})
            return
        if rows:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > PING_S:
            quiet_since = time.monotonic()
            yield ": ping\n\n"
        if await request.is_disconnected():
            return
        await asyncio.sleep(POLL_S)


# ---------------------------------------------------------------- the app


def static_file(name: str) -> Path:
    """A file of the page's static directory; no dot-files, no `..`, no directory listing."""
    parts = PurePosixPath(name).parts
    if not parts or "\\" in name or any(p in ("..", ".") or p.startswith(".") for p in parts):
        raise HTTPException(404, f"no static file {name!r}")
    path = (STATIC / name).resolve()
    if not path.is_relative_to(STATIC.resolve()) or not path.is_file():
        raise HTTPException(404, f"no static file {name!r}")
    return path


def install_errors(app: FastAPI) -> None:
    async def not_found(request: Request, e: views.NotFound) -> Json:
        return error(404, str(e), "not_found")

    async def user_error(request: Request, e: UserError) -> Json:
        return error(422, str(e), "invalid_request", e.field)

    async def invalid(request: Request, e: RequestValidationError) -> Json:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path"))
        return error(422, f"{where}: {first.get('msg', 'invalid request')}", "invalid_request", where or None)

    async def http_error(request: Request, e: HTTPException) -> Json:
        return error(e.status_code, str(e.detail), "not_found" if e.status_code == 404 else "http_error")

    app.add_exception_handler(views.NotFound, not_found)  # type: ignore[arg-type]
    app.add_exception_handler(UserError, user_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, invalid)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, http_error)  # type: ignore[arg-type]


class UiState:
    """What the routes share: the catalog, the reports written so far, and one lock for matplotlib
    (pyplot is not thread-safe, and sync routes run on a thread pool)."""

    def __init__(self, settings: UiSettings) -> None:
        self.settings = settings
        self.catalog = Catalog(settings.store, settings.roots)
        self.reports: dict[str, Path] = {}
        self.launched: list[subprocess.Popen] = []
        self.charts = threading.Lock()

    def run(self, run_id: str) -> Run:
        return views.get_run(self.catalog.scan(), run_id)

    def drawing(self, make: Callable[[], Any]) -> Any:
        with self.charts:
            return make()


def create_app(settings: UiSettings) -> Any:
    """The ASGI app: the FastAPI routes inside the Guard."""
    state = UiState(settings)
    auth = Auth(settings.api_key)
    app = FastAPI(title="lorafit ui", default_response_class=Json, docs_url=None, redoc_url=None, openapi_url=None)
    install_errors(app)
    add_page_routes(app)
    add_run_routes(app, state)
    add_study_routes(app, state)
    add_fit_routes(app, state, auth)
    return Guard(app, auth, is_loopback(settings.host))


def add_page_routes(app: FastAPI) -> None:
    @app.get("/", response_model=None)
    def index() -> FileResponse | Json:
        page = STATIC / "index.html"
        if not page.is_file():
            return error(404, f"the page is not installed: {page} is missing", "page_missing")
        return FileResponse(page, media_type="text/html; charset=utf-8", headers={"cache-control": "no-cache"})

    @app.get("/static/{name:path}")
    def static(name: str) -> FileResponse:
        return FileResponse(static_file(name), headers={"cache-control": "no-cache"})


def add_run_routes(app: FastAPI, state: UiState) -> None:
    @app.get("/api/runs")
    def runs() -> dict[str, Any]:
        scan = state.catalog.scan()
        return {
            "runs": [r.entry.to_dict() for r in scan.runs],
            "problems": [vars(p) for p in scan.problems],
            "sources": state.catalog.sources(),
        }

    @app.get("/api/runs/{run_id}")
    def run(run_id: str) -> dict[str, Any]:
        return views.detail(state.run(run_id))

    @app.get("/api/runs/{run_id}/metrics")
    def metrics(run_id: str, after: int = -1) -> dict[str, Any]:
        return views.metrics_after(state.run(run_id), after)

    @app.get("/api/runs/{run_id}/events")
    async def events(run_id: str, request: Request) -> StreamingResponse:
        found = await run_in_threadpool(state.run, run_id)
        headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}
        return StreamingResponse(live_events(found, request), media_type="text/event-stream", headers=headers)


def add_study_routes(app: FastAPI, state: UiState) -> None:
    @app.post("/api/compare")
    def compare(body: CompareRequest) -> dict[str, Any]:
        records = views.report_records(state.catalog.scan(), body.ids)
        return state.drawing(lambda: views.compare(records, body.baseline))

    @app.post("/api/compare/report")
    def compare_report(body: CompareRequest) -> dict[str, Any]:
        records = views.report_records(state.catalog.scan(), body.ids)
        out = state.drawing(lambda: views.write_compare_report(records, state.settings.reports_dir, body.baseline))
        state.reports[out.name] = out
        return {"path": str(out / "report.html"), "url": f"/api/reports/{out.name}/report.html"}

    @app.get("/api/reports/{dirname}/{name}")
    def report_file(dirname: str, name: str) -> FileResponse:
        out = state.reports.get(dirname)
        if out is None or name not in REPORT_FILES or not (out / name).is_file():
            raise views.NotFound(f"no report {dirname}/{name} written by this server")
        return FileResponse(out / name, media_type=REPORT_FILES[name])

    @app.get("/api/sweeps")
    def sweeps() -> dict[str, Any]:
        return views.sweeps(state.catalog.scan())

    @app.get("/api/sweeps/{name}")
    def sweep(name: str) -> dict[str, Any]:
        scan = state.catalog.scan()
        return state.drawing(lambda: views.sweep_detail(scan, name))


def add_fit_routes(app: FastAPI, state: UiState, auth: Auth) -> None:
    from lorafit.ui import fit as fitting

    allowed = [*(r.resolve() for r in state.settings.roots), state.settings.cwd.resolve()]

    @app.get("/api/fit/options")
    def fit_options() -> dict[str, Any]:
        return fitting.options()

    @app.post("/api/fit")
    def fit(body: FitRequest) -> dict[str, Any]:
        return fitting.fit(body, allowed)

    @app.post("/api/launch")
    def launch(body: LaunchRequest) -> dict[str, Any]:
        from lorafit.ui import launch as launching

        cfg = launching.launch_config(body.args, state.settings.roots, allowed)
        process, answer = launching.start(cfg, state.settings.reports_dir / "launches")
        state.launched = [p for p in state.launched if p.poll() is None] + [process]  # reap the finished
        return answer

    @app.post("/api/login")
    def login(body: LoginRequest) -> Json:
        if not auth.check_key(body.key):
            return error(401, "wrong API key", "invalid_api_key")
        answer = Json({"ok": True, "auth": auth.key is not None})
        if auth.key is not None:
            answer.set_cookie(COOKIE, auth.session, httponly=True, samesite="strict", path="/")
        return answer
