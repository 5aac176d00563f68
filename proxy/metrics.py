"""What happened to each request: one log line, and the proxy's Prometheus metrics (`/metrics`).

The proxy is one process with threads, so prometheus-client's ordinary registry works; queue
depth and in-flight requests are read from the gate at scrape time by a custom collector.
Tests build their own `CollectorRegistry`.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from llamabridge.edge import LIMITS, USER
from llamabridge.keys import Limits

from .classify import CLASSES
from .translate import token_count

if TYPE_CHECKING:
    from .gate import Gate

log = logging.getLogger("llamabridge.request")

# Claude Code names its session in every request: the request log and the prompt-cache check
# key on it.
SESSION_HEADER = "X-Claude-Code-Session-Id"
_SESSION_KEY = "HTTP_" + SESSION_HEADER.upper().replace("-", "_")
# Codex CLI names its session in `session-id`, OpenCode in `X-Session-Id`. Read on the OpenAI
# routes only: on /v1/messages a named session is what tells the classifier a request is Claude
# Code's.
_OPENAI_SESSION_KEYS = ("HTTP_SESSION_ID", "HTTP_X_SESSION_ID")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

# Distinct `client` label values kept before the rest are counted as "other": a label value is a
# time series in Prometheus, and User-Agent is whatever a client chooses to send.
MAX_CLIENT_FAMILIES = 32
_VERSION = re.compile(r"^v?\d")


def client_family(user_agent: str) -> str:
    """The agent behind a User-Agent, without versions: "claude-cli/2.1.328 (external, cli)" is
    "claude-cli", "Anthropic/Python 0.49.0" is "anthropic/python", "OpenAI/JS 4.1" is "openai/js"."""
    first = (user_agent or "").strip().split(" ", 1)[0]
    parts = [part for part in first.lower().split("/") if part and not _VERSION.match(part)]
    family = re.sub(r"[^a-z0-9._/-]", "", "/".join(parts))[:40].strip("-./_")
    return family or "unknown"


# The `user` label: a key's name (bounded by the keys file, and capped here all the same), "-"
# for requests without one.
MAX_USERS = 64
NO_USER = "-"
NO_UPSTREAM = "-"  # answered without llama-server (locally, refused)


class BoundedLabel:
    """A label's values, bounded: the first `limit` distinct values seen, then "other"."""

    def __init__(self, limit: int):
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        with self._lock:
            if value in self._seen or len(self._seen) < self.limit:
                self._seen.add(value)
                return value
        return "other"


class ClientLabels(BoundedLabel):
    """Bounded `client` label values: the first MAX_CLIENT_FAMILIES families seen, then "other"."""

    def __init__(self, limit: int = MAX_CLIENT_FAMILIES):
        super().__init__(limit)
        # Each request's User-Agent, mapped once: an agent sends the same string every time.
        self._families: dict[str, str] = {}

    def __call__(self, user_agent: str) -> str:
        family = self._families.get(user_agent)
        if family is None:
            family = client_family(user_agent)
            if len(self._families) < 4 * self.limit:
                self._families[user_agent] = family
        return super().__call__(family)


@dataclass
class Call:
    """One client request, filled in as it goes."""

    route: str
    client: str
    session: str | None
    user: str | None = None  # the name of the request's API key
    limits: Limits = field(default_factory=Limits)  # that key's limits
    klass: str = "-"
    started: float = field(default_factory=time.monotonic)
    status: int = 200
    queue_wait: float = 0.0
    ttft: float | None = None
    prompt_tokens: int = 0  # prefilled (not from cache)
    cached_tokens: int = 0
    generated_tokens: int = 0
    slot: int | None = None
    upstream: str | None = None  # the llama-server that ran it (LLAMA_URL may list several)
    kv_restored: int | None = None  # tokens put back into the slot from a saved file before this turn
    model: str | None = None
    handled: str = "upstream"  # upstream | local | background | shed | deduplicated | rejected
    error: str | None = None
    recorded: bool = False

    def first_token(self) -> None:
        if self.ttft is None:
            self.ttft = time.monotonic() - self.started

    def usage(self, usage: Any) -> None:
        """Anthropic-style usage, as llama-server reported it (anything not a count is none)."""
        if isinstance(usage, dict) and usage:
            self.prompt_tokens = token_count(usage.get("input_tokens"))
            self.cached_tokens = token_count(usage.get("cache_read_input_tokens"))
            self.generated_tokens = token_count(usage.get("output_tokens"))

    @classmethod
    def of(cls, route: str, environ: dict[str, Any]) -> Call:
        """A new record for the request in this WSGI environ (its agent and Claude Code session)."""
        session = environ.get(_SESSION_KEY, "").strip()[:100] or None
        if session is None and not route.startswith("/v1/messages"):
            session = next((value for key in _OPENAI_SESSION_KEYS if (value := environ.get(key, "").strip()[:100])), None)
        return cls(route=route, client=environ.get("HTTP_USER_AGENT", "-"), session=session, user=environ.get(USER),
                   limits=environ.get(LIMITS) or Limits())


