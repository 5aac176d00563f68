"""The proxy's long-lived state, built once per app: upstreams with their gates, the token
counter, the prefix tracker, slot caches saved to disk, in-flight deduplication, per-key limits
and metrics."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from llamabridge.requestlog import RequestLog

from .config import THREAD_RESERVE, Settings
from .errors import ApiError
from .flights import Flights
from .gate import Gate, Threads, Ticket
from .kvcache import KvCache
from .metrics import ProxyMetrics
from .prefix import PrefixTracker
from .quotas import Quotas
from .tokens import TokenCounter
from .upstream import ServerInfo, Upstream

log = logging.getLogger("llamabridge.proxy")

# After a client leaves mid-generation we hang up on llama-server and watch /slots: the slot
# should be idle within a token or two. Past this, it is logged and counted.
SLOT_FREE_WARN_SECONDS = 5.0
SLOT_FREE_GIVE_UP_SECONDS = 600.0


@dataclass
class Target:
    """One llama-server and the gate in front of it."""

    name: str
    upstream: Upstream
    gate: Gate
    counter: TokenCounter

    def info(self, slots_override: int) -> ServerInfo:
        info = self.upstream.info()
        self.gate.resize(slots_override or info.total_slots)
        return info


class Services:
    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None):
        self.settings = settings
        # One budget for both gates: a request waiting for either holds one of the same threads.
        self.threads = Threads(settings.threads - THREAD_RESERVE)
        self.main = self._target("llama-server", settings)
        self.background = None
        if settings.background_url:
            self.background = self._target("background llama-server", Settings(**{**settings.__dict__, "llama_url": settings.background_url}))
        self.tracker = PrefixTracker()
        self.flights = Flights()
        self.quotas = Quotas()
        self.request_log = RequestLog(settings.db_path, settings.retention) if settings.db_path else None
        self.metrics = ProxyMetrics(registry, self.request_log)
        self.metrics.watch_gate(self.main.gate, self.main.upstream.connections)
        self.kv = KvCache(settings, self.metrics, self.tracker, self.request_log.store if self.request_log else None)

    def prepare_connections(self) -> None:
        """Open a connection ahead of the next request to each llama-server that closed one
        after answering (`Connections.prepare`)."""
        self.main.upstream.connections.prepare()
        if self.background is not None:
            self.background.upstream.connections.prepare()

    def _target(self, name: str, settings: Settings) -> Target:
        upstream = Upstream(settings)
        gate = Gate(settings.upstream_slots or 1, settings.queue_max, settings.queue_timeout, self.threads)
        return Target(name, upstream, gate, TokenCounter(upstream))

    def release(self, target: Target, ticket: Ticket, client_left: bool) -> None:
        """Give the slot back. After a disconnect, only once llama-server shows it idle."""
        if not client_left:
            target.gate.release(ticket)
            return
        threading.Thread(target=self._release_when_idle, args=(target, ticket), daemon=True,
                         name=f"slot-{ticket.slot}-release").start()

    def _release_when_idle(self, target: Target, ticket: Ticket) -> None:
        started = time.monotonic()
        warned = False
        try:
            while time.monotonic() - started < SLOT_FREE_GIVE_UP_SECONDS:
                if not self._slot_busy(target, ticket.slot):
                    return
                if not warned and time.monotonic() - started > SLOT_FREE_WARN_SECONDS:
                    warned = True
                    self.metrics.slot_not_freed.inc()
                    log.warning("slot %d of %s is still busy %.0fs after its client left and we closed the request; "
                                "holding it until llama-server finishes", ticket.slot, target.name, SLOT_FREE_WARN_SECONDS)
                time.sleep(0.1)  # polling llama-server's /slots: it has no event to wait on
        finally:
            target.gate.release(ticket)

    @staticmethod
    def _slot_busy(target: Target, slot: int) -> bool:
        try:
            slots = target.upstream.json("GET", "/slots", timeout=5)
        except ApiError:
            return False  # unreachable or /slots disabled: nothing to wait for
        return any(s.get("id") == slot and s.get("is_processing") for s in slots if isinstance(s, dict))
