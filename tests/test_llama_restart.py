"""llama-server stopped or restarted under a request, with the real llama-server.

Stopped with SIGTERM (or Ctrl-C), llama-server closes its port and its idle connections at once
but leaves a request it was working on without an answer and without a close: the old process
stays until the client hangs up. The proxy must notice (upstream.Upstream.stopped) rather than
wait UPSTREAM_READ_TIMEOUT with the slot, and every request queued behind it, held.
"""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.support import processes
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

# A non-streamed completion sends nothing until it is done: 30,000 forced tokens keep the tiny
# model busy for many seconds, long past the moment the test stops llama-server.
LONG = {"model": "x", "max_tokens": 30_000, "ignore_eos": True, "messages": [{"role": "user", "content": "go"}]}
SHORT = {"model": "x", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}


def generating(llama_url: str) -> bool:
    try:
        return any(slot.get("is_processing") for slot in requests.get(llama_url + "/slots", timeout=2).json())
    except requests.RequestException:
        return False


def test_a_request_in_flight_when_llama_server_stops_is_answered_and_the_next_one_reaches_its_successor(
        llama_server_bin, tiny_model):
    port = processes.free_port()
    old = processes.llama_server(llama_server_bin, tiny_model, port=port).start()
    # A read timeout far above the checks' second: if they fail, the request ends in its 504.
    with processes.proxy(old.url, UPSTREAM_READ_TIMEOUT="120") as proxy, ThreadPoolExecutor(1) as pool:
        try:
            pending = pool.submit(requests.post, proxy.url + "/v1/chat/completions", json=LONG, timeout=300)
            wait_until(lambda: generating(old.url), what="llama-server generating the long request")
            assert old.proc is not None
            old.proc.send_signal(signal.SIGTERM)
            resp = pending.result()
            assert resp.status_code == 503, resp.text
            assert "stopped (its port refuses connections) while this request waited" in resp.json()["error"]["message"]
            # The proxy hung up, so the old process could finish exiting.
            assert old.proc.wait(timeout=60) is not None
        finally:
            old.stop()
        # The slot was given back: a new llama-server on the same port serves the next request.
        with processes.llama_server(llama_server_bin, tiny_model, port=port):
            answer = requests.post(proxy.url + "/v1/chat/completions", json=SHORT, timeout=120)
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["message"]["content"] is not None
