"""The SQLite store shared by the collector and the proxy: lifetime totals, samples, events,
and the proxy's request log.

WAL mode, so the proxy's request-log writes, the collector's scrapes and the dashboard's reads
do not block each other. The schema is a list of ordered, named migrations recorded in
`_migrations` (each runs once, in order, inside a transaction).

The invariant that makes lifetime totals exact: a total and the raw counter value it was last
advanced from are written in the same transaction, so a crash at any moment leaves the pair
consistent and the next scrape neither loses nor double-counts.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

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


def connect(path: str | Path) -> sqlite3.Connection:
    """Open (creating if needed) and migrate the store."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    _use_wal(db)
    db.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable across process crashes, cheap commits
    db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
    # A WAL file otherwise stays at its largest size (4 MB after an hourly roll-up): cut it back to
    # 1 MB whenever SQLite restarts it.
    db.execute("PRAGMA journal_size_limit=1048576")
    migrate(db)
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


class Store:
    """Thread-safe access to one connection (the collector and the proxy each open their own)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.db = connect(path)
        self.lock = threading.Lock()
        with self.lock:
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('tracking_since', ?)", (str(time.time()),))

    def close(self) -> None:
        with self.lock:
            self.db.close()

    # -- lifetime -------------------------------------------------------------------------------

    def last_raw(self) -> dict[str, float]:
        with self.lock:
            return {r["name"]: r["last_raw"] for r in self.db.execute("SELECT name, last_raw FROM lifetime WHERE last_raw IS NOT NULL")}

    def totals(self) -> dict[str, float]:
        with self.lock:
            return {r["name"]: r["total"] for r in self.db.execute("SELECT name, total FROM lifetime")}

    def meta(self, key: str) -> str | None:
        with self.lock:
            row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            return row[0] if row else None

    def record_scrape(self, now: float, deltas: dict[str, float], raw: dict[str, float], sample: dict[str, Any] | None,
                      events: Iterable[tuple[str, str]] = (), meta: dict[str, str] | None = None) -> None:
        """Advance lifetime totals by `deltas`, remember `raw` as the new baseline, add the sample,
        events and meta, all in one transaction."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for name, value in raw.items():
                    self.db.execute(
                        "INSERT INTO lifetime (name, total, last_raw, updated_at) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT(name) DO UPDATE SET total = total + excluded.total, last_raw = excluded.last_raw, "
                        "updated_at = excluded.updated_at",
                        (name, deltas.get(name, 0.0), value, now),
                    )
                if sample is not None:
                    columns = ", ".join(sample)
                    self.db.execute(f"INSERT INTO samples (ts, {columns}) VALUES (?, {', '.join('?' * len(sample))})",
                                    (now, *sample.values()))
                for kind, detail in events:
                    self.db.execute("INSERT INTO events VALUES (?, ?, ?)", (now, kind, detail))
                for key, value in (meta or {}).items():
                    self.db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def add_event(self, now: float, kind: str, detail: str = "") -> None:
        with self.lock:
            self.db.execute("INSERT INTO events VALUES (?, ?, ?)", (now, kind, detail))

    # -- reads for the API ------------------------------------------------------------------------

    def samples(self, since: float, bucket: int = 0, limit: int = 5000) -> list[dict[str, Any]]:
        """History from `since` on, oldest first: the stored rows, or with `bucket` seconds one
        point per bucket (rows of every resolution summed alike). At most the newest `limit`."""
        with self.lock:
            if bucket <= 0:
                rows = self.db.execute("SELECT * FROM samples WHERE ts >= ? ORDER BY ts DESC LIMIT ?", (since, limit))
                return [dict(r) for r in rows][::-1]
            rows = self.db.execute(
                f"""SELECT CAST(ts / {int(bucket)} AS INTEGER) * {int(bucket)}, {BUCKET_COLUMNS} FROM samples WHERE ts >= ?
                    GROUP BY 1 ORDER BY 1 DESC LIMIT ?""", (since, limit))
            return [dict(zip(("ts", *SERIES_COLUMNS), r), resolution=bucket) for r in rows][::-1]

    def latest_sample(self) -> dict[str, Any] | None:
        with self.lock:
            row = self.db.execute("SELECT * FROM samples WHERE resolution = 0 ORDER BY ts DESC LIMIT 1").fetchone()
            return dict(row) if row else None

    def events(self, since: float, limit: int = 500) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(r) for r in self.db.execute("SELECT * FROM events WHERE ts >= ? ORDER BY ts DESC LIMIT ?", (since, limit))]

    def count_events(self, kind: str) -> int:
        with self.lock:
            return self.db.execute("SELECT COUNT(*) FROM events WHERE kind = ?", (kind,)).fetchone()[0]

    # -- the proxy's request log ----------------------------------------------------------------

    REQUEST_COLUMNS = ("ts", "client", "session", "route", "class", "model", "status", "handled", "queue_wait", "ttft",
                       "total_time", "prompt_tokens", "cached_tokens", "generated_tokens", "tokens_per_second", "error", "user")

    def add_requests(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        cols = self.REQUEST_COLUMNS
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.executemany(f"INSERT INTO requests ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                                    [tuple(r.get(c) for c in cols) for r in rows])
                self.db.executemany(
                    "INSERT INTO user_totals VALUES (?, 1, ?, ?, ?, ?, ?) ON CONFLICT(user) DO UPDATE SET "
                    "requests = requests + 1, prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
                    "cached_tokens = cached_tokens + excluded.cached_tokens, "
                    "generated_tokens = generated_tokens + excluded.generated_tokens, "
                    "last_seen = MAX(last_seen, excluded.last_seen)",
                    [(r["user"], r.get("prompt_tokens") or 0, r.get("cached_tokens") or 0, r.get("generated_tokens") or 0,
                      r["ts"], r["ts"]) for r in rows if r.get("user")])
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def requests(self, limit: int = 200, client: str | None = None, klass: str | None = None, session: str | None = None,
                 user: str | None = None) -> list[dict[str, Any]]:
        where, args = [], []
        for column, value in (("client", client), ("class", klass), ("session", session), ("user", user)):
            if value:
                where.append(f"{column} = ?")
                args.append(value)
        sql = "SELECT * FROM requests" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC LIMIT ?"
        with self.lock:
            return [dict(r) for r in self.db.execute(sql, (*args, limit))]

    def request_totals(self) -> dict[str, float]:
        with self.lock:
            row = self.db.execute("SELECT COUNT(*) AS requests, COALESCE(SUM(prompt_tokens), 0) AS prompt, "
                                  "COALESCE(SUM(cached_tokens), 0) AS cached, COALESCE(SUM(generated_tokens), 0) AS generated "
                                  "FROM requests").fetchone()
            return dict(row)

    def user_totals(self) -> list[dict[str, Any]]:
        """Requests and tokens per user (API key name) since the store began, most recent first."""
        with self.lock:
            return [dict(r) for r in self.db.execute("SELECT * FROM user_totals ORDER BY last_seen DESC")]

    # -- retention --------------------------------------------------------------------------------

    def compact(self, now: float, full_for: float = 48 * 3600, minutes_for: float = 30 * 86400, requests_for: float = 30 * 86400) -> None:
        """Keep disk bounded: per-scrape samples for `full_for`, per-minute rows until
        `minutes_for`, per-hour rows after that; request-log rows for `requests_for`."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self._roll_up(0, 60, now - full_for)
                self._roll_up(60, 3600, now - minutes_for)
                self.db.execute("DELETE FROM requests WHERE ts < ?", (now - requests_for,))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def _roll_up(self, source: int, target: int, before: float) -> None:
        """Replace `source`-resolution rows older than `before` with one row per `target` seconds:
        token and second counts summed, speeds and the cache ratio recomputed from those sums,
        gauges averaged, `up` the minimum, the bucket's last context reading kept."""
        before = (before // target) * target  # whole buckets only: none is split across two runs
        self.db.execute(
            f"""INSERT INTO samples (ts, resolution, up, prompt_tokens, cached_tokens, generated_tokens, prompt_seconds,
                    generation_seconds, prompt_tps, generation_tps, busy_slots, processing, deferred, cache_ratio, context_used)
                SELECT CAST(ts / {target} AS INTEGER) * {target}, {target}, {BUCKET_COLUMNS},
                    (SELECT last.context_used FROM samples AS last WHERE last.resolution = ?
                        AND last.ts >= CAST(samples.ts / {target} AS INTEGER) * {target}
                        AND last.ts < CAST(samples.ts / {target} AS INTEGER) * {target} + {target}
                        ORDER BY last.ts DESC LIMIT 1)
                FROM samples WHERE resolution = ? AND ts < ? GROUP BY CAST(ts / {target} AS INTEGER)""",
            (source, source, before),
        )
        self.db.execute("DELETE FROM samples WHERE resolution = ? AND ts < ?", (source, before))
