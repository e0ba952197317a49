"""`lorafit ui` in a real browser (Debian's chromium driven by Playwright): every page over fake finished
runs, a comparison of two selected runs against the server's own, a run's curves growing while a real
tiny-model training writes them, the fit form against `lorafit estimate --json`, the API key form, and no
request beyond 127.0.0.1 from any page: the `page` fixture records every request of every test and fails
it on one that leaves 127.0.0.1, on a request the Content-Security-Policy refused, or on a JavaScript error.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lorafit.base.units import format_bytes
from lorafit.inputs.sources import BUILTIN_NAMES
from lorafit.reports import compare as compare_report
from lorafit.reports import sweep as sweep_report
from lorafit.reports.sweep_points import best_point, budget_of, pareto_front, sweep_rows
from lorafit.run.rundir import RunDir
from lorafit.run.store import RunStore, record_from_run_dir
from tests.browser.conftest import API_KEY, HOLD_AT, Recorded, open_page
from tests.browser.harness import CHROMIUM, LORAFIT, SWEEP, fill_fit_form, fill_form

pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
if not Path(CHROMIUM).is_file():
    pytest.skip(
        f"no chromium at {CHROMIUM} (apt-get install chromium; or LORAFIT_CHROMIUM=path)", allow_module_level=True
    )

ROW = "[data-testid=run-row]"


def wait_until(check: Callable[[], object], timeout: float, what: str) -> object:
    """Poll `check` until it returns something true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def api_runs(page, ui) -> dict:
    return page.request.get(f"{ui.url}/api/runs").json()


def run_id(runs: dict, label: str) -> str:
    return next(r["id"] for r in runs["runs"] if r["label"] == label)


def shown_ids(page) -> list[str]:
    return page.locator(ROW).evaluate_all("rows => rows.map(r => r.dataset.id)")


def table_cells(page, testid: str) -> list[list[str]]:
    """The cells of a table on the page, header row first."""
    return page.locator(f"[data-testid={testid}] tr").evaluate_all(
        "rows => rows.map(r => [...r.children].map(c => c.textContent))"
    )


def points(page, chart: str = "loss") -> int:
    return int(page.get_attribute(f"[data-testid=chart-{chart}]", "data-points"))


# ---------------------------------------------------------------- train and follow it live (first: it trains)

LIVE_STEPS = 6


def logged(run_dir: Path) -> int:
    """Training rows (those with a loss) in the run's metrics.jsonl now."""
    return sum("loss" in r for r in RunDir(run_dir).metrics())


def alive(pid: int, run_dir: Path) -> bool:
    """Whether the training the page launched (that process id, writing into run_dir) still runs."""
    try:
        return str(run_dir) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def test_a_train_page_starts_a_real_training_and_its_curves_grow_live(browser, ui):
    """The Train form starts a real tiny-model training (POST /api/launch) and the page follows it. The
    training holds after HOLD_AT of its LIVE_STEPS steps until the test releases it (tests/browser/hold), so
    two pages are open while it runs whatever the machine's pace: the launching one on the server-sent
    events, another with the stream blocked (polling /metrics?after=). Each shows exactly the rows
    metrics.jsonl has, held and after, without a reload, then the summary."""
    recorded = Recorded()
    p = open_page(browser, recorded)
    pages, launched_pid, out = [(p, recorded)], None, None
    try:
        p.goto(f"{ui.url}/#/train")
        p.wait_for_selector("[data-testid=train-form]")
        p.evaluate("window.__not_reloaded = true")
        offered = p.locator("#train-data-list option").evaluate_all("os => os.map(o => o.value)")
        assert offered == list(BUILTIN_NAMES)
        assert p.locator("[data-testid=train-root]").inner_text() == str(ui.runs)

        fill_form(p, "train", model="/etc")  # outside the run roots and the working directory: nothing starts
        p.wait_for_selector("[data-testid=train-error]")
        assert p.locator("[data-field=model]").get_attribute("class").split().count("invalid") == 1

        asked = dict(model="random:tiny", data="alpaca", method="lora", batch_size="1", max_length="64")
        with p.expect_response("**/api/launch") as launch:
            fill_form(p, "train", **asked, max_steps=str(LIVE_STEPS))
        answer = launch.value.json()
        launched_pid, out = answer["pid"], Path(answer["run_dir"])
        assert out.parent == ui.runs and p.locator("[data-field=model].invalid").count() == 0
        # the page moves to the run once training wrote its config.yaml (imports, model, data first)
        p.wait_for_selector(f"[data-testid=page-run][data-id='{answer['id']}']", timeout=90_000)
        wait_until(lambda: logged(out) == HOLD_AT, 60, f"the training to hold after step {HOLD_AT}")

        polled = Recorded()
        q = open_page(browser, polled)
        pages.append((q, polled))
        q.route("**/api/runs/*/events", lambda route: route.abort())
        q.goto(f"{ui.url}/#/run/{answer['id']}")
        q.evaluate("window.__not_reloaded = true")
        for page, _ in pages:
            wait_until(lambda page=page: points(page) == HOLD_AT, 30, f"{HOLD_AT} points on the held run's page")
            assert page.locator("[data-testid=page-run] h1 [data-testid=status]").inner_text() == "running"
        assert logged(out) == HOLD_AT < LIVE_STEPS  # still held: the pages show every row there is

        ui.gate.touch()  # let the training go on
        for page, _ in pages:
            page.wait_for_selector("[data-testid=summary]", timeout=60_000)
        wait_until(lambda: not alive(launched_pid, out), 60, "the training to exit")
        assert RunDir(out).summary().status == "ok"
        for page, rec in pages:
            assert points(page) == logged(out) == LIVE_STEPS
            assert page.evaluate("window.__not_reloaded") is True
            assert page.locator("[data-testid=live-state]").inner_text() == "finished"
            assert rec.errors == [] and rec.external() == []
        assert any("/events" in u for u in recorded.requests)
        assert any("/metrics?after=" in u for u in polled.requests)
    finally:
        ui.gate.touch()  # a held training goes on (and ends) even when the test failed
        if launched_pid is not None and alive(launched_pid, out):
            os.kill(launched_pid, signal.SIGKILL)
        for page, _ in pages:
            page.context.close()


