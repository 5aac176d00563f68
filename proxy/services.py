"""The proxy's long-lived state, built once per app: upstreams with their gates, the token
counter, the prefix tracker, slot caches saved to disk, in-flight deduplication, per-key limits
and metrics."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

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
from .upstream import ServerInfo, Unanswered, Upstream

log = logging.getLogger("llamabridge.proxy")
T = TypeVar("T")

# After a client leaves mid-generation we hang up on llama-server and watch /slots: the slot
# should be idle within a token or two. Past this, it is logged and counted.
SLOT_FREE_WARN_SECONDS = 5.0
SLOT_FREE_GIVE_UP_SECONDS = 600.0


@dataclass
class Target:
    """The llama-servers of one role (LLAMA_URL's list, or BACKGROUND_URL) and the one gate in
    front of all their slots."""

    name: str
    upstreams: list[Upstream]
    gate: Gate
    counters: list[TokenCounter]

    def first_up(self) -> int:
        """The first upstream in the rotation (the first listed, when none is)."""
        return next((i for i in range(len(self.upstreams)) if self.gate.is_up(i)), 0)

    @property
    def upstream(self) -> Upstream:
        """One to ask what any of them would answer (props, models, token counts)."""
        return self.upstreams[self.first_up()]

    @property
    def counter(self) -> TokenCounter:
        return self.counters[self.first_up()]

    def upstream_of(self, ticket: Ticket) -> Upstream:
        return self.upstreams[ticket.upstream]

    def counted(self, work: Callable[[TokenCounter], T]) -> T:
        """`work` with the token counter of the first upstream in the rotation. One found
        unreachable leaves the rotation at once (before its health check notices), and the next
        is asked: a count never fails on a stopped server while another is up."""
        while True:
            i = self.first_up()
            try:
                return work(self.counters[i])
            except Unanswered as exc:
                if not self.gate.is_up(i) or not self.drop(i, exc.message):
                    raise

    def drop(self, upstream: int, reason: str) -> bool:
        """A request found `upstream` unreachable before any answer: take it out of the rotation
        at once (its health check brings it back). True if another upstream may take the request."""
        if len(self.upstreams) < 2:
            return False
        if self.gate.is_up(upstream):
            log.warning("%s left the rotation: %s", self.upstreams[upstream].base, reason)
            self.gate.set_up(upstream, False)
        return any(self.gate.is_up(i) for i in range(len(self.upstreams)))

    def info(self, slots_override: int) -> ServerInfo:
        """The first reachable upstream's settings; every reachable one's slot count in the gate."""
        found: ServerInfo | None = None
        failure: ApiError | None = None
        for i, upstream in enumerate(self.upstreams):
            if len(self.upstreams) > 1 and not self.gate.is_up(i):
                continue
            try:
                info = upstream.info()
            except ApiError as exc:
                failure = failure or exc
                continue
            self.gate.resize(slots_override or info.total_slots, i)
            found = found or info
        if found is None:
            raise failure or ApiError(529, "no llama-server in the rotation", retry_after=5)
        return found


class Services:
    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None):
        self.settings = settings
        # One budget for both gates: a request waiting for either holds one of the same threads.
        self.threads = Threads(settings.threads - THREAD_RESERVE)
        self.main = self._target("llama-server", settings)
        self.background = None
        if settings.background_url:
            self.background = self._target("background llama-server", replace(settings, llama_url=settings.background_url, llama_urls=()))
        self.tracker = PrefixTracker()
        self.flights = Flights()
        self.quotas = Quotas()
        self.request_log = RequestLog(settings.db_path, settings.retention) if settings.db_path else None
        self.metrics = ProxyMetrics(registry, self.request_log, tuple(u.base for u in self.main.upstreams))
        self.metrics.watch_gate(self.main.gate, self.main.upstream.connections)
        if len(self.main.upstreams) > 1 and settings.kv_cache_dir:
            # One directory cannot be every llama-server's --slot-save-path on several machines.
            log.warning("KV_CACHE_DIR is ignored with several upstreams in LLAMA_URL: prompt caches are not saved to disk")
            settings = replace(settings, kv_cache_dir="")
        self.kv = KvCache(settings, self.metrics, self.tracker, self.request_log.store if self.request_log else None)

    def prepare_connections(self) -> None:
        """Open a connection ahead of the next request to each llama-server that closed one
        after answering (`Connections.prepare`)."""
        for target in (self.main, self.background):
            if target is not None:
                for upstream in target.upstreams:
                    upstream.connections.prepare()

    def _target(self, name: str, settings: Settings) -> Target:
        upstreams = [Upstream(replace(settings, llama_url=url, llama_urls=())) for url in settings.upstream_urls]
        gate = Gate([settings.upstream_slots or 1] * len(upstreams), settings.queue_max, settings.queue_timeout, self.threads,
                    affinity_wait=settings.affinity_wait, on_move=self._moved)
        return Target(name, upstreams, gate, [TokenCounter(upstream) for upstream in upstreams])

    def _moved(self, session: str, source: int, dest: int, why: str) -> None:
        """A session left the upstream that holds its cache (called under the gate's lock)."""
        self.metrics.session_moves.inc()
        log.warning("session %s moved from %s to %s (%s): its next turn prefills there", session,
                    self.main.upstreams[source].base, self.main.upstreams[dest].base, why)

    def watch_health(self) -> None:
        """With several upstreams, ask each every UPSTREAM_HEALTH_INTERVAL whether it is ready: one that is
        down or loading leaves the rotation until it answers again."""
        if len(self.main.upstreams) > 1:
            threading.Thread(target=self._health_loop, name="llamabridge-health", daemon=True).start()

    def _health_loop(self) -> None:
        model: str | None = None  # the model of the first upstream found ready
        checked: set[int] = set()  # upstreams whose model was read since they last answered
        while True:
            for i, upstream in enumerate(self.main.upstreams):
                ok, reason = upstream.health()
                if not ok:
                    checked.discard(i)  # it may come back with another model
                elif i not in checked:
                    try:
                        identity = upstream.fresh_info().identity
                    except ApiError as exc:
                        ok, reason = False, exc.message
                    else:
                        model = model or identity
                        if identity != model:
                            ok, reason = False, "it serves another model than the others (one model per proxy)"
                        else:
                            checked.add(i)
                if ok != self.main.gate.is_up(i):
                    if ok:
                        log.info("%s is ready again: back in the rotation", upstream.base)
                    else:
                        log.warning("%s left the rotation: %s", upstream.base, reason)
                    self.main.gate.set_up(i, ok)
            time.sleep(self.settings.health_interval)  # llama-server has no event to wait on

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
                if not self._slot_busy(target.upstream_of(ticket), ticket.slot):
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
    def _slot_busy(upstream: Upstream, slot: int) -> bool:
        try:
            slots = upstream.json("GET", "/slots", timeout=5)
        except ApiError:
            return False  # unreachable or /slots disabled: nothing to wait for
        return any(s.get("id") == slot and s.get("is_processing") for s in slots if isinstance(s, dict))
