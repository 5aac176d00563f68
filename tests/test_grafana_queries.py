"""Every query of every provisioned Grafana dashboard, run on a real Prometheus (Debian's) that
scrapes the real native stack (llama-server on the tiny model, the proxy, the collector) with the
repository's own scrape config, after real traffic: each must return data. The stack is secured
as the compose stack runs it: llama-server asks for LLAMA_API_KEY, the proxy and the collector for
an API key (METRICS_API_KEY opens their /metrics), and Prometheus reads both keys from files."""

from __future__ import annotations

import json
import math
import secrets
import shutil

import anthropic
import openai
import pytest
import requests
import yaml

from llamabridge import keys as keyfile
from tests.support import processes
from tests.support.waiting import wait_until
from tests.test_compose import prometheus_config
from tests.test_kv_cache import first_turn
from tests.test_traffic import main_body

pytestmark = pytest.mark.integration

ROOT = processes.ROOT
SCRAPE_INTERVAL = "1s"
# Grafana's built-in variables, as Grafana would fill them in for a short time range.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


def prometheus(config_path, data_dir) -> processes.Service:
    binary = shutil.which("prometheus")
    assert binary, "no prometheus on PATH: `make test` installs Debian's prometheus package"
    port = processes.free_port()
    cmd = [binary, f"--config.file={config_path}", f"--storage.tsdb.path={data_dir}",
           f"--web.listen-address=127.0.0.1:{port}", "--log.level=info"]
    return processes.Service("prometheus", cmd, r'msg="Start listening for connections" address=127\.0\.0\.1:(?P<port>\d+)',
                             health_path="/-/ready", timeout=60)


def query(server: processes.Service, expr: str) -> list[dict]:
    answer = requests.get(server.url + "/api/v1/query", params={"query": expr}, timeout=30).json()
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]["result"]


def scalar(server, expr: str) -> float:
    result = query(server, expr)
    return float(result[0]["value"][1]) if result else 0.0


@pytest.fixture(scope="module")
def stack(llama_server_bin, tiny_model, tmp_path_factory):
    """llama-server with its own API key; the proxy and collector sharing one store and one keys
    file (with one person's key); Prometheus scraping all three with the stack's keys. Yields the
    services, that person's key and the metrics key."""
    tmp = tmp_path_factory.mktemp("grafana")
    db = str(tmp / "llamabridge.db")
    stack_keys = {"LLAMA_API_KEY": secrets.token_urlsafe(24), "METRICS_API_KEY": secrets.token_urlsafe(24)}
    user_key = keyfile.add(tmp / "keys.json", "grafana-tester")
    (tmp / "kv").mkdir()
    env = dict(stack_keys, API_KEYS_FILE=str(tmp / "keys.json"), DB_PATH=db)
    with processes.llama_server(llama_server_bin, tiny_model, extra=["--api-key", stack_keys["LLAMA_API_KEY"],
                                                                     "--slot-save-path", str(tmp / "kv")]) as llama, \
            processes.proxy(llama.url, KV_CACHE_DIR=str(tmp / "kv"), KV_SAVE_IDLE="0.1", **env) as proxy, processes.collector(llama.url, db, interval=0.5, **env) as collector:
        # Secured for real: without its key, no service shows its metrics.
        for url in (llama.url, proxy.url, collector.url):
            assert requests.get(url + "/metrics", timeout=10).status_code == 401, url
        # The repository's scrape config, with the stack's service addresses moved to loopback and
        # the key files where this test wrote them.
        config = prometheus_config(stack_keys, tmp)
        config["global"]["scrape_interval"] = SCRAPE_INTERVAL
        where = {"llama:8080": llama, "proxy:9090": proxy, "collector:9091": collector}
        for job in config["scrape_configs"]:
            for static in job["static_configs"]:
                static["targets"] = [f"127.0.0.1:{where[target].port}" for target in static["targets"]]
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        with prometheus(tmp / "prometheus.yml", tmp / "tsdb") as prom:
            yield proxy, collector, prom, user_key, stack_keys["METRICS_API_KEY"]


