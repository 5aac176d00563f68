"""What a web page can make the user's own browser do to a proxy on 127.0.0.1, tried in a real
browser (Debian's headless Chromium, driven by Playwright) against the real proxy and the real
llama-server: none of it reaches llama-server, and nothing comes back to the page.

- A page on another origin `fetch()`es the proxy with a text/plain body (a "simple" request,
  sent without asking) and with a JSON body (which the browser must ask about first, in a
  preflight the proxy refuses), and tries to read the request log.
- DNS rebinding: a page loaded from an attacker's name, whose address then becomes the proxy's
  (here: the attacker's server stops and the proxy starts on the same port, under a name the
  browser resolves to 127.0.0.1), reads the proxy "same-origin". Its requests carry the
  attacker's name in `Host`.
"""

from __future__ import annotations

import pytest
import requests
from playwright.sync_api import sync_playwright

from tests.support import processes
from tests.support.local_http import LocalServer, QuietHandler
from tests.support.prom import metric
from tests.test_dashboard import CHROMIUM, CHROMIUM_ARGS

pytestmark = pytest.mark.integration

CHAT = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "burn the GPU"}]}

# Each attempt says what the page got: "sent" (an opaque answer it cannot read), a status, the
# text it read, or the error the browser gave it.
ATTACK = """async ([proxy, chat]) => {
  const body = JSON.stringify(chat);
  const attempt = async (f) => { try { return await f(); } catch (e) { return "blocked: " + e.message; } };
  return {
    plain_no_cors: await attempt(async () => { await fetch(proxy + "/v1/chat/completions",
      {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"}, body}); return "sent"; }),
    plain_cors: await attempt(async () => (await fetch(proxy + "/v1/chat/completions",
      {method: "POST", headers: {"Content-Type": "text/plain"}, body})).status),
    json: await attempt(async () => (await fetch(proxy + "/v1/chat/completions",
      {method: "POST", headers: {"Content-Type": "application/json"}, body})).status),
    anthropic_json: await attempt(async () => (await fetch(proxy + "/v1/messages",
      {method: "POST", headers: {"Content-Type": "application/json", "x-api-key": "x"}, body})).status),
    read_log: await attempt(async () => await (await fetch(proxy + "/api/requests")).text()),
  };
}"""


class AttackPage(QuietHandler):
    """The attacker's web server: one empty page."""

    def do_GET(self) -> None:
        page = b"<!doctype html><title>cute cats</title><p>nothing to see"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)


@pytest.fixture(scope="module")
def chromium():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=[*CHROMIUM_ARGS, "--host-resolver-rules=MAP rebind.example 127.0.0.1"])
        yield browser
        browser.close()


def decodes(llama) -> float:
    return metric(llama.url, "llamacpp:n_decode_total")


def test_a_page_on_another_origin_cannot_make_the_proxy_generate_or_read_it(chromium, llama):
    with processes.proxy(llama.url) as proxy, LocalServer(AttackPage) as attacker:
        # The proxy's log has one request in it, which the page must not read.
        requests.post(proxy.url + "/v1/chat/completions", json=CHAT, timeout=60).raise_for_status()
        before = decodes(llama)
        page = chromium.new_page()
        page.goto(attacker.url + "/")
        got = page.evaluate(ATTACK, [proxy.url, CHAT])
        page.close()
        refused = metric(proxy.url, "llamabridge_proxy_refused_requests_total", {"reason": "origin"})
        log = proxy.log_text()
    assert decodes(llama) == before, f"llama-server evaluated a prompt for the page: {got}"
    # The browser sent it, and the page learns nothing of the answer (Chromium even turns a refused
    # opaque JSON answer into a network error).
    assert got["plain_no_cors"] in ("sent", "blocked: Failed to fetch")
    assert got["plain_cors"].startswith("blocked")  # sent without a preflight, refused, and no CORS header to read it by
    assert got["json"].startswith("blocked") and got["anthropic_json"].startswith("blocked")  # their preflights refused
    assert got["read_log"].startswith("blocked"), got["read_log"]
    assert "burn the GPU" not in str(got) and "python-requests" not in str(got)
    # Each attempt reached the proxy once and was refused for its Origin: the two plain POSTs, the
    # two preflights (the POSTs behind them never sent), the read.
    assert refused == 5, (refused, got)
    assert log.count("/v1/chat/completions class=") == 1  # only the test's own request was served


def test_dns_rebinding_gets_403_and_no_data(chromium, llama):
    port = processes.free_port()
    page = chromium.new_page()
    # The attacker's page, from the attacker's name ...
    with LocalServer(AttackPage, port):
        page.goto(f"http://rebind.example:{port}/")
    # ... whose address is now the proxy's: the page's requests are same-origin to the browser.
    with processes.proxy(llama.url, PROXY_PORT=str(port)) as proxy:
        requests.post(proxy.url + "/v1/chat/completions", json=CHAT, timeout=60).raise_for_status()
        before = decodes(llama)
        got = page.evaluate("""async () => {
          const read = async (path, init) => { const r = await fetch(path, init); return [r.status, await r.text()]; };
          return {
            log: await read("/api/requests"),
            totals: await read("/api/totals"),
            generate: await read("/v1/chat/completions", {method: "POST", headers: {"Content-Type": "application/json"},
                                                         body: JSON.stringify({messages: [{role: "user", content: "hi"}], max_tokens: 8})}),
          };
        }""")
        navigated = page.goto(f"http://rebind.example:{port}/dashboard")
        shown = page.content()
        refused = metric(proxy.url, "llamabridge_proxy_refused_requests_total", {"reason": "host"})
    page.close()
    assert decodes(llama) == before
    for name, (status, text) in got.items():
        assert status == 403, (name, status, text)
        assert "ALLOWED_HOSTS" in text and "python-requests" not in text and '"requests"' not in text
    assert navigated.status == 403 and "Lifetime" not in shown
    assert refused == 4
