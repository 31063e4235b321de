"""The README's screenshots of the browser page, one per tab, made by hand (not by CI) against a running `tav-ui`
started with `--admin-token-file` (so the Train tab shows):

    python scripts/screenshots.py --url http://127.0.0.1:7860/ [--prompt TEXT --steps 4 --out docs]

It drives Debian's headless Chromium through Playwright as tests/test_ui.py does: Generate picks the first model,
generates from the prompt and waits for the video; Train picks the last base and opens More settings; Models
refreshes the models and the jobs. Writes docs/ui-generate.png, docs/ui-train.png and docs/ui-models.png.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from playwright.sync_api import sync_playwright

FLAGS = ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-component-update"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:7860/")
    p.add_argument("--prompt", default="a red square is moving left")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = p.parse_args(argv)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(300_000)
        page.goto(args.url)
        page.locator("#generate").wait_for()
        page.locator("#prompt textarea").fill(args.prompt)
        steps = page.locator("#steps input[type=number]")
        steps.fill(str(args.steps))
        steps.press("Enter")
        page.locator("#generate").click()
        page.wait_for_function("() => { const v = document.querySelector('#video video');"
                               " return v !== null && v.readyState >= 2 && v.duration > 0; }")
        page.screenshot(path=args.out / "ui-generate.png", full_page=True)
        page.get_by_role("tab", name="Train").click()
        page.locator("#base input").click()
        page.get_by_role("option").last.click()
        page.locator("#caption textarea").fill("a red square is moving right")
        page.locator("#model_id textarea").fill("my-square")
        page.get_by_text("More settings").click()
        page.wait_for_load_state("networkidle")
        page.wait_for_timeout(2000)  # the base's defaults fill in
        page.screenshot(path=args.out / "ui-train.png", full_page=True)
        page.get_by_role("tab", name="Models").click()
        page.locator("#models_refresh").click()
        page.locator("#jobs_refresh").click()
        page.wait_for_timeout(2000)  # the two tables fill in
        page.screenshot(path=args.out / "ui-models.png", full_page=True)
        browser.close()
    for name in ("generate", "train", "models"):
        print(args.out / f"ui-{name}.png")


if __name__ == "__main__":
    main()