class _StateCollector(Collector):
    """Read at scrape time: the gate's queue and slots, connections opened to llama-server, and
    request-log rows dropped."""

    def __init__(self, gate: Gate, request_log, connections=None):
        self.gate = gate
        self.request_log = request_log
        self.connections = connections

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield GaugeMetricFamily("llamabridge_proxy_queue_depth", "Requests waiting for a llama-server slot.", value=self.gate.depth())
        yield GaugeMetricFamily("llamabridge_proxy_in_flight", "Requests holding a llama-server slot.", value=self.gate.in_flight())
        yield GaugeMetricFamily("llamabridge_proxy_slots", "llama-server slots the gate admits to.", value=self.gate.slots)
        if self.connections is not None:
            yield CounterMetricFamily("llamabridge_proxy_upstream_connections", "TCP connections opened to llama-server for "
                                      "generations (a non-streamed answer leaves its connection for the next request; after a "
                                      "stream, which llama-server ends by closing it, the next one is opened ahead).",
                                      value=self.connections.opened)
            yield CounterMetricFamily("llamabridge_proxy_upstream_stalls", "Requests ended because llama-server stopped "
                                      "working on them: no byte of the answer and no answer from its main loop for "
                                      "UPSTREAM_STALL_TIMEOUT (the client got 529/503, its slot was given back).",
                                      value=self.connections.stalls)
        if self.request_log is not None:
            yield CounterMetricFamily("llamabridge_proxy_request_log_dropped", "Request-log rows dropped: past the "
                                      "retry buffer while the store would not take them, or refused by it.", value=self.request_log.dropped)


class ProxyMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, request_log=None, upstreams: tuple[str, ...] = ()):
        self.registry = registry or CollectorRegistry()
        self.request_log = request_log
        r = self.registry
        self.clients = ClientLabels()
        self.users = BoundedLabel(MAX_USERS)
        self.requests = Counter("llamabridge_proxy_requests", "Requests by client (User-Agent without versions), user "
                                "(API key name), route, class, status, how they were answered and the llama-server "
                                "that ran them (\"-\" for none).",
                                ["client", "user", "route", "class", "status", "handled", "upstream"], registry=r)
        self.queue_wait = Histogram("llamabridge_proxy_queue_wait_seconds", "Time spent waiting for a slot.", ["class"],
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("llamabridge_proxy_time_to_first_token_seconds", "Time to the first generated token, by class "
                              "and the llama-server that generated it.", ["class", "upstream"], buckets=LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("llamabridge_proxy_request_duration_seconds", "Whole request time.", ["class"],
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("llamabridge_proxy_tokens", "Tokens of proxied generations by kind (prompt = prefilled) "
                              "user (API key name) and the llama-server that ran them.", ["kind", "user", "upstream"], registry=r)
        self.refusals = Counter("llamabridge_proxy_refused_requests", "Requests refused before any route: a foreign Host "
                                "or Origin, a body that is not JSON, a missing or wrong API key.", ["reason"], registry=r)
        self.reprefills = Counter("llamabridge_proxy_reprefills", "Turns that re-prefilled more than the session's history explains.",
                                  registry=r)
        self.reprefilled_tokens = Counter("llamabridge_proxy_reprefilled_tokens", "Tokens prefilled again by those turns.", registry=r)
        self.slot_not_freed = Counter("llamabridge_proxy_slot_not_freed",
                                      "Disconnected requests whose llama-server slot stayed busy for seconds after we hung up.", registry=r)
        self.token_counts = Counter("llamabridge_proxy_token_counts", "count_tokens answers by source.", ["source"], registry=r)
        self.session_moves = Counter("llamabridge_proxy_session_moves", "Sessions sent to another upstream than the one "
                                     "holding their cache: theirs was down, or busy past AFFINITY_MAX_WAIT.", registry=r)
        # The slot KV cache on disk (kvcache.py).
        self.kv_saves = Counter("llamabridge_proxy_kv_saves", "Slots saved to KV_CACHE_DIR after a session went idle.", registry=r)
        self.kv_save_failures = Counter("llamabridge_proxy_kv_save_failures", "Slot saves llama-server refused or failed "
                                        "(no --slot-save-path, disk full, ...).", registry=r)
        self.kv_save_seconds = Histogram("llamabridge_proxy_kv_save_seconds", "Time llama-server took to save a slot.",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.kv_restores = Counter("llamabridge_proxy_kv_restores", "Saved files considered for a turn: restored into its slot, "
                                   "failed (llama-server could not load it; the turn prefilled), or refused (another model or "
                                   "a context it does not fit).", ["result"], registry=r)
        self.kv_restored_tokens = Counter("llamabridge_proxy_kv_restored_tokens", "Tokens put back into slots from saved files.",
                                          registry=r)
        self.kv_bytes = Gauge("llamabridge_proxy_kv_cache_bytes", "Bytes of saved slot KV caches in KV_CACHE_DIR.", registry=r)
        self.kv_files = Gauge("llamabridge_proxy_kv_cache_files", "Saved slot KV caches in KV_CACHE_DIR.", registry=r)
        self.kv_evictions = Counter("llamabridge_proxy_kv_evictions", "Saved files deleted to stay within KV_CACHE_MAX_GB, "
                                    "or because a newer file of the same conversation holds all they held.", ["reason"], registry=r)
        # Labelled children by (metric, label values): labels() validates and locks on every call.
        # Every label here has a bounded set of values (clients are capped by ClientLabels).
        self._children: dict[tuple, object] = {}
        # Series that exist from the start count their first request in rate() and increase():
        # a labelled series born at 1 has no earlier sample to rise from.
        for klass in CLASSES:
            for histogram in (self.queue_wait, self.duration):
                histogram.labels(klass)
            for upstream in upstreams or (NO_UPSTREAM,):
                self.ttft.labels(klass, upstream)
        for kind in ("prompt", "cached", "generated"):
            for upstream in upstreams or (NO_UPSTREAM,):
                self.tokens.labels(kind, NO_USER, upstream)
        for reason in ("host", "origin", "content_type", "key"):
            self.refusals.labels(reason)
        for result in ("restored", "failed", "refused"):
            self.kv_restores.labels(result)
        for reason in ("budget", "superseded", "missing"):
            self.kv_evictions.labels(reason)

    def refused(self, reason: str) -> None:
        self._child(self.refusals, reason).inc()

    def _child(self, metric, *values: str):
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def watch_gate(self, gate: Gate, connections=None) -> None:
        self.registry.register(_StateCollector(gate, self.request_log, connections))

    def record(self, call: Call) -> None:
        """Count and log a finished request, once."""
        if call.recorded:
            return
        call.recorded = True
        total = time.monotonic() - call.started
        user = self.users(call.user) if call.user else NO_USER
        upstream = call.upstream or NO_UPSTREAM
        self._child(self.requests, self.clients(call.client), user, call.route, call.klass, str(call.status), call.handled,
                    upstream).inc()
        if call.handled == "upstream" or call.handled == "background":
            self._child(self.queue_wait, call.klass).observe(call.queue_wait)
            if call.ttft is not None:
                self._child(self.ttft, call.klass, upstream).observe(call.ttft)
            self._child(self.tokens, "prompt", user, upstream).inc(call.prompt_tokens)
            self._child(self.tokens, "cached", user, upstream).inc(call.cached_tokens)
            self._child(self.tokens, "generated", user, upstream).inc(call.generated_tokens)
        self._child(self.duration, call.klass).observe(total)
        if self.request_log is not None:
            generating = total - (call.ttft or total) if call.ttft is not None else 0.0
            self.request_log.add({
                "ts": time.time() - total, "client": call.client[:200], "session": call.session, "user": call.user, "route": call.route,
                "class": call.klass, "model": call.model, "status": call.status, "handled": call.handled,
                "queue_wait": call.queue_wait, "ttft": call.ttft, "total_time": total, "prompt_tokens": call.prompt_tokens,
                "cached_tokens": call.cached_tokens, "generated_tokens": call.generated_tokens,
                "tokens_per_second": call.generated_tokens / generating if generating > 0 and call.generated_tokens else None,
                "error": call.error, "kv_restored": call.kv_restored, "upstream": call.upstream,
            })
        log.info(
            "%s class=%s status=%s handled=%s session=%s user=%s slot=%s wait=%.3fs ttft=%s total=%.3fs prompt=%d cached=%d generated=%d client=%r%s%s",
            call.route, call.klass, call.status, call.handled, call.session or "-", call.user or NO_USER, "-" if call.slot is None else call.slot,
            call.queue_wait, "-" if call.ttft is None else f"{call.ttft:.3f}s", total, call.prompt_tokens,
            call.cached_tokens, call.generated_tokens, call.client[:80], f" error={call.error!r}" if call.error else "",
            f" kv_restored={call.kv_restored}" if call.kv_restored else "",
        )
