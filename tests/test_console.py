"""The web console end to end in a real headless browser: Playwright drives Debian's chromium against a real
``ttt serve`` (a subprocess) on the tiny random Llama with 32-token chunks.

What the page shows is checked against what the server holds (tokens read, chunks trained, sessions on disk);
the curve must receive its points one chunk at a time; a cancelled upload resumed from the page must end with
exactly the tokens of the whole text (nothing lost, nothing read twice). Screenshots of each view go to
``build/screenshots/``. Skipped, with the reason, where Playwright or chromium is missing (``make install``
installs both when it can).
"""

from __future__ import annotations

import io
import json
import shutil
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from conftest import write_keys
from texts import book

from bench.server_process import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "build" / "screenshots"
CHUNK = 32
TIMEOUT_MS = 30_000
KEY = "ttt-console-key-0123456789"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-sync",
    "--disable-background-networking",
    "--disable-component-update",
]
# The one console message a refused key may leave: the browser's own note of the 401 response.
REFUSED_KEY = "status of 401"

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (make install)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (make install puts it in with apt-get where it can)"
)


@contextmanager
def serving(model_dir: Path, data_dir: Path, *args: str):
    env = {
        "TTT_SESSION_DEFAULTS": json.dumps({"ingest": {"chunk_tokens": CHUNK, "context_tokens": CHUNK}}),
        "OMP_NUM_THREADS": "1",
    }
    server = ServerProcess(
        ["--model", str(model_dir), "--device", "cpu", "--data-dir", str(data_dir), *args],
        env,
        data_dir.parent / f"server-{time.monotonic_ns()}.log",
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def open_server(tiny_model_dir, tmp_path_factory):
    with serving(tiny_model_dir, tmp_path_factory.mktemp("console") / "data") as server:
        yield server


class Page:
    """A browser tab on the console that records console errors and failed page scripts."""

    def __init__(self, browser, url: str, **context):
        self.context = browser.new_context(accept_downloads=True, **context)
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.goto(url)

    def shot(self, name: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=SHOTS / f"console-{name}.png", full_page=True)

    def view(self, name: str) -> None:
        self.page.get_by_role("link", name=name, exact=True).click()
        self.page.locator(f"#{name.lower()}-view").wait_for(state="visible")


@pytest.fixture
def tab(browser, open_server):
    tab = Page(browser, open_server.http)
    yield tab
    tab.context.close()
    assert tab.errors == []


def row(page, sid: str):
    return page.locator(f'#sessions tbody tr[data-session="{sid}"]')


def create_session(tab: Page, sid: str) -> None:
    tab.view("Sessions")
    tab.page.get_by_label("Name (optional: the server picks one)").fill(sid)
    tab.page.get_by_role("button", name="Create session").click()
    row(tab.page, sid).wait_for()


def session_info(server: ServerProcess, sid: str) -> httpx.Response:
    return httpx.get(f"{server.http}/v1/sessions/{sid}", timeout=60)


def settled(server: ServerProcess, sid: str) -> dict:
    """The session's info once it trains no more chunks (two reads half a second apart agree)."""
    last = None
    for _ in range(120):
        info = session_info(server, sid).json()
        if last is not None and info["chunks"] == last["chunks"]:
            return info
        last = info
        time.sleep(0.5)
    raise AssertionError(f"session {sid} still training after 60 s")


def watch_curve(page) -> None:
    """Record the number of loss points after every change of the curve (``window.curvePoints``)."""
    page.evaluate("""() => {
        window.curvePoints = [];
        new MutationObserver(() => {
            const n = document.querySelectorAll('#curve circle.point.before').length;
            if (window.curvePoints.at(-1) !== n) window.curvePoints.push(n);
        }).observe(document.querySelector('#curve'), {childList: true});
    }""")


def test_read_a_document_watch_the_curve_chat_reload_delete(tab, open_server, tmp_path, tokenizer):
    page = tab.page
    page.locator("#sessions-view").wait_for(state="visible")
    assert page.locator("#model").inner_text().startswith("Base model: ")
    tab.shot("sessions-empty")
    create_session(tab, "novel")

    text = book(0, 2500)
    document = tmp_path / "genesis.txt"
    document.write_text(text)
    tab.view("Read")
    page.get_by_label("Into session").select_option("novel")
    watch_curve(page)
    page.locator("#read-files").set_input_files(document)
    page.locator('.upload[data-phase="done"]').wait_for()

    info = session_info(open_server, "novel").json()
    expected = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert info["tokens_ingested"] == expected and info["pending_tokens"] == 0
    chunks = info["chunks"]
    assert chunks == -(-expected // CHUNK) > 10
    assert page.locator("#curve circle.point.before").count() == chunks
    assert page.locator("#curve circle.point.after").count() == chunks
    assert page.evaluate("window.curvePoints") == list(range(1, chunks + 1))  # one point per chunk, as each trains
    assert page.locator(".upload progress").get_attribute("value") == "1"
    assert f"read: {expected} tokens, {chunks} chunks" in page.locator(".upload .status").inner_text()
    assert page.locator("#curve-summary").inner_text().startswith(f"{chunks} chunks; last: ")
    tab.shot("read")

    tab.view("Chat")
    page.get_by_label("Ask").select_option("novel")
    page.get_by_label("and the base model, side by side").check()
    page.get_by_text("Sampling", exact=True).click()
    page.get_by_label("Max tokens").fill("12")
    page.get_by_label("Message").fill("Who made the heaven and the earth?")
    page.get_by_label("Message").press("Enter")  # Enter sends
    for pane in ("#chat-main", "#chat-base"):
        answer = page.locator(f"{pane} .message.assistant .text")
        answer.and_(page.locator(":not([aria-busy])")).wait_for()
        assert answer.get_attribute("data-error") is None
        assert len(answer.inner_text()) > 0
        assert int(answer.get_attribute("data-deltas")) > 1  # streamed in pieces, not in one reply
    assert page.locator("#chat-main .message.user").inner_text().endswith("Who made the heaven and the earth?")
    tab.shot("chat")

    page.reload()
    page.locator("#chat-view").wait_for(state="visible")  # the view is in the address (#chat)
    tab.view("Sessions")
    assert row(page, "novel").locator("td").first.inner_text() == str(expected)

    row(page, "novel").get_by_role("button", name="Delete session novel").click()
    dialog = page.locator("#confirm")
    assert "Delete session novel" in dialog.inner_text()
    dialog.get_by_role("button", name="Keep it").click()
    assert row(page, "novel").count() == 1 and session_info(open_server, "novel").status_code == 200
    row(page, "novel").get_by_role("button", name="Delete session novel").click()
    dialog.get_by_role("button", name="Delete").click()
    page.locator("#no-sessions").wait_for(state="visible")
    assert session_info(open_server, "novel").status_code == 404


def test_cancel_and_resume_an_upload_reads_every_token_once(tab, open_server, tmp_path, tokenizer):
    page = tab.page
    create_session(tab, "long")
    text = book(10_000, 50_000)  # ~9000 tokens in two slices: a few hundred chunks, time to cancel part way
    document = tmp_path / "long.txt"
    document.write_text(text)
    tab.view("Read")
    page.get_by_label("Into session").select_option("long")
    page.locator("#read-files").set_input_files(document)
    page.locator("#curve circle.point.before").nth(2).wait_for()  # three chunks trained
    page.get_by_role("button", name="Cancel long.txt").click()
    page.locator('.upload[data-phase="cancelled"]').wait_for()
    expected = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    before = settled(open_server, "long")  # the server stops at the next chunk once it sees the client gone
    assert 0 < before["tokens_ingested"] < expected
    tab.shot("read-cancelled")

    page.get_by_role("button", name="Resume long.txt").click()
    page.locator('.upload[data-phase="done"]').wait_for(timeout=300_000)
    after = session_info(open_server, "long").json()
    assert after["tokens_ingested"] == expected and after["pending_tokens"] == 0


def test_paste_and_drop_text_into_a_session(tab, open_server, tokenizer):
    page = tab.page
    create_session(tab, "notes")
    tab.view("Read")
    page.get_by_label("Into session").select_option("notes")
    pasted, dropped = book(50_000, 50_700), book(60_000, 60_900)
    page.get_by_label("Or paste text").fill(pasted)
    page.get_by_role("button", name="Read this text").click()
    page.locator('.upload[data-phase="done"]').wait_for()
    # a file dropped on the zone, as a desktop's file manager would
    page.evaluate(
        """text => {
        const files = new DataTransfer();
        files.items.add(new File([text], 'dropped.txt', {type: 'text/plain'}));
        document.querySelector('#drop-zone').dispatchEvent(new DragEvent('drop', {dataTransfer: files, bubbles: true}));
    }""",
        dropped,
    )
    page.locator('.upload[data-phase="done"]').nth(1).wait_for()
    assert page.locator(".upload .name").all_inner_texts() == ["pasted text → notes", "dropped.txt → notes"]
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
    info = session_info(open_server, "notes").json()
    assert info["tokens_ingested"] == count(pasted) + count(dropped) and info["pending_tokens"] == 0


def test_create_with_settings_download_and_import_an_adapter(tab, open_server, tmp_path):
    page = tab.page
    tab.view("Sessions")
    page.get_by_label("Name (optional: the server picks one)").fill("tuned")
    page.get_by_label("Memory").select_option("balanced")
    assert "balanced: ingest.steps_per_chunk 2" in page.locator("#memory-help").inner_text()
    page.get_by_text("Advanced settings").click()
    rank = page.locator("#setting-fast-rank")
    assert rank.get_attribute("placeholder") == "16" and rank.get_attribute("max") == "1024"
    rank.fill("8")
    page.get_by_role("button", name="Create session").click()
    row(page, "tuned").wait_for()
    info = session_info(open_server, "tuned").json()
    assert info["memory"] == "balanced"
    assert (
        info["fast_weight_bytes"]
        == httpx.post(  # rank 8: half the bytes of a default rank-16 session
            f"{open_server.http}/v1/sessions", json={"id": "rank16", "settings": {"memory": "balanced"}}
        ).json()["fast_weight_bytes"]
        // 2
    )

    with page.expect_download() as download:
        row(page, "tuned").get_by_role("button", name="Download the peft adapter of session tuned").click()
    archive = zipfile.ZipFile(io.BytesIO(Path(download.value.path()).read_bytes()))
    folder = tmp_path / "adapter"
    archive.extractall(folder)
    assert sorted(archive.namelist()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 8

    page.get_by_label("Name (optional)", exact=True).fill("imported")
    page.get_by_label("adapter_config.json and adapter_model.safetensors").set_input_files(
        [folder / "adapter_config.json", folder / "adapter_model.safetensors"]
    )
    page.get_by_role("button", name="Import", exact=True).click()
    row(page, "imported").wait_for()
    assert session_info(open_server, "imported").json()["fast_weight_bytes"] == info["fast_weight_bytes"]

    page.locator("#import-files").set_input_files([folder / "adapter_config.json"])  # one file: said, not sent
    page.get_by_role("button", name="Import", exact=True).click()
    assert "Choose both" in page.locator("#notice").inner_text()


def test_phone_width_and_labels(browser, open_server):
    tab = Page(browser, open_server.http, viewport={"width": 390, "height": 844})
    page = tab.page
    try:
        create_session(tab, "phone")
        for view in ("Sessions", "Read", "Chat"):
            tab.view(view)
            # nothing wider than the screen: no sideways scrolling on a phone
            assert page.evaluate("document.documentElement.scrollWidth") <= 390
            tab.shot(f"phone-{view.lower()}")
        unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea, button')]
            .filter(e => !(e.labels?.length || e.getAttribute('aria-label')
                           || (e.tagName === 'BUTTON' && e.textContent.trim())))
            .map(e => e.id || e.outerHTML)""")
        assert unlabelled == []
        # keyboard: the views are the first things Tab reaches, and Enter opens one
        page.reload()
        page.locator("#chat-view").wait_for(state="visible")
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.textContent") == "Sessions"
        page.keyboard.press("Enter")
        page.locator("#sessions-view").wait_for(state="visible")
    finally:
        tab.context.close()
    assert tab.errors == []


def test_keyed_server_asks_for_a_key(browser, tiny_model_dir, tmp_path):
    keys = write_keys(tmp_path, {"alice": KEY})
    with serving(tiny_model_dir, tmp_path / "data", "--api-keys-file", str(keys)) as server:
        httpx.post(f"{server.http}/v1/sessions", json={"id": "diary"}, headers={"authorization": f"Bearer {KEY}"})
        tab = Page(browser, server.http)
        page = tab.page
        try:
            page.locator("#key-view").wait_for(state="visible")
            assert page.locator("#sessions-view").is_hidden()
            page.get_by_role("textbox", name="API key").fill("not-the-key")
            page.get_by_role("button", name="Use this key").click()
            page.get_by_text("The server refused this key").wait_for()
            assert page.locator("#key-view").is_visible()
            tab.shot("key")

            page.get_by_role("textbox", name="API key").fill(KEY)
            page.get_by_role("button", name="Use this key").click()
            row(page, "diary").wait_for()
            assert page.evaluate("sessionStorage.getItem('ttt-api-key')") == KEY  # this tab only
            page.reload()  # the key stays for the tab's life
            row(page, "diary").wait_for()

            page.evaluate("sessionStorage.setItem('ttt-api-key', 'revoked')")
            page.get_by_role("button", name="Refresh").click()  # a 401 goes back to the key prompt
            page.locator("#key-view").wait_for(state="visible")
        finally:
            tab.context.close()
    assert tab.errors and all(REFUSED_KEY in e for e in tab.errors)