def test_train_page_says_launching_needs_a_run_root(page, ui):
    """Without --runs (here: the answer of GET /api/runs rewritten to name no run root) nothing can start."""

    def no_roots(route) -> None:  # noqa: ANN001 (a Playwright route)
        response = route.fetch()
        body = response.json()
        body["sources"]["roots"] = []
        route.fulfill(response=response, json=body)

    page.route("**/api/runs", no_roots)
    page.goto(f"{ui.url}/#/train")
    page.wait_for_selector("[data-testid=train-needs-root]")
    assert "--runs" in page.locator("[data-testid=train-needs-root]").inner_text()
    assert page.locator("[data-testid=train-submit]").is_disabled()


# ---------------------------------------------------------------- the pages


def test_runs_page_lists_sorts_and_filters_every_run_and_shows_the_damaged_one(page, ui):
    page.goto(f"{ui.url}/#/runs")
    page.wait_for_selector("[data-testid=runs-table]")
    api = api_runs(page, ui)
    assert sorted(shown_ids(page)) == sorted(r["id"] for r in api["runs"])
    assert page.locator("[data-testid=problem]").count() == len(api["problems"]) == 1
    assert "broken-run/summary.json" in page.locator("[data-testid=problems]").inner_text()
    # every column fits the 1360-pixel-wide window: the table needs no horizontal scrolling
    overflow = page.locator("[data-testid=runs-table]").evaluate(
        "t => t.parentElement.scrollWidth - t.parentElement.clientWidth"
    )
    assert overflow <= 0, f"the runs table is {overflow} px wider than its card"

    # each memory figure as lorafit prints it, MFU as a percentage
    lora = next(r for r in api["runs"] if r["label"] == "compare-smollm2/lora")
    row = page.locator(f"{ROW}[data-id='{lora['id']}']")
    assert row.locator("[data-col=peak_memory_bytes]").inner_text() == format_bytes(lora["peak_memory_bytes"])
    assert row.locator("[data-col=mfu]").inner_text() == f"{lora['mfu'] * 100:.1f}%"

    # sorted by tokens/s: fastest first, then slowest first; runs without a figure always last
    with_tps = sorted((r for r in api["runs"] if r["tokens_per_s"] is not None), key=lambda r: r["tokens_per_s"])
    page.click("[data-testid=sort-tokens_per_s]")
    assert shown_ids(page)[: len(with_tps)] == [r["id"] for r in reversed(with_tps)]
    page.click("[data-testid=sort-tokens_per_s]")
    assert shown_ids(page)[: len(with_tps)] == [r["id"] for r in with_tps]

    page.select_option("[data-testid=filter-status]", "oom")
    assert sorted(shown_ids(page)) == sorted(r["id"] for r in api["runs"] if r["status"] == "oom")
    page.select_option("[data-testid=filter-status]", "")
    page.fill("[data-testid=filter]", "qlora")
    assert shown_ids(page) == [run_id(api, "compare-smollm2/qlora")]
    page.fill("[data-testid=filter]", "")
    page.select_option("[data-testid=filter-method]", "base")
    assert sorted(shown_ids(page)) == sorted(r["id"] for r in api["runs"] if r["method"] == "base")


