"""What the collector costs: one scrape of llama-server, the SQLite store's growth, the dashboard API.

`run()` measures three things, each on the collector's own code rather than a re-implementation:

1. **One scrape of a live llama-server** (`scrape_wall_ms_*`, `scrape_cpu_ms_mean`): the exact
   `collector.job.ScrapeJob.run` the scheduler calls every COLLECT_INTERVAL seconds (GET /metrics,
   /slots and /props, parse, compute deltas, one SQLite transaction into a fresh store), run back
   to back. Wall time is what the scheduler thread is busy for; CPU time (`time.process_time`) is
   what the collector takes from a machine whose cores llama-server wants.

2. **Disk** (`sqlite_bytes_per_day`, `sqlite_bytes_month`): 30 simulated days of 10-second scrapes
   of a synthetic llama-server (counters climbing with plausible office-hours traffic, restarts,
   an outage; the synthetic /slots has as many slots, of the same n_ctx, as the live server), with
   `Store.compact` run when production runs it (at start-up, then hourly), timestamps advanced 10 s
   per scrape, no sleeping. The month's size is held to 16 MB (tests/test_collector_logic.py).
   Days 1-3 go through the real `ScrapeJob.run` (a stand-in HTTP session serves the synthetic
   /metrics text; the job module's clock is the simulated one). That path parses a /metrics text
   and commits a transaction per scrape, too slow for a month's 259,200 scrapes in a benchmark;
   days 4-30 therefore batch an hour of scrapes into one transaction, as
   `tests/test_collector_logic.py` does, but with the very rows the job writes (`scrape.deltas`,
   `ScrapeJob._sample`, the same INSERT, lifetime totals through `Store.scrape`). The two
   paths write the same rows in the same order; a side run of days 1-3 through the batched path
   checks that they give the same file sizes (reported in "notes").

3. **The dashboard API with a month of data** (`api_ms`): the collector started the way it runs in
   production (`python -m collector`: gunicorn, one gthread worker, scheduler inside) in a
   subprocess on 127.0.0.1 with the month's database, timed over real HTTP with one
   `requests.Session`, 5 warm-up then 50 timed requests per path.

`python -m bench.collector_bench --llama-url http://127.0.0.1:8080` prints the result as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import random
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a script, a module, or imported by bench/run.py
    sys.path.insert(0, str(ROOT))

from bench.stats import percentile
from collector import job as job_module
from collector import scrape
from collector.job import ScrapeJob
from llamabridge.store import Baselines, ScrapeWrite, Store, UpstreamWrite
from tests.support import processes


def _planned(plan: ScrapeWrite) -> Callable[[Baselines], ScrapeWrite]:
    """A scrape that writes `plan` whatever the store's baseline (the simulation keeps its own)."""
    return lambda baselines: plan


INTERVAL = 10.0  # COLLECT_INTERVAL's default
TICKS_PER_HOUR = int(3600 / INTERVAL)
TICKS_PER_DAY = 24 * TICKS_PER_HOUR
JOB_PATH_DAYS = 3  # days simulated through ScrapeJob.run itself; the rest are batched
MONTH_DAYS = 30
AFTER_MONTH_DAYS = 7  # simulated past day 30 on a copy, to see growth once hourly roll-ups start
API_PATHS = ("/api/totals", "/api/samples?range=1h", "/api/samples?range=24h", "/api/samples?range=30d", "/api/events",
             "/api/requests", "/api/sessions")
API_WARMUP, API_REQUESTS = 5, 50
SIM_URL = "http://llama.sim"  # base URL of the synthetic llama-server (never contacted)
SEED = 20240601


# ---------------------------------------------------------------------------------------- helpers


def _pct(values: list[float], q: float) -> float:
    return round(percentile(values, q), 3)


