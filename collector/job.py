"""The scrape job APScheduler runs every COLLECT_INTERVAL seconds.

Each run reads every llama-server in LLAMA_URL once (at the same time, when there are several),
then in one transaction reads each one's stored baseline, decides how far each of its lifetime
totals advanced, and records that with its new raw baseline, the sums over all of them, samples
for the charts, and any restart, renewing this collector's lease on the store. A collector that
finds another's lease running stands by (and says so once) until the lease ends. An outage is
logged once when it starts and once when it ends (not once per scrape) and recorded as events;
the collector keeps running through it, and the other upstreams keep being counted.

Which llama-server answers at a URL is part of its baseline (`upstream_identity`: its model and
build). A restart of the same server counts everything the new process reports; another server
answering at the same URL only sets a new baseline, since what it served before was not served
through here.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import requests

from llamabridge.store import (
    Baseline,
    Baselines,
    LeaseHeld,
    ScrapeWrite,
    Store,
    UpstreamWrite,
    holder_id,
)

from . import scrape

log = logging.getLogger("llamabridge.collector")


@dataclass
class UpstreamState:
    """What the job remembers about one llama-server between scrapes (the store remembers the rest)."""

    url: str
    session: requests.Session
    errors: int = 0  # failed reads since this collector started
    last_success: float | None = None
    down_since: float | None = None
    error: scrape.ScrapeError | None = None  # why the last read failed

    @property
    def up(self) -> bool:
        return self.down_since is None and self.last_success is not None


class ScrapeJob:
    def __init__(self, store: Store, urls: str | Sequence[str], interval: float, api_key: str = "",
                 clock: Callable[[], float] = time.time, holder: str | None = None):
        self.store = store
        self.interval = interval
        self.clock = clock
        self.holder = holder or holder_id()
        # Long enough to cover a scrape whose three reads each take their whole timeout (the
        # upstreams are read at the same time), so a slow llama-server never lets a standby take
        # over from a collector that is still working.
        self.lease_seconds = 3 * interval + 20
        urls = (urls,) if isinstance(urls, str) else tuple(urls)
        self.upstreams = [UpstreamState(url.rstrip("/"), _session(api_key)) for url in urls]
        self.several = len(self.upstreams) > 1
        self.standby: LeaseHeld | None = None  # another collector writes the store
        self.stopped = False

    # -- what the exporter and /healthz read ------------------------------------------------------

    @property
    def up(self) -> bool:
        """The last read of every llama-server worked."""
        return self.standby is None and all(u.up for u in self.upstreams)

    @property
    def error(self) -> scrape.ScrapeError | None:
        """Why a llama-server cannot be read (the first one that cannot, named when there are several)."""
        for u in self.upstreams:
            if u.error is not None and not u.up:
                return scrape.ScrapeError(self._named(u, u.error), u.error.kind)
        return None

    @property
    def scrape_errors(self) -> int:
        return sum(u.errors for u in self.upstreams)

    # -- the scrape -------------------------------------------------------------------------------

    def run(self) -> None:
        if self.stopped:
            return
        now = self.clock()
        held = self.store.lease_holder(self.holder, now)
        if held is not None:  # checked before reading llama-server: a standby does not scrape it
            self._stand_by(held)
            return
        readings = self._read_all()
        outcome: dict[str, tuple[str | None, list[tuple[str, str]]]] = {}

        def plan(baselines: Baselines) -> ScrapeWrite:
            write = ScrapeWrite(meta={"last_scrape": repr(now)})
            for i, (state, reading) in enumerate(zip(self.upstreams, readings, strict=True)):
                base = baselines.of(state.url, inherit=i == 0)
                if isinstance(reading, scrape.ScrapeError):
                    write.upstreams[state.url] = self._down_write(state, now, reading)
                else:
                    part, why = self._write(state, now, reading, base)
                    outcome[state.url] = (why, part.events)
                    write.upstreams[state.url] = part
            self._combine(write, readings)
            if not self.several:
                for part in write.upstreams.values():
                    part.sample = None  # the store-wide row is this upstream's
            return write

        held = self.store.scrape(self.holder, now, self.lease_seconds, plan)
        if held is not None:
            self._stand_by(held)
            return
        self._active()
        for state, reading in zip(self.upstreams, readings, strict=True):
            if isinstance(reading, scrape.ScrapeError):
                self._went_down(state, now, reading)
            else:
                self._came_up(state, now, *outcome[state.url])

    def read_upstream(self, url: str) -> scrape.Reading:
        """One reading of one llama-server (a simulation replaces this to drive the job through time)."""
        state = next(u for u in self.upstreams if u.url == url)
        return scrape.read(url, state.session)

    def _read_all(self) -> list[scrape.Reading | scrape.ScrapeError]:
        def one(url: str) -> scrape.Reading | scrape.ScrapeError:
            try:
                return self.read_upstream(url)
            except scrape.ScrapeError as exc:
                return exc

        if not self.several:
            return [one(self.upstreams[0].url)]
        # At the same time: one slow or unreachable llama-server must not hold the others' reads
        # back past the lease.
        with ThreadPoolExecutor(len(self.upstreams), thread_name_prefix="scrape") as pool:
            return list(pool.map(one, [u.url for u in self.upstreams]))

    def _write(self, state: UpstreamState, now: float, reading: scrape.Reading,
               base: Baseline) -> tuple[UpstreamWrite, str | None]:
        """What a reading of one llama-server records, measured against its baseline; and why its
        counters start over, if they do ("changed", a restart's reason, or None)."""
        events: list[tuple[str, str]] = []
        if state.down_since is not None:
            events.append(("recovered", f"after {now - state.down_since:.0f}s"))
        identity = scrape.identity(reading.props)
        before = base.meta.get("upstream_identity")
        if identity and before and identity != before:
            # Another server at this URL: its counters hold history served elsewhere.
            why: str | None = "changed"
            advanced = dict.fromkeys(reading.counters, 0.0)
            events.append(("upstream_changed", f"{scrape.describe(before)} -> {scrape.describe(identity)}"))
        else:
            why = scrape.restart_reason(base.last_raw, reading.counters, base.meta.get("process_start"), reading.process_start)
            if why:
                events.append(("restart", why))
            advanced = scrape.deltas(base.last_raw, reading.counters, restarted=why is not None)
        meta: dict[str, str | None] = {"last_scrape": repr(now), "upstream_error": None, "upstream_error_kind": None}
        if identity:
            meta["upstream_identity"] = identity
        if reading.process_start:
            meta["process_start"] = reading.process_start
        if reading.props:
            settings = reading.props.get("default_generation_settings") or {}
            meta["model"] = str(reading.props.get("model_alias") or "")
            meta["n_ctx"] = str(settings.get("n_ctx") or "")
            meta["total_slots"] = str(reading.props.get("total_slots") or "")
        return UpstreamWrite(advanced, reading.counters, self._sample(advanced, reading), events, meta), why

    def _down_write(self, state: UpstreamState, now: float, error: scrape.ScrapeError) -> UpstreamWrite:
        events = [("outage", str(error))] if state.down_since is None else []
        # last_scrape moves on: readers of the store see "llama-server down", not "no collector".
        meta: dict[str, str | None] = {"last_scrape": repr(now), "upstream_error": str(error), "upstream_error_kind": error.kind}
        return UpstreamWrite(sample={"up": 0}, events=events, meta=meta)

    def _combine(self, write: ScrapeWrite, readings: list[scrape.Reading | scrape.ScrapeError]) -> None:
        """The store-wide sample (all upstreams together) and what the dashboard shows of them:
        the first readable upstream's model and context, every readable one's slots, and the
        first error."""
        parts = [write.upstreams[u.url] for u in self.upstreams]
        write.sample = _sum_samples([p.sample or {"up": 0} for p in parts], [u.url for u in self.upstreams], self.several)
        first = next((p for p in parts if "model" in p.meta), None)
        write.meta.update({key: first.meta[key] if first else None for key in ("model", "n_ctx")})
        slots = sum(int(p.meta.get("total_slots") or 0) for p in parts)
        write.meta["total_slots"] = str(slots) if slots else None
        error = next(((u, r) for u, r in zip(self.upstreams, readings, strict=True) if isinstance(r, scrape.ScrapeError)), None)
        if error is None:
            write.meta.update({"upstream_error": None, "upstream_error_kind": None})
        else:
            state, exc = error
            write.meta.update({"upstream_error": self._named(state, exc),
                               "upstream_error_kind": exc.kind})

    def _came_up(self, state: UpstreamState, now: float, why: str | None, events: list[tuple[str, str]]) -> None:
        if state.down_since is not None:
            log.info("llama-server at %s is back after %.0fs", state.url, now - state.down_since)
            state.down_since = None
        if why == "changed":
            log.warning("another llama-server answers at %s (%s): counting from here, not adding its history",
                        state.url, events[-1][1])
        elif why:
            log.warning("llama-server at %s restarted (%s); counting its counters from 0", state.url, why)
        state.error = None
        state.last_success = now

    def _went_down(self, state: UpstreamState, now: float, error: scrape.ScrapeError) -> None:
        state.errors += 1
        # Once per outage; again only if it turns into a refused key (a loading server that answers
        # 503 and then 401 is a setting to fix, not an outage that ends by itself).
        starts = state.down_since is None or (error.kind == "unauthorized" and state.error is not None
                                              and state.error.kind != error.kind)
        if starts:
            # A refused key is a setting to fix, not a server that will come back by itself.
            level = logging.ERROR if error.kind == "unauthorized" else logging.WARNING
            log.log(level, "llama-server cannot be read: %s (logged once; retrying every %.0fs)",
                    self._named(state, error), self.interval)
        if state.down_since is None:
            state.down_since = now
        state.error = error

    def _named(self, state: UpstreamState, error: scrape.ScrapeError) -> str:
        """An error as a sentence that says which llama-server it is about, when there are several."""
        text = str(error)
        return f"{state.url}: {text}" if self.several and state.url not in text else text

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


SUMMED = ("prompt_tokens", "cached_tokens", "generated_tokens", "prompt_seconds", "generation_seconds")
GAUGES_SUMMED = ("busy_slots", "processing", "deferred")


def _sum_samples(samples: list[dict[str, Any]], urls: list[str], several: bool) -> dict[str, Any]:
    """One sample for all upstreams: counts and gauges added up, speeds and the cache ratio from
    those sums (the tokens of all of them over the seconds of all of them), `up` only if every
    upstream was read, and every slot's context (each named by its upstream when there are several)."""
    if not several:
        return samples[0]
    out: dict[str, Any] = {"up": min(int(s.get("up") or 0) for s in samples)}
    for key in SUMMED:
        out[key] = sum(float(s.get(key) or 0.0) for s in samples)
    for key in GAUGES_SUMMED:
        known = [s[key] for s in samples if s.get(key) is not None]
        out[key] = sum(known) if known else None
    out["prompt_tps"] = out["prompt_tokens"] / out["prompt_seconds"] if out["prompt_seconds"] > 0 else None
    out["generation_tps"] = out["generated_tokens"] / out["generation_seconds"] if out["generation_seconds"] > 0 else None
    seen = out["prompt_tokens"] + out["cached_tokens"]
    out["cache_ratio"] = out["cached_tokens"] / seen if seen > 0 else None
    context = [{**slot, "upstream": url} for s, url in zip(samples, urls, strict=True)
               for slot in json.loads(s.get("context_used") or "[]")]
    out["context_used"] = json.dumps(context)
    return out


def _session(api_key: str) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    # llama-server gives each open connection a thread until it closes or sits idle for 5 s;
    # a connection kept between scrapes 10 s apart would hold one for nothing (see the
    # proxy's upstream.py for what that can cost when many connections arrive at once).
    session.headers["Connection"] = "close"
    if api_key:
        # A llama-server started with --api-key answers /metrics and /slots only with it.
        session.headers["Authorization"] = f"Bearer {api_key}"
    return session