def test_run_page_shows_curves_summary_memory_breakdown_and_settings(page, ui):
    lora = run_id(api_runs(page, ui), "compare-smollm2/lora")
    detail = page.request.get(f"{ui.url}/api/runs/{lora}").json()
    page.goto(f"{ui.url}/#/run/{lora}")
    page.wait_for_selector("[data-testid=chart-loss]:not([data-points='0'])")
    logged = [r for r in detail["metrics"] if "loss" in r]
    assert len(logged) == 8  # the committed run's metrics.jsonl
    assert points(page, "loss") == points(page, "tokens_per_s") == points(page, "memory") == len(logged)
    assert page.locator("[data-testid=chart-loss] canvas").count() == 1  # drawn by uPlot

    parts = page.locator("[data-testid=memory-bar] [data-testid=memory-part]")
    shown = dict(
        zip(
            parts.evaluate_all("els => els.map(e => e.dataset.part)"),
            parts.evaluate_all("els => els.map(e => Number(e.dataset.bytes))"),
        )
    )
    assert shown == {p["part"]: p["bytes"] for p in detail["memory_breakdown"] if p["bytes"] > 0}
    summary = page.locator("[data-testid=summary]").inner_text()
    assert format_bytes(detail["summary"]["peak_memory"]["peak_bytes"]) in summary
    assert page.locator("[data-testid=settings] tr[data-key=lora_r] td").inner_text() == "16"
    assert page.locator("[data-testid=run-dir]").inner_text() == detail["run"]["run_dir"]


def test_select_two_runs_compare_them_and_write_the_report(page, ui):
    api = api_runs(page, ui)
    chosen = [run_id(api, "compare-smollm2/lora"), run_id(api, "compare-smollm2/qlora")]
    page.goto(f"{ui.url}/#/runs")
    for i in chosen:
        page.check(f"{ROW}[data-id='{i}'] [data-testid=select-run]")
    with page.expect_response("**/api/compare") as answered:
        page.click("[data-testid=compare-button]")
    page.wait_for_selector("[data-testid=compare-table]", timeout=60_000)
    assert page.evaluate("location.hash") == f"#/compare/{','.join(chosen)}"

    # the comparison report's own table for these two run directories, built here from the files
    rows = compare_report.build_rows([record_from_run_dir(ui.runs / "compare-smollm2" / m) for m in ("lora", "qlora")])
    head, body = compare_report.table_cells(rows)
    assert table_cells(page, "compare-table") == [head, *body]
    gains_head, gains_body, _ = compare_report.improvement_cells(rows)
    assert table_cells(page, "improvement-table") == [gains_head, *gains_body]
    for name in answered.value.json()["charts"]:
        assert page.locator(f"[data-testid=compare-chart-{name}] svg").count() == 1

    # qlora as the baseline: the improvements the report computes against it
    page.select_option("[data-testid=baseline]", "qlora")
    gains_head, gains_body, _ = compare_report.improvement_cells(rows, "qlora")
    wait_until(lambda: table_cells(page, "improvement-table") == [gains_head, *gains_body], 60, "qlora as baseline")

    page.click("[data-testid=write-report]")
    written = page.locator("[data-testid=report-path]")
    written.wait_for(timeout=60_000)
    report = Path(written.inner_text())
    assert report.name == "report.html" and report.is_file() and report.parent.parent == ui.reports
    href = page.get_attribute("[data-testid=report-link]", "href")
    assert page.request.get(f"{ui.url}{href}").text() == report.read_text()


