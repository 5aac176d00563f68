"""Lifetime totals end to end: the real collector scraping the real llama-server while it is
restarted, while the collector itself is restarted or killed with SIGKILL mid-loop. The totals
must equal the sums of the `timings` llama-server returned, exactly. And the proxy's request
log in the same store, up to the last request before a Ctrl-C."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.support import processes
from tests.support.prom import metric
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


class Traffic:
    """Known requests straight to llama-server, with the sums of what their timings report."""

    def __init__(self, url: str):
        self.url = url
        self.prompt = self.cached = self.generated = 0
        self.sent = 0
        self.lock = threading.Lock()

    def send(self, n: int) -> None:
        for _ in range(n):
            with self.lock:
                self.sent += 1
                i = self.sent
            body: dict[str, Any] = {"messages": [{"role": "user", "content": f"request {i}: " + "tell me something " * (i % 5)}],
                                    "max_tokens": 24, "temperature": 0.8}
            t = requests.post(self.url + "/v1/chat/completions", json=body, timeout=60).json()["timings"]
            with self.lock:
                self.prompt += t["prompt_n"]
                self.cached += t["cache_n"]
                self.generated += t["predicted_n"]


def wait_for_scrape(collector, after: float, timeout: float = 30) -> dict:
    """Totals once the collector has read llama-server after time `after`."""
    def scraped() -> dict | None:
        totals = requests.get(collector.url + "/api/totals", timeout=5).json()
        return totals if totals["last_scrape"] and totals["last_scrape"] > after and totals["upstream"]["up"] else None

    return wait_until(scraped, timeout, what=lambda: f"a scrape after {after}: {collector.log_text()[-2000:]}")


def assert_totals_match(totals: dict, traffic: Traffic) -> None:
    lifetime = totals["lifetime"]
    assert (lifetime["prompt_tokens"], lifetime["cached_prompt_tokens"], lifetime["generated_tokens"]) == \
        (traffic.prompt, traffic.cached, traffic.generated)


def test_lifetime_totals_survive_upstream_and_collector_restarts(llama_server_bin, tiny_model, tmp_path):
    port = processes.free_port()
    db = str(tmp_path / "store.db")
    llama = processes.llama_server(llama_server_bin, tiny_model, ctx=4096, port=port).start()
    collector = processes.collector(llama.url, db).start()
    try:
        traffic = Traffic(llama.url)
        wait_for_scrape(collector, time.time())  # the baseline
        for restart in range(2):
            traffic.send(5)
            wait_for_scrape(collector, time.time())  # a scrape has seen this process's traffic
            llama.stop()
            if restart == 0:  # the first time, two scrapes find it down; the second may fall between scrapes
                wait_until(lambda: metric(collector.url, "llamabridge_scrape_errors_total") >= 2, 10, what="two scrapes to find llama-server down")
            llama = processes.llama_server(llama_server_bin, tiny_model, ctx=4096, port=port).start()
        traffic.send(4)
        wait_for_scrape(collector, time.time())
        first_log = collector.log_text()
        collector.stop()
        traffic.send(3)  # served while the collector is down: still counted, from the stored baseline
        collector = processes.collector(llama.url, db).start()
        traffic.send(2)
        totals = wait_for_scrape(collector, time.time())
        assert_totals_match(totals, traffic)
        assert totals["lifetime"]["upstream_restarts"] == 2
        events = [e["kind"] for e in requests.get(collector.url + "/api/events", timeout=5).json()["events"]]
        assert events.count("restart") == 2 and "outage" in events and "recovered" in events
        # One log line per outage, not one per failed scrape.
        assert first_log.count("cannot be read") == events.count("outage")
    finally:
        collector.stop()
        llama.stop()


def test_sigkill_during_the_scrape_loop_loses_and_doubles_nothing(llama_server_bin, tiny_model, tmp_path):
    db = str(tmp_path / "store.db")
    with processes.llama_server(llama_server_bin, tiny_model, ctx=4096) as llama:
        collector = processes.collector(llama.url, db, interval=0.05).start()
        try:
            traffic = Traffic(llama.url)
            wait_for_scrape(collector, time.time())
            stop = threading.Event()

            def load() -> None:
                while not stop.is_set():
                    traffic.send(1)

            worker = threading.Thread(target=load)
            worker.start()
            for _ in range(3):
                last = time.time()
                for _ in range(3):  # let it scrape a few times under traffic
                    last = wait_for_scrape(collector, last)["last_scrape"]
                # The whole group: gunicorn's master and the worker whose scheduler scrapes.
                os.killpg(collector.proc.pid, signal.SIGKILL)
                collector.proc.wait(10)
                collector = processes.collector(llama.url, db, interval=0.05).start()
            stop.set()
            worker.join(60)
            assert traffic.sent > 5
            assert_totals_match(wait_for_scrape(collector, time.time()), traffic)
        finally:
            collector.stop()


def test_the_collector_leaves_no_connection_to_llama_server_open_between_scrapes(llama_server_bin, tiny_model, tmp_path):
    """llama-server gives each open connection a thread until it closes or sits idle for 5 s: a
    connection kept between scrapes would hold one for nothing."""
    with processes.llama_server(llama_server_bin, tiny_model, ctx=4096) as llama, \
            processes.collector(llama.url, str(tmp_path / "store.db"), interval=30) as collector:
        wait_for_scrape(collector, time.time() - 60)  # the first scrape, at start; the next is 30 s away
        assert collector.connections_to(llama.url) == []


def test_every_exported_metric_has_its_type(llama_server_bin, tiny_model, tmp_path):
    with processes.llama_server(llama_server_bin, tiny_model, ctx=4096) as llama, \
            processes.collector(llama.url, str(tmp_path / "store.db")) as collector:
        wait_for_scrape(collector, time.time())
        text = requests.get(collector.url + "/metrics", timeout=5).text
        types = {f.name: f.type for f in text_string_to_metric_families(text)}
    expected = {
        "llamabridge_lifetime_prompt_tokens": "counter", "llamabridge_lifetime_cached_prompt_tokens": "counter",
        "llamabridge_lifetime_generated_tokens": "counter", "llamabridge_lifetime_prompt_seconds": "counter",
        "llamabridge_lifetime_generation_seconds": "counter", "llamabridge_lifetime_requests": "counter",
        "llamabridge_lifetime_upstream_restarts": "counter", "llamabridge_scrape_errors": "counter",
        "llamabridge_generation_tokens_per_second": "gauge", "llamabridge_prompt_tokens_per_second": "gauge",
        "llamabridge_context_used_tokens": "gauge", "llamabridge_busy_slots": "gauge", "llamabridge_requests_deferred": "gauge",
        "llamabridge_prompt_cache_hit_ratio": "gauge", "llamabridge_last_scrape_success_timestamp_seconds": "gauge",
    }
    for name, kind in expected.items():
        assert types.get(name) == kind, (name, types.get(name))


def test_the_proxy_logs_every_request_to_the_shared_store(llama_server_bin, tiny_model, tmp_path):
    db = str(tmp_path / "store.db")
    with processes.llama_server(llama_server_bin, tiny_model, ctx=4096) as llama, \
            processes.proxy(llama.url, DB_PATH=db) as proxy, processes.collector(llama.url, db) as collector:
        session = "s-log-1"
        hostile = "<script>alert(1)</script> agent/1.0"
        body = {"model": "claude-sonnet-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "log me"}],
                "tools": [{"name": "Agent", "input_schema": {"type": "object"}}]}  # a main-loop turn
        r1 = requests.post(proxy.url + "/v1/messages", json=body, headers={"X-Claude-Code-Session-Id": session,
                                                                          "User-Agent": hostile}, timeout=60)
        r2 = requests.post(proxy.url + "/v1/chat/completions", timeout=60,
                           json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
        r3 = requests.post(proxy.url + "/v1/messages", data=b"{broken", headers={"Content-Type": "application/json"}, timeout=60)
        assert (r1.status_code, r2.status_code, r3.status_code) == (200, 200, 400)
        def logged() -> list[dict]:
            rows = requests.get(collector.url + "/api/requests", timeout=5).json()["requests"]
            return rows if len(rows) >= 3 else []

        rows = wait_until(logged, 10, what="the three requests in the collector's API")
        by_route = {r["route"]: r for r in rows}
        anthropic_row = next(r for r in rows if r["session"] == session)
        usage = r1.json()["usage"]
        assert anthropic_row["class"] == "main" and anthropic_row["status"] == 200 and anthropic_row["client"] == hostile
        assert (anthropic_row["prompt_tokens"], anthropic_row["cached_tokens"], anthropic_row["generated_tokens"]) == \
            (usage["input_tokens"], usage["cache_read_input_tokens"], usage["output_tokens"])
        assert anthropic_row["ttft"] is not None and anthropic_row["total_time"] >= anthropic_row["ttft"]
        assert by_route["/v1/chat/completions"]["class"] == "openai"
        assert any(r["status"] == 400 and r["error"] for r in rows)
        filtered = requests.get(collector.url + "/api/requests", params={"session": session}, timeout=5).json()["requests"]
        assert [r["session"] for r in filtered] == [session]
        wait_for_scrape(collector, time.time())
        assert metric(collector.url, "llamabridge_lifetime_requests_total") >= 3


def test_requests_answered_just_before_ctrl_c_are_in_the_log(llama_server_bin, tiny_model, tmp_path):
    """The log is written every half second off the request thread; Ctrl-C (SIGINT) ends the
    worker at once, and the rows still waiting went with it (six stops in eight, before)."""
    body = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    with processes.llama_server(llama_server_bin, tiny_model, ctx=4096) as llama:
        for stop in range(3):
            db = str(tmp_path / f"store-{stop}.db")
            with processes.proxy(llama.url, DB_PATH=db) as proxy:
                for _ in range(3):
                    assert requests.post(proxy.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
                os.killpg(proxy.proc.pid, signal.SIGINT)
                assert proxy.proc.wait(timeout=30) == 0, proxy.log_text()[-2000:]
            with sqlite3.connect(db) as store:
                assert store.execute("SELECT count(*) FROM requests WHERE route = '/v1/chat/completions'").fetchone()[0] == 3, stop
