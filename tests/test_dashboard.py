"""The built-in dashboard in a real browser (Debian's headless Chromium, driven by Playwright)
against the real stack: llama-server on the tiny model, the proxy and the collector sharing
one store, after real traffic; without keys, and with two people's API keys (the Users section,
the user filter, the login); and a proxy in front of two llama-servers (the upstream column, its
filter and the Upstreams table). Every page must run under the proxy's Content-Security-Policy
without a single violation. Also takes the README's screenshots (light and dark, with keys so
that they show every section): into a temporary directory, or over docs/screenshots/ with
UPDATE_SCREENSHOTS=1, so that a test run leaves the working tree as it found it."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import sync_playwright

from llamabridge import keys as keyfile
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
MAIN: dict[str, Any] = {"model": "claude-sonnet-4-5", "max_tokens": 24, "tools": [{"name": "Agent", "input_schema": {"type": "object"}}]}


def send(proxy, text: str, session: str, agent: str = "claude-cli/2.1.328 (external, cli)", key: str | None = None) -> None:
    body = dict(MAIN, messages=[{"role": "user", "content": text}])
    headers = {"X-Claude-Code-Session-Id": session, "User-Agent": agent, **({"x-api-key": key} if key else {})}
    resp = requests.post(proxy.url + "/v1/messages", json=body, timeout=60, headers=headers)
    assert resp.status_code == 200, resp.text


def wait_for_a_scrape_after_the_requests(proxy, collector, headers: dict | None = None) -> None:
    after = time.time()
    last_scrape = lambda: requests.get(proxy.url + "/api/totals", headers=headers, timeout=5).json()["last_scrape"] or 0
    wait_until(lambda: last_scrape() >= after + 0.5, 20, what=lambda: "a scrape after the requests: " + collector.log_text()[-2000:])


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
        wait_for_a_scrape_after_the_requests(proxy, collector)
        yield proxy


@pytest.fixture(scope="module")
def keyed_stack(llama, tmp_path_factory):
    """The same stack with two people's keys: alice's Claude Code session of two turns, and one
    request from bob's Cline. Yields the proxy and the keys by name."""
    tmp = tmp_path_factory.mktemp("dash-keys")
    keys_file = tmp / "keys.json"
    keys = {name: keyfile.add(keys_file, name) for name in ("alice", "bob")}
    db = str(tmp / "store.db")
    with processes.proxy(llama.url, DB_PATH=db, API_KEYS_FILE=str(keys_file)) as proxy, \
            processes.collector(llama.url, db, interval=0.5) as collector:
        send(proxy, "let us look at the parser", "alice-session", key=keys["alice"])
        send(proxy, "let us look at the parser and more", "alice-session", key=keys["alice"])
        assert requests.post(proxy.url + "/v1/chat/completions", timeout=60,
                             headers={"User-Agent": "Cline/3.1", "x-api-key": keys["bob"]},
                             json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}).status_code == 200
        wait_for_a_scrape_after_the_requests(proxy, collector, {"x-api-key": keys["alice"]})
        yield proxy, keys


@pytest.fixture(scope="module")
def two_upstreams(llama, llama_server_bin, tiny_model, tmp_path_factory):
    """A proxy in front of two llama-servers (the session's and one more on the same model), after
    two Claude Code sessions: the gate puts a new session on the upstream holding nobody's cache,
    so each session runs on its own; a collector reads both. Yields the proxy and the two URLs."""
    db = str(tmp_path_factory.mktemp("dash-upstreams") / "store.db")
    with processes.llama_server(llama_server_bin, tiny_model) as second, \
            processes.proxy(f"{llama.url},{second.url}", DB_PATH=db) as proxy, \
            processes.collector(f"{llama.url},{second.url}", db, interval=0.5) as collector:
        # Both read once before the requests: a first reading only sets where counting starts.
        wait_for_a_scrape_after_the_requests(proxy, collector)
        send(proxy, "let us look at the parser", "dash-up-a")
        send(proxy, "another project", "dash-up-b")
        send(proxy, "let us look at the parser and more", "dash-up-a")

        def logged() -> list[dict] | None:
            found = requests.get(proxy.url + "/api/requests", timeout=5).json()["requests"]
            return found if len(found) == 3 else None

        rows = wait_until(logged, what="the three requests in the request log")
        assert {r["upstream"] for r in rows} == {llama.url, second.url}, rows
        wait_for_a_scrape_after_the_requests(proxy, collector)
        yield proxy, (llama.url, second.url)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


