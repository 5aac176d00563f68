"""A llama-server that hangs mid-answer, with the real llama-server and proxy processes.

SIGSTOP is the hang: llama-server keeps its port and connections open and answers nothing, not
even `/slots`, as when its main loop deadlocks. The proxy must end the request after
UPSTREAM_STALL_TIMEOUT (here 3 s) in the client's own envelope, give the slot back, and count
it; and must leave alone an answer that is merely slow while llama-server still answers.

The llama-server here runs with `--ignore-eos`, so every answer runs to its `max_tokens`: the
tiny model would otherwise end its reply before the test could stop it.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest
import requests

from tests.support import processes
from tests.support.prom import metric
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

STALL_TIMEOUT = 3
# How long after the stop the client may wait for its error: the timeout, a probe that must go
# unanswered, and a slow shared machine.
ERROR_WITHIN = STALL_TIMEOUT + 12
STALLS = "llamabridge_proxy_upstream_stalls_total"
# Tens of seconds of tokens on the tiny model: still generating when the test stops llama-server.
LONG_TOKENS = 30_000
ANTHROPIC_LONG = {"model": "claude-sonnet-4-5", "max_tokens": LONG_TOKENS, "messages": [{"role": "user", "content": "go"}]}
OPENAI_LONG: dict[str, Any] = {"model": "x", "max_tokens": LONG_TOKENS, "messages": [{"role": "user", "content": "go"}]}


@pytest.fixture(scope="module")
def stack(llama_server_bin, tiny_model):
    with processes.llama_server(llama_server_bin, tiny_model, extra=["--ignore-eos"]) as llama, \
            processes.proxy(llama.url, UPSTREAM_STALL_TIMEOUT=str(STALL_TIMEOUT), UPSTREAM_READ_TIMEOUT="120") as proxy:
        yield llama, proxy


@contextmanager
def stopped(llama: processes.Service) -> Iterator[None]:
    """llama-server stopped (SIGSTOP) for the block, and always continued after it."""
    assert llama.proc is not None
    os.kill(llama.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(llama.proc.pid, signal.SIGCONT)


def generating(llama_url: str) -> bool:
    try:
        return any(slot.get("is_processing") for slot in requests.get(llama_url + "/slots", timeout=2).json())
    except requests.RequestException:
        return False


def sse_frames(resp: requests.Response) -> Iterator[tuple[str | None, str]]:
    """(event name or None, data) for each frame of a stream, as it arrives."""
    event: str | None = None
    data: list[str] = []
    for line in resp.iter_lines():
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = None, []
        elif line.startswith(b"event:"):
            event = line[6:].strip().decode()
        elif line.startswith(b"data:"):
            data.append(line[5:].strip().decode())
    if data:
        yield event, "\n".join(data)


def serves_again(proxy_url: str) -> None:
    """Once llama-server runs again, the gate admits the next request: the slot was given back."""
    short: dict[str, Any] = {"model": "x", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    resp = requests.post(proxy_url + "/v1/chat/completions", json=short, timeout=120)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["finish_reason"] == "length"


def test_a_streamed_anthropic_answer_from_a_hung_llama_server_ends_in_an_overloaded_error(stack):
    llama, proxy = stack
    before = metric(proxy.url, STALLS)
    with requests.post(proxy.url + "/v1/messages", json={**ANTHROPIC_LONG, "stream": True}, stream=True, timeout=60) as resp:
        assert resp.status_code == 200
        frames = sse_frames(resp)
        for event, _ in frames:
            if event == "content_block_delta":
                break  # the answer has started
        with stopped(llama):
            started = time.monotonic()
            rest = list(frames)  # the bytes already on their way, then the proxy's end of it
            waited = time.monotonic() - started
    assert rest, "the stream ended without a frame after llama-server stopped"
    event, data = rest[-1]
    assert event == "error", rest[-3:]
    error = json.loads(data)
    assert error["type"] == "error" and error["error"]["type"] == "overloaded_error"
    assert "UPSTREAM_STALL_TIMEOUT" in error["error"]["message"]
    assert all(name != "message_stop" for name, _ in rest)
    assert waited < ERROR_WITHIN
    assert metric(proxy.url, STALLS) == before + 1
    assert "stopped working on this request" in proxy.log_text()
    serves_again(proxy.url)


def test_a_streamed_openai_answer_from_a_hung_llama_server_ends_with_an_error_frame(stack):
    llama, proxy = stack
    before = metric(proxy.url, STALLS)
    with requests.post(proxy.url + "/v1/chat/completions", json={**OPENAI_LONG, "stream": True}, stream=True, timeout=60) as resp:
        assert resp.status_code == 200
        frames = sse_frames(resp)
        for _, data in frames:
            if json.loads(data)["choices"][0]["delta"].get("content"):
                break
        with stopped(llama):
            started = time.monotonic()
            rest = [data for _, data in frames]
            waited = time.monotonic() - started
    assert rest and "[DONE]" not in rest
    error = json.loads(rest[-1])["error"]
    assert error["type"] == "unavailable_error" and error["code"] == 503
    assert "UPSTREAM_STALL_TIMEOUT" in error["message"]
    assert waited < ERROR_WITHIN
    assert metric(proxy.url, STALLS) == before + 1
    serves_again(proxy.url)


@pytest.mark.parametrize(("route", "body", "status", "envelope_type"), [
    # llama-server sends nothing of a non-streamed completion until it is done: the proxy is
    # waiting for the answer's headers when llama-server stops.
    ("/v1/chat/completions", OPENAI_LONG, 503, "unavailable_error"),
    # The translation streams from llama-server even for a non-streamed client, which has been
    # sent nothing yet: a plain 529.
    ("/v1/messages", ANTHROPIC_LONG, 529, "overloaded_error"),
])
def test_a_non_streamed_request_to_a_hung_llama_server_gets_an_error_envelope(stack, route, body, status, envelope_type):
    llama, proxy = stack
    before = metric(proxy.url, STALLS)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(requests.post, proxy.url + route, json=body, timeout=60)
        wait_until(lambda: generating(llama.url), what="llama-server generating the long request")
        with stopped(llama):
            started = time.monotonic()
            resp = pending.result()
            waited = time.monotonic() - started
    assert resp.status_code == status, resp.text
    assert resp.headers["Retry-After"] == "5"
    assert resp.json()["error"]["type"] == envelope_type
    assert "UPSTREAM_STALL_TIMEOUT" in resp.json()["error"]["message"]
    assert waited < ERROR_WITHIN
    assert metric(proxy.url, STALLS) == before + 1
    serves_again(proxy.url)


def queued_behind_another_client(llama: processes.Service, proxy: processes.Service, quiet_for: float) -> requests.Response:
    """A short non-streamed request through the proxy, made to wait inside llama-server for
    `quiet_for` seconds: meanwhile another client, talking to llama-server directly (so the
    proxy's gate knows nothing of it), holds its one slot with a long stream. The request's
    connection is silent all that time, while llama-server's main loop works."""
    short: dict[str, Any] = {"model": "x", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    with ThreadPoolExecutor(1) as pool, \
            requests.post(llama.url + "/v1/chat/completions", json={**OPENAI_LONG, "stream": True}, stream=True, timeout=60) as stream:
        try:
            lines = stream.iter_lines()  # kept: a dropped iterator closes the stream
            next(lines)  # generating
            pending = pool.submit(requests.post, proxy.url + "/v1/chat/completions", json=short, timeout=120)
            wait_until(lambda: metric(llama.url, "llamacpp:requests_deferred") >= 1, what="the request queued in llama-server")
            until = time.monotonic() + quiet_for
            wait_until(lambda: pending.done() or time.monotonic() > until, timeout=quiet_for + 30, what="the quiet period")
            assert not pending.done(), f"ended while llama-server was busy: {pending.result().text}"
        finally:
            stream.close()  # hung up: llama-server ends that stream, and runs the queued request
        return pending.result()


def test_a_request_quiet_for_longer_than_the_stall_timeout_is_not_a_stall(stack):
    """Waiting in llama-server's own queue, a request gets nothing for longer than the stall
    timeout; llama-server answers the proxy's probes meanwhile, so it is left alone."""
    llama, proxy = stack
    before = metric(proxy.url, STALLS)
    resp = queued_behind_another_client(llama, proxy, 2 * STALL_TIMEOUT)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 8
    assert metric(proxy.url, STALLS) == before


def test_with_slots_disabled_the_proxy_asks_metrics_instead(llama_server_bin, tiny_model):
    """`--no-slots` answers /slots with 501 from the HTTP thread, which says nothing about the
    main loop: the probe falls back to /metrics. Its answers keep a quiet request going, and its
    silence ends a hung one."""
    with processes.llama_server(llama_server_bin, tiny_model, extra=["--ignore-eos", "--no-slots"]) as llama, \
            processes.proxy(llama.url, UPSTREAM_STALL_TIMEOUT=str(STALL_TIMEOUT), UPSTREAM_READ_TIMEOUT="120") as proxy, \
            ThreadPoolExecutor(1) as pool:
        assert requests.get(llama.url + "/slots", timeout=5).status_code == 501
        assert queued_behind_another_client(llama, proxy, 2 * STALL_TIMEOUT).status_code == 200
        pending = pool.submit(requests.post, proxy.url + "/v1/chat/completions", json=OPENAI_LONG, timeout=60)
        wait_until(lambda: metric(llama.url, "llamacpp:requests_processing") > 0, what="llama-server generating")
        with stopped(llama):
            resp = pending.result()
    assert resp.status_code == 503, resp.text
    assert "(/metrics)" in resp.json()["error"]["message"]
