"""The built-in dashboard in a real browser (Debian's headless Chromium, driven by Playwright)
against the real stack: llama-server on the tiny model, the proxy and the collector sharing
one store, after real traffic. Also takes the README's screenshots (light and dark): into a
temporary directory, or over docs/screenshots/ with UPDATE_SCREENSHOTS=1, so that a test run
leaves the working tree as it found it."""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import requests
from playwright.sync_api import sync_playwright

from tests.support import processes
from tests.support.local_http import LocalServer, QuietHandler
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
# The closed network here refuses Chromium's own background connections; keep it from trying.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
HOSTILE = "evil-agent/1.0 <script>window.__pwned = 1</script><img src=x onerror=window.__pwned=2>"
MAIN = {"model": "claude-sonnet-4-5", "max_tokens": 24, "tools": [{"name": "Agent", "input_schema": {"type": "object"}}]}


def send(proxy, text: str, session: str, agent: str = "claude-cli/2.1.328 (external, cli)") -> None:
    body = dict(MAIN, messages=[{"role": "user", "content": text}])
    resp = requests.post(proxy.url + "/v1/messages", json=body, timeout=60,
                         headers={"X-Claude-Code-Session-Id": session, "User-Agent": agent})
    assert resp.status_code == 200, resp.text


@pytest.fixture(scope="module")
def stack(llama, tmp_path_factory):
    db = str(tmp_path_factory.mktemp("dash") / "store.db")
    with processes.proxy(llama.url, DB_PATH=db) as proxy, processes.collector(llama.url, db, interval=0.5) as collector:
        for turn in range(3):
            send(proxy, "let us look at the parser " + "and more " * turn, "dash-session-1")
        send(proxy, "another project", "dash-session-2")
        send(proxy, "who am I", "dash-session-3", agent=HOSTILE)
        assert requests.post(proxy.url + "/v1/chat/completions", timeout=60, headers={"User-Agent": "Cline/3.1"},
                             json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}).status_code == 200
        after = time.time()
        wait_until(lambda: (requests.get(proxy.url + "/api/totals", timeout=5).json()["last_scrape"] or 0) >= after + 0.5, 20,
                   what=lambda: "a scrape after the requests: " + collector.log_text()[-2000:])
        yield proxy


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def open_page(browser, url: str, scheme: str = "light"):
    page = browser.new_page(color_scheme=scheme, viewport={"width": 1280, "height": 1500})
    page.errors = []
    page.outside = []
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on("request", lambda r: page.outside.append(r.url) if not r.url.startswith(url.split("/dashboard")[0]) and not r.url.startswith("data:") else None)
    page.goto(url)
    page.wait_for_function("document.querySelectorAll('#req-rows tr').length > 0 && document.querySelectorAll('#session-list table').length > 0")
    return page


def test_every_section_shows_what_the_api_returns(stack, browser):
    page = open_page(browser, stack.url + "/dashboard")
    totals = requests.get(stack.url + "/api/totals", timeout=5).json()
    lifetime, upstream = totals["lifetime"], totals["upstream"]
    page.wait_for_function("document.getElementById('lt-requests').textContent !== '–'")
    text = lambda sel: page.locator(sel).text_content().strip()  # noqa: E731
    assert text("#status") == "llama-server up"
    assert f"{upstream['n_ctx']:,} tokens context" in text("#model")
    for selector, value in (("#lt-prompt", lifetime["prompt_tokens"]), ("#lt-cached", lifetime["cached_prompt_tokens"]),
                            ("#lt-generated", lifetime["generated_tokens"]), ("#lt-requests", totals["proxy"]["requests"]),
                            ("#lt-restarts", lifetime["upstream_restarts"])):
        assert value < 10_000 and text(selector) == f"{int(value):,}", (selector, text(selector), value)
    assert text("#slots").endswith(f"/ {upstream['slots']}")
    assert text("#since").startswith("since ")
    assert page.locator("#contexts .bar").count() == upstream["slots"]
    # History: both charts draw lines from the samples.
    for chart in ("#chart-speed", "#chart-tokens"):
        assert page.locator(f"{chart} polyline.series").count() >= 1
        assert len(page.locator(f"{chart} polyline.series").first.get_attribute("points").split()) >= 2
    # Sessions: one table per Claude Code session, turns in order, the first one marked cold.
    session = page.locator("#session-list > div", has_text="dash-session-1")
    assert session.locator("tbody tr").count() == 3
    assert session.locator("tbody tr").first.locator(".tag.cold").count() == 1
    assert page.errors == [] and page.outside == []
    page.close()


