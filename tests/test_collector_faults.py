"""The collector against what goes wrong in a long-lived stack, with the real llama-server: a
second collector started on the same store, a llama-server that asks for an API key, another
llama-server answering at the same address. The totals must stay exactly what llama-server
served, and a collector that cannot count must say why."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import requests

from tests.support import processes
from tests.support.prom import metric, metric_in
from tests.support.waiting import wait_until
from tests.test_collector_lifetime import Traffic, assert_totals_match, wait_for_scrape

pytestmark = pytest.mark.integration


def llama_counters(llama, headers: dict | None = None) -> tuple[float, float, float]:
    """llama-server's own counters: uncached prompt, cached prompt and generated tokens."""
    page = requests.get(llama.url + "/metrics", headers=headers, timeout=10).text
    prompt, cached, generated = (metric_in(page, f"llamacpp:{name}") for name in ("prompt_tokens_total", "prompt_tokens_cached_total",
                                                                                  "tokens_predicted_total"))
    assert prompt is not None and cached is not None and generated is not None, page
    return prompt, cached, generated


def lifetime(collector) -> tuple[float, float, float]:
    totals = requests.get(collector.url + "/api/totals", timeout=5).json()["lifetime"]
    return totals["prompt_tokens"], totals["cached_prompt_tokens"], totals["generated_tokens"]


def test_two_collectors_on_one_store_count_once_and_the_second_takes_over(llama_server_bin, tiny_model, tmp_path):
    db = str(tmp_path / "store.db")
    with processes.llama_server(llama_server_bin, tiny_model, ctx=4096) as llama:
        first = processes.collector(llama.url, db, interval=0.2).start()
        second = None
        try:
            wait_for_scrape(first, time.time())  # the first holds the lease and has set the baseline
            second = processes.collector(llama.url, db, interval=0.2).start()
            wait_until(lambda: "standing by" in second.log_text(), 20, what=second.log_text)
            assert requests.get(second.url + "/healthz", timeout=5).json()["standby"] is True
            assert metric(second.url, "llamabridge_collector_standby") == 1
            assert metric(first.url, "llamabridge_collector_standby") == 0
            traffic = Traffic(llama.url)
            traffic.send(6)
            wait_for_scrape(first, time.time())
            # Both running, the totals are llama-server's own counters once (it started at 0 with
            # the first collector's baseline), not twice.
            assert lifetime(first) == llama_counters(llama)
            assert_totals_match(requests.get(first.url + "/api/totals", timeout=5).json(), traffic)
            # The first stops (SIGTERM: it gives the lease up); the second takes over and goes on
            # from the stored baseline.
            first.stop()
            wait_until(lambda: "taking over" in second.log_text(), 20, what=second.log_text)
            traffic.send(4)
            totals = wait_for_scrape(second, time.time())
            assert totals["upstream"]["standby"] is False
            assert lifetime(second) == llama_counters(llama)
            assert_totals_match(totals, traffic)
        finally:
            first.stop()
            if second is not None:
                second.stop()


def test_a_llama_server_with_an_api_key(llama_server_bin, tiny_model, tmp_path):
    """With LLAMA_API_KEY the collector counts; without it, /metrics, /api/totals and the log say
    why nothing is counted."""
    key = "llama-secret-key"
    auth = {"Authorization": f"Bearer {key}"}
    with (processes.llama_server(llama_server_bin, tiny_model, ctx=4096, extra=["--api-key", key]) as llama,
          processes.collector(llama.url, str(tmp_path / "keyed.db"), interval=0.2, LLAMA_API_KEY=key) as keyed,
          processes.collector(llama.url, str(tmp_path / "keyless.db"), interval=0.2) as keyless):
            wait_for_scrape(keyed, time.time())
            body = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 12}
            answer = requests.post(llama.url + "/v1/chat/completions", json=body, headers=auth, timeout=60)
            assert answer.status_code == 200
            wait_for_scrape(keyed, time.time())
            assert lifetime(keyed) == llama_counters(llama, auth) and lifetime(keyed)[2] > 0

            wait_until(lambda: requests.get(keyless.url + "/api/totals", timeout=5).json()["upstream"]["error"], 20,
                       what=keyless.log_text)
            upstream = requests.get(keyless.url + "/api/totals", timeout=5).json()["upstream"]
            assert upstream["up"] is False and upstream["error_kind"] == "unauthorized"
            assert "LLAMA_API_KEY" in upstream["error"] and "401" in upstream["error"]
            assert metric(keyless.url, "llamabridge_upstream_up") == 0
            assert metric(keyless.url, "llamabridge_upstream_error", {"reason": "unauthorized"}) == 1
            assert metric(keyed.url, "llamabridge_upstream_error", missing=0) == 0
            assert " ERROR llamabridge.collector: llama-server cannot be read" in keyless.log_text()
            assert lifetime(keyless) == (0, 0, 0)


