"""Bad input and a missing upstream, against the real proxy process: every answer is a clear
4xx/5xx in the route's own envelope, and the worker that answered is still the one serving."""

from __future__ import annotations

import json
import re
import socket

import anthropic
import openai
import pytest
import requests

from tests.support import processes
from tests.support.prom import metric

pytestmark = pytest.mark.integration

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def small_proxy(llama):
    """A proxy with a small body limit, so the limit is cheap to cross."""
    with processes.proxy(llama.url, MAX_REQUEST_BYTES=str(LIMIT)) as server:
        yield server


@pytest.fixture(scope="module")
def orphan_proxy():
    """A proxy whose llama-server is not there (a port nothing listens on)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with processes.proxy(f"http://127.0.0.1:{port}") as server:
        yield server


def anthropic_error(resp: requests.Response, status: int, error_type: str) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["type"] == "error" and body["error"]["type"] == error_type, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]["message"]


def openai_error(resp: requests.Response, status: int) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert isinstance(body["error"]["message"], str) and body["error"]["message"] and body["error"]["type"]
    return body["error"]["message"]


# What every client sends; without it the proxy refuses a body before reading it (415).
JSON = {"Content-Type": "application/json"}
GOOD = {"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("data, expect", [
    (b"", "empty"),
    (b"{not json", "not valid JSON"),
    (b'{"model": "x", "messages": [{"role": "user", "content": "caf\xe9"}], "max_tokens": 5}', "not valid UTF-8"),
    (b"[" * 30_000 + b"]" * 30_000, "nested too deeply"),
    (json.dumps(["a list"]).encode(), "body: expected a JSON object"),
    (json.dumps({**GOOD, "messages": [{"role": "user", "content": [{"type": "hologram"}]}]}).encode(), "messages.0.content.0.type"),
    (json.dumps({**GOOD, "max_tokens": "lots"}).encode(), "max_tokens"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "messages"}).encode(), "messages"),
    # llama-server would answer 200 with an empty reply (the empty stop matches at once).
    (json.dumps({**GOOD, "stop_sequences": [""]}).encode(), "stop_sequences.0: each stop sequence must be non-empty"),
])
def test_bad_anthropic_bodies_get_a_400_naming_the_problem(small_proxy, data, expect):
    resp = requests.post(small_proxy.url + "/v1/messages", data=data, headers={"Content-Type": "application/json"}, timeout=10)
    assert expect in anthropic_error(resp, 400, "invalid_request_error")


def test_bad_openai_body_gets_an_openai_400(small_proxy):
    resp = requests.post(small_proxy.url + "/v1/chat/completions", data=b"{oops", headers=JSON, timeout=10)
    assert "not valid JSON" in openai_error(resp, 400)


def test_requests_the_proxy_refuses_are_counted_as_rejected_not_as_llama_servers(small_proxy):
    """`handled="rejected"`: the proxy answered without llama-server (bad JSON, a body that does not
    validate); an error llama-server gave stays `upstream`."""
    def count(route: str, handled: str) -> float:
        return metric(small_proxy.url, "llamabridge_proxy_requests_total",
                      {"route": route, "status": "400", "handled": handled}, missing=0.0)

    before = {(route, handled): count(route, handled) for route in ("/v1/messages", "/v1/chat/completions")
              for handled in ("rejected", "upstream")}
    requests.post(small_proxy.url + "/v1/messages", data=b"{oops", headers=JSON, timeout=10)
    requests.post(small_proxy.url + "/v1/messages", json={**GOOD, "messages": "hi"}, timeout=10)
    requests.post(small_proxy.url + "/v1/chat/completions", data=b"{oops", headers=JSON, timeout=10)
    too_many = requests.post(small_proxy.url + "/v1/chat/completions", timeout=30, json={
        "model": "m", "max_tokens": 10**12, "messages": [{"role": "user", "content": "hi"}]})
    assert too_many.status_code == 400, too_many.text  # llama-server's own refusal, relayed
    after = {key: count(*key) for key in before}
    assert {key: after[key] - before[key] for key in before} == {
        ("/v1/messages", "rejected"): 2, ("/v1/messages", "upstream"): 0,
        ("/v1/chat/completions", "rejected"): 1, ("/v1/chat/completions", "upstream"): 1}
    content_type = requests.get(small_proxy.url + "/metrics", timeout=10).headers["Content-Type"]
    assert content_type.count("charset") == 1, content_type


def test_huge_body_is_413_in_both_envelopes(small_proxy):
    big = json.dumps({**GOOD, "messages": [{"role": "user", "content": "x" * (LIMIT * 2)}]})
    resp = requests.post(small_proxy.url + "/v1/messages", data=big, headers=JSON, timeout=10)
    assert "MAX_REQUEST_BYTES" in anthropic_error(resp, 413, "request_too_large")
    resp = requests.post(small_proxy.url + "/v1/chat/completions", data=big, headers=JSON, timeout=10)
    assert "MAX_REQUEST_BYTES" in openai_error(resp, 413)


def test_unknown_route_and_method(small_proxy):
    anthropic_error(requests.get(small_proxy.url + "/v1/messages", timeout=10), 405, "invalid_request_error")
    assert "no route" in openai_error(requests.get(small_proxy.url + "/v2/everything", timeout=10), 404)


def test_requests_the_http_server_cannot_parse_get_json_both_sdks_read(small_proxy):
    """gunicorn answers these itself, before any route (here a header over its 8 KB limit): the
    body is JSON that each SDK reads as its own error, not an HTML page."""
    big = {"X-Big": "a" * 9000}
    claude = anthropic.Anthropic(base_url=small_proxy.url, api_key="k", max_retries=0, default_headers=big)
    with pytest.raises(anthropic.APIStatusError) as caught:
        claude.messages.create(**GOOD)
    assert caught.value.status_code == 431 and isinstance(caught.value.body, dict)
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    assert "Request Header Fields Too Large" in caught.value.body["error"]["message"]

    oai = openai.OpenAI(base_url=small_proxy.url + "/v1", api_key="k", max_retries=0, default_headers=big)
    with pytest.raises(openai.APIStatusError) as caught:
        oai.chat.completions.create(model="m", max_tokens=1, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 431 and caught.value.type == "invalid_request_error"
    assert "Request Header Fields Too Large" in caught.value.message

    with socket.create_connection(("127.0.0.1", small_proxy.port), timeout=10) as s:  # not HTTP at all
        s.sendall(b"HELLO\r\n\r\n")
        answer = b"".join(iter(lambda: s.recv(65536), b""))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"Content-Type: application/json" in head
    assert json.loads(body)["error"]["message"].startswith("Bad Request: Invalid Request Line")


def test_the_worker_survives_bad_input(small_proxy):
    """After all of the above (and a burst more), the same single worker still serves real requests."""
    for _ in range(20):
        requests.post(small_proxy.url + "/v1/messages", data=b"\xff\xfe", headers=JSON, timeout=10)
    resp = requests.post(small_proxy.url + "/v1/messages", json=GOOD, timeout=60)
    assert resp.status_code == 200 and resp.json()["content"]
    log = small_proxy.log_text()
    assert len(re.findall(r"Booting worker", log)) == 1, log
    assert "Traceback" not in log


def test_upstream_down_is_overloaded_for_anthropic(orphan_proxy):
    resp = requests.post(orphan_proxy.url + "/v1/messages", json=GOOD, timeout=30)
    message = anthropic_error(resp, 529, "overloaded_error")
    assert "unreachable" in message and resp.headers["retry-after"]
    resp = requests.post(orphan_proxy.url + "/v1/messages/count_tokens", json={"model": "x", "messages": GOOD["messages"]}, timeout=30)
    anthropic_error(resp, 529, "overloaded_error")


def test_upstream_down_is_503_for_openai(orphan_proxy):
    resp = requests.post(orphan_proxy.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}, timeout=30)
    assert "unreachable" in openai_error(resp, 503)
    assert resp.headers["retry-after"]


def test_health_reports_the_missing_upstream(orphan_proxy):
    resp = requests.get(orphan_proxy.url + "/healthz", timeout=30)
    assert resp.status_code == 503 and resp.json()["status"] == "unavailable"
    assert requests.head(orphan_proxy.url + "/api/hello", timeout=5).status_code == 200


def test_logs_name_each_request_but_never_its_keys(llama):
    """The proxy's own line per API call by default; gunicorn's access line per HTTP request with
    ACCESS_LOG=true. Neither writes headers, where clients put their API keys."""
    secret = "sk-ant-never-log-this-0123456789"
    headers = {"x-api-key": secret, "Authorization": f"Bearer {secret}"}
    for access_log in ("false", "true"):
        with processes.proxy(llama.url, ACCESS_LOG=access_log) as server:
            assert requests.post(server.url + "/v1/messages", json=GOOD, headers=headers, timeout=60).status_code == 200
            assert requests.get(server.url + "/metrics", headers=headers, timeout=10).status_code == 200
            server.stop()  # flushes the log
            log = server.log_text()
        assert re.search(r"llamabridge\.request: /v1/messages class=\S+ status=200", log), log
        assert ('"GET /metrics HTTP/1.1" 200' in log) is (access_log == "true"), log
        assert secret not in log
