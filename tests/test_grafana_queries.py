"""Every query of every provisioned Grafana dashboard, run on a real Prometheus (Debian's) that
scrapes the real native stack (llama-server on the tiny model, the proxy, the collector) with the
repository's own scrape config, after real traffic: each must return data."""

from __future__ import annotations

import json
import math
import shutil

import anthropic
import openai
import pytest
import requests
import yaml

from tests.support import processes
from tests.support.waiting import wait_until
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
def stack(llama, tmp_path_factory):
    """The proxy and collector sharing one store, and Prometheus scraping them and llama-server."""
    tmp = tmp_path_factory.mktemp("grafana")
    db = str(tmp / "llamabridge.db")
    with processes.proxy(llama.url, DB_PATH=db) as proxy, processes.collector(llama.url, db, interval=0.5) as collector:
        # The repository's scrape config, with the stack's service addresses moved to loopback.
        config = yaml.safe_load((ROOT / "prometheus/prometheus.yml").read_text())
        config["global"]["scrape_interval"] = SCRAPE_INTERVAL
        where = {"llama:8080": llama, "proxy:9090": proxy, "collector:9091": collector}
        for job in config["scrape_configs"]:
            for static in job["static_configs"]:
                static["targets"] = [f"127.0.0.1:{where[target].port}" for target in static["targets"]]
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        with prometheus(tmp / "prometheus.yml", tmp / "tsdb") as prom:
            yield proxy, collector, prom


def test_every_dashboard_query_returns_data(stack, capture_messages):
    proxy, collector, prom = stack

    # Every target scraped once before the traffic, so rates and increases have a starting point.
    def all_up() -> bool:
        targets = requests.get(prom.url + "/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        return len(targets) == 3 and all(t["health"] == "up" for t in targets)
    wait_until(all_up, timeout=60, what="Prometheus to scrape llama-server, the proxy and the collector")

    # Real traffic of every kind the dashboards break down, in two rounds: the first creates the
    # labelled series, the second (once Prometheus has seen the first) makes them rise.
    session = {"X-Claude-Code-Session-Id": "grafana-session"}
    claude = anthropic.Anthropic(base_url=proxy.url, api_key="x", default_headers=session, max_retries=0)
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)

    def traffic(round_: int) -> int:
        title = capture_messages[0]  # Claude Code's session-title request, from the recorded session
        requests.post(proxy.url + "/v1/messages?beta=true", json=title, headers=session, timeout=60).raise_for_status()
        claude.messages.create(**main_body(f"turn {round_}"))
        with claude.messages.stream(**main_body(f"streamed turn {round_}")) as stream:
            stream.until_done()
        claude.messages.count_tokens(model="claude-sonnet-4-5", messages=[{"role": "user", "content": "count me"}])
        client.chat.completions.create(model="x", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
        assert requests.post(proxy.url + "/v1/messages", data=b"{not json", timeout=10).status_code == 400
        return 6

    def ingested(requests_sent: int) -> bool:
        return (scalar(prom, "sum(llamabridge_proxy_requests_total)") >= requests_sent
                and scalar(prom, "llamabridge_lifetime_requests_total") >= requests_sent - 2  # count_tokens and 400s: not generations
                and scalar(prom, "sum(llamacpp:tokens_predicted_total)") > 0)

    sent = traffic(1)
    wait_until(lambda: ingested(sent), timeout=60, what="the first round to reach Prometheus")
    sent += traffic(2)
    counted = requests.get(proxy.url + "/metrics", timeout=5).text
    assert 'handled="local"' in counted and 'status="400"' in counted
    wait_until(lambda: ingested(sent), timeout=60, what="the second round to reach Prometheus")

    failures, checked = [], 0
    for path in sorted((ROOT / "grafana/dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel["targets"]:
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
