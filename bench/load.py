"""The load benchmark: many Claude Code-shaped sessions on one llama-server slot through the proxy.

Failures, how many requests llama-server ran and queued at once (its own /metrics, polled), the
queue wait per request class and how fast the proxy answers background requests (from the
proxy's request log), and the services' resident memory idle and at the load's peak.
"""

from __future__ import annotations

import copy
import sqlite3
import threading
import time
from concurrent import futures
from typing import Any

import requests

from bench.readings import llama_metrics, rss_parts
from bench.stats import percentile as pct

# The load's sessions all start at one instant; background requests answered after this many
# seconds are also reported on their own (the steady state, without that start burst).
START_BURST_SECONDS = 2.0


def idle_memory(proxy_url: str, pids: dict[str, int]) -> dict:
    """Each service's memory (MB) before any load: right after one 1-token request through each
    of the proxy's two fast paths, so what the first request loads and builds is counted.
    `<name>_parts` lists the process, then its children (the proxy's arbiter, then worker)."""
    session = requests.Session()
    warm: dict[str, dict[str, Any]] = {"/v1/chat/completions": {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]},
            "/v1/messages": {"model": "claude-sonnet-4-5", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}}
    for path, body in warm.items():
        resp = session.post(proxy_url + path, json=body, timeout=30)
        assert resp.status_code == 200, (path, resp.status_code, resp.text[:300])
    session.close()
    out: dict = {}
    for name, pid in pids.items():
        out[f"{name}_parts"] = rss_parts(pid)
        out[name] = sum(out[f"{name}_parts"])
    return out


class Sampler(threading.Thread):
    """Polls llama-server's /metrics (requests processing and deferred) and the services' memory."""

    def __init__(self, llama_url: str, pids: dict[str, int]):
        super().__init__(daemon=True)
        self.llama_url, self.pids = llama_url, pids
        self.stop = threading.Event()
        self.max_processing = self.max_deferred = 0.0
        self.peak_rss = {name: 0.0 for name in pids}
        self.peak_parts: dict[str, list[float]] = {name: [] for name in pids}  # each process at that peak

    def run(self) -> None:
        session = requests.Session()
        while not self.stop.is_set():
            try:
                _, gauges = llama_metrics(self.llama_url, session, timeout=5)
                self.max_processing = max(self.max_processing, gauges.get("requests_processing", 0.0))
                self.max_deferred = max(self.max_deferred, gauges.get("requests_deferred", 0.0))
            except requests.RequestException:
                pass
            for name, pid in self.pids.items():
                parts = rss_parts(pid)
                if sum(parts) > self.peak_rss[name]:
                    self.peak_rss[name], self.peak_parts[name] = sum(parts), parts
            self.stop.wait(0.02)


