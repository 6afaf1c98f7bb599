"""The web playground in a real headless Chromium: streaming text, chat, a fine-tune with its loss curve,
the API-key field, and a narrow (phone) layout. Screenshots go to test-artifacts/."""

from __future__ import annotations

import os
import threading
import time

import pytest
from test_copies import sherlock  # noqa: F401 - the prepared book, a fixture
from test_server_live import LiveServer, story

CHROMIUM = "/usr/bin/chromium"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing (apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )
        yield b
        b.close()


@pytest.fixture()
def server(tunesmith_home):
    s = LiveServer(tunesmith_home).start()
    yield s
    s.stop()


def _watch_output(page) -> None:
    """Record every length the generated text goes through, to prove it arrives in pieces."""
    page.evaluate("""() => {
        window.__lengths = [];
        new MutationObserver(() => {
            const el = document.querySelector('#gen-text');
            if (el) window.__lengths.push(el.textContent.length);
        }).observe(document.querySelector('#output'), {childList: true, subtree: true, characterData: true});
    }""")


def _set_range(page, selector: str, value) -> None:
    page.eval_on_selector(selector, "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", value)


def test_playground_streams_chats_and_fine_tunes(browser, server, artifacts, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    outside: list[str] = []
    page.on("request", lambda req: None if req.url.startswith(server.url) else outside.append(req.url))
    page.goto(server.url + "/")
    page.wait_for_function("() => [...document.querySelectorAll('#model option')].some(o => o.value === 'tiny-llama')")
    page.select_option("#model", "tiny-llama")
    _set_range(page, "#max-tokens", 24)
    _set_range(page, "#temperature", 0.7)
    assert page.inner_text("#max-tokens-val") == "24" and page.inner_text("#temperature-val") == "0.70"
    page.fill("#prompt", "The lamplighter walked along the harbour wall")
    _watch_output(page)
    page.click("#generate")
    page.wait_for_function("() => document.querySelector('#gen-text') && document.querySelector('#gen-text').textContent.length > 0")
    page.wait_for_function("() => !document.querySelector('#generate').disabled", timeout=60_000)
    generated = page.inner_text("#gen-text")
    lengths = [n for n in page.evaluate("window.__lengths") if n > 0]
    assert generated.strip() and len(set(lengths)) >= 2, lengths  # it grew token by token
    assert "tokens" in page.inner_text("#write-stats") and "finish" in page.inner_text("#write-stats")
    assert page.inner_text("#output").startswith("The lamplighter walked along the harbour wall")
    page.screenshot(path=str(artifacts / "playground.png"), full_page=True)

    page.click("#tab-chat")
    page.fill("#chat-input", "Tell me about the sea.")
    page.press("#chat-input", "Enter")
    page.wait_for_function("() => { const m = document.querySelectorAll('.msg.assistant .msg-body'); "
                           "return m.length && m[m.length-1].textContent.length > 0 && !document.querySelector('#send').disabled; }",
                           timeout=60_000)
    assert page.inner_text(".msg.user .msg-body") == "Tell me about the sea."
    page.screenshot(path=str(artifacts / "playground-chat.png"), full_page=True)

    train = tmp_path / "harbour.txt"
    train.write_text(story(30, seed=4))
    page.click("#tab-jobs")
    page.set_input_files("#train-file", str(train))
    page.select_option("#job-base", "tiny-llama")
    page.fill("#job-epochs", "3")
    page.fill("#job-batch", "2")
    page.fill("#job-suffix", "harbour")
    page.click("#start-job")
    page.wait_for_selector("#job-detail:not(.hidden)")
    page.wait_for_function("() => document.querySelector('#jd-status').textContent === 'succeeded'", timeout=150_000)
    assert page.inner_text("#jd-model").startswith("ft:tiny-llama:harbour:ftjob-")
    assert "The job has successfully completed" in page.inner_text("#jd-events")
    page.wait_for_timeout(300)
    # the loss curve was drawn: the canvas has many non-background pixels in the training-line colour
    drawn = page.evaluate("""() => {
        const c = document.querySelector('#loss-chart');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i+2] > 150 && d[i] < 140 && d[i+3] > 0) n++;
        return n;
    }""")
    assert drawn > 100, drawn
    page.screenshot(path=str(artifacts / "playground-jobs.png"), full_page=True)
    page.click("#jd-use")  # switches to Write with the new model picked
    page.wait_for_selector("#view-write:not(.hidden)")
    assert page.eval_on_selector("#model", "el => el.value").startswith("ft:tiny-llama:harbour:")
    assert not errors, errors
    assert not outside, outside  # nothing fetched from anywhere but this server
    page.close()

    phone = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2)
    phone.goto(server.url + "/")
    phone.wait_for_function("() => document.querySelectorAll('#model option').length > 0")
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
    phone.fill("#prompt", "Narrow screens work too")
    phone.screenshot(path=str(artifacts / "playground-narrow.png"), full_page=True)
    phone.click("#tab-jobs")
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390
    phone.screenshot(path=str(artifacts / "playground-narrow-jobs.png"), full_page=True)
    phone.close()


