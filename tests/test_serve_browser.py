"""The chat page at `/` in a real browser: Debian's headless Chromium driven by Playwright, against
a real `lmforge serve` subprocess on 127.0.0.1 with a tiny GPT overfit on a few chat turns
(tests/serve_chat_helpers.py), so the replies are known: a greeting, Chinese text, and a reply
that is an HTML-injection string. References: the same request to the API (httpx), the server's
own error message and request log, and the browser itself (dialogs, DOM, layout).

The browser contexts bypass the page's Content-Security-Policy: Playwright's waits evaluate
strings, which the policy forbids, and without it the injection test is stricter (only the
page's textContent discipline stands between the reply and an alert()).
Skipped only where /usr/bin/chromium is missing and this is not CI (CI installs it).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from serve_chat_helpers import (
    ABILITIES,
    CONVERSATION,
    ENDLESS_MAX_TOKENS,
    GREETING,
    INJECTION,
    chat_checkpoint,
    endless_checkpoint,
)
from serve_helpers import running_server

CHROMIUM = "/usr/bin/chromium"
KEY = "page-test-key"
MAX_TOKENS = 120
MODEL = "tiny-chat"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists() and not os.environ.get("CI"),
                                reason="needs Debian's chromium (/usr/bin/chromium); CI installs it")


@pytest.fixture(scope="module")
def server():
    with running_server(["--ckpt", str(chat_checkpoint()), "--api-key", KEY, "--max-tokens", "1000",
                         "--model-name", MODEL]) as s:
        yield s


@pytest.fixture(scope="module")
def endless_server():
    """A model whose replies run to max_tokens: ENDLESS_MAX_TOKENS of them take seconds."""
    with running_server(["--ckpt", str(endless_checkpoint()), "--api-key", KEY, "--max-tokens",
                         str(ENDLESS_MAX_TOKENS)]) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


class Page:
    """One browser tab on the chat page, recording dialogs (an alert() is an injection) and page errors."""

    def __init__(self, browser, url: str, width: int = 1280, height: int = 860) -> None:
        self.context = browser.new_context(bypass_csp=True, viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.urls: list[str] = []  # every request the page makes
        self.page.on("request", lambda r: self.urls.append(r.url))
        self.page.goto(url + "/")

    def settings(self, key: str | None = None, temperature: str | None = None, max_tokens: str | None = None):
        if key is not None:
            self.page.fill("#api-key", key)
            self.page.press("#api-key", "Tab")  # `change`: saved, the model list reloads with the key
        if temperature is not None:
            self.page.fill("#temperature", temperature)
            assert self.page.text_content("#temperature-value") == temperature
        if max_tokens is not None:
            self.page.fill("#max-tokens", max_tokens)
            self.page.press("#max-tokens", "Tab")

    def send(self, text: str) -> None:
        self.page.fill("#message-input", text)
        self.page.click("#send")

    def replies(self) -> list[str]:
        return [e.text_content() for e in self.page.query_selector_all(".msg.assistant .content")]

    def wait_reply(self, n: int, timeout: float = 120) -> dict:
        """Wait until the n-th reply has finished; its text, finish mark and the page's delta count."""
        self.page.wait_for_function(
            "n => { const a = document.querySelectorAll('.msg.assistant');"
            " return a.length >= n && a[n - 1].dataset.finish !== undefined; }", arg=n, timeout=timeout * 1000)
        item = self.page.query_selector_all(".msg.assistant")[n - 1]
        content = item.query_selector(".content")
        return {"text": content.text_content(), "finish": item.get_attribute("data-finish"),
                "deltas": int(content.get_attribute("data-deltas"))}

    def close(self) -> None:
        self.context.close()


def api_reply(url: str, messages: list[dict], max_tokens: int = MAX_TOKENS) -> tuple[str, int]:
    """The API's greedy reply to `messages` (non-streamed) and the number of text pieces its stream sends."""
    import httpx

    body = {"messages": messages, "temperature": 0, "max_tokens": max_tokens}
    headers = {"Authorization": f"Bearer {KEY}"}
    reply = httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=120).json()
    pieces = 0
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, headers=headers,
                      timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:])["choices"]
                pieces += bool(choices and choices[0]["delta"].get("content"))
    return reply["choices"][0]["message"]["content"], pieces