def run(llama_url: str, proxy_url: str, db_path: str, clients: int, seconds: float, title: dict, turn: dict,
        sampler: Sampler) -> dict:
    """Each client is one Claude Code session from the recorded one: a streamed main turn with its
    long system prompt and all its tools (its own last message), and around every third turn a
    session title and a burst of count_tokens requests (one per tool, as /context sends them).
    `sampler` is already running; `db_path` is the proxy's request log."""
    deadline = time.monotonic() + seconds
    outcomes: list[tuple[str, int, float]] = []  # (kind, status, client-side ms)
    lock = threading.Lock()
    pool = futures.ThreadPoolExecutor(max_workers=clients * (len(turn["tools"]) + 3))
    headers = {"User-Agent": "claude-cli/2.1.328 (external, cli)", "anthropic-version": "2023-06-01"}

    def call(kind: str, path: str, body: dict, session_id: str) -> None:
        start = time.perf_counter()
        try:
            with requests.post(proxy_url + path, json=body, timeout=900, stream=bool(body.get("stream")),
                               headers=dict(headers, **{"X-Claude-Code-Session-Id": session_id})) as resp:
                data = resp.content  # the whole answer, streamed or not
                status = resp.status_code
                if status == 200 and body.get("stream") and b"event: message_stop" not in data:
                    status = -2  # a stream that did not finish
        except requests.RequestException:
            status = -1
        with lock:
            outcomes.append((kind, status, (time.perf_counter() - start) * 1000))

    def client(i: int) -> None:
        session_id = f"bench-{i}"
        n = 0
        while time.monotonic() < deadline:
            if n % 3 == 0:
                call("title", "/v1/messages?beta=true", title, session_id)
                burst = [pool.submit(call, "count_tokens", "/v1/messages/count_tokens?beta=true",
                                     {"model": turn["model"], "messages": [{"role": "user", "content": "foo"}], "tools": [tool]},
                                     session_id) for tool in turn["tools"]]
                futures.wait(burst)
            body = copy.deepcopy(turn)
            body["messages"][-1]["content"][-1]["text"] = f"client {i}, turn {n}: list the files here"
            call("main", "/v1/messages?beta=true", body, session_id)
            n += 1

    started, started_at = time.monotonic(), time.time()
    workers = [pool.submit(client, i) for i in range(clients)]
    futures.wait(workers)
    for worker in workers:
        worker.result()  # a bug in the client loop must not pass for a quiet run
    elapsed = time.monotonic() - started
    pool.shutdown()
    failed = [o for o in outcomes if o[1] != 200]
    rows = _logged(db_path, len(outcomes))

    by_class: dict[str, list[float]] = {}
    for klass, handled, wait, _, _ in rows:
        by_class.setdefault(klass, []).append((wait or 0) * 1000)
    # Claude Code's background requests the proxy answers itself: session titles and token-count probes.
    local_at = [(total * 1000, ts) for klass, handled, _, total, ts in rows if handled == "local" and klass in ("title", "probe")]
    # All sessions start at one instant, so their titles, token counts and first main turns reach
    # the proxy together. No target of its own, but it tells that burst apart from the steady
    # state that follows.
    settled = [ms for ms, ts in local_at if ts >= started_at + START_BURST_SECONDS]
    local = [ms for ms, _ in local_at]
    titles_client = [ms for kind, status, ms in outcomes if kind == "title"]
    # Token counts are exact (llama-server's template and tokenizer, two calls each), then cached:
    # the slowest are the first of each in the start burst.
    counts = [total * 1000 for klass, _, _, total, _ in rows if klass == "count_tokens"]
    return {
        "clients": clients, "seconds": round(elapsed, 1), "requests": len(outcomes),
        "by_kind": {kind: sum(1 for o in outcomes if o[0] == kind) for kind in ("main", "title", "count_tokens")},
        "failed": len(failed), "failures": [f"{k} {s}" for k, s, _ in failed[:10]],
        "max_upstream_processing": sampler.max_processing, "max_upstream_deferred": sampler.max_deferred,
        "queue_wait_ms": {k: {"p50": pct(v, 50), "p90": pct(v, 90), "p99": pct(v, 99), "n": len(v)} for k, v in sorted(by_class.items())},
        "background_local_ms": {"p50": pct(local, 50), "p99": pct(local, 99), "n": len(local)},
        "background_after_start_ms": {"p50": pct(settled, 50), "p99": pct(settled, 99), "n": len(settled)},
        "title_client_ms": {"p50": pct(titles_client, 50), "p99": pct(titles_client, 99)},
        "count_tokens_ms": {"p50": pct(counts, 50), "p99": pct(counts, 99), "max": max(counts, default=float("nan")), "n": len(counts)},
    }


def _logged(db_path: str, expected: int) -> list[tuple]:
    """The bench sessions' rows of the proxy's request log: (class, handled, queue wait s, total
    s, timestamp). A background thread writes the log, so this waits (up to a minute) until it
    holds as many rows as the clients saw answers."""
    rows: list[tuple] = []
    end = time.monotonic() + 60
    while time.monotonic() < end:
        with sqlite3.connect(db_path) as db:
            rows = db.execute("SELECT class, handled, queue_wait, total_time, ts FROM requests WHERE session LIKE 'bench-%'").fetchall()
        if len(rows) >= expected:
            break
        time.sleep(0.2)
    return rows
