"""Threads for what needs no slot: with every slot busy and the queue full, the proxy still answers
health checks, /metrics, token counts, local title answers and the dashboard at once (each request
waiting for a slot holds one of its threads). Start-up refuses a thread pool a full queue would
exhaust, and at run time the gates stop at PROXY_THREADS less the reserve, even when llama-server
reports more slots than start-up assumed. Real llama-server (tiny model), real proxy processes."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import requests

from proxy.config import THREAD_RESERVE, ConfigError, Settings, from_env
from tests.support import processes
from tests.support.hold import holding_the_slot, raw_post
from tests.support.prom import metric
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

# The rule's smallest pool for QUEUE_MAX=7 and one assumed slot: 7 + 1 + 16.
THREADS, QUEUE_MAX = 24, 7
SHORT_CHAT = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "waiting"}]}
# Each no-slot request, this many times at once: together close to the whole reserve.
COPIES = 3
# The bound for an answer while the queue is full: generous (each takes milliseconds).
ANSWER_SECONDS = 1.0


def no_slot_requests(url: str, title: dict) -> dict[str, Callable[[], requests.Response]]:
    """What must never wait behind generations: each a call returning its response."""
    return {
        "healthz": lambda: requests.get(url + "/healthz", timeout=30),
        "metrics": lambda: requests.get(url + "/metrics", timeout=30),
        "dashboard": lambda: requests.get(url + "/dashboard", timeout=30),
        "count_tokens": lambda: requests.post(url + "/v1/messages/count_tokens?beta=true", timeout=30,
                                              json={"model": "m", "messages": [{"role": "user", "content": "count me"}]}),
        # Claude Code's own title request, answered without the model (POLICY_TITLE=local).
        "title": lambda: requests.post(url + "/v1/messages?beta=true", json=dict(title, stream=False), timeout=30,
                                       headers={"X-Claude-Code-Session-Id": "title-session"}),
    }


def answer_at_once(url: str, title: dict) -> None:
    def timed(call):
        started = time.monotonic()
        response = call()
        return response, time.monotonic() - started

    calls = [(name, call) for name, call in no_slot_requests(url, title).items() for _ in range(COPIES)]
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        answers = [(name, pool.submit(timed, call)) for name, call in calls]
        results = [(name, *future.result(timeout=60)) for name, future in answers]
    for name, response, took in results:
        assert response.status_code == 200, (name, response.status_code, response.text[:300])
        assert took < ANSWER_SECONDS, (name, round(took, 3), sorted(round(t, 3) for _, _, t in results))
    titles = [response.json() for name, response, _ in results if name == "title"]
    assert all(t["type"] == "message" and t["content"] for t in titles), titles


@contextlib.contextmanager
def queued(url: str, count: int):
    """`count` short generations waiting for a slot, each on a socket the test hangs up on at the end
    (the proxy then takes them out of the queue)."""
    with contextlib.ExitStack() as stack:
        for _ in range(count):
            stack.enter_context(raw_post(url, "/v1/chat/completions", SHORT_CHAT))
        wait_until(lambda: metric(url, "llamabridge_proxy_queue_depth") == count, what=f"{count} requests to queue")
        yield


def refused(url: str) -> requests.Response:
    return requests.post(url + "/v1/messages?beta=true", timeout=10,
                         json={"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "no room"}]})


def wait_idle(url: str) -> None:
    wait_until(lambda: metric(url, "llamabridge_proxy_queue_depth") == 0 and metric(url, "llamabridge_proxy_in_flight") == 0,
               timeout=60, what="the gate to empty")


def test_a_full_queue_leaves_threads_for_what_needs_no_slot(llama, capture_messages):
    with processes.proxy(llama.url, PROXY_THREADS=str(THREADS), QUEUE_MAX=str(QUEUE_MAX)) as proxy:
        with holding_the_slot(proxy.url), queued(proxy.url, QUEUE_MAX):
            assert metric(proxy.url, "llamabridge_proxy_in_flight") == 1
            full = refused(proxy.url)
            assert full.status_code == 529 and "QUEUE_MAX" in full.json()["error"]["message"]
            answer_at_once(proxy.url, capture_messages[0])
            assert metric(proxy.url, "llamabridge_proxy_queue_depth") == QUEUE_MAX  # still full throughout
        wait_idle(proxy.url)


def test_more_slots_than_assumed_never_take_the_reserve(llama_server_bin, tiny_model, capture_messages):
    """Start-up counts one slot (UPSTREAM_SLOTS=0); llama-server has two. The gate stops at
    PROXY_THREADS - THREAD_RESERVE requests in all, below QUEUE_MAX waiting."""
    budget = THREADS - THREAD_RESERVE
    with processes.llama_server(llama_server_bin, tiny_model, parallel=2) as llama, \
            processes.proxy(llama.url, PROXY_THREADS=str(THREADS), QUEUE_MAX=str(QUEUE_MAX)) as proxy:
        with holding_the_slot(proxy.url), holding_the_slot(proxy.url):
            assert metric(proxy.url, "llamabridge_proxy_slots") == 2 and metric(proxy.url, "llamabridge_proxy_in_flight") == 2
            with queued(proxy.url, budget - 2):
                full = refused(proxy.url)
                assert budget - 2 < QUEUE_MAX
                assert full.status_code == 529 and "PROXY_THREADS" in full.json()["error"]["message"], full.text
                answer_at_once(proxy.url, capture_messages[0])
                assert metric(proxy.url, "llamabridge_proxy_queue_depth") == budget - 2
        wait_idle(proxy.url)


# ---------------------------------------------------------------- the rule at start-up


def test_the_defaults_keep_the_reserve():
    settings = from_env({})
    assert settings.threads == Settings.threads >= Settings.queue_max + 1 + THREAD_RESERVE
    assert from_env({"PROXY_THREADS": "24", "QUEUE_MAX": "7"}).threads == 24  # exactly enough
    with pytest.raises(ConfigError, match=r"UPSTREAM_SLOTS=2 .* need PROXY_THREADS>=25"):
        from_env({"PROXY_THREADS": "24", "QUEUE_MAX": "7", "UPSTREAM_SLOTS": "2"})


def test_too_few_threads_for_the_queue_stops_the_proxy_with_one_line(tmp_path):
    base = dict(os.environ, LLAMABRIDGE_ENV_FILE=str(tmp_path / "absent.env"), DB_PATH=str(tmp_path / "store.db"),
                LLAMA_URL="http://127.0.0.1:9", PROXY_PORT="0")
    for name in ("PROXY_THREADS", "QUEUE_MAX", "UPSTREAM_SLOTS"):
        base.pop(name, None)
    result = subprocess.run([sys.executable, "-m", "proxy", "check"], env=base, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr  # the defaults pass
    for command in (["check"], []):  # make up's check, and serving
        result = subprocess.run([sys.executable, "-m", "proxy", *command], env=dict(base, PROXY_THREADS="64"),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.splitlines() == [(
            "llamabridge proxy: PROXY_THREADS=64 is too few: QUEUE_MAX=64 waiting requests, 1 slot (UPSTREAM_SLOTS=0) generating "
            "and 16 threads kept for requests that need no slot (health checks, metrics, the dashboard) need PROXY_THREADS>=81; "
            "raise PROXY_THREADS or lower QUEUE_MAX")]
