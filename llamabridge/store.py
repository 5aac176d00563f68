"""The SQLite store shared by the collector and the proxy: lifetime totals, samples, events,
and the proxy's request log.

WAL mode, so the proxy's request-log writes, the collector's scrapes and the dashboard's reads
do not block each other. The schema is a list of ordered, named migrations recorded in
`_migrations` (each runs once, in order, inside a transaction).

The invariant that makes lifetime totals exact: a total and the raw counter value it was last
advanced from are written in the same transaction, so a crash at any moment leaves the pair
consistent and the next scrape neither loses nor double-counts. The same holds for everything
exported as a lifetime counter: request totals are running totals advanced in the transaction
that adds the request rows (never a COUNT over rows that retention deletes), and the baseline a
scrape is measured against is read inside the transaction that advances it.

One collector writes the lifetime totals at a time: each scrape's transaction renews a lease
in the store (`lease`), and a collector that finds another's lease still running stands by.

LLAMA_URL may list several llama-servers. Each has its own totals and baseline
(`upstream_lifetime`, `upstream_meta`, keyed by its URL), and `lifetime` holds their sum: a scrape
advances an upstream's total and the sum by the same amount in the same transaction, so the sum
is always exactly what the upstreams' totals add up to, whichever of them were read.

Two connections per process: writes go through one, behind a lock; reads (the dashboard's JSON,
`/metrics`) through another, so a read never waits behind a long write (WAL lets a reader see
the last committed state while a writer works).
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamabridge.settings import env_float

MIGRATIONS: list[tuple[str, Callable[[sqlite3.Connection], None]]] = []

# A bucket of samples as one: counts summed, speeds and the cache ratio from those sums (not an
# average of per-scrape ratios), gauges averaged, `up` only if up throughout.
BUCKET_COLUMNS = """MIN(up), SUM(prompt_tokens), SUM(cached_tokens), SUM(generated_tokens), SUM(prompt_seconds),
    SUM(generation_seconds),
    CASE WHEN SUM(prompt_seconds) > 0 THEN SUM(prompt_tokens) / SUM(prompt_seconds) END,
    CASE WHEN SUM(generation_seconds) > 0 THEN SUM(generated_tokens) / SUM(generation_seconds) END,
    AVG(busy_slots), AVG(processing), AVG(deferred),
    CASE WHEN SUM(prompt_tokens) + SUM(cached_tokens) > 0
         THEN 1.0 * SUM(cached_tokens) / (SUM(prompt_tokens) + SUM(cached_tokens)) END"""
SERIES_COLUMNS = ("up", "prompt_tokens", "cached_tokens", "generated_tokens", "prompt_seconds", "generation_seconds",
                  "prompt_tps", "generation_tps", "busy_slots", "processing", "deferred", "cache_ratio")


def migration(fn: Callable[[sqlite3.Connection], None]) -> Callable[[sqlite3.Connection], None]:
    MIGRATIONS.append((fn.__name__, fn))
    return fn


def _run(db: sqlite3.Connection, script: str) -> None:
    """Execute `;`-separated statements inside the caller's transaction (sqlite3's
    executescript would commit it first)."""
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


@migration
def m001_initial(db: sqlite3.Connection) -> None:
    _run(
        db,
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        -- One row per llama-server counter: the lifetime total, and the raw value last seen.
        CREATE TABLE lifetime (
            name TEXT PRIMARY KEY,
            total REAL NOT NULL DEFAULT 0,
            last_raw REAL,
            updated_at REAL NOT NULL
        );
        -- One row per scrape (resolution 0), rolled up into per-minute (60) and per-hour (3600) rows.
        CREATE TABLE samples (
            ts REAL NOT NULL,
            resolution INTEGER NOT NULL DEFAULT 0,
            up INTEGER NOT NULL,
            prompt_tokens REAL NOT NULL DEFAULT 0,
            cached_tokens REAL NOT NULL DEFAULT 0,
            generated_tokens REAL NOT NULL DEFAULT 0,
            prompt_seconds REAL NOT NULL DEFAULT 0,
            generation_seconds REAL NOT NULL DEFAULT 0,
            prompt_tps REAL,
            generation_tps REAL,
            busy_slots REAL,
            processing REAL,
            deferred REAL,
            cache_ratio REAL,
            context_used TEXT
        );
        CREATE INDEX samples_by_time ON samples (resolution, ts);
        -- Upstream restarts, outages and recoveries.
        CREATE TABLE events (ts REAL NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '');
        CREATE INDEX events_by_time ON events (ts);
        -- One row per request through the proxy.
        CREATE TABLE requests (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            client TEXT,
            session TEXT,
            route TEXT,
            class TEXT,
            model TEXT,
            status INTEGER,
            handled TEXT,
            queue_wait REAL,
            ttft REAL,
            total_time REAL,
            prompt_tokens INTEGER,
            cached_tokens INTEGER,
            generated_tokens INTEGER,
            tokens_per_second REAL,
            error TEXT
        );
        CREATE INDEX requests_by_time ON requests (ts);
        CREATE INDEX requests_by_session ON requests (session, ts);
        """
    )


