"""Forty days of a stack left running, through the real store and scrape job on real SQLite,
with the clock injected: traffic every day, hourly compaction with a 30-day request log, two
llama-server restarts, a collector restart, and collectors killed with SIGKILL at random points
of their writes. Every lifetime counter the collector exports must be non-decreasing at every
scrape (Prometheus reads any fall as a counter reset), and end equal to what was served.

The same with two llama-servers in LLAMA_URL, each restarting at its own times and the second
down for a while: each one's totals end equal to what it served, and the sums to both.

llama-server is simulated here (what /metrics would say at each moment, as a scrape.Reading):
its counters are a function of time, so a collector in another process, killed at any moment,
and this one after it agree on what the server has served.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from collector import scrape
from collector.exporter import StoreCollector
from collector.job import ScrapeJob
from llamabridge.store import Retention, Store

ROOT = Path(__file__).resolve().parents[1]
INTERVAL = 600.0  # one scrape per simulated 10 minutes: 144 a day
TICKS_PER_DAY = 144
DAYS = 40
T0 = 1_790_000_000.0
URLS = ("http://llama-a.invalid:8080", "http://llama-b.invalid:8080")
# Ticks at which each llama-server starts anew.
RESTARTS = ({10 * TICKS_PER_DAY + 7, 25 * TICKS_PER_DAY + 100}, {15 * TICKS_PER_DAY + 40, 31 * TICKS_PER_DAY + 3})
# Ticks at which the second cannot be read (its process keeps running and counting).
OUTAGE = range(20 * TICKS_PER_DAY, 20 * TICKS_PER_DAY + 30)
MODEL = {"model_path": "/models/coder.gguf", "build_info": "b11434-abc", "total_slots": 1,
         "default_generation_settings": {"n_ctx": 32768}}
KILL_SPAN = 3 * TICKS_PER_DAY
RETENTION = Retention(requests_days=30, raw_hours=48, minute_days=30)


def served(tick: int, upstream: int = 0) -> dict[str, float]:
    """What llama-server `upstream` serves during `tick` (the same in every process)."""
    rng = random.Random(tick if upstream == 0 else f"{upstream}:{tick}")
    prompt, cached, generated = rng.randrange(0, 400), rng.randrange(0, 3000), rng.randrange(0, 300)
    return {"prompt_tokens_total": prompt, "prompt_tokens_cached_total": cached, "tokens_predicted_total": generated,
            "prompt_seconds_total": prompt / 800, "tokens_predicted_seconds_total": generated / 40,
            "n_decode_total": generated + (1 if prompt else 0)}


@functools.lru_cache(maxsize=2)
def _cumulative(upstream: int) -> list[tuple[float, ...]]:
    sums, running = [], (0.0,) * len(served(0))
    for tick in range(DAYS * TICKS_PER_DAY + 1):
        running = tuple(a + b for a, b in zip(running, served(tick, upstream).values()))
        sums.append(running)
    return sums


def served_through(tick: int, upstream: int) -> tuple[float, ...]:
    """Everything served in ticks 0..tick, counter by counter (in served()'s order)."""
    return _cumulative(upstream)[tick]


def process_of(tick: int, upstream: int) -> int:
    """The tick at which the llama-server process running at `tick` started."""
    return max([0, *(r for r in RESTARTS[upstream] if r <= tick)])


def reading(tick: int, upstream: int = 0) -> scrape.Reading:
    """What /metrics says at the end of `tick`: everything this process served since it started."""
    if upstream == 1 and tick in OUTAGE:
        raise scrape.ScrapeError(f"llama-server unreachable at {URLS[upstream]}: ConnectionError", "unreachable")
    start = process_of(tick, upstream)
    before = served_through(start - 1, upstream) if start > 0 else (0.0,) * len(served(0))
    counters = {name: now - then for name, now, then in zip(served(0), served_through(tick, upstream), before)}
    return scrape.Reading(counters, {"requests_processing": 0.0, "requests_deferred": 0.0},
                          f"{start * 1000 + 17 + upstream}", [], MODEL)


class SimulatedJob(ScrapeJob):
    """The real ScrapeJob, reading the simulated llama-servers at the clock's tick instead of over HTTP."""

    def __init__(self, store: Store, clock: dict, upstreams: int):
        super().__init__(store, URLS[:upstreams], INTERVAL, clock=lambda: T0 + clock["tick"] * INTERVAL)
        self.ticks = clock

    def read_upstream(self, url: str) -> scrape.Reading:
        return reading(self.ticks["tick"], URLS.index(url))


def job_at(store: Store, clock: dict, upstreams: int) -> ScrapeJob:
    return SimulatedJob(store, clock, upstreams)


def run_ticks(db: str, first: int, last: int, upstreams: int) -> None:
    """A collector process scraping ticks first..last as fast as it can, printing each tick it has
    scraped, then waiting to be killed (its parent kills it somewhere in its writes, at a point it
    picks from these lines rather than from a clock, so a fast machine cannot finish first)."""
    for upstream in range(upstreams):
        _cumulative(upstream)  # before the writes begin
    store = Store(db)
    clock = {"tick": first}
    job = job_at(store, clock, upstreams)
    for tick in range(first, last + 1):
        clock["tick"] = tick
        if tick % 6 == 0:
            store.compact(T0 + tick * INTERVAL, RETENTION)
        job.run()
        print(tick, flush=True)
    sys.stdin.read()  # until killed


def exported(collector: StoreCollector) -> dict[str, float]:
    """Every lifetime counter, a per-upstream one as `name{url}`."""
    return {sample.name + (f"{{{sample.labels['upstream']}}}" if "upstream" in sample.labels else ""): sample.value
            for family in collector.collect() if family.type == "counter" and "lifetime" in family.name
            for sample in family.samples}


@pytest.mark.parametrize("upstreams", [1, 2])
def test_forty_days_of_lifetime_counters_never_fall_and_add_up(tmp_path, upstreams):
    db = str(tmp_path / "store.db")
    store = Store(db)
    clock = {"tick": 0}
    job = job_at(store, clock, upstreams)
    rng = random.Random(30)
    # Three kills, each in a span of KILL_SPAN ticks clear of llama-server's restarts (a restart the
    # killed collector never saw would lose, to polling, what the old process served after its
    # last scrape: true of a real collector too, and not what this test measures).
    restarts = set().union(*RESTARTS[:upstreams])
    kills = sorted(rng.sample([t for t in range(5 * TICKS_PER_DAY, 35 * TICKS_PER_DAY)
                               if not any(t <= r <= t + KILL_SPAN + 1 for r in restarts)], 3))
    collector_restart = 3 * TICKS_PER_DAY + 50
    last: dict[str, float] = {}
    requests_sent = request_tokens = 0
    checks = 0

    def check() -> None:
        nonlocal last, checks
        now = exported(StoreCollector(store, job))
        falls = {name: (last[name], value) for name, value in now.items() if name in last and value < last[name]}
        assert not falls, (clock["tick"], falls)
        last, checks = now, checks + 1

    tick = 0
    while tick < DAYS * TICKS_PER_DAY:
        clock["tick"] = tick
        if tick % 6 == 0:  # the hourly retention job
            store.compact(T0 + tick * INTERVAL, RETENTION)
        # The proxy's request log: a few requests in this tick, with their tokens.
        rows = [{"ts": T0 + tick * INTERVAL - i, "route": "/v1/messages", "class": "main", "status": 200,
                 "prompt_tokens": rng.randrange(50), "cached_tokens": 0, "generated_tokens": rng.randrange(20)}
                for i in range(rng.randrange(1, 4))]
        store.add_requests(rows)
        requests_sent += len(rows)
        request_tokens += sum(r["prompt_tokens"] + r["generated_tokens"] for r in rows)
        job.run()
        assert job.up == (upstreams == 1 or tick not in OUTAGE), tick
        check()
        if tick == collector_restart:  # a collector restart: stopped, a new one on the store
            job.stop()
            job = job_at(store, clock, upstreams)
        if kills and tick == kills[0]:
            kills.pop(0)
            # Another collector process takes the store and is killed in the middle of its
            # scrapes and compactions; this one resumes after it from whatever it committed.
            job.stop()
            first, end = tick + 1, tick + KILL_SPAN
            child = subprocess.Popen([sys.executable, "-c", ("from tests.test_lifetime_simulation import run_ticks; "
                                                             f"run_ticks({db!r}, {first}, {end}, {upstreams})")], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
            # Killed once it reports a tick picked at random: by then it is in the writes of the
            # next one (or in the compaction before them).
            target = rng.randrange(first, end - 1)
            try:
                while (line := child.stdout.readline()) and int(line) < target:
                    pass
                assert line, f"the collector process died before tick {target} (exit {child.poll()})"
            finally:
                os.kill(child.pid, signal.SIGKILL)
                child.wait()
                child.stdin.close()
                child.stdout.close()
            assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            check()  # what it committed, nothing less than before
            assert store.meta("last_scrape") and float(store.meta("last_scrape")) > T0 + tick * INTERVAL, "it wrote nothing"
            job = job_at(store, clock, upstreams)
            tick = end
            continue
        tick += 1
    assert checks >= DAYS * TICKS_PER_DAY - 3 * KILL_SPAN

    # Everything each llama-server served after the first scrape (which only sets the baseline),
    # each process counted to its last reading; every request.
    served_by = []
    for u in range(upstreams):
        totals = {name: 0.0 for name in served(0)}
        for t in range(1, DAYS * TICKS_PER_DAY):
            for name, value in served(t, u).items():
                totals[name] += value
        served_by.append(totals)
    for name, source in (("prompt_tokens", "prompt_tokens_total"), ("cached_prompt_tokens", "prompt_tokens_cached_total"),
                         ("generated_tokens", "tokens_predicted_total"), ("decode_calls", "n_decode_total")):
        assert last[f"llamabridge_lifetime_{name}_total"] == sum(totals[source] for totals in served_by), name
        for url, totals in zip(URLS, served_by):
            assert last[f"llamabridge_upstream_lifetime_{name}_total{{{url}}}"] == totals[source], (name, url)
    assert abs(last["llamabridge_lifetime_generation_seconds_total"]
               - sum(totals["tokens_predicted_seconds_total"] for totals in served_by)) < 1e-6
    assert last["llamabridge_lifetime_requests_total"] == requests_sent
    assert (last["llamabridge_lifetime_request_prompt_tokens_total"] + last["llamabridge_lifetime_request_generated_tokens_total"]
            == request_tokens)
    assert last["llamabridge_lifetime_upstream_restarts_total"] == len(restarts)
    for url, times in zip(URLS[:upstreams], RESTARTS):
        assert last[f"llamabridge_upstream_lifetime_restarts_total{{{url}}}"] == len(times)
    # Retention did its work under those counters: ten days of request rows and of fine samples are gone.
    kept = sqlite3.connect(db).execute("SELECT COUNT(*), MIN(ts) FROM requests").fetchone()
    assert kept[0] < requests_sent and kept[1] >= T0 + (DAYS - 30) * 86400 - 3600 - INTERVAL  # compacted hourly
    resolutions = dict(sqlite3.connect(db).execute("SELECT resolution, COUNT(*) FROM samples GROUP BY resolution").fetchall())
    # Per scrape one row for all upstreams, and with several one more for each.
    assert set(resolutions) == {0, 60, 3600} and resolutions[0] <= (48 * 6 + 6) * (1 if upstreams == 1 else 1 + upstreams)