def test_request_log_updates_filters_and_escapes(stack, browser):
    page = open_page(browser, stack.url + "/dashboard")
    # A request whose User-Agent is markup is shown as text and runs nothing.
    hostile_cell = page.locator("#req-rows td", has_text="<script>window.__pwned = 1</script>")
    assert hostile_cell.count() >= 1
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#req-rows script, #req-rows img, #session-list script").count() == 0
    # A new request appears within 10 s (the page refreshes every 5 s, without reloading).
    marker = f"fresh-client/{time.time_ns()}"
    send(stack, "one more", "dash-session-4", agent=marker)
    page.locator("#req-rows td", has_text=marker).wait_for(timeout=10_000)
    # Filters.
    page.select_option("#f-class", "openai")
    page.wait_for_function("[...document.querySelectorAll('#req-rows tr')].every(tr => tr.children[3].textContent === 'openai')")
    assert page.locator("#req-rows tr").count() >= 1
    page.select_option("#f-class", "")
    page.select_option("#f-client", "Cline/3.1")
    page.wait_for_function("[...document.querySelectorAll('#req-rows tr')].every(tr => tr.children[1].textContent === 'Cline/3.1')")
    page.select_option("#f-client", "")
    # A click shows the request's details.
    page.locator("#req-rows tr").first.click()
    assert page.locator("#req-detail").is_visible() and '"route"' in page.locator("#req-detail").inner_text()
    # The range switch redraws the charts.
    page.click("button[data-range='24h']")
    page.wait_for_function("document.querySelector(\"button[data-range='24h']\").classList.contains('on')")
    assert page.errors == []
    page.close()


class _KeepRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # urllib then raises the 3xx as an HTTPError, which is also the response


NO_REDIRECTS = urllib.request.build_opener(_KeepRedirects)


class PrefixProxy(LocalServer):
    """A path-prefix reverse proxy (what nginx or Traefik would be in front): /llm/x -> /x."""

    def __init__(self, target: str, prefix: str = "/llm"):
        outer = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                if not self.path.startswith(prefix + "/"):
                    outer.misses.append(self.path)
                    self.send_error(404)
                    return
                try:  # as a reverse proxy does: a redirect goes to the browser, not followed here
                    resp = NO_REDIRECTS.open(target + self.path[len(prefix):])
                except urllib.error.HTTPError as answer:
                    resp = answer
                with resp:
                    data = resp.read()
                    self.send_response(resp.status)
                    for name in ("Content-Type", "Location"):
                        if resp.headers[name]:
                            self.send_header(name, resp.headers[name])
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)

        self.misses: list[str] = []
        super().__init__(Handler)
        self.prefixed = self.url + prefix  # where the dashboard is reached through it


def test_works_behind_a_path_prefix(stack, browser):
    with PrefixProxy(stack.url) as front:
        for typed in ("/dashboard", "/dashboard/"):  # the trailing slash leads to the same page
            page = open_page(browser, front.prefixed + typed)
            assert page.url == front.prefixed + "/dashboard"
            assert page.locator("#status").inner_text() == "llama-server up"
            assert front.misses == [] and page.errors == []
            page.close()


def test_screenshots_light_and_dark(stack, browser, tmp_path):
    into = SCREENSHOTS if os.environ.get("UPDATE_SCREENSHOTS") == "1" else tmp_path
    into.mkdir(parents=True, exist_ok=True)
    for scheme in ("light", "dark"):
        page = open_page(browser, stack.url + "/dashboard", scheme)
        page.wait_for_function("document.getElementById('lt-requests').textContent !== '–'")
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == ("rgb(250, 250, 250)" if scheme == "light" else "rgb(20, 20, 23)")
        shot = into / f"dashboard-{scheme}.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        page.close()