# Under the page's Content-Security-Policy, wait_for_function predicates are written as functions:
# Playwright polls a bare expression with eval() in the page, which the policy refuses.
# Every Content-Security-Policy violation the page causes, as the browser reports it to the page
# itself (Chromium also logs each as a console error, which page.errors collects too).
RECORD_CSP_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.__cspViolations.push(`${e.effectiveDirective}: ${e.blockedURI || "inline"}, line ${e.lineNumber}: ${e.sample}`));
"""


def open_page(browser, url: str, scheme: str = "light", key: str | None = None, before=None):
    """The dashboard, loaded, in a browser context of its own (closed with page.context.close());
    with a key, the browser gives it as the password when the proxy asks (HTTP Basic). `before`
    gets the page before it loads (to route its requests)."""
    context = browser.new_context(color_scheme=scheme, viewport={"width": 1280, "height": 1500},
                                  http_credentials={"username": "me", "password": key} if key else None)
    context.add_init_script(RECORD_CSP_VIOLATIONS)
    page = context.new_page()
    page.errors = []
    page.outside = []
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on("request", lambda r: page.outside.append(r.url) if not r.url.startswith(url.split("/dashboard")[0]) and not r.url.startswith("data:") else None)
    if before is not None:
        before(page)
    page.goto(url)
    page.wait_for_function("() => document.querySelectorAll('#req-rows tr').length > 0 && "
                           "document.querySelectorAll('#session-list table').length > 0")
    return page


def assert_clean(page) -> None:
    """No script error, no CSP violation, no request to any host but the proxy."""
    assert page.evaluate("window.__cspViolations") == []
    assert page.errors == [] and page.outside == []


def column(page, name: str) -> int:
    """The index of a requests-table column, by its heading."""
    return page.locator("#requests thead th").all_text_contents().index(name)


def every_row_shows(page, name: str, value: str) -> None:
    """Wait until the requests table shows only rows whose column `name` is `value`."""
    page.wait_for_function("([i, v]) => [...document.querySelectorAll('#req-rows tr')].every(tr => tr.children[i].textContent === v)",
                           arg=[column(page, name), value])


def host_port(url: str) -> str:
    return urlsplit(url).netloc


def upstream_shown(page) -> bool:
    """Whether the requests table shows its upstream column (cells and heading alike), its filter,
    and the Upstreams table."""
    i = column(page, "upstream")
    cells = page.evaluate("(i) => [...document.querySelectorAll('#req-rows tr')].map(tr => !tr.children[i].hidden)", i)
    parts = [page.locator(sel).is_visible() for sel in ("#upstream-head", "#f-upstream", "#upstreams")]
    assert len(set(cells + parts)) == 1, (cells, parts)  # all shown or all hidden
    return parts[0]


def test_every_section_shows_what_the_api_returns(stack, browser):
    page = open_page(browser, stack.url + "/dashboard")
    totals = requests.get(stack.url + "/api/totals", timeout=5).json()
    lifetime, upstream = totals["lifetime"], totals["upstream"]
    page.wait_for_function("() => document.getElementById('lt-requests').textContent !== '–'")
    text = lambda sel: page.locator(sel).text_content().strip()
    assert text("#status") == "llama-server up"
    assert f"{upstream['n_ctx']:,} tokens context" in text("#model")
    for selector, value in (("#lt-prompt", lifetime["prompt_tokens"]), ("#lt-cached", lifetime["cached_prompt_tokens"]),
                            ("#lt-generated", lifetime["generated_tokens"]), ("#lt-requests", totals["proxy"]["requests"]),
                            ("#lt-restarts", lifetime["upstream_restarts"])):
        assert value < 10_000 and text(selector) == f"{int(value):,}", (selector, text(selector), value)
    assert text("#slots").endswith(f"/ {upstream['slots']}")
    assert text("#since").startswith("since ")
    assert page.locator("#contexts .bar").count() == upstream["slots"]
    # Styled from the style block alone (the CSP refuses style attributes): the legend's swatches
    # have the colours of the lines they name.
    swatches = page.evaluate("[...document.querySelectorAll('.legend .sw')].map(e => getComputedStyle(e).backgroundColor)")
    colours = page.evaluate("[...document.querySelectorAll('#chart-speed polyline.series')].map(e => getComputedStyle(e).stroke)")
    assert len(swatches) == 4 and swatches[:2] == swatches[2:] and set(swatches) == set(colours), (swatches, colours)
    # History: both charts draw lines from the samples.
    for chart in ("#chart-speed", "#chart-tokens"):
        assert page.locator(f"{chart} polyline.series").count() >= 1
        assert len(page.locator(f"{chart} polyline.series").first.get_attribute("points").split()) >= 2
    # Sessions: one table per Claude Code session, turns in order, the first one marked cold.
    session = page.locator("#session-list > div", has_text="dash-session-1")
    assert session.locator("tbody tr").count() == 3
    assert session.locator("tbody tr").first.locator(".tag.cold").count() == 1
    assert page.locator("#users").is_hidden()  # no keys, no users
    assert page.locator("#alert").is_hidden()  # llama-server is read: nothing to warn of
    assert_clean(page)
    page.context.close()


def test_a_turn_restored_from_disk_is_marked_and_no_other(stack, browser):
    """A turn whose slot llama-server restored from a file saved on disk (kv_restored > 0) gets a
    badge with the tokens restored, titled with the tokens it skipped (its cached_tokens), in the
    request table and in its session. A row with kv_restored null, or without the key at all (a
    store older than the column), gets none. The page reads the real proxy's answers with one
    turn given kv_restored: a real restore needs a llama-server restart mid-session, which the
    prompt-cache tests make."""
    turns = next(s["turns"] for s in requests.get(stack.url + "/api/sessions", timeout=5).json()["sessions"]
                 if s["session"] == "dash-session-1")
    restored, unrestored = turns[-1], turns[0]

    def with_one_restore(route) -> None:
        response = route.fetch()
        body = response.json()
        rows = body.get("requests") or [turn for s in body.get("sessions", []) for turn in s["turns"]]
        for row in rows:
            row.pop("kv_restored", None)  # as an older store answers
            if row["id"] == restored["id"]:
                row["kv_restored"] = 12345
            elif row["id"] == unrestored["id"]:
                row["kv_restored"] = None
        route.fulfill(response=response, json=body)

    def route(page) -> None:
        page.route(re.compile(r"/api/(requests|sessions)(\?.*)?$"), with_one_restore)

    page = open_page(browser, stack.url + "/dashboard", before=route)
    title = f"started from the prompt cache saved on disk; {restored['cached_tokens']:,} tokens skipped"
    for where in ("#req-rows", "#session-list"):
        page.locator(f"{where} .tag.restored").first.wait_for()
        tags = page.locator(f"{where} .tag.restored")
        assert tags.count() == 1, where
        assert tags.text_content() == "restored 12,345" and tags.get_attribute("title") == title, where
    # In the request table, beside the turn's cached tokens; in its session, in place of "cold"
    # or "re-prefilled".
    row = page.locator("#req-rows tr", has=page.locator(".tag.restored"))
    assert row.get_attribute("data-id") == str(restored["id"])
    cached = row.locator("td").nth(column(page, "cached")).text_content()
    assert cached == f"{restored['cached_tokens']:,}restored 12,345"
    session = page.locator("#session-list > div", has_text="dash-session-1")
    assert session.locator("tbody tr").last.locator(".tag").all_text_contents() == ["restored 12,345"]
    assert session.locator("tbody tr").first.locator(".tag").all_text_contents() == ["cold"]  # kv_restored null
    # Styled from the style block (the CSP refuses style attributes): in the colour of "llama-server up".
    page.wait_for_function("() => document.getElementById('status').classList.contains('up')")
    colours = page.evaluate("[getComputedStyle(document.querySelector('#req-rows .tag.restored')).color, "
                            "getComputedStyle(document.getElementById('status')).backgroundColor]")
    assert colours[0] == colours[1], colours
    assert_clean(page)
    page.context.close()


def test_history_charts_before_any_sample(llama, browser, tmp_path):
    """A store with nothing in it yet (no collector has scraped): each chart says so, and its y axis
    reads 0, 1, 2 from the bottom, three distinct labels, not a rounded half that repeats the top."""
    with processes.proxy(llama.url, DB_PATH=str(tmp_path / "empty.db")) as proxy:
        assert requests.get(proxy.url + "/api/samples", timeout=5).json()["samples"] == []
        context = browser.new_context()
        context.add_init_script(RECORD_CSP_VIOLATIONS)
        page = context.new_page()
        page.errors, page.outside = [], []
        page.on("pageerror", lambda e: page.errors.append(str(e)))
        page.goto(proxy.url + "/dashboard")
        for chart in ("#chart-speed", "#chart-tokens"):
            page.wait_for_function("(chart) => document.querySelectorAll(chart + ' text.empty').length === 1", arg=chart)
            ticks = page.locator(f"{chart} text.tick").all_text_contents()
            assert ticks == ["0", "1", "2"], (chart, ticks)
            assert page.locator(f"{chart} text.empty").text_content() == "no data yet"
            assert page.locator(f"{chart} polyline.series").count() == 0
        assert_clean(page)
        context.close()


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
    every_row_shows(page, "class", "openai")
    assert page.locator("#req-rows tr").count() >= 1
    page.select_option("#f-class", "")
    page.select_option("#f-client", "Cline/3.1")
    every_row_shows(page, "client", "Cline/3.1")
    page.select_option("#f-client", "")
    # Without keys, no request has a user.
    assert page.locator("#f-user option").all_text_contents() == ["all"]
    every_row_shows(page, "user", "–")
    # A click shows the request's details.
    page.locator("#req-rows tr").first.click()
    assert page.locator("#req-detail").is_visible() and '"route"' in page.locator("#req-detail").inner_text()
    # The range switch redraws the charts.
    page.click("button[data-range='24h']")
    page.wait_for_function("() => document.querySelector(\"button[data-range='24h']\").classList.contains('on')")
    assert_clean(page)
    page.context.close()


def test_two_upstreams_get_a_column_a_filter_and_a_table(two_upstreams, browser):
    """Behind two llama-servers, each request says which one ran it (host:port, the whole URL as
    its title), the upstream filter keeps one server's, and the Upstreams table sums each one's
    requests and tokens over the rows the page holds."""
    proxy, urls = two_upstreams
    rows = requests.get(proxy.url + "/api/requests", params={"limit": 500}, timeout=5).json()["requests"]
    page = open_page(browser, proxy.url + "/dashboard")
    assert upstream_shown(page)
    i = column(page, "upstream")
    cells = page.locator(f"#req-rows tr td:nth-child({i + 1})")
    assert cells.all_text_contents() == [host_port(r["upstream"]) for r in rows]
    assert [cells.nth(n).get_attribute("title") for n in range(cells.count())] == [r["upstream"] for r in rows]
    assert len(set(cells.all_text_contents())) == 2
    options = page.locator("#f-upstream option")
    assert options.all_text_contents() == ["all", *sorted(host_port(u) for u in urls)]
    for url in urls:
        page.select_option("#f-upstream", url)
        every_row_shows(page, "upstream", host_port(url))
        assert page.locator("#req-rows tr").count() == sum(r["upstream"] == url for r in rows)
        assert upstream_shown(page)  # one server's rows, and still the column that says so
    page.select_option("#f-upstream", "")
    page.wait_for_function("(n) => document.querySelectorAll('#req-rows tr').length === n", arg=len(rows))
    # The Upstreams table: one row per llama-server, as the request log's rows add up.
    assert page.locator("#upstreams-over").text_content() == f"over the latest {len(rows)} requests"
    table = [row.locator("td").all_text_contents() for row in page.locator("#upstream-rows tr").all()]
    expected = []
    for url in sorted(urls):
        mine = [r for r in rows if r["upstream"] == url]
        expected.append([host_port(url), str(len(mine)),
                          *(f"{sum(r[k] or 0 for r in mine):,}" for k in ("prompt_tokens", "cached_tokens", "generated_tokens"))])
    assert [cells[:5] for cells in table] == expected
    assert all(cells[5] not in ("", "–") for cells in table)
    assert sum(int(cells[4].replace(",", "")) for cells in table) > 0
    assert_clean(page)
    page.context.close()


def test_two_upstreams_get_lifetime_totals_each_and_charts_each(two_upstreams, browser):
    """The collector reads both llama-servers: the header counts them, the Lifetime section has a
    row for each (adding up to its tiles), each slot's context names its server, and the History
    charts can show one server's series."""
    proxy, urls = two_upstreams
    totals = requests.get(proxy.url + "/api/totals", timeout=5).json()
    page = open_page(browser, proxy.url + "/dashboard")
    page.wait_for_function("() => !document.getElementById('lt-upstreams').hidden")
    assert page.locator("#status").text_content() == "2 of 2 llama-servers up"
    table = [row.locator("td").all_text_contents() for row in page.locator("#lt-upstream-rows tr").all()]
    expected = [[host_port(u["url"]), "up", *(f"{int(u['lifetime'][k]):,}" for k in ("prompt_tokens", "cached_prompt_tokens",
                                                                              "generated_tokens", "upstream_restarts"))]
                for u in totals["upstreams"]]
    assert [u["url"] for u in totals["upstreams"]] == sorted(urls) and table == expected
    generated = [u["lifetime"]["generated_tokens"] for u in totals["upstreams"]]
    assert all(generated) and sum(generated) == totals["lifetime"]["generated_tokens"]
    contexts = page.locator("#contexts span").all_text_contents()
    assert sorted({c.split(" slot ")[0] for c in contexts}) == sorted(host_port(u) for u in urls)
    assert page.locator("#h-upstream option").all_text_contents() == ["all", *sorted(host_port(u) for u in urls)]
    with page.expect_response(lambda r: "/api/samples" in r.url and "upstream=" in r.url) as answer:
        page.select_option("#h-upstream", urls[1])
    series = answer.value.json()
    assert series["upstream"] == urls[1] and series["samples"]
    assert sum(s["generated_tokens"] for s in series["samples"]) == totals["upstreams"][sorted(urls).index(urls[1])]["lifetime"]["generated_tokens"]
    assert_clean(page)
    page.context.close()