BUSY_TIMEOUT = 30.0


def _use_wal(db: sqlite3.Connection) -> None:
    """Switch the file to write-ahead logging, waiting for other processes as the busy timeout
    would. The timeout does not cover this statement: while another process is creating the
    same new store (`make run` starts the proxy and the collector together), SQLite answers
    "database is locked" at once rather than wait with a lock held and risk a deadlock."""
    deadline = time.monotonic() + BUSY_TIMEOUT
    pause = 0.005
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(pause)  # the other process needs a few milliseconds; no event to wait on
        pause = min(pause * 2, 0.1)


def connect(path: str | Path, busy_timeout: float = BUSY_TIMEOUT) -> sqlite3.Connection:
    """Open (creating if needed) and migrate the store."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    db = _open(path, busy_timeout)
    _use_wal(db)
    db.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable across process crashes, cheap commits
    # A WAL file otherwise stays at its largest size (4 MB after an hourly roll-up): cut it back to
    # 1 MB whenever SQLite restarts it.
    db.execute("PRAGMA journal_size_limit=1048576")
    migrate(db)
    return db


def _open(path: str | Path, busy_timeout: float) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), timeout=busy_timeout, isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    db.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
    return db


def migrate(db: sqlite3.Connection) -> list[str]:
    db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    done = {row[0] for row in db.execute("SELECT name FROM _migrations")}
    applied = []
    for name, fn in MIGRATIONS:
        if name in done:
            continue
        db.execute("BEGIN IMMEDIATE")
        try:
            if db.execute("SELECT 1 FROM _migrations WHERE name = ?", (name,)).fetchone() is None:  # another process won
                fn(db)
                db.execute("INSERT INTO _migrations VALUES (?, ?)", (name, time.time()))
                applied.append(name)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    return applied


@migration
def m002_samples_by_ts(db: sqlite3.Connection) -> None:
    """History reads ask for a time range across resolutions: samples_by_time (resolution, ts) cannot serve them."""
    db.execute("CREATE INDEX samples_by_ts ON samples (ts)")


@migration
def m003_request_users(db: sqlite3.Connection) -> None:
    """Who made each request (the name of its API key), and running totals per user, advanced in
    the same transaction as the rows they count, so they outlive the rows' retention."""
    _run(
        db,
        """
        ALTER TABLE requests ADD COLUMN user TEXT;
        CREATE INDEX requests_by_user ON requests (user, ts);
        CREATE TABLE user_totals (
            user TEXT PRIMARY KEY,
            requests INTEGER NOT NULL DEFAULT 0,
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            cached_tokens INTEGER NOT NULL DEFAULT 0,
            generated_tokens INTEGER NOT NULL DEFAULT 0,
            first_seen REAL NOT NULL,
            last_seen REAL NOT NULL
        )
        """,
    )


