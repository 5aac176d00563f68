"""Traffic shaping against the real llama-server (tiny model, one slot): the admission gate
under a burst of Claude Code-shaped requests, priority order, queue bounds, disconnects while
queued, pings while waiting, deduplicated retries, local titles and the background lane."""

from __future__ import annotations

import concurrent.futures
import copy
import itertools
import json
import sqlite3
import threading
import time
import uuid
from typing import Self

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.support import processes
from tests.support.anthropic_sse import check_order, parse
from tests.support.prom import metric, metric_in
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

AGENT_TOOLS = [{"name": "Agent", "description": "Spawn a subagent", "input_schema": {"type": "object", "properties": {"task": {"type": "string"}}}},
               {"name": "Bash", "description": "Run a command", "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}}}]
# Holds the only slot for several seconds (an OpenAI request that ignores end-of-turn).
LONG_HOLD = {"model": "x", "max_tokens": 4000, "ignore_eos": True, "messages": [{"role": "user", "content": "hold the slot"}]}
# Forces ~200 generated tokens (a second or two here): long enough to hold the slot while others queue.
HOLD_SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 200}


def main_body(text: str, max_tokens: int = 16) -> dict:
    return {"model": "claude-sonnet-4-5", "max_tokens": max_tokens, "tools": AGENT_TOOLS,
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "messages": [{"role": "user", "content": text}]}


def subagent_body(text: str) -> dict:
    return dict(main_body(text), tools=AGENT_TOOLS[1:])


def background_body(text: str) -> dict:
    return {"model": "claude-sonnet-4-5", "max_tokens": 256, "thinking": {"type": "disabled"},
            "messages": [{"role": "user", "content": text}]}


def holder_body(session: str, items: int = 200) -> dict:
    schema = dict(HOLD_SCHEMA, minItems=items)
    return {"model": "claude-sonnet-4-5", "max_tokens": 8000, "messages": [{"role": "user", "content": "digits " + session}],
            "output_config": {"format": {"type": "json_schema", "schema": schema}}}


def post(url: str, body: dict, session: str | None = None, path: str = "/v1/messages", timeout: float = 120) -> requests.Response:
    headers = {"X-Claude-Code-Session-Id": session} if session else {}
    return requests.post(url + path + "?beta=true", json=body, headers=headers, timeout=timeout)


def proxy_metric(proxy, name: str, labels: dict | None = None) -> float:
    """The proxy's counter or gauge; 0 for a labelled one that has not counted yet."""
    return metric(proxy.url, name, labels, missing=0.0)


def wait_recorded(proxy, count: int) -> None:
    """Wait until the proxy has logged `count` requests in all. A non-streamed Anthropic answer
    is recorded (metrics, prompt-cache check, request log, then this log line) just after it
    has gone to the client, so a test that reads those right after the answer waits here."""
    wait_until(lambda: proxy.log_text().count("llamabridge.request: ") >= count, what=f"{count} requests to be recorded")


class UpstreamMonitor:
    """Polls llama-server's /metrics while a test runs: most requests processing and deferred."""

    def __init__(self, llama):
        self.llama = llama
        self.max_processing = 0.0
        self.max_deferred = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                text = requests.get(self.llama.url + "/metrics", timeout=30).text
            except requests.RequestException:
                continue  # a busy server answers /metrics late; the next sample counts

            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == "llamacpp:requests_processing":
                        self.max_processing = max(self.max_processing, sample.value)
                    elif sample.name == "llamacpp:requests_deferred":
                        self.max_deferred = max(self.max_deferred, sample.value)
            self.samples += 1
            self._stop.wait(0.01)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture(scope="module")
def background_llama(llama_server_bin, tiny_model):
    """A second, small llama-server for the background lane."""
    with processes.llama_server(llama_server_bin, tiny_model, ctx=8192) as server:
        yield server


@pytest.fixture(scope="module")
def lane_proxy(llama, background_llama):
    with processes.proxy(llama.url, BACKGROUND_URL=background_llama.url) as server:
        yield server


def test_burst_of_mixed_claude_code_requests(lane_proxy, llama, background_llama, capture_messages):
    """30 at once: main loops, titles, token counts, background work. None fails; llama-server
    never runs or queues more than its one slot; titles never reach a model."""
    title = capture_messages[0]
    jobs = []
    for i in range(10):
        jobs.append(("main", main_body(f"task {i}: look at the repository"), f"s-main-{i}", "/v1/messages"))
    for i in range(8):
        jobs.append(("title", dict(copy.deepcopy(title), stream=bool(i % 2)), f"s-title-{i}", "/v1/messages"))
    for i in range(8):
        jobs.append(("count", {"model": "claude-sonnet-4-5", "tools": AGENT_TOOLS, "messages": [{"role": "user", "content": f"count {i}"}]},
                     f"s-main-{i}", "/v1/messages/count_tokens"))
    for i in range(4):
        jobs.append(("background", background_body(f"summarise item {i}"), f"s-bg-{i}", "/v1/messages"))
    predicted_before = requests.get(background_llama.url + "/metrics", timeout=5).text
    recorded_before = lane_proxy.log_text().count("llamabridge.request: ")

    def run(job):
        kind, body, session, path = job
        started = time.monotonic()
        resp = post(lane_proxy.url, body, session, path)
        return kind, resp, time.monotonic() - started

    with UpstreamMonitor(llama) as monitor, concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run, jobs))
    assert monitor.samples > 5
    for kind, resp, _ in results:
        assert resp.status_code == 200, (kind, resp.status_code, resp.text[:300])
        if kind == "count":
            assert resp.json()["input_tokens"] > 0 and resp.headers["X-Llamabridge-Token-Count"] == "exact"
        else:
            message = parse(resp.content) if resp.headers["content-type"].startswith("text/event-stream") else None
            if message is not None:
                check_order(message)
    assert monitor.max_processing <= 1 and monitor.max_deferred == 0, (monitor.max_processing, monitor.max_deferred)
    titles = [(resp, took) for kind, resp, took in results if kind == "title"]
    for resp, _ in titles:
        text = resp.json()["content"][0]["text"] if not resp.headers["content-type"].startswith("text/event-stream") else \
            "".join(d["delta"]["text"] for e, d in parse(resp.content) if e == "content_block_delta")
        assert json.loads(text) == {"title": "List the files here"}
    # Answered here, never queued behind the model: every title is back before a typical main
    # request of the same burst (absolute latency is measured by `make bench`, not asserted).
    title_times = sorted(took for _, took in titles)
    main_times = sorted(took for kind, _, took in results if kind == "main")
    assert title_times[-1] < main_times[len(main_times) // 2], (title_times, main_times)
    wait_recorded(lane_proxy, recorded_before + len(jobs))
    assert proxy_metric(lane_proxy, "llamabridge_proxy_requests_total", {"class": "title", "handled": "local"}) >= 8
    assert proxy_metric(lane_proxy, "llamabridge_proxy_requests_total", {"class": "background", "handled": "background"}) >= 4
    assert requests.get(background_llama.url + "/metrics", timeout=5).text != predicted_before  # the lane did the work
    log = lane_proxy.log_text()
    for klass in ("main", "title", "background"):
        assert f"class={klass} " in log


@pytest.fixture()
def pass_proxy(llama, tmp_path):
    """Background requests queue like the rest (POLICY_BACKGROUND=pass), one slot."""
    with processes.proxy(llama.url, POLICY_BACKGROUND="pass", DB_PATH=str(tmp_path / "store.db")) as server:
        server.db_path = tmp_path / "store.db"
        yield server


def admission_order(proxy, sessions: list[str]) -> list[str]:
    """Sessions in the order the gate admitted them, from the proxy's request log."""
    def rows() -> list[tuple]:
        with sqlite3.connect(proxy.db_path) as db:
            found = db.execute(f"SELECT session, ts + queue_wait FROM requests WHERE session IN ({','.join('?' * len(sessions))})",
                               sessions).fetchall()
        return found if len(found) == len(sessions) else []

    logged = wait_until(rows, timeout=10, what=f"{len(sessions)} sessions in the request log")
    return [session for session, _ in sorted(logged, key=lambda r: r[1])]


def test_queued_requests_are_served_by_priority_then_arrival(pass_proxy, llama):
    def run(name: str, body: dict, session: str) -> None:
        resp = post(pass_proxy.url, body, session)
        assert resp.status_code == 200, resp.text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        holder = pool.submit(requests.post, pass_proxy.url + "/v1/chat/completions", json=LONG_HOLD, timeout=120)
        wait_until(lambda: proxy_metric(pass_proxy, "llamabridge_proxy_in_flight") == 1, what="the holder to run")
        # Each runs long enough (a 40-digit grammar) that admissions are far apart next to the
        # few milliseconds of jitter in how the request log times them.
        slow = {"max_tokens": 256, "output_config": {"format": {"type": "json_schema", "schema": dict(HOLD_SCHEMA, minItems=40)}}}
        order = [("background-1", dict(background_body("b1"), **slow), "s-b1"), ("subagent-1", dict(subagent_body("s1"), **slow), "s-sub"),
                 ("main-1", dict(main_body("m1"), **slow), "s-m1"), ("background-2", dict(background_body("b2"), **slow), "s-b2"),
                 ("main-2", dict(main_body("m2"), **slow), "s-m2"), ("subagent-2", dict(subagent_body("s2"), **slow), "s-sub2")]
        futures = []
        for n, (name, body, session) in enumerate(order, start=1):
            futures.append(pool.submit(run, name, body, session))
            wait_until(lambda n=n: proxy_metric(pass_proxy, "llamabridge_proxy_queue_depth") == n, what=f"{name} to queue")
        assert holder.result(timeout=120).status_code == 200
        for f in futures:
            f.result(timeout=120)
    names = {session: name for name, _, session in order}
    admitted = [names[s] for s in admission_order(pass_proxy, list(names))]
    assert admitted == ["main-1", "main-2", "subagent-1", "subagent-2", "background-1", "background-2"]


def test_every_generation_route_waits_for_the_slot_in_the_proxy(pass_proxy, llama):
    """The Responses API and llama-server's native /completion and /infill queue in the gate
    like chat completions, so llama-server never holds a second request in its own queue."""
    routes = [("/v1/responses", {"input": "hi", "max_output_tokens": 4}),
              ("/v1/completions", {"prompt": "hi", "max_tokens": 4}),
              ("/completion", {"prompt": "hi", "n_predict": 4}),
              ("/infill", {"input_prefix": "def f(", "input_suffix": ")", "n_predict": 4})]
    with UpstreamMonitor(llama) as upstream, concurrent.futures.ThreadPoolExecutor(len(routes) + 1) as pool:
        holder = pool.submit(requests.post, pass_proxy.url + "/v1/chat/completions", json=LONG_HOLD, timeout=120)
        wait_until(lambda: proxy_metric(pass_proxy, "llamabridge_proxy_in_flight") == 1, what="the holder to run")
        waiting = {path: pool.submit(requests.post, pass_proxy.url + path, json=body, timeout=120) for path, body in routes}
        wait_until(lambda: proxy_metric(pass_proxy, "llamabridge_proxy_queue_depth") == len(routes), what="every route to queue")
        assert not any(f.done() for f in waiting.values()) and not holder.done()
        assert holder.result(timeout=120).status_code == 200
        statuses = {path: f.result(timeout=120).status_code for path, f in waiting.items()}
    assert statuses == {"/v1/responses": 200, "/v1/completions": 200, "/completion": 200, "/infill": 501}  # no FIM tokens in the tiny model
    assert upstream.samples > 0 and upstream.max_deferred == 0 and upstream.max_processing <= 1


@pytest.fixture()
def tight_proxy(llama):
    with processes.proxy(llama.url, QUEUE_MAX="1", QUEUE_TIMEOUT="1.5") as server:
        yield server


def test_queue_full_and_queue_timeout_are_overloaded_with_retry_after(tight_proxy, llama):
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        # Holds the only slot for several seconds: far past QUEUE_TIMEOUT.
        holder = pool.submit(requests.post, tight_proxy.url + "/v1/chat/completions", json=LONG_HOLD, timeout=120)
        wait_until(lambda: proxy_metric(tight_proxy, "llamabridge_proxy_in_flight") == 1, what="the holder")
        waiting = pool.submit(post, tight_proxy.url, main_body("waits"), "s-wait")
        wait_until(lambda: proxy_metric(tight_proxy, "llamabridge_proxy_queue_depth") == 1, what="a queued request")
        full = post(tight_proxy.url, main_body("no room"), "s-full")
        assert full.status_code == 529 and full.headers["retry-after"]
        assert full.json()["error"]["type"] == "overloaded_error" and "QUEUE_MAX" in full.json()["error"]["message"]
        openai_full = requests.post(tight_proxy.url + "/v1/chat/completions", timeout=30,
                                    json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 4})
        assert openai_full.status_code == 503 and openai_full.headers["retry-after"]
        timed_out = waiting.result(timeout=60)
        assert timed_out.status_code == 529 and "QUEUE_TIMEOUT" in timed_out.json()["error"]["message"]
        assert holder.result(timeout=120).status_code == 200
    wait_until(lambda: proxy_metric(tight_proxy, "llamabridge_proxy_in_flight") == 0, what="the slot to be released")


