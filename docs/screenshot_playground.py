"""Screenshots of the playground (docs/playground.png in the README) from a running server:

    .venv/bin/python docs/screenshot_playground.py http://127.0.0.1:8000 docs/

Drives Debian's Chromium (deploy/install-chromium.sh) with Playwright: sets a prompt and the
`positive` weight, presses Run, waits for both answers, and writes playground.png (desktop) and
playground-phone.png (a phone's width) into the folder given."""

from __future__ import annotations

import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

SIZES = {"playground.png": {"width": 1280, "height": 820}, "playground-phone.png": {"width": 390, "height": 844}}


def main(url: str, out: Path, prompt: str = "How was your weekend?", weight: str = "2",
         strength: str = "4", max_tokens: str = "40", seed: str = "1") -> None:
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium")
        for name, viewport in SIZES.items():
            page = browser.new_page(viewport=viewport, device_scale_factor=1)
            page.goto(f"{url}/playground")
            page.wait_for_selector("#heads input[type=range]")
            page.fill("#prompt", prompt)
            page.fill("#max_tokens", max_tokens)
            page.fill("#seed", seed)
            page.fill("#wn-positive", weight)
            page.fill("#strength", strength)
            page.click("#run")
            for panel in ("plain", "steered"):
                page.wait_for_selector(f"#{panel} [data-metric=KL]", timeout=300_000)
            page.screenshot(path=str(out / name), full_page=True)
            print(out / name)
        browser.close()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2] if len(sys.argv) > 2 else "docs"))