@migration
def m004_running_totals(db: sqlite3.Connection) -> None:
    """Lifetime counters that are not llama-server's: running totals, advanced in the transaction
    that writes what they count, started from what the store holds today. And the collector's
    lease (one writer of the lifetime totals per store)."""
    _run(
        db,
        """
        CREATE TABLE counters (name TEXT PRIMARY KEY, value REAL NOT NULL DEFAULT 0);
        INSERT INTO counters SELECT 'requests', COUNT(*) FROM requests;
        INSERT INTO counters SELECT 'request_prompt_tokens', COALESCE(SUM(prompt_tokens), 0) FROM requests;
        INSERT INTO counters SELECT 'request_cached_tokens', COALESCE(SUM(cached_tokens), 0) FROM requests;
        INSERT INTO counters SELECT 'request_generated_tokens', COALESCE(SUM(generated_tokens), 0) FROM requests;
        INSERT INTO counters SELECT 'upstream_restarts', COUNT(*) FROM events WHERE kind = 'restart';
        INSERT INTO counters SELECT 'upstream_changes', COUNT(*) FROM events WHERE kind = 'upstream_changed';
        CREATE TABLE lease (name TEXT PRIMARY KEY, holder TEXT NOT NULL, acquired REAL NOT NULL, expires REAL NOT NULL)
        """,
    )


@migration
def m005_kv_files(db: sqlite3.Connection) -> None:
    """The proxy's index of slot KV-cache files that llama-server saved (proxy/kvcache.py): what
    each holds, so that a request can find the file whose tokens begin its prompt, and when it
    was last used, for the disk budget. The files themselves are in KV_CACHE_DIR; a request-log
    column says how many tokens a turn got back from one."""
    _run(
        db,
        """
        CREATE TABLE kv_files (
            name TEXT PRIMARY KEY,
            model TEXT NOT NULL,
            n_ctx INTEGER NOT NULL,
            tokens INTEGER NOT NULL,
            checkpoints TEXT NOT NULL,
            saved_tokens INTEGER NOT NULL,
            bytes INTEGER NOT NULL,
            session TEXT,
            created REAL NOT NULL,
            last_used REAL NOT NULL
        );
        ALTER TABLE requests ADD COLUMN kv_restored INTEGER
        """,
    )


@migration
def m006_request_upstreams(db: sqlite3.Connection) -> None:
    """Which llama-server ran each request: LLAMA_URL may list several."""
    _run(db, "ALTER TABLE requests ADD COLUMN upstream TEXT")


@migration
def m007_upstream_totals(db: sqlite3.Connection) -> None:
    """Lifetime totals per llama-server, for LLAMA_URL's list: each upstream's totals and the raw
    counters they were last advanced from (`upstream_lifetime`), and what else its scrapes must
    remember, such as which server it is and when its process started (`upstream_meta`). The
    `lifetime` table keeps the sum. Samples and events say which upstream they are about (NULL:
    all of them).

    What was tracked so far belongs to one llama-server whose URL the store never recorded: it is
    kept under the URL '' and taken over by LLAMA_URL's first llama-server at its first scrape."""
    _run(
        db,
        """
        CREATE TABLE upstream_lifetime (
            upstream TEXT NOT NULL,
            name TEXT NOT NULL,
            total REAL NOT NULL DEFAULT 0,
            last_raw REAL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (upstream, name)
        );
        CREATE TABLE upstream_meta (upstream TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (upstream, key));
        INSERT INTO upstream_lifetime SELECT '', name, total, last_raw, updated_at FROM lifetime;
        INSERT INTO upstream_lifetime SELECT '', name, value, NULL, 0 FROM counters
            WHERE name IN ('upstream_restarts', 'upstream_changes') AND value > 0;
        INSERT INTO upstream_meta SELECT '', key, value FROM meta WHERE key IN
            ('upstream_identity', 'process_start', 'model', 'n_ctx', 'total_slots', 'upstream_error', 'upstream_error_kind');
        DELETE FROM meta WHERE key IN ('upstream_identity', 'process_start');
        UPDATE lifetime SET last_raw = NULL;
        ALTER TABLE samples ADD COLUMN upstream TEXT;
        ALTER TABLE events ADD COLUMN upstream TEXT
        """,
    )


