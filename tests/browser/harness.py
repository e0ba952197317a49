"""What the UI's browser tests and its screenshots (bench/ui_screenshots.py) share: realistic finished
runs written without training, a `lorafit ui` server in a subprocess, Debian's chromium through Playwright.

The compare runs are the committed SmolLM2-135M comparison (docs/benchmarks/2026-11-23-cpu-compare-smollm2:
full, LoRA and QLoRA runs with summary.json, metrics.jsonl, config.yaml and eval.json, and the two base
evaluations), copied into a run root. The sweep is a run store group of batch x length x optimizer points
(some out of memory, one failed), as `lorafit sweep` stores them. A damaged run directory (summary.json
that is not JSON) shows how the page lists problems.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from lorafit.run.store import RunRecord, RunStore
from lorafit.run.summary import Summary

REPO = Path(__file__).resolve().parents[2]
HOLD = Path(__file__).resolve().parent / "hold"  # sitecustomize.py: holds a training between two steps
CHROMIUM = os.environ.get("LORAFIT_CHROMIUM", "/usr/bin/chromium")
LORAFIT = Path(sys.executable).with_name("lorafit")
COMPARE = REPO / "docs" / "benchmarks" / "2026-11-23-cpu-compare-smollm2"
COMPARE_RUNS = ("full", "lora", "qlora", "base", "base-nf4")
SWEEP = "sweep-batch-length"
GIB = 2**30


def write_fake_runs(root: Path) -> tuple[Path, Path]:
    """Under `root`: runs/ (the comparison's run dirs and a damaged one) and runs.sqlite (a sweep);
    returns (run root, store)."""
    runs = root / "runs"
    for name in COMPARE_RUNS:
        shutil.copytree(COMPARE / name, runs / "compare-smollm2" / name)
    broken = runs / "broken-run"
    broken.mkdir(parents=True)
    (broken / "summary.json").write_text('{"status": "ok", "tokens_per_s": ')  # cut off mid-write
    store = root / "runs.sqlite"
    with RunStore(store) as s:
        for i, record in enumerate(sweep_points()):
            record.created = 1_764_000_000 + i
            s.put(record)
    return runs, store


def sweep_points() -> list[RunRecord]:
    """A batch x length x optimizer sweep on SmolLM2-135M under a 6 GiB budget: throughput grows with
    batch and length, memory with both; the largest points run out of memory."""
    out = []
    for optimizer in ("adamw", "adamw_8bit"):
        for batch in (1, 2, 4, 8):
            for length in (256, 512, 1024):
                out.append(_point(batch, length, optimizer))
    return out


def _point(batch: int, length: int, optimizer: str) -> RunRecord:
    tokens = batch * length
    # activations grow with the tokens and (attention) with the length; the 8-bit optimizer saves a little
    peak = 1.1 * GIB + tokens * 0.8e6 + batch * length**2 * 120 - (0.15 * GIB if optimizer == "adamw_8bit" else 0)
    status = "oom" if peak > 7.5 * GIB else "ok"
    if (batch, length, optimizer) == (8, 512, "adamw_8bit"):
        status = "failed"
    config = {
        "model": "smollm2-135m",
        "method": "lora",
        "batch_size": batch,
        "max_length": length,
        "optimizer": optimizer,
        "memory_budget": "6GiB",
        "out": f"runs/sweep/b{batch}-l{length}-{optimizer}",
    }
    label = f"batch_size={batch} max_length={length} optimizer={optimizer}"
    summary = None
    metrics: list[dict] = []
    if status == "ok":
        # throughput grows with the tokens per step, less with the length (attention), a little less 8-bit
        tps = 95 * math.log2(2 + tokens / 256) * (1.06 - 0.05 * math.log2(length / 256))
        tps *= 0.96 if optimizer == "adamw_8bit" else 1.0
        summary = Summary.from_dict(
            {
                "schema_version": 2,
                "status": "ok",
                "model": "smollm2-135m",
                "method": "lora",
                "optimizer": optimizer,
                "steps": 8,
                "tokens_per_s": tps,
                "peak_memory": {"peak_bytes": int(peak), "kind": "cpu_rss"},
                "j_per_token": None,
                "energy_unavailable_reason": "CPU run and no RAPL energy counter on this machine",
                "mfu": tps / 900,
                "loss_first": 1.9,
                "loss_last": 1.55 + 0.01 * batch,
                "loss_mean": 1.7,
            }
        )
        metrics = [
            {"step": s, "loss": 1.9 - 0.04 * s, "tokens_per_s": tps, "memory_bytes": int(peak)} for s in range(1, 9)
        ]
    error = {"oom": "out of memory (exit 4)", "failed": "RuntimeError: NaN loss"}.get(status)
    return RunRecord(label, "sweep", status, config, summary=summary, metrics=metrics, group_name=SWEEP, error=error)


def compare_summary(name: str) -> dict:
    """The committed summary.json of one of the comparison's training runs."""
    return json.loads((COMPARE / name / "summary.json").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ui(
    *args: str, cwd: Path, log_name: str = "ui.log", env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    """`lorafit ui ARGS --port <free>` started in a subprocess (not yet answering): (process, base url).
    Its output goes to cwd/log_name; `env` is added to this process's environment (and so reaches the
    trainings the server launches)."""
    port = free_port()
    argv = [str(LORAFIT), "ui", *args, "--port", str(port)]
    with (cwd / log_name).open("w") as log:
        proc = subprocess.Popen(argv, cwd=cwd, stdout=log, stderr=log, env={**os.environ, **(env or {})})
    return proc, f"http://127.0.0.1:{port}"


def holding_env(step: int, gate: Path) -> dict[str, str]:
    """The environment under which a `lorafit train` (started by the server or by a test) holds after
    writing metrics row `step` until the file `gate` exists: tests/browser/hold/sitecustomize.py."""
    path = os.pathsep.join(p for p in (str(HOLD), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "LORAFIT_TEST_HOLD": f"{step}:{gate}"}


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 60) -> None:
    """Wait until the server answers GET /; its log in the error when it exits or does not answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lorafit ui exited {proc.returncode}: {log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    stop(proc)
    raise RuntimeError(f"lorafit ui did not answer within {timeout} s: {log.read_text()}")


def start_ui(*args: str, cwd: Path) -> tuple[subprocess.Popen, str]:
    """`lorafit ui ARGS` on a free port, once it answers: (process, base url)."""
    proc, url = launch_ui(*args, cwd=cwd)
    wait_ready(proc, url, cwd / "ui.log")
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    """End a process this harness started (by its own handle), killing it when it does not stop."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def launch_chromium(playwright):  # noqa: ANN001, ANN201 (playwright is optional: no types at import)
    """Debian's chromium under Playwright (Playwright's own browser download is never used)."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])


SELECTS = ("method", "precision", "optimizer", "device")  # the forms' <select> fields; the others are typed


def fill_form(page, prefix: str, **values: str) -> None:  # noqa: ANN001 (a Playwright page)
    """Fill a form's fields (by their form names; `prefix`: fit or train) and submit it."""
    for name, value in values.items():
        target = f"[data-testid={prefix}-{name}]"
        if name in SELECTS:
            page.select_option(target, value)
        else:
            page.fill(target, value)
    page.click(f"[data-testid={prefix}-submit]")


def fill_fit_form(page, **values: str) -> None:  # noqa: ANN001 (a Playwright page)
    fill_form(page, "fit", **values)
