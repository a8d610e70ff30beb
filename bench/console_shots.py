"""The README's console screenshots, and what reading took through the page: ``ttt serve`` on the embedded default
model (a subprocess), Debian's chromium driven by Playwright; a session reads the first 24,000 characters of
Genesis (KJV) from a file dropped on the page, then one question goes to it and to the base model side by side.

    python -m bench.console_shots [--out docs]    # writes console.png and console-chat.png, prints the read
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
import time
from pathlib import Path

from bench.server_process import ServerProcess

TEXT = Path(__file__).parent / "data" / "kjv_genesis_exodus.txt"
CHARS = 24_000
QUESTION = "In the story, what did God call the light?"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-sync",
    "--disable-background-networking",
    "--disable-component-update",
]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.console_shots", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs", help="folder of console.png and console-chat.png (default docs)")
    args = p.parse_args(argv)
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs Debian's chromium (apt-get install chromium)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="ttt-console-"))
    document = tmp / "genesis-1-3.txt"
    document.write_text(TEXT.read_text()[:CHARS])
    server = ServerProcess(["--device", "cpu", "--data-dir", str(tmp / "data")], {}, tmp / "server.log")
    try:
        server.wait_ready(300)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(600_000)
            page.goto(server.http)
            page.get_by_label("Name (optional: the server picks one)").fill("genesis")
            page.get_by_role("button", name="Create session").click()
            page.locator('#sessions tbody tr[data-session="genesis"]').wait_for()
            page.get_by_role("link", name="Read", exact=True).click()
            started = time.perf_counter()
            page.locator("#read-files").set_input_files(document)
            page.locator('.upload[data-phase="done"]').wait_for()
            seconds = time.perf_counter() - started
            status = page.locator(".upload .status").inner_text()
            page.screenshot(path=out / "console.png", full_page=True)
            page.get_by_role("link", name="Chat", exact=True).click()
            page.get_by_label("and the base model, side by side").check()
            page.get_by_label("Message").fill(QUESTION)
            page.get_by_label("Message").press("Enter")
            for pane in ("#chat-main", "#chat-base"):
                page.locator(f"{pane} .message.assistant .text:not([aria-busy])").wait_for()
            page.screenshot(path=out / "console-chat.png", full_page=True)
            browser.close()
    finally:
        server.stop()
    tokens = int(re.search(r"read: (\d+) tokens", status)[1])
    print(f"{status} in {seconds:.1f} s through the page: {tokens / seconds:.0f} tokens/s; screenshots in {out}/")


if __name__ == "__main__":
    main()