# Events that advance a running counter of the same name in `counters` (and in the upstream's
# `upstream_lifetime` rows) as they are recorded.
COUNTED_EVENTS = {"restart": "upstream_restarts", "upstream_changed": "upstream_changes"}
# The store's URL for the one llama-server it tracked before it kept totals per upstream.
INHERITED = ""


@dataclass(frozen=True)
class Retention:
    """How long the store keeps what it does not need forever. Lifetime totals, per-user totals,
    events and per-hour samples are kept for the life of the store (a year of hourly rows is
    8,760 rows); only these age out."""

    requests_days: float = 30.0  # request-log rows (REQUEST_LOG_DAYS)
    raw_hours: float = 48.0  # samples at scrape resolution, then one per minute (SAMPLES_RAW_HOURS)
    minute_days: float = 30.0  # per-minute samples, then one per hour (SAMPLES_MINUTE_DAYS)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Retention:
        return cls(
            requests_days=env_float(env, "REQUEST_LOG_DAYS", cls.requests_days, 0.01, 36500, "days"),
            raw_hours=env_float(env, "SAMPLES_RAW_HOURS", cls.raw_hours, 1, 24 * 36500, "hours"),
            minute_days=env_float(env, "SAMPLES_MINUTE_DAYS", cls.minute_days, 1, 36500, "days"),
        )


@dataclass(frozen=True)
class LeaseHeld:
    """Another collector writes this store until `expires` (a Unix time)."""

    holder: str
    expires: float


@dataclass
class Baseline:
    """What the last scrape of one upstream left, read inside the transaction that will advance it."""

    last_raw: dict[str, float]
    meta: dict[str, str]


@dataclass
class UpstreamWrite:
    """What one scrape records for one upstream: how far each total advanced (`deltas`), the raw
    counters that become its baseline, its own sample row (None: none), its events, and its meta
    (a None value deletes the key)."""

    deltas: dict[str, float] = field(default_factory=dict)
    raw: dict[str, float] = field(default_factory=dict)
    sample: dict[str, Any] | None = None
    events: list[tuple[str, str]] = field(default_factory=list)
    meta: dict[str, str | None] = field(default_factory=dict)


@dataclass
class ScrapeWrite:
    """What one scrape records: per upstream URL, and for the store as a whole the sample the
    charts draw (all upstreams together) and the store's meta."""

    upstreams: dict[str, UpstreamWrite] = field(default_factory=dict)
    sample: dict[str, Any] | None = None
    meta: dict[str, str | None] = field(default_factory=dict)