def test_another_llama_server_at_the_same_address_starts_a_new_baseline(llama_server_bin, tiny_model, tmp_path):
    """A restart of the same server counts all it reports; another server (another model file)
    answering at LLAMA_URL is counted from when it is first seen, not from its own start."""
    port = processes.free_port()
    db = str(tmp_path / "store.db")
    other_model = tmp_path / "another-model.gguf"
    shutil.copyfile(tiny_model, other_model)
    llama = processes.llama_server(llama_server_bin, tiny_model, ctx=4096, port=port).start()
    collector = processes.collector(llama.url, db, interval=0.2).start()
    try:
        traffic = Traffic(llama.url)
        wait_for_scrape(collector, time.time())
        traffic.send(3)
        wait_for_scrape(collector, time.time())
        before = lifetime(collector)
        assert before == llama_counters(llama)
        # While the collector is stopped, llama-server is replaced by one with another model
        # that serves traffic the collector never sees it serve.
        collector.stop()
        llama.stop()
        llama = processes.llama_server(llama_server_bin, str(other_model), ctx=4096, port=port).start()
        elsewhere = Traffic(llama.url)
        elsewhere.send(3)
        collector = processes.collector(llama.url, db, interval=0.2).start()
        wait_for_scrape(collector, time.time())
        assert lifetime(collector) == before  # its history is not added
        events = requests.get(collector.url + "/api/events", timeout=5).json()["events"]
        assert [e["kind"] for e in events].count("upstream_changed") == 1
        assert "another-model.gguf" in events[0]["detail"]
        assert metric(collector.url, "llamabridge_lifetime_upstream_changes_total") == 1
        # From then on, what it serves is counted.
        mark = llama_counters(llama)
        traffic.send(2)
        wait_for_scrape(collector, time.time())
        now = llama_counters(llama)
        assert lifetime(collector) == tuple(b + n - m for b, n, m in zip(before, now, mark))
    finally:
        collector.stop()
        llama.stop()


def test_an_idle_slot_shows_the_conversation_it_holds(llama_server_bin, tiny_model, tmp_path):
    """A slot that finished its request keeps the prompt in its cache (the next turn of that
    conversation reuses it): the context it shows is that prompt's size, not 0, while no slot
    counts as busy."""
    with processes.llama_server(llama_server_bin, tiny_model, ctx=4096) as llama, \
            processes.collector(llama.url, str(tmp_path / "store.db"), interval=0.2) as collector:
        body = {"messages": [{"role": "user", "content": "a conversation that stays in the slot " * 20}], "max_tokens": 8}
        timings = requests.post(llama.url + "/v1/chat/completions", json=body, timeout=60).json()["timings"]
        now = wait_for_scrape(collector, time.time())["now"]
        held = [slot["used"] for slot in json.loads(now["context_used"])]
        # llama-server's slot counts its prompt as it was cached, a few tokens more than the
        # request's timings report, and never more than the prompt and the 8-token answer.
        prompt = timings["prompt_n"] + timings["cache_n"]
        assert len(held) == 1 and prompt <= held[0] <= prompt + 8 and held[0] > 100, (held, timings)
        assert now["busy_slots"] == 0
        assert metric(collector.url, "llamabridge_context_used_tokens", {"slot": "0"}) == held[0]
