"""`lorafit ui`: the web app over the runs (registered in cli.main)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from lorafit.base.errors import UserError
from lorafit.cli.console import stderr_console as console

DEFAULT_STORE = Path("runs.sqlite")
DEFAULT_RUNS = Path("runs")


def sources(store: Path | None, runs: list[Path]) -> tuple[Path | None, list[Path]]:
    """The store and run roots to show. Given ones must exist; with neither given, runs.sqlite and runs/
    where they exist (possibly nothing: the page then says how to add runs)."""
    if store is None and not runs:
        return (DEFAULT_STORE if DEFAULT_STORE.is_file() else None), ([DEFAULT_RUNS] if DEFAULT_RUNS.is_dir() else [])
    if store is not None and not store.is_file():
        raise UserError("run store not found", file=str(store), field="store")
    for root in runs:
        if not root.is_dir():
            raise UserError("run root not found (give a run directory or a directory of runs)", file=str(root),
                            field="runs")  # fmt: skip
    return store, list(dict.fromkeys(runs))


def checked_key(host: str, api_key: str | None) -> str | None:
    """The API key (flag, else LORAFIT_API_KEY); binding beyond loopback without one is refused."""
    from lorafit.ui.app import is_loopback

    key = api_key or os.environ.get("LORAFIT_API_KEY") or None
    if key is None and not is_loopback(host):
        raise UserError(
            f"--host {host} exposes every run to the network: give --api-key KEY (or set LORAFIT_API_KEY), "
            "or bind 127.0.0.1",
            field="host",
        )
    return key


def free_port(host: str) -> int:
    """A port nothing listens on now, for --port 0."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ui_command(
    store: Annotated[
        Path | None, typer.Option(help="SQLite run store to show [default: runs.sqlite when it exists].")
    ] = None,
    runs: Annotated[
        list[Path] | None,
        typer.Option(
            "--runs",
            metavar="DIR",
            help="Run root: a run directory, or a directory searched for run directories (repeatable) "
            "[default: runs/ when it exists].",
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind; beyond loopback it needs --api-key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 7860,
    api_key: Annotated[
        str | None, typer.Option(help="Key every /api request needs (default: env LORAFIT_API_KEY; none on loopback).")
    ] = None,
    reports_dir: Annotated[Path, typer.Option(help="Where the page's Report button writes reports.")] = Path(
        "ui-reports"
    ),
) -> None:
    """Open the runs in the browser: every run of the store and the run directories (live while training),
    compare runs with the report's tables and charts, sweeps with their Pareto front, and "will it fit?"
    over the estimator. Serves on 127.0.0.1 by default; elsewhere only with an API key."""
    if not 0 <= port < 65536:
        raise UserError(f"port must be in 0..65535 (0: any free port), got {port}", field="port")
    key = checked_key(host, api_key)
    store_path, roots = sources(store, runs or [])
    port = port or free_port(host)  # chosen here, so the address printed below is the one served
    import threading

    import uvicorn

    from lorafit.ui.app import UiSettings, create_app
    from lorafit.ui.fit import warm_up

    settings = UiSettings(store_path, roots, host, key, reports_dir.resolve())
    if store_path is None and not roots:
        console.print(
            "[bold yellow]lorafit ui:[/] no runs.sqlite or runs/ here; the page is empty until you give "
            "--store FILE or --runs DIR"
        )
    shown = f"[{host}]" if ":" in host else host
    listed = ", ".join(map(str, roots)) or "none"
    console.print(f"lorafit ui: http://{shown}:{port}/ (store {store_path or 'none'}; runs {listed})")
    threading.Thread(target=warm_up, name="warm-up", daemon=True).start()
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning", access_log=False)
