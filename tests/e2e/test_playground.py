"""The playground page at ``/`` in a real headless browser (Debian's Chromium driven by Playwright) against a real
local cluster: it loads, a message with a picture streams an answer, the image tier's counters move; with API keys
configured it refuses to chat until a key is given. A screenshot of each state is kept under
test-artifacts/playground/ (gitignored).

Needs Playwright (the dev extra) and a Chromium (``chromium`` on PATH, or ``TRIBUTARY_CHROMIUM``): scripts/test.sh
installs Debian's when run as root. Without one these tests skip, unless ``TRIBUTARY_BROWSER_TESTS=1`` (CI) makes a
missing browser a failure."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import local_cluster
from tests.media import png_bytes

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "playground"
CHROMIUM = os.environ.get("TRIBUTARY_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRED = os.environ.get("TRIBUTARY_BROWSER_TESTS") == "1"
KEY = "sk-playground-test-0123456789abcdef"

pytestmark = pytest.mark.slow
if not REQUIRED:
    pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (the dev extra has it)")
    if CHROMIUM is None:
        pytest.skip("no Chromium (apt-get install chromium, or set TRIBUTARY_CHROMIUM)", allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "TRIBUTARY_BROWSER_TESTS=1 but no Chromium was found"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        # A fake microphone (a tone) so that recording runs for real: getUserMedia, MediaRecorder, decoding, WAV.
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def cluster(tiny_model, redis_server, tmp_path_factory):
    with local_cluster(tiny_model, redis_server.url, tmp_path_factory.mktemp("playground"),
                       prefix="playground") as c:
        c.wait_ready()
        yield c


@pytest.fixture(scope="module")
def keyed_cluster(tiny_model, redis_server, tmp_path_factory):
    with local_cluster(tiny_model, redis_server.url, tmp_path_factory.mktemp("playground-keys"),
                       prefix="playground-keys", env={"TRIBUTARY_API_KEYS": f"alice:{KEY}"}) as c:
        c.wait_ready()
        yield c


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def wait_answers(page, n: int) -> None:
    """Until the page shows ``n`` assistant answers and the send button is back (the last stream ended)."""
    page.wait_for_function(f"() => document.querySelectorAll('#messages li.assistant').length === {n} && "
                           "!document.querySelector('#send').disabled", timeout=60_000)


def image_items(page) -> int:
    text = page.locator('tr[data-tier="encoder:image"] td.done').inner_text()
    return int(re.match(r"\d+", text)[0])


def wait_until(cond, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_chat_with_a_picture_streams_an_answer_and_the_image_tier_moves(browser, cluster, tmp_path):
    picture = tmp_path / "fresh.png"
    picture.write_bytes(png_bytes(96, 64, seed=int(time.time()) % 100000))  # never seen: it must be encoded
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(cluster.base_url + "/")
    page.wait_for_selector('tr[data-tier="encoder:image"]')
    assert cluster.model in page.locator("#model").inner_text()
    assert page.locator("#key-form").is_hidden() and page.locator("#send").is_enabled()
    shot(page, "1-loaded")
    before = image_items(page)

    page.set_input_files("#image", str(picture))
    page.wait_for_selector("#attachments span")  # read by a FileReader, asynchronously
    assert "fresh.png" in page.locator("#attachments").inner_text()
    page.click("details summary")  # the sampling settings, folded by default
    page.fill("#max_tokens", "24")
    page.fill("#seed", "7")
    page.fill("#prompt", "What is in this picture?")
    page.click("#send")
    answer = page.locator("#messages li.assistant .text").last
    page.wait_for_function("() => !document.querySelector('#send').disabled", timeout=60_000)
    assert answer.inner_text().strip(), "no answer text streamed"
    assert page.locator("#messages li.user img").count() == 1
    assert page.locator("#messages li.error").count() == 0 and page.locator("#chat-error").inner_text() == ""
    shot(page, "2-answered")

    wait_until(lambda: image_items(page) > before, "the image tier's counter did not move")
    assert page.locator('tr[data-tier="encoder:image"] td.live').inner_text() == "1"
    page.wait_for_function("() => !document.querySelector('#ttft-last').textContent.startsWith('no requests')")
    shot(page, "3-tiers-moved")

    # A follow-up resends the picture (the conversation is kept in the page): the cache answers it.
    page.fill("#prompt", "And the colours?")
    page.keyboard.press("Enter")
    wait_answers(page, 2)
    assert page.locator("#messages li.assistant .text").last.inner_text().strip()
    page.wait_for_function("() => /[1-9]\\d* hits/.test(document.querySelector('#cache').textContent)")
    assert not errors, errors

    phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
    phone.goto(cluster.base_url + "/")
    phone.wait_for_selector('tr[data-tier="backbone"]')
    shot(phone, "4-phone")
    chat, tiers = phone.locator("#chat").bounding_box(), phone.locator("#tiers").bounding_box()
    assert chat["width"] <= 390 and tiers["y"] >= chat["y"] + chat["height"] - 1  # stacked, not side by side
    wide = phone.evaluate("[...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > "
                          "392 && !e.closest('.table-wrap')).map(e => e.tagName + '#' + e.id + '.' + e.className)")
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390, wide  # nothing wider than the screen


def test_a_recorded_sound_is_sent_as_wav_and_answered(browser, cluster):
    context = browser.new_context(permissions=["microphone"])
    page = context.new_page()
    page.goto(cluster.base_url + "/")
    page.wait_for_selector('tr[data-tier="encoder:audio"]')
    page.click("#record")
    page.wait_for_selector('#record[aria-pressed="true"]')
    time.sleep(1.5)
    page.click("#record")
    page.wait_for_selector("#attachments span", timeout=15_000)
    assert "recording.wav" in page.locator("#attachments").inner_text()
    page.fill("#prompt", "What do you hear?")
    # Sampled with a seed: the same answer every run (unseeded, one may be empty by chance). The sampling settings
    # are folded by default: opened first.
    page.eval_on_selector("details", "d => { d.open = true; }")
    page.fill("#seed", "7")
    page.click("#send")
    wait_answers(page, 1)
    assert page.locator("#messages li.assistant .text").inner_text().strip()
    assert page.locator("#messages li.error").count() == 0, page.locator("#chat-error").inner_text()
    assert page.locator("#messages li.user audio").count() == 1
    shot(page, "5-recorded")
    context.close()


def test_an_error_is_shown_as_the_api_says_it(browser, cluster, tmp_path):
    """The file's name is markup: shown as text, never run (the page holds the API key)."""
    name = "<img src=x onerror=window.pwned=1>.png"
    bad = tmp_path / name
    bad.write_bytes(b"this is text, not a PNG")
    page = browser.new_page()
    page.goto(cluster.base_url + "/")
    page.wait_for_selector('tr[data-tier="backbone"]')
    page.set_input_files("#image", str(bad))
    page.wait_for_selector("#attachments span")
    assert name in page.locator("#attachments").inner_text()
    assert page.locator("#attachments img").count() == 0 and page.evaluate("window.pwned") is None
    page.fill("#prompt", "Look")
    page.click("#send")
    page.wait_for_function("() => document.querySelector('#chat-error').textContent !== ''")
    message = page.locator("#chat-error").inner_text()
    assert "messages.0.content.1" in message and "(invalid_media)" in message, message  # message and code
    shot(page, "6-error")