def test_one_upstream_or_none_shows_no_upstream_column(stack, browser):
    """With one llama-server every row names the same one, and rows of an older store, or of
    requests answered without llama-server, name none: either way the page looks as it did
    before there could be several."""
    rows = requests.get(stack.url + "/api/requests", timeout=5).json()["requests"]
    assert len({r["upstream"] for r in rows}) == 1 and rows[0]["upstream"]
    page = open_page(browser, stack.url + "/dashboard")
    assert not upstream_shown(page)
    # Nor lifetime totals per server, nor a choice of server for the charts.
    assert page.locator("#lt-upstreams").is_hidden() and page.locator("#h-upstream-label").is_hidden()
    assert page.locator("#status").text_content() == "llama-server up"
    assert_clean(page)
    page.context.close()

    def without_upstreams(route) -> None:
        response = route.fetch()
        body = response.json()
        for row in body["requests"][::2]:
            row.pop("upstream")
        for row in body["requests"][1::2]:
            row["upstream"] = None
        route.fulfill(response=response, json=body)

    page = open_page(browser, stack.url + "/dashboard",
                     before=lambda page: page.route(re.compile(r"/api/requests(\?.*)?$"), without_upstreams))
    assert not upstream_shown(page)
    assert page.locator("#f-upstream option").all_text_contents() == ["all"]
    assert_clean(page)
    page.context.close()


