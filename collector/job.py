"""The scrape job APScheduler runs every COLLECT_INTERVAL seconds.

Each run reads llama-server once and records, in one transaction, how far each lifetime total
advanced, the new raw baseline, a sample for the charts, and any restart. An outage is logged
once when it starts and once when it ends (not once per scrape) and recorded as events; the
collector keeps running through it.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import requests

from . import scrape
from .store import Store

log = logging.getLogger("llamabridge.collector")


class ScrapeJob:
    def __init__(self, store: Store, base_url: str, interval: float, api_key: str = ""):
        self.store = store
        self.base_url = base_url.rstrip("/")
        self.interval = interval
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
        self.last_reading: scrape.Reading | None = None

    @property
    def up(self) -> bool:
        """The last read of llama-server worked."""
        return self.down_since is None and self.last_success is not None

    def run(self) -> None:
        now = time.time()
        try:
            reading = scrape.read(self.base_url, self.session)
        except scrape.ScrapeError as exc:
            self._down(now, str(exc))
            return
        events: list[tuple[str, str]] = []
        if self.down_since is not None:
            log.info("llama-server is back after %.0fs", now - self.down_since)
            events.append(("recovered", f"after {now - self.down_since:.0f}s"))
            self.down_since = None
        last = self.store.last_raw()
        why = scrape.restart_reason(last, reading.counters, self.store.meta("process_start"), reading.process_start)
        if why:
            log.warning("llama-server restarted (%s); counting its counters from 0", why)
            events.append(("restart", why))
        advanced = scrape.deltas(last, reading.counters, restarted=why is not None)
        meta = {"last_scrape": repr(now)}
        if reading.process_start:
            meta["process_start"] = reading.process_start
        settings = reading.props.get("default_generation_settings") or {}
        if reading.props:
            meta["model"] = str(reading.props.get("model_alias") or "")
            meta["n_ctx"] = str(settings.get("n_ctx") or "")
            meta["total_slots"] = str(reading.props.get("total_slots") or "")
        self.store.record_scrape(now, advanced, reading.counters, self._sample(advanced, reading), events, meta)
        self.last_success = now
        self.last_reading = reading

    def _down(self, now: float, reason: str) -> None:
        self.scrape_errors += 1
        if self.down_since is None:
            self.down_since = now
            log.warning("llama-server cannot be read: %s (logged once; retrying every %.0fs)", reason, self.interval)
            self.store.record_scrape(now, {}, {}, {"up": 0}, [("outage", reason)], meta={"last_scrape": repr(now)})
        else:
            # last_scrape moves on: readers of the store see "llama-server down", not "no collector".
            self.store.record_scrape(now, {}, {}, {"up": 0}, meta={"last_scrape": repr(now)})

    @staticmethod
    def _sample(advanced: dict[str, float], reading: scrape.Reading) -> dict[str, Any]:
        prompt = advanced.get("prompt_tokens_total", 0.0)
        cached = advanced.get("prompt_tokens_cached_total", 0.0)
        generated = advanced.get("tokens_predicted_total", 0.0)
        prompt_s = advanced.get("prompt_seconds_total", 0.0)
        gen_s = advanced.get("tokens_predicted_seconds_total", 0.0)
        context = []
        for slot in reading.slots if isinstance(reading.slots, list) else []:
            used = 0
            if slot.get("is_processing"):
                decoded = (slot.get("next_token") or [{}])[0].get("n_decoded") or 0
                used = int(slot.get("n_prompt_tokens") or 0) + int(decoded)
            context.append({"slot": slot.get("id"), "used": used, "n_ctx": slot.get("n_ctx")})
        busy = sum(1 for c in context if c["used"]) if context else None
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
