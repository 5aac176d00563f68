"""Reset detection on recorded llama-server /metrics texts, the store's schema and transactions,
and retention keeping a month of 10-second samples small."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import time
from pathlib import Path

import pytest

from collector import scrape
from llamabridge.store import ScrapeWrite, Store, UpstreamWrite, connect

FIXTURES = Path(__file__).parent / "fixtures"
# The Process-Start-Time-Unix headers recorded with the two texts.
START_BEFORE, START_AFTER = "3724350572", "3725066060"


@pytest.fixture(scope="module")
def before():
    return scrape.parse_metrics((FIXTURES / "metrics-before-restart.txt").read_text())[0]


@pytest.fixture(scope="module")
def after():
    return scrape.parse_metrics((FIXTURES / "metrics-after-restart.txt").read_text())[0]


def test_parse_reads_every_counter(before):
    assert set(before) == set(scrape.COUNTERS)
    assert before["prompt_tokens_total"] == 82 and before["tokens_predicted_total"] == 33


def test_first_reading_only_sets_the_baseline(before):
    assert scrape.restart_reason({}, before, None, START_BEFORE) is None
    assert set(scrape.deltas({}, before, restarted=False).values()) == {0.0}


def test_same_process_counts_the_difference(before):
    later = dict(before, prompt_tokens_total=before["prompt_tokens_total"] + 40)
    assert scrape.restart_reason(before, later, START_BEFORE, START_BEFORE) is None
    assert scrape.deltas(before, later, restarted=False)["prompt_tokens_total"] == 40


def test_restart_counts_the_whole_new_value(before, after):
    why = scrape.restart_reason(before, after, START_BEFORE, START_AFTER)
    assert why == "new process start time"
    advanced = scrape.deltas(before, after, restarted=True)
    assert advanced["prompt_tokens_total"] == after["prompt_tokens_total"] == 33


def test_counter_going_backwards_is_a_restart_even_without_the_header(before, after):
    assert scrape.restart_reason(before, after, None, None) == "counters went backwards"


def test_restarted_server_that_climbed_past_the_old_values_is_caught_by_the_header(before):
    climbed = {name: value + 1000 for name, value in before.items()}
    assert scrape.restart_reason(before, climbed, START_BEFORE, START_AFTER) == "new process start time"
    assert scrape.deltas(before, climbed, restarted=True)["prompt_tokens_total"] == before["prompt_tokens_total"] + 1000


def test_missing_metric_is_left_alone(before):
    partial = {k: v for k, v in before.items() if k != "n_decode_total"}
    advanced = scrape.deltas(before, partial, restarted=False)
    assert "n_decode_total" not in advanced


def test_garbage_is_a_scrape_error():
    with pytest.raises(scrape.ScrapeError):
        scrape.parse_metrics("<html>not metrics</html>\n")
    with pytest.raises(scrape.ScrapeError):
        scrape.parse_metrics("# nothing from llama-server\nother_metric 1\n")


def test_migrations_create_the_exact_schema(tmp_path):
    db = connect(tmp_path / "s.db")
    tables = ("lifetime", "samples", "events", "requests", "user_totals", "counters", "lease", "kv_files", "upstream_lifetime",
              "upstream_meta")
    columns = {t: [r[1] for r in db.execute(f"PRAGMA table_info({t})")] for t in tables}
    assert columns["lifetime"] == ["name", "total", "last_raw", "updated_at"]
    assert columns["samples"][:3] == ["ts", "resolution", "up"] and "context_used" in columns["samples"]
    assert columns["requests"] == ["id"] + list(Store.REQUEST_COLUMNS)
    assert columns["user_totals"] == ["user", "requests", "prompt_tokens", "cached_tokens", "generated_tokens", "first_seen", "last_seen"]
    assert columns["counters"] == ["name", "value"] and columns["lease"] == ["name", "holder", "acquired", "expires"]
    assert columns["kv_files"] == list(Store.KV_COLUMNS)
    assert columns["upstream_lifetime"] == ["upstream", "name", "total", "last_raw", "updated_at"]
    assert columns["upstream_meta"] == ["upstream", "key", "value"]
    assert columns["samples"][-1] == "upstream" and columns["events"] == ["ts", "kind", "detail", "upstream"]
    assert [r[0] for r in db.execute("SELECT name FROM _migrations")] == ["m001_initial", "m002_samples_by_ts", "m003_request_users",
                                                                         "m004_running_totals", "m005_kv_files",
                                                                         "m006_request_upstreams", "m007_upstream_totals"]
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # A store from before m002 gets only m002 when it is opened again.
    db.execute("DROP INDEX samples_by_ts")
    db.execute("DELETE FROM _migrations WHERE name = 'm002_samples_by_ts'")
    db.close()
    db = connect(tmp_path / "s.db")
    assert db.execute("SELECT COUNT(*) FROM _migrations").fetchone()[0] == 7
    assert db.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'samples_by_ts'").fetchone()


def _open_store(path: str, start) -> str | None:
    start.wait()
    try:
        Store(path).close()
    except Exception as exc:  # noqa: BLE001 - any failure is reported to the test, which names it
        return repr(exc)
    return None


def test_processes_creating_the_same_store_at_once_all_open_it(tmp_path):
    """`make run` starts the proxy and the collector together on a new store: SQLite refused one
    of them the switch to WAL ("database is locked", its busy timeout not applying), and that
    service failed to boot, in about one start in three."""
    context = multiprocessing.get_context("spawn")
    for round_ in range(12):
        path = str(tmp_path / f"store-{round_}.db")
        with context.Manager() as manager, context.Pool(3) as pool:
            start = manager.Barrier(3)
            failures = [f for f in pool.starmap(_open_store, [(path, start)] * 3) if f]
        assert not failures, (round_, failures)
        assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_failed_scrape_write_changes_nothing(tmp_path):
    store = Store(tmp_path / "s.db")
    url = "http://llama.invalid:8080"
    store.scrape("test", 1.0, 60, lambda base: ScrapeWrite({url: UpstreamWrite({"prompt_tokens_total": 0}, {"prompt_tokens_total": 10})},
                                                           {"up": 1}))
    with pytest.raises(sqlite3.OperationalError):
        store.scrape("test", 2.0, 60, lambda base: ScrapeWrite({url: UpstreamWrite({"prompt_tokens_total": 5}, {"prompt_tokens_total": 15})},
                                                               {"no_such_column": 1}))
    assert store.totals() == {"prompt_tokens_total": 0} and store.last_raw(url) == {"prompt_tokens_total": 10}
    assert store.upstream_totals() == {url: {"prompt_tokens_total": 0}}


MONTH_LIMIT_BYTES = 12 * 1024 * 1024


def test_retention_keeps_a_month_of_10s_samples_small(tmp_path):
    """30 days of scrapes every 10 s (259,200 samples), compacted hourly as the collector does:
    the database stays under 12 MB (the README says about 9 MB, for a llama-server with one slot)."""
    path = tmp_path / "month.db"
    store = Store(path)
    start = time.time() - 30 * 86400
    sample = ("[{\"slot\": 0, \"used\": 1200, \"n_ctx\": 32768}]",)
    for hour in range(30 * 24):
        rows = [(start + hour * 3600 + i * 10, 1, 120.0, 900.0, 40.0, 0.05, 0.4, 1500.0, 60.0, 1.0, 1.0, 0.0, 0.88, sample[0])
                for i in range(360)]
        with store.lock:  # an hour per transaction: the same rows as 360 scrapes, written faster
            store.db.execute("BEGIN")
            store.db.executemany(
                "INSERT INTO samples (ts, up, prompt_tokens, cached_tokens, generated_tokens, prompt_seconds, generation_seconds,"
                " prompt_tps, generation_tps, busy_slots, processing, deferred, cache_ratio, context_used)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            store.db.execute("COMMIT")
        store.compact(start + (hour + 1) * 3600)
    with store.lock:
        by_resolution = dict(store.db.execute("SELECT resolution, COUNT(*) FROM samples GROUP BY resolution").fetchall())
        tokens = store.db.execute("SELECT SUM(generated_tokens) FROM samples").fetchone()[0]
    assert tokens == 30 * 24 * 360 * 40.0  # rolled up, not lost
    assert by_resolution[0] <= 48 * 360 + 360 and by_resolution[60] > 0
    size = os.path.getsize(path) + (os.path.getsize(f"{path}-wal") if os.path.exists(f"{path}-wal") else 0)
    assert size < MONTH_LIMIT_BYTES, size
    # The dashboard's ranges read the newest points, one per bucket, whatever resolution they are stored at.
    now = start + 30 * 24 * 3600
    hour = store.samples(now - 3600)
    assert len(hour) == 360 and hour[-1]["ts"] > now - 11 and hour[0]["ts"] < hour[-1]["ts"]
    day = store.samples(now - 86400, 60)
    assert 1439 <= len(day) <= 1441 and day[-1]["ts"] > now - 120
    assert all(point["generated_tokens"] == 6 * 40.0 for point in day[1:-1])  # six 10 s scrapes a minute
    month = store.samples(now - 30 * 86400, 3600)
    assert 719 <= len(month) <= 721 and month[-1]["ts"] > now - 7200
    assert sum(point["generated_tokens"] for point in month) == pytest.approx(tokens, rel=0.01)
    assert month[len(month) // 2]["generation_tps"] == pytest.approx(40.0 / 0.4)  # from the sums


def test_roll_ups_compute_speeds_from_sums_and_keep_the_last_context(tmp_path):
    store = Store(tmp_path / "s.db")
    rows = [  # a fast scrape with few tokens and a slow one with many: the minute's speed is tokens / seconds
        (600.0, 10.0, 0.01, 1000.0, 0.0, '[{"slot": 0, "used": 1200, "n_ctx": 4096}]'),
        (610.0, 1000.0, 10.0, 100.0, 0.5, '[{"slot": 0, "used": 999, "n_ctx": 4096}]'),
    ]
    with store.lock:
        store.db.executemany("INSERT INTO samples (ts, up, generated_tokens, generation_seconds, generation_tps, cache_ratio,"
                             " prompt_tokens, cached_tokens, context_used) VALUES (?, 1, ?, ?, ?, ?, 100, 0, ?)", rows)
    store.compact(now=1000.0 + 48 * 3600)
    (minute,) = store.samples(0)
    assert minute["resolution"] == 60 and minute["generated_tokens"] == 1010.0
    assert minute["generation_tps"] == pytest.approx(1010.0 / 10.01)  # not the average of 1000 and 100
    assert minute["context_used"] == rows[-1][-1]  # the latest reading, not the largest string


def test_an_outage_reads_as_llama_server_down_not_as_a_missing_collector(tmp_path):
    from collector.job import ScrapeJob
    from llamabridge.api import stored_status
    from tests.support.processes import free_port

    store = Store(tmp_path / "s.db")
    job = ScrapeJob(store, f"http://127.0.0.1:{free_port()}", interval=10)
    job.run()
    job.run()  # still down: no new event, but the store hears from the collector
    assert stored_status(store) == {"up": False, "collector": True, "error": f"llama-server unreachable at {job.upstreams[0].url}: ConnectionError",
                                    "error_kind": "unreachable"}
    assert [e["kind"] for e in store.events(0)] == ["outage"]


def test_roll_ups_keep_each_upstream_apart(tmp_path):
    """With several llama-servers a scrape writes a row for all of them and one for each: a
    minute rolled up stays one row per upstream, each with its own last context."""
    store = Store(tmp_path / "s.db")
    rows = [(600.0, None, 30.0, '[{"slot": 0, "used": 7}]'), (600.0, "http://a:8080", 10.0, '[{"slot": 0, "used": 1}]'),
            (610.0, None, 60.0, '[{"slot": 0, "used": 8}]'), (610.0, "http://a:8080", 20.0, '[{"slot": 0, "used": 2}]')]
    with store.lock:
        store.db.executemany("INSERT INTO samples (ts, up, upstream, generated_tokens, context_used) VALUES (?, 1, ?, ?, ?)", rows)
    store.compact(now=1000.0 + 48 * 3600)
    (together,) = store.samples(0)
    (mine,) = store.samples(0, upstream="http://a:8080")
    assert (together["generated_tokens"], together["context_used"]) == (90.0, rows[2][-1])
    assert (mine["generated_tokens"], mine["context_used"], mine["resolution"]) == (30.0, rows[3][-1], 60)
    assert store.sampled_upstreams(0) == ["http://a:8080"]


def test_a_store_from_before_per_upstream_totals_goes_on_under_the_first_url(tmp_path, monkeypatch):
    """A store written before it kept totals per llama-server: its totals, baseline and restarts
    become LLAMA_URL's first llama-server's at its first scrape, which then counts on from that
    baseline (neither again from zero nor the whole counters twice); a second one starts its own."""
    from collector.exporter import StoreCollector
    from collector.job import ScrapeJob
    from llamabridge import store as store_module

    path = tmp_path / "old.db"
    names = [name for name, _ in store_module.MIGRATIONS]
    monkeypatch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:names.index("m007_upstream_totals")])
    old = connect(path)
    identity = scrape.identity({"model_path": "/models/a.gguf", "build_info": "b1"})
    old.execute("INSERT INTO lifetime VALUES ('prompt_tokens_total', 1000, 40, 1.0)")
    old.executemany("INSERT INTO meta VALUES (?, ?)", [("upstream_identity", identity), ("process_start", "77")])
    old.execute("UPDATE counters SET value = 2 WHERE name = 'upstream_restarts'")
    old.close()
    monkeypatch.undo()

    a, b = "http://a:8080", "http://b:8080"
    readings = {a: scrape.Reading({"prompt_tokens_total": 65.0}, {}, "77", [], {"model_path": "/models/a.gguf", "build_info": "b1"}),
                b: scrape.Reading({"prompt_tokens_total": 500.0}, {}, "90", [], {"model_path": "/models/a.gguf", "build_info": "b1"})}

    class Job(ScrapeJob):
        def read_upstream(self, url: str) -> scrape.Reading:
            return readings[url]

    store = Store(path)
    job = Job(store, (a, b), interval=10, clock=lambda: 5.0)
    job.run()
    assert store.totals() == {"prompt_tokens_total": 1025.0}  # 25 more from the old baseline; b only sets its own
    assert store.upstream_totals() == {a: {"prompt_tokens_total": 1025.0, "upstream_restarts": 2.0}, b: {"prompt_tokens_total": 0.0}}
    readings[b] = scrape.Reading({"prompt_tokens_total": 530.0}, {}, "90", [], readings[b].props)
    job.run()
    exported = {(s.name, s.labels.get("upstream")): s.value for family in StoreCollector(store, job).collect() for s in family.samples}
    assert exported[("llamabridge_lifetime_prompt_tokens_total", None)] == 1055.0
    assert exported[("llamabridge_upstream_lifetime_prompt_tokens_total", a)] == 1025.0
    assert exported[("llamabridge_upstream_lifetime_prompt_tokens_total", b)] == 30.0
    assert exported[("llamabridge_upstream_lifetime_restarts_total", a)] == 2.0
    assert exported[("llamabridge_lifetime_upstream_restarts_total", None)] == 2.0