class _KeepRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # urllib then raises the 3xx as an HTTPError, which is also the response


NO_REDIRECTS = urllib.request.build_opener(_KeepRedirects)


class PrefixProxy(LocalServer):
    """A path-prefix reverse proxy (what nginx or Traefik would be in front): /llm/x -> /x."""

    def __init__(self, target: str, prefix: str = "/llm"):
        outer = self

        class PrefixHandler(QuietHandler):
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
                    for name in ("Content-Type", "Location", "Content-Security-Policy", "X-Content-Type-Options", "X-Frame-Options"):
                        if resp.headers[name]:
                            self.send_header(name, resp.headers[name])
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)

        self.misses: list[str] = []
        super().__init__(PrefixHandler)
        self.prefixed = self.url + prefix  # where the dashboard is reached through it


def test_works_behind_a_path_prefix(stack, browser):
    with PrefixProxy(stack.url) as front:
        for typed in ("/dashboard", "/dashboard/"):  # the trailing slash leads to the same page
            page = open_page(browser, front.prefixed + typed)
            assert page.url == front.prefixed + "/dashboard"
            assert page.locator("#status").inner_text() == "llama-server up"
            assert front.misses == []
            assert_clean(page)
            page.context.close()


def inline_hashes(page: bytes, tag: bytes) -> list[str]:
    """The CSP source of each inline <tag> block: 'sha256-' and the base64 SHA-256 of its text."""
    blocks = re.findall(rb"<%s>(.*?)</%s>" % (tag, tag), page, re.DOTALL)
    return [f"'sha256-{base64.b64encode(hashlib.sha256(block).digest()).decode()}'" for block in blocks]