def _remove_db(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _size(path: Path | str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


# ---------------------------------------------------------------------------------------- 1. scrape


def _bench_scrapes(llama_url: str, workdir: Path, scrapes: int) -> tuple[dict[str, float], list[Any]]:
    """Time ScrapeJob.run against the live llama-server; also return its /slots (the simulation's shape)."""
    path = workdir / "scrape.db"
    _remove_db(path)
    store = Store(path)
    job = ScrapeJob(store, llama_url, INTERVAL)
    try:
        # One unmeasured scrape first, as in a collector's life it happens once: it opens the
        # keep-alive connection and only sets the counter baseline (no deltas yet).
        job.run()
        if not job.up:
            raise RuntimeError(f"cannot scrape llama-server at {llama_url} (is it up, with --metrics?)")
        wall: list[float] = []
        cpu: list[float] = []
        for _ in range(scrapes):
            c0, w0 = time.process_time(), time.perf_counter()
            job.run()
            w1, c1 = time.perf_counter(), time.process_time()
            wall.append((w1 - w0) * 1000)
            cpu.append((c1 - c0) * 1000)
        if job.scrape_errors or not job.up:
            raise RuntimeError(f"{job.scrape_errors} of {scrapes} scrapes of {llama_url} failed")
        live = job.read_upstream(llama_url).slots  # one more read, after the timed ones, for the simulation's shape
        slots = live if isinstance(live, list) else []
    finally:
        job.upstreams[0].session.close()
        store.close()
    return ({"scrape_wall_ms_p50": _pct(wall, 50), "scrape_wall_ms_p99": _pct(wall, 99),
             "scrape_cpu_ms_mean": round(float(np.mean(cpu)), 3)}, slots)


# ---------------------------------------------------------------------------------------- 2. disk


class _Traffic:
    """A synthetic llama-server, one reading per 10-second tick (None: it cannot be reached).

    Deterministic (seeded). Busy in 35 % of the intervals between 08:00 and 20:00 of each simulated
    day and in 3 % otherwise; a busy interval evaluates 0-3,000 prompt tokens, takes 0-30,000 from
    the prompt cache and generates 20-400 tokens on 1-3 slots. llama-server restarts (counters back
    to 0, new Process-Start-Time-Unix) at 14:00 on every third day, and on every seventh day it is
    unreachable for 3 minutes from 03:00 and comes back as a new process.
    """

    RESTART_AT = 14 * TICKS_PER_HOUR
    OUTAGE_AT, OUTAGE_TICKS = 3 * TICKS_PER_HOUR, 18

    def __init__(self, n_slots: int, n_ctx: int, seed: int = SEED):
        self.rng = random.Random(seed)
        self.n_slots, self.n_ctx = n_slots, n_ctx
        self.start_time = 3_700_000_000  # llama-server's header is a clock reading, not a Unix time
        self._restart()

    def _restart(self) -> None:
        self.start_time += 1 + self.rng.randrange(1_000_000)
        self.counters = {name: 0.0 for name in scrape.COUNTERS}

    def reading(self, tick: int) -> scrape.Reading | None:
        day, in_day = divmod(tick, TICKS_PER_DAY)
        if day % 7 == 4 and self.OUTAGE_AT <= in_day < self.OUTAGE_AT + self.OUTAGE_TICKS:
            if in_day == self.OUTAGE_AT + self.OUTAGE_TICKS - 1:
                self._restart()
            return None
        if day % 3 == 1 and in_day == self.RESTART_AT:
            self._restart()
        rng, c = self.rng, self.counters
        busy = rng.random() < (0.35 if 8 <= in_day // TICKS_PER_HOUR < 20 else 0.03)
        active = min(self.n_slots, rng.choices((1, 2, 3), (0.7, 0.2, 0.1))[0]) if busy else 0
        if busy:
            prompt, cached, generated = rng.randint(0, 3000), rng.randint(0, 30000), rng.randint(20, 400)
            c["prompt_tokens_total"] += prompt
            c["prompt_tokens_cached_total"] += cached
            c["prompt_seconds_total"] += prompt / rng.uniform(800, 1600)
            c["tokens_predicted_total"] += generated
            c["tokens_predicted_seconds_total"] += min(9.5, generated / rng.uniform(30, 60))
            c["n_decode_total"] += generated + -(-prompt // 512)
        slots = []
        for i in range(self.n_slots):
            slot: dict[str, Any] = {"id": i, "n_ctx": self.n_ctx, "speculative": False, "is_processing": i < active}
            if i < active:
                slot["n_prompt_tokens"] = rng.randint(200, max(201, int(self.n_ctx * 0.8)))
                slot["next_token"] = [{"has_next_token": True, "n_remain": -1, "n_decoded": rng.randint(1, 400)}]
            slots.append(slot)
        gauges = {
            "prompt_tokens_seconds": c["prompt_tokens_total"] / c["prompt_seconds_total"] if c["prompt_seconds_total"] else 0.0,
            "predicted_tokens_seconds": (c["tokens_predicted_total"] / c["tokens_predicted_seconds_total"]
                                         if c["tokens_predicted_seconds_total"] else 0.0),
            "requests_processing": float(active),
            "requests_deferred": float(busy and rng.random() < 0.05),
            "n_busy_slots_per_decode": float(max(active, 1)),
        }
        props = {"model_alias": "sim-model", "total_slots": self.n_slots,
                 "default_generation_settings": {"n_ctx": self.n_ctx}}
        return scrape.Reading(dict(c), gauges, str(self.start_time), slots, props)


def _metrics_text(reading: scrape.Reading) -> str:
    """The reading as llama-server's /metrics text (floats written exactly: parsing gives them back)."""
    lines = []
    for kind, values in (("counter", reading.counters), ("gauge", reading.gauges)):
        for name, value in values.items():
            lines += [f"# HELP llamacpp:{name} {name}", f"# TYPE llamacpp:{name} {kind}", f"llamacpp:{name} {value!r}"]
    return "\n".join(lines) + "\n"


class _SimResponse:
    def __init__(self, text: str = "", payload: Any = None, headers: dict[str, str] | None = None):
        self.status_code, self.text, self._payload, self.headers = 200, text, payload, headers or {}

    def json(self) -> Any:
        return self._payload


class _SimSession:
    """Stands in for ScrapeJob.session: serves the current synthetic reading, or fails like a
    llama-server that cannot be reached."""

    def __init__(self) -> None:
        self.reading: scrape.Reading | None = None

    def get(self, url: str, timeout: float | None = None) -> _SimResponse:
        reading = self.reading
        if reading is None:
            raise requests.ConnectionError("simulated outage")
        path = url.rsplit("/", 1)[-1]
        if path == "metrics":
            return _SimResponse(_metrics_text(reading), headers={"Process-Start-Time-Unix": reading.process_start or ""})
        return _SimResponse(payload=reading.slots if path == "slots" else reading.props)

    def close(self) -> None:
        pass


class _Simulation:
    """Feeds one store tick by tick, running `Store.compact` when production does: at start-up and
    then hourly. Measures the database after each simulated day.

    What is measured (`sizes`): the main database file plus its -wal file right after
    `PRAGMA wal_checkpoint(TRUNCATE)`, i.e. the main file holding every page (-wal is 0 then, and
    -shm, a 32 KB index rebuilt on open, is left out); the same measure as the test's 16 MB bound.
    Production never truncates the WAL (no journal_size_limit, no TRUNCATE checkpoint), so on disk
    the -wal file also stays at its high-water mark; `wal_max` is the largest -wal seen just
    before a daily checkpoint, which approximates it (auto-checkpoints at 1,000 pages).
    """

    def __init__(self, path: Path, traffic: _Traffic, t0: float):
        self.path, self.traffic, self.t0 = path, traffic, t0
        self.store = Store(path)
        self.tick = 0
        self.sizes: list[int] = []  # after day 1, 2, ...
        self.wal_max = 0
        # The job's state, kept here for the batched path and handed over from the job path.
        self.last_raw: dict[str, float] = {}
        self.process_start: str | None = None
        self.down_since: float | None = None

    def now(self, tick: int) -> float:
        return self.t0 + tick * INTERVAL

    def _hour_start(self) -> None:
        if self.tick % TICKS_PER_HOUR == 0:  # the retention job: first run at start-up, then every hour
            self.store.compact(self.now(self.tick))

    def _day_end(self) -> None:
        if self.tick % TICKS_PER_DAY == 0:
            self.wal_max = max(self.wal_max, _size(f"{self.path}-wal"))
            with self.store.lock:
                self.store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.sizes.append(_size(self.path) + _size(f"{self.path}-wal"))

    def run_job(self, days: int) -> None:
        """Through ScrapeJob.run itself: one /metrics text parsed and one transaction per scrape."""
        clock = {"now": 0.0}
        job = ScrapeJob(self.store, SIM_URL, INTERVAL, clock=lambda: clock["now"])
        session = _SimSession()
        job.upstreams[0].session.close()
        # A stand-in, not a requests.Session: scrape.read only calls get() on it, and ScrapeJob
        # types its session as the real one.
        job.upstreams[0].session = session  # type: ignore[assignment]
        job.upstreams[0].down_since = self.down_since
        for _ in range(days * TICKS_PER_DAY):
            self._hour_start()
            session.reading = self.traffic.reading(self.tick)
            clock["now"] = self.now(self.tick)
            job.run()
            self.tick += 1
            self._day_end()
        job.stop()  # the lease, for the next simulation on a copy of this store
        self.last_raw = self.store.last_raw(SIM_URL)
        self.process_start = self.store.upstream_meta(SIM_URL)[SIM_URL].get("process_start")
        self.down_since = job.upstreams[0].down_since

    def run_batched(self, days: int) -> None:
        """An hour of scrapes per transaction: the job's decisions and rows, without its per-scrape
        /metrics parse and commit (the fast way tests/test_collector_logic.py fills a month)."""
        for _ in range(days * 24):
            self._hour_start()
            samples: list[tuple[float, dict[str, Any]]] = []
            events: list[tuple[float, str, str]] = []
            advanced_sum: dict[str, float] = {}
            meta: dict[str, str] = {}
            for _ in range(TICKS_PER_HOUR):
                now = self.now(self.tick)
                reading = self.traffic.reading(self.tick)
                self.tick += 1
                if reading is None:  # as ScrapeJob._down: one event when the outage starts, a row per scrape
                    if self.down_since is None:
                        self.down_since = now
                        events.append((now, "outage", f"llama-server unreachable at {SIM_URL}: ConnectionError"))
                    samples.append((now, {"up": 0}))
                    continue
                if self.down_since is not None:
                    events.append((now, "recovered", f"after {now - self.down_since:.0f}s"))
                    self.down_since = None
                why = scrape.restart_reason(self.last_raw, reading.counters, self.process_start, reading.process_start)
                if why:
                    events.append((now, "restart", why))
                advanced = scrape.deltas(self.last_raw, reading.counters, restarted=why is not None)
                for name, value in advanced.items():
                    advanced_sum[name] = advanced_sum.get(name, 0.0) + value
                self.last_raw = dict(reading.counters)
                self.process_start = reading.process_start
                settings = reading.props.get("default_generation_settings") or {}
                meta = {"last_scrape": repr(now), "process_start": reading.process_start or "",
                        "model": str(reading.props.get("model_alias") or ""), "n_ctx": str(settings.get("n_ctx") or ""),
                        "total_slots": str(reading.props.get("total_slots") or "")}
                samples.append((now, ScrapeJob._sample(advanced, reading)))
            store = self.store
            with store.lock:
                store.db.execute("BEGIN IMMEDIATE")
                try:
                    # Store.scrape's INSERT, once per run of rows with the same columns, in scrape order.
                    for columns, run in itertools.groupby(samples, key=lambda s: tuple(s[1])):
                        store.db.executemany(
                            f"INSERT INTO samples (ts, {', '.join(columns)}) VALUES (?, {', '.join('?' * len(columns))})",
                            [(ts, *sample.values()) for ts, sample in run])
                    store.db.executemany("INSERT INTO events (ts, kind, detail, upstream) VALUES (?, ?, ?, ?)",
                                         [(*event, SIM_URL) for event in events])
                    store.db.execute("COMMIT")
                except BaseException:
                    store.db.execute("ROLLBACK")
                    raise
            if meta:  # lifetime totals and their baseline, as the job writes them (once an hour here)
                upstream_meta: dict[str, str | None] = {**meta}
                store_meta: dict[str, str | None] = {k: v for k, v in meta.items() if k != "process_start"}
                plan = ScrapeWrite({SIM_URL: UpstreamWrite(advanced_sum, self.last_raw, meta=upstream_meta)}, meta=store_meta)
                store.scrape("bench", float(meta["last_scrape"]), 3600, _planned(plan))
                store.release_lease("bench")  # a collector started on this store later must not stand by
            self._day_end()

    def copy_to(self, path: Path) -> _Simulation:
        """A copy of the database (SQLite's backup API, page for page) to go on simulating."""
        _remove_db(path)
        with self.store.lock, sqlite3.connect(str(path)) as target:
            self.store.db.backup(target)
        target.close()
        other = _Simulation(path, self.traffic, self.t0)
        other.tick, other.sizes, other.wal_max = self.tick, list(self.sizes), self.wal_max
        other.last_raw, other.process_start, other.down_since = dict(self.last_raw), self.process_start, self.down_since
        return other

    def close(self) -> None:
        self.store.close()


def _quiet(fn: Callable[[], Any]) -> Any:
    """Run fn with the job's restart/outage warnings silenced (the simulation has dozens)."""
    logger = logging.getLogger(job_module.log.name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return fn()
    finally:
        logger.setLevel(level)


# ---------------------------------------------------------------------------------------- 3. API


def _bench_api(llama_url: str, db_path: Path, notes: list[str]) -> dict[str, dict[str, float]]:
    # The collector as the test suite starts it (tests/support/processes.py): gunicorn, its own
    # process group, stopped by its own PID. The product's scrape interval, not someone's .env.
    os.environ.setdefault("LLAMABRIDGE_ENV_FILE", os.devnull)
    session = requests.Session()
    session.trust_env = False
    with processes.collector(llama_url, str(db_path), interval=INTERVAL) as collector:
        base = collector.url
        # Timed once the first scheduled scrape has run (it starts at once, with the start-up
        # compaction), so the timings below are not of a collector still starting.
        deadline = time.monotonic() + 60
        while not session.get(base + "/healthz", timeout=2).json().get("upstream_up"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the collector never read llama-server:\n{collector.log_text()[-3000:]}")
            time.sleep(0.05)

        results: dict[str, dict[str, float]] = {}
        for path in API_PATHS:
            times = []
            for i in range(API_WARMUP + API_REQUESTS):
                t0 = time.perf_counter()
                resp = session.get(base + path, timeout=30)
                body = resp.content
                elapsed = (time.perf_counter() - t0) * 1000
                if resp.status_code != 200:
                    raise RuntimeError(f"GET {path} answered HTTP {resp.status_code}: {body[:300]!r}")
                if i >= API_WARMUP:
                    times.append(elapsed)
            results[path] = {"p50": _pct(times, 50), "p99": _pct(times, 99)}

        # What the charts get: the newest points of each range, one per bucket (llamabridge/api.py RANGES).
        newest = session.get(base + "/api/totals", timeout=30).json()["now"]["ts"]
        for name in ("1h", "24h", "30d"):
            resp = session.get(f"{base}/api/samples?range={name}", timeout=30)
            rows = resp.json()["samples"]
            if rows:
                resolutions = sorted({r["resolution"] for r in rows})
                notes.append(f"/api/samples?range={name}: {len(rows)} rows ({len(resp.content) / 1e6:.2f} MB of JSON), "
                             f"resolutions {resolutions} s, from {(newest - rows[0]['ts']) / 3600:.1f} h to "
                             f"{(newest - rows[-1]['ts']) / 3600:.1f} h before the newest sample")
        notes.append("/api/requests and /api/sessions read the proxy's request log, which a collector-only month "
                     "leaves empty: their timings are the app's fixed cost")
    session.close()
    return results


# ---------------------------------------------------------------------------------------- run


def run(llama_url: str, workdir: Path, scrapes: int = 200) -> dict:
    """Measure the collector (see the module docstring). `workdir` receives the databases and the
    collector's log; `llama_url` is a live llama-server started with --metrics."""
    llama_url = llama_url.rstrip("/")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    result: dict[str, Any] = {}

    # 1. One scrape of the live server.
    scrape_stats, live_slots = _bench_scrapes(llama_url, workdir, scrapes)
    result.update(scrape_stats)
    n_slots = len(live_slots) or 1
    n_ctx = int((live_slots[0].get("n_ctx") if live_slots else None) or 4096)
    notes.append(f"scrape: {scrapes} back-to-back ScrapeJob.run calls against {llama_url} into a fresh store, after "
                 f"one unmeasured scrape that sets the baseline; the server's /metrics, /slots ({len(live_slots)} slots) "
                 f"and /props are read each time")

    # 2. A simulated month. It ends now, so the API's 1h/24h/30d windows see it as live data.
    started = time.perf_counter()
    t0 = float(int(time.time())) - MONTH_DAYS * 86400
    month_path = workdir / "month.db"
    _remove_db(month_path)
    sim = _Simulation(month_path, _Traffic(n_slots, n_ctx), t0)
    after: _Simulation | None = None
    try:
        _quiet(lambda: sim.run_job(JOB_PATH_DAYS))
        sim.run_batched(MONTH_DAYS - JOB_PATH_DAYS)
        after = sim.copy_to(workdir / "after-month.db")
    finally:
        sim.close()
    sizes = sim.sizes
    with sqlite3.connect(str(month_path)) as db:
        rows = dict(db.execute("SELECT resolution, COUNT(*) FROM samples GROUP BY resolution").fetchall())
        page_size, freelist = db.execute("PRAGMA page_size").fetchone()[0], db.execute("PRAGMA freelist_count").fetchone()[0]
        events = db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    db.close()
    # Retention keeps every scrape for 48 h, then one row a minute until 30 days, then one an hour.
    # Days 1-2 therefore add a full day of 10 s rows each; from day 3 on the 10 s rows stay at ~48 h
    # (each hour's compaction rolls the oldest hour into minute rows, whose freed pages the new
    # scrapes reuse) and the file grows by one day of minute rows a day. That is the growth a store
    # sees for most of its first month, and what its size at 30 days is made of, so the per-day
    # figure is the mean daily growth over days 3-30: (size after day 30 - size after day 2) / 28.
    # After day 30 minute rows become hourly ones and growth nearly stops (simulated below, in notes).
    result["sqlite_bytes_per_day"] = round(float((sizes[MONTH_DAYS - 1] - sizes[1]) / (MONTH_DAYS - 2)), 0)
    result["sqlite_bytes_month"] = float(sizes[MONTH_DAYS - 1])
    mb = lambda n: f"{n / 1e6:.2f}"
    notes.append(f"disk: {MONTH_DAYS} days of 10 s scrapes (days 1-{JOB_PATH_DAYS} through ScrapeJob.run, the rest batched "
                 f"an hour per transaction with the same rows), Store.compact hourly; synthetic llama-server with "
                 f"{n_slots} slots of n_ctx {n_ctx} like the live one, busy 35% of 08-20 h and 3% otherwise, a restart "
                 f"every 3rd day and a 3-minute outage every 7th; simulated in {time.perf_counter() - started:.0f} s")
    notes.append(f"sizes are main file + -wal after PRAGMA wal_checkpoint(TRUNCATE) (-shm excluded); MB after days "
                 f"1, 2, 3, 10, 20, 30: {', '.join(mb(sizes[d - 1]) for d in (1, 2, 3, 10, 20, 30))}; "
                 f"at 30 days: {rows.get(0, 0)} 10 s rows, {rows.get(60, 0)} minute rows, {events} events, "
                 f"{freelist} free pages of {page_size} B")
    notes.append(f"production never truncates the WAL, so on disk add the -wal high-water mark: {mb(sim.wal_max)} MB "
                 f"(largest -wal seen before a daily checkpoint)")

    # 3. The dashboard API on the month's database (before the post-month simulation, so its data ends now).
    try:
        result["api_ms"] = _bench_api(llama_url, month_path, notes)
    except BaseException:
        if after is not None:
            after.close()
        raise

    # Past 30 days, on a copy: minute rows older than 30 days become hourly ones.
    assert after is not None
    try:
        after.run_batched(AFTER_MONTH_DAYS)
    finally:
        after.close()
    # Day 31 still frees and refills pages while the first minute rows turn hourly; from day 32 on
    # only hourly rows accumulate (growth a few pages a day, so it is averaged over several days).
    first = after.sizes[MONTH_DAYS] - after.sizes[MONTH_DAYS - 1]
    growth = (after.sizes[-1] - after.sizes[MONTH_DAYS]) / (AFTER_MONTH_DAYS - 1)
    notes.append(f"past 30 days (days 31-{MONTH_DAYS + AFTER_MONTH_DAYS} simulated on a copy): day 31 adds "
                 f"{first / 1e3:.1f} kB, then {growth / 1e3:.1f} kB/day (only hourly rows accumulate)")
    _remove_db(after.path)

    # Check the batched path against the job path: days 1-3 again, batched, from the same seed.
    check = _Simulation(workdir / "check.db", _Traffic(n_slots, n_ctx), t0)
    try:
        check.run_batched(JOB_PATH_DAYS)
    finally:
        check.close()
    _remove_db(check.path)
    same = check.sizes == sizes[:JOB_PATH_DAYS]
    notes.append("batched path check: days 1-3 batched give " + ("the same sizes as through ScrapeJob.run" if same else
                 f"sizes {check.sizes} where ScrapeJob.run gave {sizes[:JOB_PATH_DAYS]}"))

    result["notes"] = notes
    ordered = ("scrape_wall_ms_p50", "scrape_wall_ms_p99", "scrape_cpu_ms_mean", "sqlite_bytes_per_day", "sqlite_bytes_month",
               "api_ms", "notes")
    return {key: result[key] for key in ordered}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-url", required=True, help="a live llama-server started with --metrics")
    parser.add_argument("--scrapes", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="collector-bench-") as work:
        print(json.dumps(run(args.llama_url, Path(work), args.scrapes), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
