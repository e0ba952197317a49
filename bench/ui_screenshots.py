"""Screenshots of every page of `lorafit ui` for docs/ui.md, over realistic runs written without training.

    .venv/bin/python bench/ui_screenshots.py [--out docs/ui]

The runs are those of the browser tests (tests/browser/harness.py): the committed SmolLM2-135M comparison
(full, LoRA, QLoRA and the two base evaluations), a store holding a batch x length x optimizer sweep,
and a damaged run directory. Drives Debian's chromium (/usr/bin/chromium, or $LORAFIT_CHROMIUM) through
Playwright, as the tests do; about 30 s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402
from playwright.sync_api import Page, sync_playwright  # noqa: E402

from tests.browser.harness import SWEEP, fill_fit_form, launch_chromium, start_ui, stop, write_fake_runs  # noqa: E402

VIEWPORT = {"width": 1360, "height": 900}


def shoot(page: Page, out: Path, name: str, max_height: int = 1700) -> None:
    """The page from the top, at most max_height pixels of it."""
    height = min(max_height, page.evaluate("document.documentElement.scrollHeight"))
    clip = {"x": 0, "y": 0, "width": VIEWPORT["width"], "height": height}
    path = out / f"{name}.png"
    page.screenshot(path=str(path), clip=clip, full_page=True)
    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)  # a third of the bytes, same look
    print(out / f"{name}.png")


def run_ids(page: Page, url: str) -> dict[str, str]:
    """{label: id} of the runs the server lists."""
    runs = page.request.get(f"{url}/api/runs").json()["runs"]
    return {r["label"]: r["id"] for r in runs}


def take_all(page: Page, url: str, out: Path) -> None:
    ids = run_ids(page, url)
    chosen = [ids[f"compare-smollm2/{m}"] for m in ("full", "lora", "qlora", "base")]

    page.goto(f"{url}/#/runs")
    page.wait_for_selector("[data-testid=runs-table]")
    for run_id in chosen[1:3]:
        page.check(f"[data-testid=run-row][data-id='{run_id}'] [data-testid=select-run]")
    shoot(page, out, "runs", 1100)

    page.goto(f"{url}/#/run/{ids['compare-smollm2/lora']}")
    page.wait_for_selector("[data-testid=chart-loss]:not([data-points='0'])")
    shoot(page, out, "run")

    page.goto(f"{url}/#/compare/{','.join(chosen)}")
    page.wait_for_selector("[data-testid=compare-table]", timeout=60_000)
    shoot(page, out, "compare", 2200)

    page.goto(f"{url}/#/sweeps")
    page.wait_for_selector("[data-testid=sweeps-table]")
    shoot(page, out, "sweeps", 500)

    page.goto(f"{url}/#/sweep/{SWEEP}")
    page.wait_for_selector("[data-testid=sweep-points]", timeout=60_000)
    shoot(page, out, "sweep", 2200)

    page.goto(f"{url}/#/fit")
    page.wait_for_selector("[data-testid=fit-form]")
    fill_fit_form(
        page, model="smollm2-135m", method="qlora", batch_size="8", max_length="2048", device="cuda", budget="8GB"
    )
    page.wait_for_selector("[data-testid=fit-answer]", timeout=60_000)
    shoot(page, out, "fit", 1100)

    page.goto(f"{url}/#/train")
    page.wait_for_selector("[data-testid=train-form]")
    for name, value in {"model": "random:tiny", "batch_size": "2", "max_length": "256", "max_steps": "50"}.items():
        page.fill(f"[data-testid=train-{name}]", value)
    shoot(page, out, "train", 800)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/ui"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        runs, store = write_fake_runs(root)
        reports = str(root / "reports")
        proc, url = start_ui("--runs", str(runs), "--store", str(store), "--reports-dir", reports, cwd=root)
        try:
            with sync_playwright() as p:
                browser = launch_chromium(p)
                take_all(browser.new_page(viewport=VIEWPORT), url, args.out.resolve())
                browser.close()
        finally:
            stop(proc)


if __name__ == "__main__":
    main()