def test_disconnect_while_queued_leaves_the_queue(pass_proxy, llama):
    from tests.support.hold import raw_post

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        holder = pool.submit(requests.post, pass_proxy.url + "/v1/chat/completions", json=LONG_HOLD, timeout=120)
        wait_until(lambda: proxy_metric(pass_proxy, "llamabridge_proxy_in_flight") == 1, what="the holder")
        with raw_post(pass_proxy.url, "/v1/messages", main_body("leaves")):
            wait_until(lambda: proxy_metric(pass_proxy, "llamabridge_proxy_queue_depth") == 1, what="the request to queue")
        wait_until(lambda: proxy_metric(pass_proxy, "llamabridge_proxy_queue_depth") == 0, timeout=10, what="the queue to empty")
        assert holder.done() is False  # it left while the slot was still taken
        assert holder.result(timeout=120).status_code == 200
    wait_until(lambda: proxy_metric(pass_proxy, "llamabridge_proxy_in_flight") == 0, what="the slot to be released")
    assert proxy_metric(pass_proxy, "llamabridge_proxy_requests_total", {"status": "499"}) == 1


def test_streamed_request_waiting_for_a_slot_gets_pings(pass_proxy, llama):
    """Queued past a few seconds, a streamed request gets message_start at once, then pings."""
    # The holder streams until the test hangs up on it (after the first ping), so the wait lasts
    # as long as the test needs however fast this machine generates.
    hold = dict(LONG_HOLD, max_tokens=30000, stream=True)
    with requests.post(pass_proxy.url + "/v1/chat/completions", json=hold, stream=True, timeout=120) as holder:
        assert holder.status_code == 200
        wait_until(lambda: proxy_metric(pass_proxy, "llamabridge_proxy_in_flight") == 1, what="the holder")
        events, arrived = [], []
        with requests.post(pass_proxy.url + "/v1/messages", json=dict(main_body("patience"), stream=True), stream=True, timeout=120) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith(b"event: "):
                    events.append(line[7:].decode())
                    arrived.append(time.monotonic())
                    if events[-1] == "ping":
                        holder.close()  # the client leaves; the proxy frees the slot for the waiting request
    assert events[0] == "message_start" and "ping" in events
    first_block = events.index("content_block_start") if "content_block_start" in events else events.index("message_delta")
    assert events.index("ping") < first_block
    gaps = [b - a for a, b in itertools.pairwise(arrived[:first_block + 1])]
    assert max(gaps) < 10, gaps  # never silent for 10 s while waiting
    assert events[-1] == "message_stop"


