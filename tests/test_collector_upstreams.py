"""The collector with several llama-servers in LLAMA_URL, against two real llama-servers: lifetime
totals per upstream and in sum, each equal to what its llama-server's timings reported; one
stopped (the other goes on being counted, and the stopped one is reported down by name) and
restarted (its restart is counted and its totals go on from where they were)."""

from __future__ import annotations

import time

import pytest
import requests

from tests.support import processes
from tests.support.prom import metric
from tests.support.waiting import wait_until
from tests.test_collector_lifetime import Traffic

pytestmark = pytest.mark.integration


def totals(collector) -> dict:
    return requests.get(collector.url + "/api/totals", timeout=5).json()


def scraped_after(collector, after: float, *urls: str) -> dict:
    """/api/totals once the collector has read each of `urls` after time `after`."""
    def done() -> dict | None:
        t = totals(collector)
        seen = {u["url"]: u for u in t["upstreams"]}
        return t if all(url in seen and seen[url]["up"] and seen[url]["last_scrape"] > after for url in urls) else None

    return wait_until(done, 30, what=lambda: f"a scrape of {urls} after {after}: {collector.log_text()[-2000:]}")


def lifetime_of(t: dict, url: str) -> tuple[int, int, int]:
    lifetime = next(u for u in t["upstreams"] if u["url"] == url)["lifetime"]
    return lifetime["prompt_tokens"], lifetime["cached_prompt_tokens"], lifetime["generated_tokens"]


def sent(traffic: Traffic) -> tuple[int, int, int]:
    return traffic.prompt, traffic.cached, traffic.generated


def test_lifetime_totals_per_upstream_add_up_through_a_stop_and_a_restart(llama_server_bin, tiny_model, tmp_path):
    ports = [processes.free_port(), processes.free_port()]
    servers = [processes.llama_server(llama_server_bin, tiny_model, ctx=4096, port=port).start() for port in ports]
    a, b = (s.url for s in servers)
    try:
        with processes.collector(f"{a},{b}", str(tmp_path / "store.db")) as collector:
            scraped_after(collector, 0, a, b)  # each first scrape only sets its baseline
            traffic = {a: Traffic(a), b: Traffic(b)}
            traffic[a].send(3)
            traffic[b].send(5)
            t = scraped_after(collector, time.time(), a, b)
            for url in (a, b):
                assert lifetime_of(t, url) == sent(traffic[url]), url
            lifetime = t["lifetime"]
            assert (lifetime["prompt_tokens"], lifetime["cached_prompt_tokens"], lifetime["generated_tokens"]) == \
                tuple(x + y for x, y in zip(sent(traffic[a]), sent(traffic[b])))
            for url in (a, b):
                assert metric(collector.url, "llamabridge_upstream_lifetime_generated_tokens_total", {"upstream": url}) == \
                    traffic[url].generated
            assert metric(collector.url, "llamabridge_lifetime_generated_tokens_total") == \
                traffic[a].generated + traffic[b].generated

            # b stops: reported down by name; a goes on being counted meanwhile.
            servers[1].stop()
            wait_until(lambda: metric(collector.url, "llamabridge_upstream_up", {"upstream": b}) == 0, 30, what="b seen down")
            assert metric(collector.url, "llamabridge_upstream_up", {"upstream": a}) == 1
            assert metric(collector.url, "llamabridge_upstream_error", {"upstream": b, "reason": "unreachable"}) == 1
            health = requests.get(collector.url + "/healthz", timeout=5).json()
            assert [(u["url"], u["up"]) for u in health["upstreams"]] == [(a, True), (b, False)]
            assert b in health["upstreams"][1]["error"]
            traffic[a].send(2)
            t = scraped_after(collector, time.time(), a)
            assert lifetime_of(t, a) == sent(traffic[a])
            down = next(u for u in t["upstreams"] if u["url"] == b)
            assert not down["up"] and b in down["error"] and not t["upstream"]["up"] and b in t["upstream"]["error"]

            # b comes back as a new process on its port: its restart is counted, its totals go on.
            servers[1] = processes.llama_server(llama_server_bin, tiny_model, ctx=4096, port=ports[1]).start()
            traffic[b].send(2)
            t = scraped_after(collector, time.time(), a, b)
            assert lifetime_of(t, b) == sent(traffic[b])
            assert next(u for u in t["upstreams"] if u["url"] == b)["lifetime"]["upstream_restarts"] == 1
            assert t["lifetime"]["generated_tokens"] == traffic[a].generated + traffic[b].generated
            assert metric(collector.url, "llamabridge_upstream_lifetime_restarts_total", {"upstream": b}) == 1
            assert metric(collector.url, "llamabridge_upstream_lifetime_restarts_total", {"upstream": a}) == 0

            # The charts: all of them together, and each one's own series.
            history = requests.get(collector.url + "/api/samples?range=1h", timeout=5).json()
            assert history["upstreams"] == sorted([a, b])
            mine = requests.get(collector.url + "/api/samples", params={"range": "1h", "upstream": b}, timeout=5).json()
            assert sum(s["generated_tokens"] for s in mine["samples"]) == traffic[b].generated
            assert sum(s["generated_tokens"] for s in history["samples"]) == traffic[a].generated + traffic[b].generated
            assert any(s["up"] == 0 for s in mine["samples"]) and any(s["up"] == 1 for s in mine["samples"])
    finally:
        for server in servers:
            server.stop()