def test_with_keys_users_their_filter_and_the_login(keyed_stack, browser):
    proxy, keys = keyed_stack
    alice = {"x-api-key": keys["alice"]}
    # Without a key, neither the page nor its JSON: the browser gets 401 and is asked for a key
    # (HTTP Basic; headless Chromium, with nobody to ask, gives up on the page); a wrong key, 401.
    for password in (None, "llb-wrong"):
        context = browser.new_context(http_credentials={"username": "me", "password": password} if password else None)
        page = context.new_page()
        seen = []
        page.on("response", lambda r, seen=seen: seen.append((r.status, r.headers.get("www-authenticate", ""))))
        if password is None:
            with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
                page.goto(proxy.url + "/dashboard")
        else:
            assert page.goto(proxy.url + "/dashboard").status == 401
            assert page.locator("#users").count() == 0  # an error envelope, not the page
        assert seen and all(status == 401 and challenge.startswith("Basic ") for status, challenge in seen), seen
        context.close()
    assert requests.get(proxy.url + "/api/users", timeout=5).status_code == 401
    # With one, the page and the headers that keep it to itself: only its own script and style run.
    answer = requests.get(proxy.url + "/dashboard", headers=alice, timeout=5)
    assert answer.status_code == 200
    assert answer.headers["X-Content-Type-Options"] == "nosniff" and answer.headers["X-Frame-Options"] == "DENY"
    policy = [directive.strip() for directive in answer.headers["Content-Security-Policy"].split(";")]
    script, style = inline_hashes(answer.content, b"script"), inline_hashes(answer.content, b"style")
    assert len(script) == 1 and len(style) == 1
    for directive in ("default-src 'none'", f"script-src {script[0]}", f"style-src {style[0]}", "connect-src 'self'",
                      "frame-ancestors 'none'"):
        assert directive in policy, (directive, policy)

    users = requests.get(proxy.url + "/api/users", headers=alice, timeout=5).json()["users"]
    assert [u["user"] for u in users] == ["bob", "alice"]  # most recently seen first
    assert [u["requests"] for u in users] == [1, 2]
    page = open_page(browser, proxy.url + "/dashboard", key=keys["bob"])
    # The Users section: one row per user, as /api/users has them.
    page.locator("#users").wait_for(state="visible", timeout=10_000)
    rows = page.locator("#user-rows tr")
    assert rows.count() == 2
    for row, user in zip(rows.all(), users):
        cells = row.locator("td").all_text_contents()
        counts = [f"{user[k]:,}" for k in ("requests", "prompt_tokens", "cached_tokens", "generated_tokens")]
        assert cells[:5] == [user["user"], *counts], (cells, user)
        assert cells[5] not in ("", "–")
    assert users[1]["generated_tokens"] > 0
    # The requests table says whose each request was; the user filter keeps one person's.
    assert set(page.locator("#f-user option").all_text_contents()) == {"all", "alice", "bob"}
    whose = page.locator(f"#req-rows tr td:nth-child({column(page, 'user') + 1})").all_text_contents()
    assert sorted(whose) == ["alice", "alice", "bob"]
    for name, count in (("alice", 2), ("bob", 1)):
        page.select_option("#f-user", name)
        every_row_shows(page, "user", name)
        assert page.locator("#req-rows tr").count() == count == len(
            requests.get(proxy.url + "/api/requests", params={"user": name}, headers=alice, timeout=5).json()["requests"])
    page.select_option("#f-user", "")
    page.wait_for_function("() => document.querySelectorAll('#req-rows tr').length === 3")
    assert_clean(page)
    page.context.close()