def test_sweep_pages_show_points_ooms_pareto_front_and_best(page, ui):
    with RunStore(ui.store) as store:
        rows = sweep_rows(store.runs(group_name=SWEEP))
    counts = [len(rows), *(sum(r["status"] == s for r in rows) for s in ("ok", "oom", "failed"))]
    assert counts[2] == 2  # out of memory: batch 8 x 1024 with either optimizer
    page.goto(f"{ui.url}/#/sweeps")
    row = page.locator(f"[data-testid=sweep-row][data-name='{SWEEP}']")
    row.wait_for()
    assert row.locator("td").all_inner_texts()[1:5] == [str(n) for n in counts]

    with page.expect_response(f"**/api/sweeps/{SWEEP}") as answered:
        row.locator("a").click()
    page.wait_for_selector("[data-testid=sweep-points]", timeout=60_000)
    front = {r["id"] for r in pareto_front(rows)}
    shown = page.locator("[data-testid=sweep-point]").evaluate_all(
        "rs => rs.map(r => [r.dataset.id, r.dataset.status, r.dataset.pareto === 'true'])"
    )
    assert sorted(shown) == sorted([r["id"], r["status"], r["id"] in front] for r in rows)
    assert page.locator("tr.row-oom").count() == 2  # marked
    assert page.locator("[data-testid=verdict]").inner_text() == sweep_report.verdict(rows)
    best = best_point(rows, budget_of(rows))
    assert best["label"] in page.locator("[data-testid=best-point]").inner_text()
    assert page.locator("tr:has([data-testid=status]) .best-badge").count() == 1
    for name in answered.value.json()["charts"]:
        assert page.locator(f"[data-testid=sweep-chart-{name}] svg").count() == 1


# ---------------------------------------------------------------- will it fit?


def test_fit_form_answers_as_lorafit_estimate(page, ui):
    asked = ["--model", "smollm2-135m", "--method", "qlora", "--batch-size", "2", "--max-length", "512"]
    asked += ["--lora-r", "8", "--device", "cuda", "--budget", "2GB"]
    cli = subprocess.Popen([str(LORAFIT), "estimate", *asked, "--json"], stdout=subprocess.PIPE, text=True)

    page.goto(f"{ui.url}/#/fit")
    page.wait_for_selector("[data-testid=fit-form]")
    fill_fit_form(page, model="/etc")  # outside the run roots and the working directory
    page.wait_for_selector("[data-testid=fit-error]")
    assert page.locator("[data-field=model]").get_attribute("class").split().count("invalid") == 1

    fill_fit_form(
        page, model="smollm2-135m", method="qlora", batch_size="2", max_length="512", lora_r="8", device="cuda",
        budget="2GB",
    )  # fmt: skip
    page.wait_for_selector("[data-testid=fit-answer]", timeout=60_000)

    out, _ = cli.communicate(timeout=120)
    assert cli.returncode == 0
    expected = json.loads(out.splitlines()[-1])
    estimate = expected["estimate"]
    parts = page.locator("[data-testid=fit-breakdown] [data-testid=memory-part]")
    shown = dict(
        zip(
            parts.evaluate_all("els => els.map(e => e.dataset.part)"),
            parts.evaluate_all("els => els.map(e => Number(e.dataset.bytes))"),
        )
    )
    assert shown == {k: v for k, v in estimate["parts"].items() if v > 0}
    assert int(page.get_attribute("[data-testid=fit-total]", "data-bytes")) == estimate["total"]
    fits = estimate["total"] <= expected["budget_bytes"]
    assert page.get_attribute("[data-testid=fit-verdict]", "data-fits") == str(fits).lower()
    command = page.locator("[data-testid=fit-command]").inner_text()
    assert command.startswith("lorafit train ") and "--method qlora --batch-size 2 --max-length 512" in command

    # the largest batch shown fits the budget and one more does not (asked of the same server)
    largest = int(page.get_attribute("[data-testid=fit-max-batch]", "data-value"))
    form = page.evaluate("fitState.values")
    for batch, fit in ((largest, True), (largest + 1, False)):
        answer = page.request.post(f"{ui.url}/api/fit", data={**form, "batch_size": batch}).json()
        assert answer["fits"] is fit, (batch, answer["estimate"]["total"], answer["budget_bytes"])


# ---------------------------------------------------------------- the API key


def test_with_an_api_key_the_page_asks_for_it_and_then_works(page, keyed_ui):
    page.goto(f"{keyed_ui.url}/#/runs")
    page.wait_for_selector("[data-testid=login-form]", state="visible")
    assert page.locator("[data-testid=runs-table]").count() == 0
    page.fill("[data-testid=api-key]", "wrong")
    page.click("[data-testid=login-submit]")
    page.wait_for_selector("[data-testid=login-error]", state="visible")
    page.fill("[data-testid=api-key]", API_KEY)
    page.click("[data-testid=login-submit]")
    page.wait_for_selector("[data-testid=runs-table]")
    assert page.locator("[data-testid=login]").is_hidden()
    listed = page.request.get(f"{keyed_ui.url}/api/runs").json()["runs"]  # the page's cookie now opens the API
    assert sorted(shown_ids(page)) == sorted(r["id"] for r in listed)
    assert API_KEY not in page.evaluate("document.cookie")  # HttpOnly: no script on the page can read it
