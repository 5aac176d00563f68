"""The scrape job APScheduler runs every COLLECT_INTERVAL seconds.

Each run reads llama-server once, then in one transaction reads the stored baseline, decides how
far each lifetime total advanced, and records it with the new raw baseline, a sample for the
charts, and any restart, renewing this collector's lease on the store. A collector that finds
another's lease running stands by (and says so once) until the lease ends. An outage is logged
once when it starts and once when it ends (not once per scrape) and recorded as events; the
collector keeps running through it.

Which llama-server is behind LLAMA_URL is part of the baseline (`upstream_identity`: its model
and build). A restart of the same server counts everything the new process reports; another
server answering at the same URL only sets a new baseline, since what it served before was not
served through here.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import requests

from llamabridge.store import Baseline, LeaseHeld, ScrapePlan, Store, holder_id

from . import scrape

log = logging.getLogger("llamabridge.collector")


class ScrapeJob:
    def __init__(self, store: Store, base_url: str, interval: float, api_key: str = "",
                 clock: Callable[[], float] = time.time, holder: str | None = None):
        self.store = store
        self.base_url = base_url.rstrip("/")
        self.interval = interval
        self.clock = clock
        self.holder = holder or holder_id()
        # Long enough to cover a scrape whose three reads each take their whole timeout, so a
        # slow llama-server never lets a standby take over from a collector that is still working.
        self.lease_seconds = 3 * interval + 20
        self.session = requests.Session()
        self.session.trust_env = False
        # llama-server gives each open connection a thread until it closes or sits idle for 5 s;
        # a connection kept between scrapes 10 s apart would hold one for nothing (see the
        # proxy's upstream.py for what that can cost when many connections arrive at once).
        self.session.headers["Connection"] = "close"
        if api_key:
            # A llama-server started with --api-key answers /metrics and /slots only with it.
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.scrape_errors = 0
        self.last_success: float | None = None
        self.down_since: float | None = None
        self.error: scrape.ScrapeError | None = None  # why the last read failed
        self.standby: LeaseHeld | None = None  # another collector writes the store
        self.stopped = False

    @property
    def up(self) -> bool:
        """The last read of llama-server worked."""
        return self.down_since is None and self.last_success is not None and self.standby is None

    def run(self) -> None:
        if self.stopped:
            return
        now = self.clock()
        held = self.store.lease_holder(self.holder, now)
        if held is not None:  # checked before reading llama-server: a standby does not scrape it
            self._stand_by(held)
            return
        try:
            reading = self.read_upstream()
        except scrape.ScrapeError as exc:
            self._down(now, exc)
            return
        outcome: dict[str, Any] = {}

        def plan(base: Baseline) -> ScrapePlan:
            events: list[tuple[str, str]] = []
            if self.down_since is not None:
                events.append(("recovered", f"after {now - self.down_since:.0f}s"))
            identity = scrape.identity(reading.props)
            before = base.meta.get("upstream_identity")
            if identity and before and identity != before:
                # Another server at this URL: its counters hold history served elsewhere.
                why: str | None = "changed"
                advanced = dict.fromkeys(reading.counters, 0.0)
                events.append(("upstream_changed", f"{scrape.describe(before)} -> {scrape.describe(identity)}"))
            else:
                why = scrape.restart_reason(base.last_raw, reading.counters, base.meta.get("process_start"),
                                            reading.process_start)
                if why:
                    events.append(("restart", why))
                advanced = scrape.deltas(base.last_raw, reading.counters, restarted=why is not None)
            outcome["why"], outcome["events"] = why, events
            meta: dict[str, Any] = {"last_scrape": repr(now), "upstream_error": None, "upstream_error_kind": None}
            if identity:
                meta["upstream_identity"] = identity
            if reading.process_start:
                meta["process_start"] = reading.process_start
            settings = reading.props.get("default_generation_settings") or {}
            if reading.props:
                meta["model"] = str(reading.props.get("model_alias") or "")
                meta["n_ctx"] = str(settings.get("n_ctx") or "")
                meta["total_slots"] = str(reading.props.get("total_slots") or "")
            return advanced, reading.counters, self._sample(advanced, reading), events, meta

        held = self.store.scrape(self.holder, now, self.lease_seconds, plan)
        if held is not None:
            self._stand_by(held)
            return
        self._active()
        if self.down_since is not None:
            log.info("llama-server is back after %.0fs", now - self.down_since)
            self.down_since = None
        if outcome["why"] == "changed":
            log.warning("another llama-server answers at %s (%s): counting from here, not adding its history",
                        self.base_url, outcome["events"][-1][1])
        elif outcome["why"]:
            log.warning("llama-server restarted (%s); counting its counters from 0", outcome["why"])
        self.error = None
        self.last_success = now

    def read_upstream(self) -> scrape.Reading:
        """One reading of llama-server (a simulation replaces this to drive the job through time)."""
        return scrape.read(self.base_url, self.session)

    def _down(self, now: float, error: scrape.ScrapeError) -> None:
        self.scrape_errors += 1
        # Once per outage; again only if it turns into a refused key (a loading server that answers
        # 503 and then 401 is a setting to fix, not an outage that ends by itself).
        starts = self.down_since is None or (error.kind == "unauthorized" and self.error is not None and self.error.kind != error.kind)
        events = [("outage", str(error))] if self.down_since is None else []
        meta = {"last_scrape": repr(now), "upstream_error": str(error), "upstream_error_kind": error.kind}
        # last_scrape moves on: readers of the store see "llama-server down", not "no collector".
        held = self.store.scrape(self.holder, now, self.lease_seconds, lambda base: ({}, {}, {"up": 0}, events, meta))
        if held is not None:
            self._stand_by(held)
            return
        self._active()
        if starts:
            # A refused key is a setting to fix, not a server that will come back by itself.
            level = logging.ERROR if error.kind == "unauthorized" else logging.WARNING
            log.log(level, "llama-server cannot be read: %s (logged once; retrying every %.0fs)", error, self.interval)
        if self.down_since is None:
            self.down_since = now
        self.error = error

    def _stand_by(self, held: LeaseHeld) -> None:
        if self.standby is None or self.standby.holder != held.holder:
            log.warning("another collector (%s) is writing the store %s; standing by, and taking over when it stops "
                        "(or %.0fs after its last write)", held.holder, self.store.path, self.lease_seconds)
        self.standby = held

    def _active(self) -> None:
        if self.standby is not None:
            log.warning("taking over the store %s from %s", self.store.path, self.standby.holder)
            self.standby = None

    def stop(self) -> None:
        """No more scrapes; give the lease up so a standby collector takes over at once."""
        self.stopped = True
        try:
            self.store.release_lease(self.holder)
        except Exception as exc:  # noqa: BLE001 - stopping anyway; the lease then runs out by itself
            log.warning("could not release the store's collector lease: %s", exc)

    @staticmethod
    def _sample(advanced: dict[str, float], reading: scrape.Reading) -> dict[str, Any]:
        prompt = advanced.get("prompt_tokens_total", 0.0)
        cached = advanced.get("prompt_tokens_cached_total", 0.0)
        generated = advanced.get("tokens_predicted_total", 0.0)
        prompt_s = advanced.get("prompt_seconds_total", 0.0)
        gen_s = advanced.get("tokens_predicted_seconds_total", 0.0)
        context = []
        slots = reading.slots if isinstance(reading.slots, list) else []
        for slot in slots:
            # What the slot holds: an idle slot keeps its last prompt (a conversation's cache) and
            # still reports its size, which is what tells a user a session nears its window.
            used = int(slot.get("n_prompt_tokens") or 0)
            if slot.get("is_processing"):
                used += int((slot.get("next_token") or [{}])[0].get("n_decoded") or 0)
            context.append({"slot": slot.get("id"), "used": used, "n_ctx": slot.get("n_ctx")})
        busy = sum(1 for slot in slots if slot.get("is_processing")) if slots else None
        return {
            "up": 1,
            "prompt_tokens": prompt,
            "cached_tokens": cached,
            "generated_tokens": generated,
            "prompt_seconds": prompt_s,
            "generation_seconds": gen_s,
            "prompt_tps": prompt / prompt_s if prompt_s > 0 else None,
            "generation_tps": generated / gen_s if gen_s > 0 else None,
            "busy_slots": busy,
            "processing": reading.gauges.get("requests_processing"),
            "deferred": reading.gauges.get("requests_deferred"),
            "cache_ratio": cached / (prompt + cached) if prompt + cached > 0 else None,
            "context_used": json.dumps(context),
        }