def test_screenshots_light_and_dark(keyed_stack, browser, tmp_path):
    proxy, keys = keyed_stack
    into = SCREENSHOTS if os.environ.get("UPDATE_SCREENSHOTS") == "1" else tmp_path
    into.mkdir(parents=True, exist_ok=True)
    for scheme in ("light", "dark"):
        page = open_page(browser, proxy.url + "/dashboard", scheme, key=keys["alice"])
        page.wait_for_function("() => document.getElementById('lt-requests').textContent !== '–'")
        page.locator("#users").wait_for(state="visible")
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == ("rgb(250, 250, 250)" if scheme == "light" else "rgb(20, 20, 23)")
        shot = into / f"dashboard-{scheme}.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        assert_clean(page)
        page.context.close()


def test_a_banner_says_why_the_collector_cannot_count(llama_server_bin, tiny_model, browser, tmp_path):
    """llama-server asks for a key the collector was not given: the totals stop, and the page says
    so at the top (and says nothing there while all is well: the other tests' pages)."""
    key = "llama-secret-key"
    db = str(tmp_path / "store.db")
    with processes.llama_server(llama_server_bin, tiny_model, ctx=4096, extra=["--api-key", key]) as llama, \
            processes.proxy(llama.url, DB_PATH=db, LLAMA_API_KEY=key) as proxy, \
            processes.collector(llama.url, db, interval=0.5) as collector:
        send(proxy, "is anyone counting?", "banner-session")
        wait_until(lambda: requests.get(proxy.url + "/api/totals", timeout=5).json()["upstream"]["error"], 20, what=collector.log_text)
        page = open_page(browser, proxy.url + "/dashboard")
        page.locator("#alert").wait_for(state="visible", timeout=10_000)
        banner = page.locator("#alert").inner_text()
        assert "cannot read llama-server" in banner and "LLAMA_API_KEY" in banner, banner
        assert page.locator("#status").inner_text() == "llama-server down"
        assert_clean(page)
        page.context.close()
