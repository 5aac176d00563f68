"""Forty days of a stack left running, through the real store and scrape job on real SQLite,
with the clock injected: traffic every day, hourly compaction with a 30-day request log, two
llama-server restarts, a collector restart, and collectors killed with SIGKILL at random points
of their writes. Every lifetime counter the collector exports must be non-decreasing at every
scrape (Prometheus reads any fall as a counter reset), and end equal to what was served.

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

from collector import scrape
from collector.exporter import StoreCollector
from collector.job import ScrapeJob
from llamabridge.store import Retention, Store

ROOT = Path(__file__).resolve().parents[1]
INTERVAL = 600.0  # one scrape per simulated 10 minutes: 144 a day
TICKS_PER_DAY = 144
DAYS = 40
T0 = 1_790_000_000.0
RESTARTS = {10 * TICKS_PER_DAY + 7, 25 * TICKS_PER_DAY + 100}  # ticks at which llama-server starts anew
MODEL = {"model_path": "/models/coder.gguf", "build_info": "b11434-abc", "total_slots": 1,
         "default_generation_settings": {"n_ctx": 32768}}
KILL_SPAN = 3 * TICKS_PER_DAY
RETENTION = Retention(requests_days=30, raw_hours=48, minute_days=30)


def served(tick: int) -> dict[str, float]:
    """What llama-server serves during `tick` (the same in every process)."""
    rng = random.Random(tick)
    prompt, cached, generated = rng.randrange(0, 400), rng.randrange(0, 3000), rng.randrange(0, 300)
    return {"prompt_tokens_total": prompt, "prompt_tokens_cached_total": cached, "tokens_predicted_total": generated,
            "prompt_seconds_total": prompt / 800, "tokens_predicted_seconds_total": generated / 40,
            "n_decode_total": generated + (1 if prompt else 0)}


@functools.lru_cache(maxsize=1)
def _cumulative() -> list[tuple[float, ...]]:
    sums, running = [], (0.0,) * len(served(0))
    for tick in range(DAYS * TICKS_PER_DAY + 1):
        running = tuple(a + b for a, b in zip(running, served(tick).values()))
        sums.append(running)
    return sums


def served_through(tick: int) -> tuple[float, ...]:
    """Everything served in ticks 0..tick, counter by counter (in served()'s order)."""
    return _cumulative()[tick]


def process_of(tick: int) -> int:
    """The tick at which the llama-server process running at `tick` started."""
    return max([0, *(r for r in RESTARTS if r <= tick)])


def reading(tick: int) -> scrape.Reading:
    """What /metrics says at the end of `tick`: everything this process served since it started."""
    start = process_of(tick)
    before = served_through(start - 1) if start > 0 else (0.0,) * len(served(0))
    counters = {name: now - then for name, now, then in zip(served(0), served_through(tick), before)}
    return scrape.Reading(counters, {"requests_processing": 0.0, "requests_deferred": 0.0}, f"{start * 1000 + 17}",
                          [], MODEL)


class SimulatedJob(ScrapeJob):
    """The real ScrapeJob, reading the simulated llama-server at the clock's tick instead of over HTTP."""

    def __init__(self, store: Store, clock: dict):
        super().__init__(store, "http://llama.invalid:8080", INTERVAL, clock=lambda: T0 + clock["tick"] * INTERVAL)
        self.ticks = clock

    def read_upstream(self) -> scrape.Reading:
        return reading(self.ticks["tick"])


def job_at(store: Store, clock: dict) -> ScrapeJob:
    return SimulatedJob(store, clock)


def run_ticks(db: str, first: int, last: int) -> None:
    """A collector process scraping ticks first..last as fast as it can, printing each tick it has
    scraped, then waiting to be killed (its parent kills it somewhere in its writes, at a point it
    picks from these lines rather than from a clock, so a fast machine cannot finish first)."""
    _cumulative()  # before the writes begin
    store = Store(db)
    clock = {"tick": first}
    job = job_at(store, clock)
    for tick in range(first, last + 1):
        clock["tick"] = tick
        if tick % 6 == 0:
            store.compact(T0 + tick * INTERVAL, RETENTION)
        job.run()
        print(tick, flush=True)
    sys.stdin.read()  # until killed


def exported(collector: StoreCollector) -> dict[str, float]:
    return {sample.name: sample.value for family in collector.collect() if family.type == "counter"
            and family.name.startswith("llamabridge_lifetime") for sample in family.samples}


def test_forty_days_of_lifetime_counters_never_fall_and_add_up(tmp_path):
    db = str(tmp_path / "store.db")
    store = Store(db)
    clock = {"tick": 0}
    job = job_at(store, clock)
    rng = random.Random(30)
    # Three kills, each in a span of KILL_SPAN ticks clear of llama-server's restarts (a restart the
    # killed collector never saw would lose, to polling, what the old process served after its
    # last scrape: true of a real collector too, and not what this test measures).
    kills = sorted(rng.sample([t for t in range(5 * TICKS_PER_DAY, 35 * TICKS_PER_DAY)
                               if not any(t <= r <= t + KILL_SPAN + 1 for r in RESTARTS)], 3))
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
        assert job.up, tick
        check()
        if tick == collector_restart:  # a collector restart: stopped, a new one on the store
            job.stop()
            job = job_at(store, clock)
        if kills and tick == kills[0]:
            kills.pop(0)
            # Another collector process takes the store and is killed in the middle of its
            # scrapes and compactions; this one resumes after it from whatever it committed.
            job.stop()
            first, end = tick + 1, tick + KILL_SPAN
            child = subprocess.Popen([sys.executable, "-c", ("from tests.test_lifetime_simulation import run_ticks; "
                                                             f"run_ticks({db!r}, {first}, {end})")], cwd=ROOT, stdin=subprocess.PIPE,
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
            job = job_at(store, clock)
            tick = end
            continue
        tick += 1
    assert checks >= DAYS * TICKS_PER_DAY - 3 * KILL_SPAN

    # Everything llama-server served after the first scrape (which only sets the baseline), each
    # process counted to its last reading; every request.
    totals = {name: 0.0 for name in served(0)}
    for t in range(1, DAYS * TICKS_PER_DAY):
        for name, value in served(t).items():
            totals[name] += value
    assert last["llamabridge_lifetime_prompt_tokens_total"] == totals["prompt_tokens_total"]
    assert last["llamabridge_lifetime_cached_prompt_tokens_total"] == totals["prompt_tokens_cached_total"]
    assert last["llamabridge_lifetime_generated_tokens_total"] == totals["tokens_predicted_total"]
    assert last["llamabridge_lifetime_decode_calls_total"] == totals["n_decode_total"]
    assert abs(last["llamabridge_lifetime_generation_seconds_total"] - totals["tokens_predicted_seconds_total"]) < 1e-6
    assert last["llamabridge_lifetime_requests_total"] == requests_sent
    assert (last["llamabridge_lifetime_request_prompt_tokens_total"] + last["llamabridge_lifetime_request_generated_tokens_total"]
            == request_tokens)
    assert last["llamabridge_lifetime_upstream_restarts_total"] == len(RESTARTS)
    # Retention did its work under those counters: ten days of request rows and of fine samples are gone.
    kept = sqlite3.connect(db).execute("SELECT COUNT(*), MIN(ts) FROM requests").fetchone()
    assert kept[0] < requests_sent and kept[1] >= T0 + (DAYS - 30) * 86400 - 3600 - INTERVAL  # compacted hourly
    resolutions = dict(sqlite3.connect(db).execute("SELECT resolution, COUNT(*) FROM samples GROUP BY resolution").fetchall())
    assert set(resolutions) == {0, 60, 3600} and resolutions[0] <= 48 * 6 + 6