def test_identical_retry_from_the_same_session_runs_once(pass_proxy, llama):
    session = str(uuid.uuid4())
    body = holder_body("dedup", items=800)
    before = requests.get(llama.url + "/metrics", timeout=5).text
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, pass_proxy.url, body, session)
        wait_until(lambda: proxy_metric(pass_proxy, "llamabridge_proxy_in_flight") == 1, what="the first copy")
        second = pool.submit(post, pass_proxy.url, body, session)
        a, b = first.result(timeout=120), second.result(timeout=120)
    assert a.status_code == b.status_code == 200
    assert a.json()["content"] == b.json()["content"]
    wait_until(lambda: proxy_metric(pass_proxy, "llamabridge_proxy_requests_total", {"handled": "deduplicated"}) == 1,
               what="the follower to be recorded")

    generated = metric(llama.url, "llamacpp:tokens_predicted_total") - metric_in(before, "llamacpp:tokens_predicted_total")
    assert generated == a.json()["usage"]["output_tokens"]  # one generation, not two


def test_background_is_shed_while_the_slot_holds_a_conversation(llama):
    with processes.proxy(llama.url) as proxy:
        first = post(proxy.url, main_body("warm the slot"), "s-warm")
        assert first.status_code == 200
        shed = post(proxy.url, background_body("a summary nobody waits for"), "s-warm")
        assert shed.status_code == 529 and shed.json()["error"]["type"] == "overloaded_error"
        assert "POLICY_BACKGROUND=shed" in shed.json()["error"]["message"]