def test_every_dashboard_query_returns_data(stack, capture_messages):
    proxy, _collector, prom, user_key, metrics_key = stack

    # Every target scraped once before the traffic, so rates and increases have a starting point.
    def all_up() -> bool:
        targets = requests.get(prom.url + "/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        return len(targets) == 3 and all(t["health"] == "up" for t in targets)
    wait_until(all_up, timeout=60, what="Prometheus to scrape llama-server, the proxy and the collector")

    # Real traffic of every kind the dashboards break down, in two rounds: the first creates the
    # labelled series, the second (once Prometheus has seen the first) makes them rise.
    session = {"X-Claude-Code-Session-Id": "grafana-session"}
    claude = anthropic.Anthropic(base_url=proxy.url, api_key=user_key, default_headers=session, max_retries=0)
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=user_key, max_retries=0)
    keyed = {"x-api-key": user_key}

    def traffic(round_: int) -> int:
        title = capture_messages[0]  # Claude Code's session-title request, from the recorded session
        requests.post(proxy.url + "/v1/messages?beta=true", json=title, headers=dict(session, **keyed), timeout=60).raise_for_status()
        claude.messages.create(**main_body(f"turn {round_}"))
        with claude.messages.stream(**main_body(f"streamed turn {round_}")) as stream:
            stream.until_done()
        claude.messages.count_tokens(model="claude-sonnet-4-5", messages=[{"role": "user", "content": "count me"}])
        client.chat.completions.create(model="x", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
        malformed = requests.post(proxy.url + "/v1/messages", data=b"{not json", timeout=10,
                                  headers=dict(keyed, **{"content-type": "application/json"}))
        assert malformed.status_code == 400
        # Refused at the edge (a wrong key): not one of the requests counted below.
        assert requests.post(proxy.url + "/v1/messages", json=title, headers={"x-api-key": "llb-wrong"}, timeout=10).status_code == 401
        # Last, so nothing takes the slot before it has been idle long enough to be saved to disk.
        claude.messages.create(**first_turn(f"round {round_}"))
        return 7

    def ingested(requests_sent: int) -> bool:
        return (scalar(prom, "sum(llamabridge_proxy_requests_total)") >= requests_sent
                and scalar(prom, "llamabridge_lifetime_requests_total") >= requests_sent - 2  # count_tokens and 400s: not generations
                and scalar(prom, "sum(llamacpp:tokens_predicted_total)") > 0
                and scalar(prom, "llamabridge_proxy_kv_saves_total") >= requests_sent // 7)

    sent = traffic(1)
    wait_until(lambda: ingested(sent), timeout=60, what="the first round to reach Prometheus")
    sent += traffic(2)
    counted = requests.get(proxy.url + "/metrics", headers={"Authorization": f"Bearer {metrics_key}"}, timeout=5).text
    assert 'handled="local"' in counted and 'status="400"' in counted
    wait_until(lambda: ingested(sent), timeout=60, what="the second round to reach Prometheus")

    failures, checked = [], 0
    for path in sorted((ROOT / "grafana/dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):  # a row has none
                expr = target["expr"]
                for name, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(name, value)
                assert "$" not in expr, f"unhandled Grafana variable in {expr}"
                result = query(prom, expr)
                values = [float(series["value"][1]) for series in result]
                checked += 1
                if not any(math.isfinite(v) for v in values):
                    failures.append(f"{board['title']} / {panel['title']}: {expr} -> {values or 'no series'}")
    assert checked >= 40
    assert not failures, "\n".join(failures)


# llama-server's gauges that restart their averaging window at every read of /metrics: with two
# readers (Prometheus and the collector) each sees what the other left, often 0.
RESET_ON_READ = ("llamacpp:prompt_tokens_seconds", "llamacpp:predicted_tokens_seconds", "llamacpp:n_busy_slots_per_decode")


def test_no_panel_reads_a_gauge_llama_server_resets_on_read():
    exprs = [(path.name, panel["title"], target["expr"]) for path in sorted((ROOT / "grafana/dashboards").glob("*.json"))
             for panel in json.loads(path.read_text())["panels"] for target in panel.get("targets", [])]
    assert len(exprs) >= 40
    speeds = [expr for _, title, expr in exprs if "speed" in title.lower()]
    # A speed is tokens counted over seconds counted: a rate of counters, or a lifetime ratio of them.
    assert len(speeds) >= 2 and all("tokens_total" in expr and "seconds_total" in expr for expr in speeds), speeds
    offenders = [(name, title, expr) for name, title, expr in exprs if any(gauge in expr for gauge in RESET_ON_READ)]
    assert not offenders, offenders
    # The built-in dashboard charts the collector's samples, whose speeds are counter deltas over
    # seconds deltas (collector/job.py): it never sees llama-server's gauges at all.
    page = (ROOT / "dashboard/index.html").read_text()
    assert not any(gauge.split(":")[1] in page for gauge in RESET_ON_READ)