def test_with_keys_the_page_refuses_to_chat_until_a_key_is_given(browser, keyed_cluster):
    assert httpx.get(keyed_cluster.base_url + "/dashboard/state").status_code == 401
    assert httpx.get(keyed_cluster.base_url + "/").status_code == 200  # the page itself holds no data
    page = browser.new_page()
    page.goto(keyed_cluster.base_url + "/")
    page.wait_for_selector("#key-form:not([hidden])")
    assert page.locator("#send").is_disabled()
    page.fill("#prompt", "Hello?")
    page.keyboard.press("Enter")
    time.sleep(0.5)
    assert page.locator("#messages li").count() == 0  # nothing was sent
    shot(page, "7-needs-key")

    page.fill("#key", "sk-wrong")
    page.click("#key-form button")
    page.wait_for_function("() => document.querySelector('#key-error').textContent.includes('refused')")

    page.fill("#key", KEY)
    page.click("#key-form button")
    page.wait_for_selector("#key-form[hidden]", state="attached")
    page.wait_for_function("() => document.querySelector('#model').textContent.includes('tenant alice')")
    assert page.locator("#send").is_enabled()
    assert "your tenant" in page.locator("#cache-scope").inner_text()
    page.fill("#prompt", "Hello?")
    page.eval_on_selector("details", "d => { d.open = true; }")
    page.fill("#seed", "7")
    page.click("#send")
    wait_answers(page, 1)
    assert page.locator("#messages li.assistant .text").inner_text().strip()
    assert page.locator("#messages li.error").count() == 0
    shot(page, "8-keyed-chat")