class Baselines:
    """Each upstream's baseline, read on demand inside a scrape's transaction. The first upstream
    asked for with `inherit` takes over what the store tracked before it kept totals per upstream
    (see m007_upstream_totals), if nothing has yet."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def of(self, upstream: str, inherit: bool = False) -> Baseline:
        if inherit and upstream != INHERITED and self._known(INHERITED) and not self._known(upstream):
            for table in ("upstream_lifetime", "upstream_meta"):
                self.db.execute(f"UPDATE {table} SET upstream = ? WHERE upstream = ?", (upstream, INHERITED))
        raw = {r["name"]: r["last_raw"] for r in self.db.execute(
            "SELECT name, last_raw FROM upstream_lifetime WHERE upstream = ? AND last_raw IS NOT NULL", (upstream,))}
        meta = {r["key"]: r["value"] for r in self.db.execute("SELECT key, value FROM upstream_meta WHERE upstream = ?", (upstream,))}
        return Baseline(raw, meta)

    def _known(self, upstream: str) -> bool:
        return any(self.db.execute(f"SELECT 1 FROM {table} WHERE upstream = ? LIMIT 1", (upstream,)).fetchone()
                   for table in ("upstream_lifetime", "upstream_meta"))

LEASE = "collector"


class Store:
    """Thread-safe access to the store: one connection for writes, one for reads (the collector
    and the proxy each open their own pair)."""

    def __init__(self, path: str | Path, busy_timeout: float = BUSY_TIMEOUT):
        self.path = str(path)
        self.db = connect(path, busy_timeout)
        self.lock = threading.Lock()
        self._reader = _open(path, BUSY_TIMEOUT)
        self._read_lock = threading.Lock()
        with self.lock:
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('tracking_since', ?)", (str(time.time()),))

    def close(self) -> None:
        with self.lock:
            self.db.close()
        with self._read_lock:
            self._reader.close()

    def _read(self, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._read_lock:
            return self._reader.execute(sql, tuple(args)).fetchall()

    def _write(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run `work` in one write transaction (all of it or none of it)."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                result = work(self.db)
                self.db.execute("COMMIT")
                return result
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    # -- lifetime -------------------------------------------------------------------------------

    def last_raw(self, upstream: str) -> dict[str, float]:
        """The raw counters `upstream`'s totals were last advanced from."""
        return {r["name"]: r["last_raw"] for r in self._read(
            "SELECT name, last_raw FROM upstream_lifetime WHERE upstream = ? AND last_raw IS NOT NULL", (upstream,))}

    def totals(self) -> dict[str, float]:
        """llama-server's lifetime totals, summed over every upstream the store has tracked."""
        return {r["name"]: r["total"] for r in self._read("SELECT name, total FROM lifetime")}

    def upstream_totals(self) -> dict[str, dict[str, float]]:
        """Lifetime totals per upstream URL (with its restarts and changes): they add up to
        `totals()` and the matching `counters()`."""
        out: dict[str, dict[str, float]] = {}
        for r in self._read("SELECT upstream, name, total FROM upstream_lifetime ORDER BY upstream, name"):
            out.setdefault(r["upstream"], {})[r["name"]] = r["total"]
        return out

    def upstream_meta(self, upstream: str | None = None) -> dict[str, dict[str, str]]:
        """What the collector last recorded about each upstream (or only `upstream`)."""
        rows = self._read("SELECT upstream, key, value FROM upstream_meta WHERE ? IS NULL OR upstream = ?", (upstream, upstream))
        out: dict[str, dict[str, str]] = {}
        for r in rows:
            out.setdefault(r["upstream"], {})[r["key"]] = r["value"]
        return out

    def counters(self) -> dict[str, float]:
        """The store's own running totals (requests, their tokens, upstream restarts and changes)."""
        return {r["name"]: r["value"] for r in self._read("SELECT name, value FROM counters")}

    def meta(self, key: str) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def scrape(self, holder: str, now: float, lease_seconds: float,
               plan: Callable[[Baselines], ScrapeWrite]) -> LeaseHeld | None:
        """One scrape's write, if `holder` holds (or can take) the store's collector lease: `plan`
        reads the baselines it needs and decides what to write from them, and every upstream's
        totals, baseline, samples and events, the sums, the store's sample and the lease are
        written, all in one transaction. Returns LeaseHeld, writing nothing, while another
        collector's lease runs."""
        def work(db: sqlite3.Connection) -> LeaseHeld | None:
            held = _lease_held(db, holder, now)
            if held is not None:
                return held
            db.execute("INSERT INTO lease VALUES (?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                       "acquired = CASE WHEN holder = excluded.holder THEN acquired ELSE excluded.acquired END, "
                       "holder = excluded.holder, expires = excluded.expires", (LEASE, holder, now, now + lease_seconds))
            self._record(db, now, plan(Baselines(db)))
            return None

        return self._write(work)

    def lease_holder(self, holder: str, now: float) -> LeaseHeld | None:
        """Who else holds the collector lease now, if anyone does (a read: may be stale by one write)."""
        rows = self._read("SELECT holder, expires FROM lease WHERE name = ?", (LEASE,))
        return _held(rows[0] if rows else None, holder, now)

    def release_lease(self, holder: str) -> None:
        """Give the lease up (a collector stopping): a standby takes over at its next scrape."""
        self._write(lambda db: db.execute("DELETE FROM lease WHERE name = ? AND holder = ?", (LEASE, holder)))

    @staticmethod
    def _record(db: sqlite3.Connection, now: float, write: ScrapeWrite) -> None:
        for upstream, part in write.upstreams.items():
            for name, value in part.raw.items():
                advanced = part.deltas.get(name, 0.0)
                db.execute(
                    "INSERT INTO upstream_lifetime (upstream, name, total, last_raw, updated_at) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT(upstream, name) DO UPDATE SET total = total + excluded.total, last_raw = excluded.last_raw, "
                    "updated_at = excluded.updated_at", (upstream, name, advanced, value, now))
                # The sum moves with the upstream's total, in the same transaction.
                db.execute("INSERT INTO lifetime (name, total, updated_at) VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                           "total = total + excluded.total, updated_at = excluded.updated_at", (name, advanced, now))
            if part.sample is not None:
                _insert_sample(db, now, {**part.sample, "upstream": upstream})
            for kind, detail in part.events:
                db.execute("INSERT INTO events (ts, kind, detail, upstream) VALUES (?, ?, ?, ?)", (now, kind, detail, upstream))
                if kind in COUNTED_EVENTS:
                    _advance(db, COUNTED_EVENTS[kind], 1)
                    db.execute("INSERT INTO upstream_lifetime (upstream, name, total, updated_at) VALUES (?, ?, 1, ?) "
                               "ON CONFLICT(upstream, name) DO UPDATE SET total = total + 1, updated_at = excluded.updated_at",
                               (upstream, COUNTED_EVENTS[kind], now))
            for key, text in part.meta.items():
                if text is None:
                    db.execute("DELETE FROM upstream_meta WHERE upstream = ? AND key = ?", (upstream, key))
                else:
                    db.execute("INSERT INTO upstream_meta VALUES (?, ?, ?) ON CONFLICT(upstream, key) DO UPDATE SET "
                               "value = excluded.value", (upstream, key, text))
        if write.sample is not None:
            _insert_sample(db, now, write.sample)
        for key, text in write.meta.items():
            if text is None:
                db.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, text))

    # -- reads for the API ------------------------------------------------------------------------

    def samples(self, since: float, bucket: int = 0, limit: int = 5000, upstream: str | None = None) -> list[dict[str, Any]]:
        """History from `since` on, oldest first: the stored rows, or with `bucket` seconds one
        point per bucket (rows of every resolution summed alike). At most the newest `limit`.
        All upstreams together, or one upstream's own rows (kept while LLAMA_URL lists several)."""
        if bucket <= 0:
            rows = self._read("SELECT * FROM samples WHERE ts >= ? AND upstream IS ? ORDER BY ts DESC LIMIT ?",
                              (since, upstream, limit))
            return [dict(r) for r in rows][::-1]
        rows = self._read(
            f"""SELECT CAST(ts / {int(bucket)} AS INTEGER) * {int(bucket)}, {BUCKET_COLUMNS} FROM samples
                WHERE ts >= ? AND upstream IS ? GROUP BY 1 ORDER BY 1 DESC LIMIT ?""", (since, upstream, limit))
        return [dict(zip(("ts", *SERIES_COLUMNS), r), resolution=bucket) for r in rows][::-1]

    def latest_sample(self, upstream: str | None = None) -> dict[str, Any] | None:
        """The newest scrape's sample: all upstreams together, or one upstream's own."""
        rows = self._read("SELECT * FROM samples WHERE resolution = 0 AND upstream IS ? ORDER BY ts DESC LIMIT 1", (upstream,))
        return dict(rows[0]) if rows else None

    def sampled_upstreams(self, since: float) -> list[str]:
        """Upstreams with samples of their own from `since` on (there are none with one upstream)."""
        return [r[0] for r in self._read("SELECT DISTINCT upstream FROM samples WHERE ts >= ? AND upstream IS NOT NULL "
                                         "ORDER BY upstream", (since,))]

    def events(self, since: float, limit: int = 500) -> list[dict[str, Any]]:
        return [dict(r) for r in self._read("SELECT * FROM events WHERE ts >= ? ORDER BY ts DESC LIMIT ?", (since, limit))]

    def count_events(self, kind: str) -> int:
        """Restarts and upstream changes from their running counters; other kinds by counting rows."""
        if kind in COUNTED_EVENTS:
            return int(self.counters().get(COUNTED_EVENTS[kind], 0))
        return self._read("SELECT COUNT(*) FROM events WHERE kind = ?", (kind,))[0][0]

    # -- the proxy's request log ----------------------------------------------------------------

    REQUEST_COLUMNS = ("ts", "client", "session", "route", "class", "model", "status", "handled", "queue_wait", "ttft",
                       "total_time", "prompt_tokens", "cached_tokens", "generated_tokens", "tokens_per_second", "error", "user",
                       "kv_restored", "upstream")

    def add_requests(self, rows: list[dict[str, Any]]) -> None:
        """Add request-log rows and advance the running totals they count, in one transaction."""
        if not rows:
            return
        cols = self.REQUEST_COLUMNS

        def work(db: sqlite3.Connection) -> None:
            db.executemany(f"INSERT INTO requests ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                           [tuple(r.get(c) for c in cols) for r in rows])
            _advance(db, "requests", len(rows))
            for column in ("prompt_tokens", "cached_tokens", "generated_tokens"):
                _advance(db, f"request_{column}", sum(r.get(column) or 0 for r in rows))
            db.executemany(
                "INSERT INTO user_totals VALUES (?, 1, ?, ?, ?, ?, ?) ON CONFLICT(user) DO UPDATE SET "
                "requests = requests + 1, prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
                "cached_tokens = cached_tokens + excluded.cached_tokens, "
                "generated_tokens = generated_tokens + excluded.generated_tokens, "
                "last_seen = MAX(last_seen, excluded.last_seen)",
                [(r["user"], r.get("prompt_tokens") or 0, r.get("cached_tokens") or 0, r.get("generated_tokens") or 0,
                  r["ts"], r["ts"]) for r in rows if r.get("user")])

        self._write(work)

    def requests(self, limit: int = 200, client: str | None = None, klass: str | None = None, session: str | None = None,
                 user: str | None = None) -> list[dict[str, Any]]:
        where, args = [], []
        for column, value in (("client", client), ("class", klass), ("session", session), ("user", user)):
            if value:
                where.append(f"{column} = ?")
                args.append(value)
        sql = "SELECT * FROM requests" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC LIMIT ?"
        return [dict(r) for r in self._read(sql, (*args, limit))]

    def request_totals(self) -> dict[str, float]:
        """Requests and their tokens since the store began (running totals: retention does not lower them)."""
        counters = self.counters()
        return {"requests": int(counters.get("requests", 0)), "prompt": counters.get("request_prompt_tokens", 0),
                "cached": counters.get("request_cached_tokens", 0), "generated": counters.get("request_generated_tokens", 0)}

    def user_totals(self) -> list[dict[str, Any]]:
        """Requests and tokens per user (API key name) since the store began, most recent first."""
        return [dict(r) for r in self._read("SELECT * FROM user_totals ORDER BY last_seen DESC")]

    # -- the proxy's KV-cache files ---------------------------------------------------------------

    KV_COLUMNS = ("name", "model", "n_ctx", "tokens", "checkpoints", "saved_tokens", "bytes", "session", "created", "last_used")

    def kv_files(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._read("SELECT * FROM kv_files ORDER BY last_used")]

    def kv_put(self, row: dict[str, Any]) -> None:
        cols = self.KV_COLUMNS
        self._write(lambda db: db.execute(f"INSERT OR REPLACE INTO kv_files ({', '.join(cols)}) "
                                          f"VALUES ({', '.join('?' * len(cols))})", tuple(row[c] for c in cols)))

    def kv_touch(self, name: str, when: float) -> None:
        self._write(lambda db: db.execute("UPDATE kv_files SET last_used = MAX(last_used, ?) WHERE name = ?", (when, name)))

    def kv_delete(self, names: Iterable[str]) -> None:
        names = list(names)
        if names:
            self._write(lambda db: db.executemany("DELETE FROM kv_files WHERE name = ?", [(n,) for n in names]))

    # -- retention --------------------------------------------------------------------------------

    def compact(self, now: float, retention: Retention = Retention()) -> dict[str, int]:
        """Keep disk bounded: samples at scrape resolution for `raw_hours`, per-minute rows until
        `minute_days`, per-hour rows after that; request-log rows for `requests_days`. Safe to
        run from several processes (each run is one transaction, and a second finds nothing
        left to do). Returns how many rows each step removed."""
        def work(db: sqlite3.Connection) -> dict[str, int]:
            return {
                "samples_to_minutes": self._roll_up(db, 0, 60, now - retention.raw_hours * 3600),
                "minutes_to_hours": self._roll_up(db, 60, 3600, now - retention.minute_days * 86400),
                "requests": db.execute("DELETE FROM requests WHERE ts < ?", (now - retention.requests_days * 86400,)).rowcount,
            }

        return self._write(work)

    @staticmethod
    def _roll_up(db: sqlite3.Connection, source: int, target: int, before: float) -> int:
        """Replace `source`-resolution rows older than `before` with one row per `target` seconds
        and upstream: token and second counts summed, speeds and the cache ratio recomputed from
        those sums, gauges averaged, `up` the minimum, the bucket's last context reading kept."""
        before = (before // target) * target  # whole buckets only: none is split across two runs
        db.execute(
            f"""INSERT INTO samples (ts, resolution, up, prompt_tokens, cached_tokens, generated_tokens, prompt_seconds,
                    generation_seconds, prompt_tps, generation_tps, busy_slots, processing, deferred, cache_ratio, context_used,
                    upstream)
                SELECT CAST(ts / {target} AS INTEGER) * {target}, {target}, {BUCKET_COLUMNS},
                    (SELECT last.context_used FROM samples AS last WHERE last.resolution = ?
                        AND last.upstream IS samples.upstream
                        AND last.ts >= CAST(samples.ts / {target} AS INTEGER) * {target}
                        AND last.ts < CAST(samples.ts / {target} AS INTEGER) * {target} + {target}
                        ORDER BY last.ts DESC LIMIT 1),
                    upstream
                FROM samples WHERE resolution = ? AND ts < ? GROUP BY upstream, CAST(ts / {target} AS INTEGER)""",
            (source, source, before),
        )
        return db.execute("DELETE FROM samples WHERE resolution = ? AND ts < ?", (source, before)).rowcount


def _insert_sample(db: sqlite3.Connection, now: float, sample: dict[str, Any]) -> None:
    columns = ", ".join(sample)
    db.execute(f"INSERT INTO samples (ts, {columns}) VALUES (?, {', '.join('?' * len(sample))})", (now, *sample.values()))


def _advance(db: sqlite3.Connection, name: str, by: float) -> None:
    db.execute("INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + excluded.value", (name, by))


def holder_id() -> str:
    """This process, as a lease holder: host and process id."""
    return f"{socket.gethostname()}/{os.getpid()}"


def _gone(holder: str) -> bool:
    """A holder on this host whose process has ended (SIGKILL, a crash): its lease is void at once,
    so a collector restarted by hand or by Docker does not wait out its own old lease."""
    host, _, pid = holder.rpartition("/")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # alive, someone else's
    return False


def _lease_held(db: sqlite3.Connection, holder: str, now: float) -> LeaseHeld | None:
    row = db.execute("SELECT holder, expires FROM lease WHERE name = ?", (LEASE,)).fetchone()
    return _held(row, holder, now)


def _held(row: sqlite3.Row | None, holder: str, now: float) -> LeaseHeld | None:
    if row and row["holder"] != holder and row["expires"] > now and not _gone(row["holder"]):
        return LeaseHeld(row["holder"], row["expires"])
    return None
