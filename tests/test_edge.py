"""The edge checks (llamabridge/edge.py) on the real proxy in front of the real llama-server,
with and without keys: what a web page could make a browser send is refused before any route
runs (a body that is not JSON, a foreign Host, a foreign Origin), and nothing of it reaches
llama-server; pages and JSON carry the headers that keep browsers from sniffing or framing them.
(The same attacks from a real browser: test_browser_attacks.py; keys: test_keys.py.)"""

from __future__ import annotations

import json

import pytest
import requests

from tests.support import processes
from tests.support.prom import metric

pytestmark = pytest.mark.integration

CHAT = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
MESSAGE = {"model": "claude-sonnet-4-5", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def guarded(llama):
    with processes.proxy(llama.url, ALLOWED_HOSTS="llamabox.lan", ALLOWED_ORIGINS="https://app.example,chrome-extension://*") as proxy:
        yield proxy


def decodes(llama) -> float:
    """llama-server's own count of decode calls: it moves with every prompt it evaluates."""
    return metric(llama.url, "llamacpp:n_decode_total")


@pytest.mark.parametrize("path, body, anthropic", [
    ("/v1/chat/completions", CHAT, False),
    ("/v1/messages", MESSAGE, True),
    ("/v1/responses", {"model": "m", "input": "hi"}, False),
    ("/completion", {"prompt": "hi", "n_predict": 4}, False),
])
def test_a_body_that_does_not_say_json_is_415_and_never_reaches_llama_server(guarded, llama, path, body, anthropic):
    before = decodes(llama)
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": content_type} if content_type else {}
        answer = requests.post(guarded.url + path, data=json.dumps(body), headers=headers, timeout=30)
        assert answer.status_code == 415, (content_type, answer.text)
        error = answer.json()["error"]
        assert "application/json" in error["message"]
        assert error["type"] == "invalid_request_error"
        assert (answer.json().get("type") == "error") is anthropic
    # Any JSON media type is a JSON body, parameters and all.
    for content_type in ("application/json; charset=utf-8", "application/vnd.api+json"):
        assert requests.post(guarded.url + path, data=json.dumps(body), headers={"Content-Type": content_type},
                             timeout=60).status_code == 200
    assert decodes(llama) > before  # the JSON ones did reach it ...
    after = decodes(llama)
    requests.post(guarded.url + path, data=json.dumps(body), headers={"Content-Type": "text/plain"}, timeout=30)
    assert decodes(llama) == after  # ... and the plain one did not
    assert metric(guarded.url, "llamabridge_proxy_refused_requests_total", {"reason": "content_type"}) >= 5


def test_a_foreign_host_is_403_with_no_data(guarded, llama):
    """What a page sends after re-pointing its own name at 127.0.0.1 (DNS rebinding): its name."""
    before = decodes(llama)
    for path in ("/api/requests", "/api/totals", "/dashboard", "/metrics", "/v1/models"):
        answer = requests.get(guarded.url + path, headers={"Host": f"rebind.example:{guarded.port}"}, timeout=10)
        assert answer.status_code == 403, (path, answer.text)
        assert "ALLOWED_HOSTS" in answer.json()["error"]["message"]
        assert "requests" not in answer.json() and "<html" not in answer.text
    answer = requests.post(guarded.url + "/v1/messages", json=MESSAGE, headers={"Host": "rebind.example"}, timeout=10)
    assert answer.status_code == 403 and answer.json()["error"]["type"] == "permission_error"
    assert decodes(llama) == before
    # Loopback by name or address, any literal IP, and the names in ALLOWED_HOSTS are this machine.
    for host in ("localhost", f"localhost:{guarded.port}", "127.0.0.1", "[::1]:9090", "192.168.1.20:9090", "LlamaBox.lan:9090"):
        assert requests.get(guarded.url + "/api/totals", headers={"Host": host}, timeout=10).status_code == 200, host
    assert requests.get(guarded.url + "/api/totals", headers={"Host": "llamabox.lan.evil.example"}, timeout=10).status_code == 403


def test_a_foreign_origin_is_403_and_the_proxys_own_origin_passes(guarded, llama):
    before = decodes(llama)
    for origin in ("https://evil.example", "null", f"http://127.0.0.1:{guarded.port + 1}", "http://localhost"):
        answer = requests.post(guarded.url + "/v1/chat/completions", json=CHAT, headers={"Origin": origin}, timeout=10)
        assert answer.status_code == 403, origin
        assert "ALLOWED_ORIGINS" in answer.json()["error"]["message"]
        assert "Access-Control-Allow-Origin" not in answer.headers
    # A cross-site request that sends no Origin (an <img>, a <script>) says so in Sec-Fetch-Site.
    answer = requests.get(guarded.url + "/api/requests", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}, timeout=10)
    assert answer.status_code == 403
    assert decodes(llama) == before
    own = requests.post(guarded.url + "/v1/chat/completions", json=CHAT, headers={"Origin": guarded.url}, timeout=60)
    assert own.status_code == 200 and "Access-Control-Allow-Origin" not in own.headers
    # Following a link to the dashboard from another site is a navigation, not a request by a page.
    assert requests.get(guarded.url + "/dashboard", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"},
                        timeout=10).status_code == 200


def test_an_allowed_origin_gets_cors_and_its_preflight(guarded):
    preflight = requests.options(guarded.url + "/v1/chat/completions", timeout=10, headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, x-api-key"})
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert preflight.headers["Access-Control-Allow-Headers"] == "content-type, x-api-key"
    answer = requests.post(guarded.url + "/v1/chat/completions", json=CHAT, headers={"Origin": "https://app.example"}, timeout=60)
    assert answer.status_code == 200 and answer.headers["Access-Control-Allow-Origin"] == "https://app.example"
    extension = requests.get(guarded.url + "/v1/models", headers={"Origin": "chrome-extension://abcdef"}, timeout=10)
    assert extension.status_code == 200 and extension.headers["Access-Control-Allow-Origin"] == "chrome-extension://abcdef"
    # Not allowed: no preflight either.
    refused = requests.options(guarded.url + "/v1/chat/completions", timeout=10,
                               headers={"Origin": "https://other.example", "Access-Control-Request-Method": "POST"})
    assert refused.status_code == 403 and "Access-Control-Allow-Origin" not in refused.headers


def test_pages_and_json_refuse_sniffing_and_framing(guarded):
    for path in ("/dashboard", "/api/totals", "/api/requests", "/metrics", "/v1/models"):
        answer = requests.get(guarded.url + path, timeout=10)
        assert answer.status_code == 200, path
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert answer.headers["X-Frame-Options"] == "DENY"
        assert "frame-ancestors 'none'" in answer.headers["Content-Security-Policy"]
    policy = requests.get(guarded.url + "/dashboard", timeout=10).headers["Content-Security-Policy"]
    directives = dict(part.strip().split(" ", 1) for part in policy.split(";"))
    assert directives["default-src"] == "'none'" and directives["connect-src"] == "'self'"
    assert directives["script-src"].startswith("'sha256-") and "unsafe" not in policy


def test_no_cors_headers_by_default(proxy):
    """Without ALLOWED_ORIGINS, no origin but the proxy's own is served."""
    answer = requests.options(proxy.url + "/v1/messages", timeout=10,
                              headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert answer.status_code == 403 and not any(h.lower().startswith("access-control-") for h in answer.headers)