def chat_records(server) -> list[dict]:
    """The server's request log lines for /v1/chat/completions so far."""
    return [r for r in server.log_records() if r.get("route") == "/v1/chat/completions"]


def watch_renders(page) -> None:
    """Record the reply's text length at every DOM change the page makes (what a user sees, token by token)
    in window.__lengths.

    The tab's network is throttled (16 kB/s, Chromium's own emulation), so the events of a reply
    arrive spread over about a second however fast the server is, as from a distant server."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": 16000,
                                                  "uploadThroughput": -1})
    page.evaluate("""() => {
        window.__lengths = [];
        new MutationObserver(() => {
            const a = document.querySelectorAll('.msg.assistant .content');
            if (a.length) window.__lengths.push(a[a.length - 1].textContent.length);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")


def test_chat_page_streams_a_multi_turn_conversation_as_text(server, browser, tmp_path):
    tab = Page(browser, server.url)
    tab.settings(key=KEY, temperature="0", max_tokens=str(MAX_TOKENS))
    tab.page.wait_for_function("() => document.getElementById('model').value === 'tiny-chat'")
    assert tab.page.title().startswith(MODEL)  # the model's name, from GET /v1/models
    history: list[dict] = []
    watch_renders(tab.page)
    for turn in range(3):
        user = CONVERSATION[2 * turn]["content"]
        tab.page.evaluate("() => { window.__lengths = []; }")
        tab.send(user)
        got = tab.wait_reply(turn + 1)
        history.append({"role": "user", "content": user})
        expected, pieces = api_reply(server.url, history)
        assert got["text"] == expected  # the page sent the whole conversation, greedy, and showed it all
        assert got["finish"] == "stop"
        assert got["deltas"] == pieces > 5  # one piece per server-sent event, as the API streams them
        lengths = tab.page.evaluate("() => window.__lengths")
        assert len({n for n in lengths if 0 < n < len(expected)}) >= 3  # it grew on screen, piece by piece
        history.append({"role": "assistant", "content": expected})

    assert tab.replies()[:2] == [GREETING, ABILITIES]  # the overfit model's trained turns (Chinese included)
    assert INJECTION in tab.replies()[2]  # shown literally: no dialog, no element made from it
    assert tab.dialogs == [] and tab.errors == []
    assert tab.page.locator("#messages script, #messages img").count() == 0
    assert tab.page.is_hidden("#error")
    assert {server.url + "/static/chat.js", server.url + "/static/chat.css"} <= set(tab.urls)
    assert all(u.startswith((server.url + "/", "data:")) for u in tab.urls), tab.urls  # nothing from elsewhere
    screenshot = Path(os.environ.get("LMFORGE_SCREENSHOT") or tmp_path / "serve-chat.png")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    tab.page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000

    tab.page.click("#new-chat")  # a new conversation: the first turn's reply again, without the history
    tab.send(CONVERSATION[0]["content"])
    assert tab.wait_reply(1)["text"] == GREETING
    tab.close()


def test_stop_button_aborts_the_reply_and_frees_the_slot(endless_server, browser):
    import httpx

    server = endless_server
    tab = Page(browser, server.url)
    tab.settings(key=KEY, temperature="0", max_tokens=str(ENDLESS_MAX_TOKENS))
    before = len(chat_records(server))
    tab.send("Tell me everything")
    tab.page.wait_for_function("() => (document.querySelector('.msg.assistant .content') || {}).textContent"
                               "?.length >= 8")
    assert tab.page.is_visible("#stop") and tab.page.is_hidden("#send")
    tab.page.click("#stop")
    got = tab.wait_reply(1, timeout=10)
    assert got["finish"] == "stopped" and 8 <= len(got["text"]) < ENDLESS_MAX_TOKENS
    assert "stopped by you" in tab.page.text_content(".msg.assistant .meta")
    time.sleep(0.5)
    assert tab.replies() == [got["text"]]  # nothing more arrived
    assert tab.page.is_visible("#send") and tab.page.is_hidden("#stop")

    tab.send("More")  # New chat while a reply streams: the reply is dropped, the new conversation is empty
    tab.page.wait_for_function("() => (document.querySelectorAll('.msg.assistant .content')[1] || {})"
                               ".textContent?.length >= 8")
    tab.page.click("#new-chat")
    time.sleep(0.5)
    assert tab.page.locator(".msg").count() == 0 and tab.page.is_visible("#empty")
    assert tab.page.is_visible("#send") and tab.page.is_hidden("#error")
    with tab.page.expect_request("**/v1/chat/completions") as sent:
        tab.send("Again")
    assert json.loads(sent.value.post_data)["messages"] == [{"role": "user", "content": "Again"}]
    tab.page.wait_for_selector(".msg.assistant .content[data-deltas]:not([data-deltas='0'])")
    tab.page.keyboard.press("Escape")  # Esc stops too
    assert tab.wait_reply(1, timeout=10)["finish"] == "stopped"

    deadline = time.monotonic() + 15  # the server saw the client go: the request ended early, its slot is free
    while time.monotonic() < deadline and len(chat_records(server)) < before + 3:
        time.sleep(0.1)
    records = chat_records(server)
    assert len(records) == before + 3 and all(r["completion_tokens"] < ENDLESS_MAX_TOKENS for r in records[-3:])
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    assert 'lmforge:num_requests_running{model_name="tiny-gpt"} 0.0' in metrics
    tab.close()


def test_errors_show_the_servers_message(server, browser):
    import httpx

    refused = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong-key"}, timeout=10)
    message = refused.json()["error"]["message"]
    tab = Page(browser, server.url)
    tab.settings(key="wrong-key")
    # the page's first request (before a key was saved) may have shown "missing API key" already: wait for
    # the answer to the request made with the wrong key
    tab.page.wait_for_function("m => (document.querySelector('#error-text') || {}).textContent?.includes(m)",
                               arg=f"HTTP 401: {message}")
    assert not tab.page.is_hidden("#error")

    tab.page.click("#error-close")
    tab.send("Hi there")
    tab.page.wait_for_selector("#error:not([hidden])")
    assert tab.page.text_content("#error-text").startswith(f"HTTP 401: {message}")
    assert tab.page.locator(".msg").count() == 0  # the failed turn left the conversation empty,
    assert tab.page.input_value("#message-input") == "Hi there"  # its text back in the box to send again
    assert tab.page.evaluate("() => localStorage.getItem('lmforge.apiKey')") == "wrong-key"

    tab.settings(key=KEY)  # the right key: the page works again
    tab.page.wait_for_selector("#error", state="hidden")
    tab.page.route("**/v1/chat/completions", lambda route: route.abort())  # the server is unreachable
    tab.page.click("#send")
    tab.page.wait_for_selector("#error:not([hidden])")
    assert tab.page.text_content("#error-text").startswith("Network error")
    assert tab.dialogs == [] and tab.errors == []
    tab.close()


def test_chat_page_fits_a_phone(server, browser, tmp_path):
    tab = Page(browser, server.url, width=390, height=800)
    assert tab.page.is_hidden("#settings")  # a drawer on a phone, behind the Settings button
    tab.page.click("#toggle-settings")
    tab.settings(key=KEY, temperature="0", max_tokens=str(MAX_TOKENS))
    tab.page.click("#toggle-settings")
    assert tab.page.is_hidden("#settings")
    tab.page.wait_for_function("() => document.getElementById('model').value === 'tiny-chat'")
    tab.send(CONVERSATION[0]["content"])
    assert tab.wait_reply(1)["text"] == GREETING
    assert tab.page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scroll
    tab.page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
    tab.close()