def test_playground_asks_for_the_api_key(browser, tunesmith_home, artifacts):
    server = LiveServer(tunesmith_home, api_key="browser-key").start()
    try:
        page = browser.new_page(viewport={"width": 1000, "height": 700})
        page.goto(server.url + "/")
        page.wait_for_selector("#keybox:not(.hidden)")
        page.wait_for_selector("#banner:not(.hidden)")
        assert "API key" in page.inner_text("#banner")
        assert page.eval_on_selector_all("#model option", "els => els.length") == 0  # 401 until the key is given
        page.fill("#api-key", "browser-key")
        page.click("#save-key")
        page.wait_for_function("() => [...document.querySelectorAll('#model option')].some(o => o.value === 'tiny-llama')")
        assert page.evaluate("localStorage.getItem('tunesmith.apiKey')") == "browser-key"
        assert page.is_hidden("#banner")
        page.close()
    finally:
        server.stop()


class InProcessServer:
    """The app served by uvicorn in a thread of this process, so that a test can give it a model."""

    def __init__(self, app):
        import uvicorn
        from test_server_live import free_port

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def test_playground_marks_copied_text_and_says_where_it_is_from(browser, tunesmith_home, sherlock, artifacts):  # noqa: F811
    from test_copies import OWN, SWANDAM
    from test_server_api import CopyingBatch, CopyingModel, book_run

    from tunesmith.server.app import ServerConfig, create_app
    from tunesmith.server.models_cache import ModelCache

    flat = " ".join(SWANDAM.split())
    book_run(tunesmith_home, sherlock)
    cache = ModelCache(loader=lambda source: CopyingModel(f"{OWN[0]} {flat} {OWN[1]}"), sizer=lambda m: 1)
    app = create_app(ServerConfig(home=tunesmith_home, start_worker=False, model_cache=cache))
    app.state.generator.batching = CopyingBatch()
    where = "sherlock.txt, lines 5205\u20135209 (ADVENTURE VI. THE MAN WITH THE TWISTED LIP)"  # test_copies.PLANTED
    with InProcessServer(app) as server:
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url + "/")
        page.wait_for_function("() => [...document.querySelectorAll('#model option')].some(o => o.value === 'sherlock-run')")
        page.select_option("#model", "tiny-llama")
        assert page.is_disabled("#check-copying") and "base model" in page.inner_text("#copying-hint")
        page.select_option("#model", "sherlock-run")
        assert page.is_enabled("#check-copying")
        page.check("#check-copying")
        page.fill("#prompt", "Once")
        page.click("#generate")
        page.wait_for_selector("#gen-text mark.copied")
        page.wait_for_function("() => !document.querySelector('#generate').disabled")
        marks = page.query_selector_all("#gen-text mark.copied")
        assert [m.text_content() for m in marks] == [flat]
        assert page.text_content("#gen-text") == f"{OWN[0]} {flat} {OWN[1]}"  # the text itself is unchanged
        assert marks[0].get_attribute("data-source").startswith(f"Copied from {where} \u2014 {len(flat.split())} words")
        assert "copied" in page.inner_text("#write-stats") and "sherlock.txt" in page.inner_text("#write-stats")
        marks[0].hover()
        tooltip = page.evaluate("() => getComputedStyle(document.querySelector('mark.copied'), '::after').content")
        assert where in tooltip
        page.screenshot(path=str(artifacts / "playground-copies.png"), full_page=True)

        page.click("#tab-chat")
        page.fill("#chat-input", "Tell me about London.")
        page.press("#chat-input", "Enter")
        page.wait_for_selector(".msg.assistant mark.copied")
        assert page.text_content(".msg.assistant mark.copied") == flat
        assert "copied" in page.inner_text(".msg.assistant .msg-note")
        page.screenshot(path=str(artifacts / "playground-copies-chat.png"), full_page=True)

        page.uncheck("#check-copying")  # off: plain text, no marks
        page.click("#tab-write")
        page.click("#generate")
        page.wait_for_function("() => !document.querySelector('#generate').disabled && "
                               "document.querySelector('#gen-text').textContent.length > 0")
        assert page.query_selector_all("#gen-text mark.copied") == []
        assert not errors, errors
        page.close()
