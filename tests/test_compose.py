"""The compose stack (`make up`) as far as this machine can check it without a Docker engine:
compose.yaml against the Compose specification's JSON schema and the stack's conventions, the
image's Dockerfile, Prometheus' config (with the real promtool), Grafana's provisioning and
dashboards, the llama-server service's settings run for real on the native binary, the checks
`make up` makes before it calls Docker, and `make keys`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from llamabridge import keys as keyfile
from tests.support import processes
from tests.support.waiting import wait_until

ROOT = processes.ROOT
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())  # PyYAML resolves the `<<: *anchor` merges
SERVICES = COMPOSE["services"]
DATASOURCE_UID = "llamabridge-prometheus"
DASHBOARDS = {  # file -> (uid, title): the uids are pinned so links and bookmarks survive re-provisioning
    "llama-server.json": ("llamabridge-llama-server", "llama.cpp server"),
    "proxy.json": ("llamabridge-proxy", "llamabridge proxy"),
    "lifetime.json": ("llamabridge-lifetime", "Lifetime"),
}
LOCAL_DEFAULT = "${BIND_ADDR:-127.0.0.1}:"


def check_jsonschema(path: Path) -> subprocess.CompletedProcess:
    tool = Path(sys.executable).with_name("check-jsonschema")
    return subprocess.run([str(tool), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------- compose.yaml


def test_compose_file_is_valid_against_the_compose_specification(tmp_path):
    result = check_jsonschema(ROOT / "compose.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    # The validator does reject what Compose would: a misspelt depends_on condition.
    broken = tmp_path / "compose.yaml"
    broken.write_text((ROOT / "compose.yaml").read_text().replace("condition: service_healthy", "condition: healthy", 1))
    result = check_jsonschema(broken)
    assert result.returncode != 0 and "healthy" in result.stdout + result.stderr


def test_services_and_profiles():
    assert set(SERVICES) == {"llama", "llama-cpu", "llama-rpc", "proxy", "collector", "prometheus", "grafana"}
    assert COMPOSE["name"] == "llamabridge"
    assert SERVICES["llama"]["profiles"] == ["gpu"]
    assert SERVICES["llama-cpu"]["profiles"] == ["cpu"]
    assert SERVICES["llama-rpc"]["profiles"] == ["rpc"]
    # The CPU and RPC variants answer at the same address, so the rest of the stack does not change.
    for name in ("llama-cpu", "llama-rpc"):
        assert SERVICES[name]["networks"]["default"]["aliases"] == ["llama"], name
    for name in ("proxy", "collector", "prometheus", "grafana"):
        assert "profiles" not in SERVICES[name], name  # always on, whichever llama-server (or none)


def test_images_are_pinned():
    gpu, cpu = SERVICES["llama"]["image"], SERVICES["llama-cpu"]["image"]
    gpu_build = re.fullmatch(r"ghcr\.io/ggml-org/llama\.cpp:server-cuda12-b(\d+)", gpu)
    cpu_build = re.fullmatch(r"ghcr\.io/ggml-org/llama\.cpp:server-b(\d+)", cpu)
    assert gpu_build and cpu_build and gpu_build[1] == cpu_build[1], (gpu, cpu)
    for name in ("prometheus", "grafana"):
        image = SERVICES[name]["image"]
        assert re.fullmatch(r"[a-z/]+:v?\d+\.\d+\.\d+@sha256:[0-9a-f]{64}", image), image
    dockerfile = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.MULTILINE)[1]
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), base


def test_llama_service_gpu_reservation_settings_and_healthcheck():
    gpu = SERVICES["llama"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert "deploy" not in SERVICES["llama-cpu"] and "deploy" not in SERVICES["llama-rpc"]
    for name in ("llama", "llama-cpu", "llama-rpc"):
        service = SERVICES[name]
        env = dict(item.partition("=")[::2] for item in service["environment"])
        assert env["LLAMA_ARG_ENDPOINT_METRICS"] == "1" and env["LLAMA_ARG_JINJA"] == "1"
        for passthrough in ("LLAMA_ARG_MODEL", "LLAMA_ARG_HF_REPO"):
            assert passthrough in env and env[passthrough] == "", passthrough  # from .env, unset if unset
        assert env["LLAMA_ARG_CTX_SIZE"].startswith("${LLAMA_ARG_CTX_SIZE:-")
        assert env["LLAMA_ARG_N_PARALLEL"].startswith("${LLAMA_ARG_N_PARALLEL:-")
        # llama-server reads --api-key from LLAMA_API_KEY (there is no LLAMA_ARG_API_KEY): the same
        # variable, from .env, that the proxy, the collector and Prometheus send.
        assert env["LLAMA_API_KEY"] == "${LLAMA_API_KEY:-}" and "LLAMA_ARG_API_KEY" not in env
        assert env["LLAMA_CACHE"] == "/cache" and "llama-cache:/cache" in service["volumes"]
        assert "./models:/models:ro" in service["volumes"]
        check = service["healthcheck"]
        assert "http://127.0.0.1:8080/health" in check["test"]
        assert duration_seconds(check["start_period"]) >= 30 * 60  # a first model download
        assert "ports" not in service


def test_proxy_and_collector_share_one_image_a_volume_and_wait_for_llama():
    proxy, collector = SERVICES["proxy"], SERVICES["collector"]
    assert proxy["build"] == collector["build"] == "."
    assert proxy["image"] == collector["image"]
    assert proxy["command"] == ["python", "-m", "proxy"] and collector["command"] == ["python", "-m", "collector"]
    for service in (proxy, collector):
        assert "data:/data" in service["volumes"]
        assert service["environment"]["DB_PATH"] == "/data/llamabridge.db"
        assert service["environment"]["LLAMA_URL"] == "${LLAMA_URL:-http://llama:8080}"
        assert service["depends_on"] == {
            "llama": {"condition": "service_healthy", "required": False},
            "llama-cpu": {"condition": "service_healthy", "required": False},
            "llama-rpc": {"condition": "service_healthy", "required": False},
        }
        assert "/healthz" in " ".join(service["healthcheck"]["test"])
    assert proxy["environment"]["PROXY_PORT"] == "9090" and collector["environment"]["COLLECTOR_PORT"] == "9091"
    assert set(COMPOSE["volumes"]) == {"data", "llama-cache", "kv-cache", "prometheus-data", "grafana-data"}


def test_llama_server_saves_prompt_caches_where_the_proxy_finds_them():
    """Both llama-server services save slots (--slot-save-path, a flag: llama-server reads it from
    no variable) into the kv-cache volume, which the proxy mounts at the same path and is told
    about (KV_CACHE_DIR); the collector needs none of it."""
    for name in ("llama", "llama-cpu", "llama-rpc"):
        service = SERVICES[name]
        assert service["command"] == ["--slot-save-path", "/kv-cache"], name
        assert "kv-cache:/kv-cache" in service["volumes"], name
        assert not any(item.startswith("LLAMA_ARG_SLOT_SAVE_PATH") for item in service["environment"]), name
    proxy, collector = SERVICES["proxy"], SERVICES["collector"]
    assert proxy["environment"]["KV_CACHE_DIR"] == "/kv-cache"
    assert proxy["volumes"] == ["data:/data", "kv-cache:/kv-cache"]
    assert "KV_CACHE_DIR" not in collector["environment"] and collector["volumes"] == ["data:/data"]


def test_docker_waits_for_the_proxy_to_finish_its_requests_and_its_request_log():
    """`docker compose stop` sends SIGTERM, then SIGKILL after stop_grace_period: long enough for
    gunicorn's graceful stop of the requests still running, then the request log's last flush."""
    from llamabridge.requestlog import EXIT_SECONDS, WRITE_BUSY_SECONDS
    from proxy.__main__ import SERVER_OPTIONS

    needed = SERVER_OPTIONS["graceful_timeout"] + EXIT_SECONDS + WRITE_BUSY_SECONDS
    assert duration_seconds(SERVICES["proxy"]["stop_grace_period"]) > needed
    # The collector's requests are short; it gets the same time to finish a scrape and close the store.
    assert SERVICES["collector"]["stop_grace_period"] == SERVICES["proxy"]["stop_grace_period"]


def test_proxy_and_collector_get_the_keys_and_judge_exposure_by_where_docker_publishes_them():
    proxy, collector = SERVICES["proxy"]["environment"], SERVICES["collector"]["environment"]
    # Both listen on 0.0.0.0 in their containers; whether they may run without keys depends on
    # where Docker publishes them: the proxy on BIND_ADDR, the collector nowhere.
    assert proxy["PUBLISHED_ADDR"] == "${BIND_ADDR:-127.0.0.1}" and proxy["PROXY_HOST"] == "0.0.0.0"
    assert collector["PUBLISHED_ADDR"] == "127.0.0.1" and "ports" not in SERVICES["collector"]
    for env in (proxy, collector):
        hosts = env["ALLOWED_HOSTS"].split(",")
        assert {"proxy", "collector"} <= set(hosts)  # as Prometheus scrapes them
        assert "${BIND_ADDR:-127.0.0.1}" in hosts and "${ALLOWED_HOSTS:-}" in hosts  # and the user's own names
        assert env["LLAMA_API_KEY"] == "${LLAMA_API_KEY:-}" and env["METRICS_API_KEY"] == "${METRICS_API_KEY:-}"


def test_only_the_proxy_and_grafana_are_published_on_loopback_by_default():
    published = {name: service["ports"] for name, service in SERVICES.items() if "ports" in service}
    assert published == {"proxy": [LOCAL_DEFAULT + "${PROXY_PORT:-9090}:9090"],
                         "grafana": [LOCAL_DEFAULT + "${GRAFANA_PORT:-3000}:3000"]}


def test_every_service_has_a_healthcheck():
    for name, service in SERVICES.items():
        assert service.get("healthcheck", {}).get("test"), name


def test_every_service_keeps_a_bounded_log():
    """Left running for weeks, a service that logs every request must not fill the disk."""
    for name, service in SERVICES.items():
        logging = service.get("logging", {})
        assert logging.get("driver") == "json-file" and logging["options"]["max-size"] and int(logging["options"]["max-file"]) >= 1, name


def test_grafana_is_provisioned_read_only_for_anonymous_viewers():
    grafana = SERVICES["grafana"]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboards_dir = mounts["./grafana/dashboards"]
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboards_dir + "/") and (ROOT / "grafana/dashboards" / Path(home).name).is_file()
    provider = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/llamabridge.yaml").read_text())["providers"]
    assert len(provider) == 1 and provider[0]["options"]["path"] == dashboards_dir
    assert provider[0]["editable"] is False and provider[0]["allowUiUpdates"] is False
    prometheus = SERVICES["prometheus"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]


def test_every_file_the_stack_mounts_or_builds_from_exists():
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and source != "./models":  # make up creates ./models
                assert (ROOT / source).exists(), (name, source)
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), line
                assert f"!{source.rstrip('/')}" in (ROOT / ".dockerignore").read_text().replace("/\n", "\n"), source


def test_rpc_llama_server_is_built_from_the_pinned_source_with_the_rpc_backend():
    """The ggml-org images have no RPC backend, so the rpc profile builds its llama-server (and
    the worker) with llama/build.sh, as `make rpc-server` does, at the build the other services pin."""
    service = SERVICES["llama-rpc"]
    context = ROOT / service["build"]["context"]
    dockerfile = (context / service["build"]["dockerfile"]).read_text()
    assert re.search(r"bash /src/build\.sh rpc-server", dockerfile)
    for base in re.findall(r"^FROM (\S+)", dockerfile, re.MULTILINE):
        assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), base
    for line in dockerfile.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (context / source).is_file(), line
    version = re.search(r'LLAMA_CPP_VERSION="\$\{LLAMA_CPP_VERSION:-(\d+)\.', (ROOT / "llama/build.sh").read_text())[1]
    cpu_build = SERVICES["llama-cpu"]["image"].rsplit("-b", 1)[1]
    assert service["image"] == f"llamabridge-llama-rpc:b{version}" and version == cpu_build
    # Its workers come from .env like every other llama-server setting; unset stays unset.
    assert "LLAMA_ARG_RPC" in service["environment"]


def test_dockerfile_runs_as_a_non_root_user_with_a_healthcheck():
    dockerfile = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*CMD", dockerfile, re.MULTILINE)
    assert 'CMD ["python", "-m", "proxy"]' in dockerfile


def duration_seconds(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text))


# ---------------------------------------------------------------- Prometheus and Grafana files


def scrape_credentials() -> dict[str, tuple[str, str]]:
    """Per Prometheus job: the credentials file it reads, and the variable whose value compose.yaml
    writes there (a top-level `configs:` entry with `content: ${VAR:-...}`, mounted at that path)."""
    config = yaml.safe_load((ROOT / "prometheus/prometheus.yml").read_text())
    sources = {mount["target"]: mount["source"] for mount in SERVICES["prometheus"]["configs"]}
    found = {}
    for job in config["scrape_configs"]:
        path = job["authorization"]["credentials_file"]
        content = COMPOSE["configs"][sources[path]]["content"]
        variable = re.fullmatch(r"\$\{(\w+):-[^}]+\}", content)
        assert variable is not None, f"{sources[path]}'s content is not a single ${{VAR:-default}}: {content!r}"
        found[job["job_name"]] = (path, variable[1])
    return found


def prometheus_config(keys: dict[str, str], where: Path) -> dict:
    """prometheus/prometheus.yml as the stack's Prometheus reads it, with each credentials file
    written into `where` holding keys[VAR], as Compose writes it into the container."""
    config = yaml.safe_load((ROOT / "prometheus/prometheus.yml").read_text())
    credentials = scrape_credentials()
    for job in config["scrape_configs"]:
        path, variable = credentials[job["job_name"]]
        local = where / Path(path).name
        local.write_text(keys[variable])
        job["authorization"]["credentials_file"] = str(local)
    return config


def test_prometheus_config_is_valid_and_scrapes_the_three_services(tmp_path):
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(prometheus_config({"LLAMA_API_KEY": "k", "METRICS_API_KEY": "m"}, tmp_path)))
    result = subprocess.run(["promtool", "check", "config", str(config_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((ROOT / "prometheus/prometheus.yml").read_text())
    targets = {job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]] for job in config["scrape_configs"]}
    assert targets == {"llama-server": ["llama:8080"], "llamabridge-proxy": ["proxy:9090"],
                       "llamabridge-collector": ["collector:9091"]}


def test_prometheus_scrapes_with_the_keys_compose_mounts():
    """llama-server's key for llama-server, the metrics key for the proxy and the collector, each
    from a file Compose writes into the Prometheus container (its config cannot read variables)."""
    credentials = scrape_credentials()
    assert {job: variable for job, (_, variable) in credentials.items()} == {
        "llama-server": "LLAMA_API_KEY", "llamabridge-proxy": "METRICS_API_KEY", "llamabridge-collector": "METRICS_API_KEY"}
    for name, config in COMPOSE["configs"].items():
        # Compose writes no file for an empty `content` (it skips it, and Prometheus would find
        # none): an unset key must become a word that a server without keys ignores.
        default = re.fullmatch(r"\$\{\w+:-([^}]+)\}", config["content"])
        assert default and default[1].strip(), (name, config)


def test_datasource_has_the_pinned_uid():
    sources = yaml.safe_load((ROOT / "grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"]
    assert len(sources) == 1
    source = sources[0]
    assert source["uid"] == DATASOURCE_UID and source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090" and source["editable"] is False


def dashboards() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in sorted((ROOT / "grafana/dashboards").glob("*.json"))}


def test_dashboards_have_pinned_uids_and_reference_the_datasource_by_uid():
    boards = dashboards()
    assert set(boards) == set(DASHBOARDS)
    for name, board in boards.items():
        text = (ROOT / "grafana/dashboards" / name).read_text()
        assert (board["uid"], board["title"]) == DASHBOARDS[name]
        assert "__inputs" not in board and "__requires" not in board and "${DS_" not in text, name
        assert board.get("id") is None and board["editable"] is False
        ids = [panel["id"] for panel in board["panels"]]
        assert len(ids) == len(set(ids)) and len(ids) >= 6, name
        for panel in board["panels"]:
            if panel["type"] == "row":  # a heading over the panels below it: no query of its own
                assert "targets" not in panel and panel["gridPos"]["w"] == 24, (name, panel["title"])
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, (name, panel["title"])
            assert panel["targets"], (name, panel["title"])
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == DATASOURCE_UID and target["expr"].strip()
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, (name, panel["title"])


def test_dashboards_cover_what_users_look_for():
    def exprs(name: str) -> str:
        return " ".join(t["expr"] for p in dashboards()[name]["panels"] for t in p.get("targets", []))

    llama = exprs("llama-server.json")
    for metric in ("llamacpp:prompt_tokens_total", "llamacpp:tokens_predicted_total", "llamacpp:requests_processing",
                   "llamacpp:requests_deferred", "llamabridge_context_used_tokens", "llamabridge_lifetime_cached_prompt_tokens_total",
                   "llamacpp:n_decode_total", "llamabridge_lifetime_upstream_restarts_total"):
        assert metric in llama, metric
    proxy = exprs("proxy.json")
    for needle in ("sum by (client)", "sum by (class)", "sum by (status)", "llamabridge_proxy_queue_depth",
                   "llamabridge_proxy_queue_wait_seconds_bucket", "llamabridge_proxy_time_to_first_token_seconds_bucket",
                   "llamabridge_proxy_request_duration_seconds_bucket", 'handled!="upstream"', 'status=~"[45].."',
                   "sum by (user)", 'kind!="cached"', "llamabridge_proxy_refused_requests_total", "sum by (reason)",
                   # the prompt cache on disk
                   "llamabridge_proxy_kv_saves_total", "llamabridge_proxy_kv_save_failures_total",
                   "sum by (result) (rate(llamabridge_proxy_kv_restores_total", "llamabridge_proxy_kv_restored_tokens_total",
                   "llamabridge_proxy_kv_cache_bytes", "llamabridge_proxy_kv_cache_files",
                   "llamabridge_proxy_kv_save_seconds_bucket"):
        assert needle in proxy, needle
    assert "Prompt cache on disk" in [p["title"] for p in dashboards()["proxy.json"]["panels"] if p["type"] == "row"]
    lifetime = exprs("lifetime.json")
    for needle in ("llamabridge_lifetime_generated_tokens_total", "llamabridge_lifetime_requests_total", "[1d]"):
        assert needle in lifetime, needle


# ---------------------------------------------------------------- llama-server as the compose service runs it


def compose_llama_environment(overrides: dict[str, str]) -> dict[str, str]:
    """The llama service's environment as Compose would resolve it from an .env that sets only
    `overrides`: `${X:-default}` gives the default, a bare name the .env value or "" (set, empty)."""
    env = {}
    for item in SERVICES["llama-cpu"]["environment"]:
        name, has_value, value = item.partition("=")
        if not has_value:
            value = overrides.get(name, "")
        else:
            value = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: overrides.get(m[1], m[2]), value)
        env[name] = value
    return env


@pytest.mark.integration
@pytest.mark.parametrize("api_key", ["", "compose-test-key"], ids=["no-key", "key"])
def test_llama_service_settings_start_a_real_llama_server(llama_server_bin, tiny_model, tmp_path, api_key):
    """The service's LLAMA_ARG_* settings and entry point, run on the native llama-server: the
    empty variables an .env leaves are dropped, and metrics, jinja and the context size hold.
    With LLAMA_API_KEY (make up makes one) everything but /health needs the key; left empty,
    llama-server asks for none and ignores the word Prometheus' key file then holds."""
    port = processes.free_port()
    env = compose_llama_environment({"LLAMA_ARG_MODEL": tiny_model, "LLAMA_ARG_CTX_SIZE": "8192",
                                     "LLAMA_ARG_THREADS": "1", "LLAMA_API_KEY": api_key})
    assert env["LLAMA_ARG_HF_REPO"] == "" and env["LLAMA_ARG_CACHE_RAM"] == ""  # the case the entry point exists for
    assert env["LLAMA_API_KEY"] == api_key
    unset = re.fullmatch(r"\$\{LLAMA_API_KEY:-([^}]+)\}", COMPOSE["configs"]["llama-api-key"]["content"])[1]
    sent = {"Authorization": f"Bearer {api_key or unset}"}  # what Prometheus sends
    env.update(LLAMA_ARG_HOST="127.0.0.1", LLAMA_ARG_PORT=str(port), LLAMA_CACHE=str(tmp_path),  # loopback, not the container's
               LLAMA_SERVER=llama_server_bin, PATH=os.environ["PATH"])
    entry = SERVICES["llama-cpu"]["entrypoint"]
    script = next(v.split(":")[0] for v in SERVICES["llama-cpu"]["volumes"] if v.split(":")[1] == entry[-1])
    # The service's command, with the kv-cache volume's mount point made a directory of this
    # test's own that does not exist yet (a fresh volume is empty; llama-server refuses a missing one).
    kv_cache = tmp_path / "kv-cache"
    command = [str(kv_cache) if arg == "/kv-cache" else arg for arg in SERVICES["llama-cpu"]["command"]]
    server = processes.Service("llama-server", ["sh", str(ROOT / script), *command], r"listening on http://127\.0\.0\.1:(?P<port>\d+)",
                               env=env, health_path="/health", timeout=120)
    with server:  # its healthcheck's /health answered, key or not
        # The entry point made the directory and gave it to the proxy's uid (this test runs as
        # root, as the image's entry point does), so the proxy may delete what llama-server saves.
        assert kv_cache.is_dir() and (os.getuid() != 0 or kv_cache.stat().st_uid == 10001)
        chat = requests.post(server.url + "/v1/chat/completions", headers=sent, timeout=60,
                             json={"max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 200, chat.text
        saved = requests.post(server.url + "/slots/0?action=save", headers=sent, timeout=60, json={"filename": "s.bin"})
        assert saved.status_code == 200 and saved.json()["n_saved"] > 0, saved.text
        assert (kv_cache / "s.bin").stat().st_size > 0
        props = requests.get(server.url + "/props", headers=sent, timeout=10).json()
        assert props["default_generation_settings"]["n_ctx"] == 8192 and props["total_slots"] == 1
        assert props["endpoint_metrics"] is True
        assert props["chat_template_caps"].get("supports_tools") is True  # --jinja: the model's own template
        metrics = requests.get(server.url + "/metrics", headers=sent, timeout=10)
        assert metrics.status_code == 200 and "llamacpp:prompt_tokens_total" in metrics.text
        without = requests.get(server.url + "/metrics", timeout=10).status_code
        assert without == (401 if api_key else 200)


# ---------------------------------------------------------------- make up's checks, and make keys (no Docker engine here)

FAKE_DOCKER = r'''#!/usr/bin/env bash
# A stand-in for the docker CLI: this machine has no Docker engine (and the tests need each kind
# of missing piece on demand). It answers like the real client for what scripts/compose.sh and
# scripts/keys.sh ask, and logs every call.
echo "docker $* COMPOSE_PROFILES=${COMPOSE_PROFILES-unset}" >> "$FAKE_DOCKER_LOG"
case "$*" in
  "compose version"*)
    [[ -n "$FAKE_COMPOSE" ]] || { echo "docker: unknown command: docker compose" >&2; exit 1; }
    echo "$FAKE_COMPOSE" ;;
  "info --format"*) echo "$FAKE_RUNTIMES" ;;
  "info") [[ -z "$FAKE_NO_ENGINE" ]] || { echo "Cannot connect to the Docker daemon" >&2; exit 1; } ;;
  # The stack's containers: FAKE_PS holds their ids (none by default).
  "compose ps -a -q") [[ -z "$FAKE_PS" ]] || echo "$FAKE_PS" ;;
  # The proxy's start-up checks in its container: FAKE_CHECK is the one line of a refusal.
  "compose run --rm --no-deps -T proxy python -m proxy check")
    echo " Volume \"llamabridge_data\"  Created" >&2
    [[ -z "$FAKE_CHECK" ]] || { echo "$FAKE_CHECK" >&2; exit 2; } ;;
  *) exit 0 ;;
esac
'''
# The native proxy in a copy of the repository: its venv's python logs what it was asked.
FAKE_PYTHON = '#!/usr/bin/env bash\necho "python $*" >> "$FAKE_DOCKER_LOG"\n'
HF_REPO = {"LLAMA_ARG_HF_REPO": "org/model:Q4_K_M"}


@pytest.fixture
def stack_copy(tmp_path):
    """scripts/compose.sh and scripts/keys.sh in a throwaway copy of the repository's top level
    (they write .env there), with the tools they use and nothing else on PATH."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for name in ("compose.yaml", ".env.example", "Makefile", "scripts/compose.sh", "scripts/compose-lib.sh", "scripts/keys.sh"):
        shutil.copy(ROOT / name, root / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "sh", "sed", "sort", "head", "tail", "grep", "cp", "mkdir", "dirname", "cat", "env",
                 "base64", "tr", "make"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    return root, bin_dir, tmp_path / "docker.log"


def run_in_copy(stack_copy, argv: list[str], docker: bool, env: dict[str, str]) -> subprocess.CompletedProcess:
    root, bin_dir, log = stack_copy
    if docker:
        fake = bin_dir / "docker"
        fake.write_text(FAKE_DOCKER)
        fake.chmod(0o755)
    full = {"PATH": str(bin_dir), "HOME": str(root), "FAKE_DOCKER_LOG": str(log),
            "FAKE_COMPOSE": "2.30.3", "FAKE_RUNTIMES": '{"nvidia":{"path":"nvidia-container-runtime"},"runc":{"path":"runc"}}'}
    full.update(env)
    return subprocess.run(argv, cwd=root, env=full, capture_output=True, text=True, timeout=60)


def make_up(stack_copy, *, docker: bool = True, command: str = "up", **env: str) -> subprocess.CompletedProcess:
    return run_in_copy(stack_copy, ["bash", str(stack_copy[0] / "scripts/compose.sh"), command], docker, env)


def make_keys(stack_copy, *variables: str, docker: bool = True, **env: str) -> subprocess.CompletedProcess:
    """`make keys VAR=value ...` in the copy, through its Makefile; `env` is the environment."""
    return run_in_copy(stack_copy, ["make", "--no-print-directory", "keys", *variables], docker, env)


def compose_calls(log: Path) -> list[str]:
    """What the scripts asked Compose (or the native venv's python) to do, in order: every logged
    call but the probes (docker compose version, docker compose ps)."""
    return [line for line in log.read_text().splitlines() if line.startswith(("docker compose ", "python "))
            and not line.startswith(("docker compose version", "docker compose ps"))] if log.exists() else []


def test_make_up_without_docker_suggests_the_native_run(stack_copy):
    result = make_up(stack_copy, docker=False)
    assert result.returncode == 2
    assert "Docker is not installed" in result.stderr and "make demo" in result.stderr and "make run" in result.stderr


def test_make_up_without_the_compose_plugin_or_with_an_old_one(stack_copy):
    result = make_up(stack_copy, FAKE_COMPOSE="")
    assert result.returncode == 2 and "Compose plugin is missing" in result.stderr and "make demo" in result.stderr
    result = make_up(stack_copy, FAKE_COMPOSE="2.20.2")
    assert result.returncode == 2 and "2.20.2 is too old" in result.stderr


def test_make_up_without_a_running_engine(stack_copy):
    result = make_up(stack_copy, FAKE_NO_ENGINE="1")
    assert result.returncode == 2 and "engine does not answer" in result.stderr


def test_make_up_without_the_nvidia_toolkit_suggests_the_cpu_variant(stack_copy):
    result = make_up(stack_copy, FAKE_RUNTIMES='{"runc":{"path":"runc"}}', **HF_REPO)
    assert result.returncode == 2
    assert "NVIDIA container toolkit" in result.stderr and "LLAMA_DEVICE=cpu make up" in result.stderr
    assert "make demo" in result.stderr


def test_make_up_needs_a_model(stack_copy):
    result = make_up(stack_copy)
    assert result.returncode == 2 and "no model" in result.stderr and "LLAMA_ARG_HF_REPO" in result.stderr
    result = make_up(stack_copy, LLAMA_ARG_MODEL="/models/missing.gguf")
    assert result.returncode == 2 and "no models/missing.gguf here" in result.stderr


def test_make_up_gpu_cpu_and_external_llama_server(stack_copy):
    root, _, log = stack_copy
    result = make_up(stack_copy, **HF_REPO)
    assert result.returncode == 0, result.stderr
    # Built once, the proxy's start-up checks run in its own container, then the stack started.
    assert compose_calls(log) == ["docker compose build COMPOSE_PROFILES=gpu",
                                  "docker compose run --rm --no-deps -T proxy python -m proxy check COMPOSE_PROFILES=gpu",
                                  "docker compose up --detach --remove-orphans COMPOSE_PROFILES=gpu"]
    # First run: .env made from the example, with a generated Grafana password.
    password = re.search(r"^GRAFANA_ADMIN_PASSWORD=(\S{20,})$", (root / ".env").read_text(), re.MULTILINE)
    assert password and password[1] not in result.stdout
    (root / "models").mkdir(exist_ok=True)
    (root / "models/m.gguf").write_bytes(b"GGUF")
    result = make_up(stack_copy, LLAMA_DEVICE="cpu", LLAMA_ARG_MODEL="/models/m.gguf")
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines()[-1].endswith("COMPOSE_PROFILES=cpu")
    assert (root / ".env").read_text().count("GRAFANA_ADMIN_PASSWORD=") == 1  # filled in once, then kept
    result = make_up(stack_copy, LLAMA_URL="http://gpu-box.lan:8080")
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines()[-1].endswith("COMPOSE_PROFILES=")  # no llama-server service
    for inside in ("http://127.0.0.1:8080", "http://0.0.0.0:8080"):
        result = make_up(stack_copy, LLAMA_URL=inside)
        assert result.returncode == 2 and "host.docker.internal:8080" in result.stderr


def test_make_up_generates_the_stacks_keys_once_and_never_prints_them(stack_copy):
    """The stack's own llama-server gets a key (LLAMA_API_KEY), and Prometheus one for the proxy's
    and the collector's /metrics (METRICS_API_KEY): made into .env on the first run, then kept."""
    root, _, _ = stack_copy
    first = make_up(stack_copy, **HF_REPO)
    assert first.returncode == 0, first.stderr
    env = (root / ".env").read_text()
    made = {name: re.search(rf"^{name}=([A-Za-z0-9]{{20,}})$", env, re.MULTILINE)
            for name in ("GRAFANA_ADMIN_PASSWORD", "LLAMA_API_KEY", "METRICS_API_KEY")}
    assert all(made.values()), env
    assert len({m[1] for m in made.values()}) == 3
    for name, found in made.items():
        assert found[1] not in first.stdout + first.stderr
        assert f"({name})" in first.stdout and env.count(f"\n{name}=") == 1
    again = make_up(stack_copy, **HF_REPO)
    assert again.returncode == 0 and "generated" not in again.stdout
    assert (root / ".env").read_text() == env


def test_make_up_leaves_the_key_of_your_own_llama_server_to_you(stack_copy):
    root, _, _ = stack_copy
    result = make_up(stack_copy, LLAMA_URL="http://gpu-box.lan:8080")
    assert result.returncode == 0, result.stderr
    env = (root / ".env").read_text()
    assert not re.search(r"^LLAMA_API_KEY=\S", env, re.MULTILINE) and "LLAMA_API_KEY" not in result.stdout
    assert re.search(r"^METRICS_API_KEY=\S{20,}$", env, re.MULTILINE)


def test_make_up_stops_when_the_proxy_would_refuse_to_start(stack_copy):
    """The proxy's own start-up check, run in its container before anything starts: its refusal
    ends make up with status 2, its line shown, and the stack is not started."""
    _, _, log = stack_copy
    refusal = ("llamabridge proxy: BIND_ADDR=0.0.0.0 reaches beyond this machine, but API_KEYS_FILE=/data/keys.json "
               "has no keys: add one (make keys ADD=<name>, or python -m proxy keys add <name>), or set "
               "ALLOW_UNAUTHENTICATED=true to serve anyone who can reach it")
    result = make_up(stack_copy, BIND_ADDR="0.0.0.0", FAKE_CHECK=refusal, **HF_REPO)
    assert result.returncode == 2
    assert f"make up: the proxy's start-up check failed: {refusal}\n" in result.stderr
    assert "Volume" not in result.stderr  # Compose's own progress lines are not the message
    assert "make keys ADD=<name>, then make up again" in result.stderr and "ALLOW_UNAUTHENTICATED=true in .env" in result.stderr
    assert compose_calls(log)[-1].startswith("docker compose run --rm --no-deps -T proxy python -m proxy check")
    # On loopback a refusal is about a setting, not keys: only its line.
    bad = "llamabridge proxy: QUEUE_MAX='lots': expected a whole number"
    result = make_up(stack_copy, FAKE_CHECK=bad, **HF_REPO)
    assert result.returncode == 2 and bad in result.stderr and "make keys" not in result.stderr
    assert not any(call.startswith("docker compose up") for call in compose_calls(log))


def test_make_up_beyond_loopback_points_at_make_keys(stack_copy):
    result = make_up(stack_copy, **HF_REPO)
    assert result.returncode == 0 and "make keys" not in result.stdout
    result = make_up(stack_copy, BIND_ADDR="192.168.1.20", **HF_REPO)
    assert result.returncode == 0, result.stderr
    assert "http://192.168.1.20:9090" in result.stdout and "make keys ADD=<name>" in result.stdout


def test_make_up_reads_env_like_compose(stack_copy):
    """Comments, quotes and `export` in .env mean what Compose takes them to mean."""
    root, _, log = stack_copy
    (root / "models").mkdir()
    (root / "models/m.gguf").write_bytes(b"GGUF")
    (root / ".env").write_text("LLAMA_DEVICE=gpu\nLLAMA_DEVICE=cpu   # no GPU on this box\n"
                               "export LLAMA_ARG_MODEL=\"/models/m.gguf\"  # the one in ./models\n"
                               "GRAFANA_ADMIN_PASSWORD='a#b c'\nPROXY_PORT=9191 # moved\n")
    result = make_up(stack_copy)
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines()[-1].endswith("COMPOSE_PROFILES=cpu")
    assert "model /models/m.gguf" in result.stdout and "http://127.0.0.1:9191 " in result.stdout
    assert "password generated" not in result.stdout  # the quoted one, '#' and all, was read


def test_make_up_rpc_needs_its_workers(stack_copy):
    _, _, log = stack_copy
    result = make_up(stack_copy, LLAMA_DEVICE="rpc", **HF_REPO)
    assert result.returncode == 2 and "LLAMA_ARG_RPC=host:port,host:port" in result.stderr
    assert compose_calls(log) == []
    result = make_up(stack_copy, LLAMA_DEVICE="rpc", LLAMA_ARG_RPC="10.0.0.2:50052,10.0.0.3:50052", FAKE_RUNTIMES="{}", **HF_REPO)
    assert result.returncode == 0, result.stderr  # no NVIDIA toolkit needed here: the workers have the GPUs
    assert "layers on 10.0.0.2:50052,10.0.0.3:50052" in result.stdout
    assert log.read_text().splitlines()[-1].endswith("COMPOSE_PROFILES=rpc")


def test_make_down_ps_and_logs_cover_every_profile(stack_copy):
    _, _, log = stack_copy
    for command in ("down", "ps", "logs"):
        assert make_up(stack_copy, command=command).returncode == 0
        assert log.read_text().splitlines()[-1].startswith(f"docker compose --profile gpu --profile cpu --profile rpc {command}")


COMPOSE_KEYS = "docker compose run --rm --no-deps -T proxy python -m proxy keys"


def test_make_keys_manages_the_compose_stack_once_it_exists(stack_copy):
    """The stack's keys file is in its data volume: a one-off proxy container reads and writes it
    (the running proxy re-reads it), with the make variables as `keys` arguments."""
    _, _, log = stack_copy
    result = make_keys(stack_copy, "ADD=alice", "CONCURRENT=2", "TPM=20000", FAKE_PS="3f2a9c01")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("\n") == 1 and "the compose stack's keys" in result.stderr  # which one, in one line
    assert compose_calls(log)[-1] == f"{COMPOSE_KEYS} add alice --concurrent 2 --tokens-per-minute 20000 COMPOSE_PROFILES=unset"
    assert make_keys(stack_copy, "REMOVE=alice", FAKE_PS="3f2a9c01").returncode == 0
    assert compose_calls(log)[-1].startswith(f"{COMPOSE_KEYS} remove alice ")
    assert make_keys(stack_copy, FAKE_PS="3f2a9c01").returncode == 0
    assert compose_calls(log)[-1].startswith(f"{COMPOSE_KEYS} list ")


def test_make_keys_manages_the_compose_stack_to_be_when_bind_addr_is_beyond_loopback(stack_copy):
    """BIND_ADDR is a setting only compose uses: beyond loopback, the keys are for the stack that
    make up will refuse to start without them."""
    root, _, log = stack_copy
    (root / ".env").write_text("BIND_ADDR=0.0.0.0  # the LAN\n")
    result = make_keys(stack_copy, "ADD=bob")
    assert result.returncode == 0 and "the compose stack's keys" in result.stderr, result.stderr
    assert compose_calls(log) == [f"{COMPOSE_KEYS} add bob COMPOSE_PROFILES=unset"]


def test_make_keys_manages_the_native_proxy_otherwise(stack_copy):
    root, _, log = stack_copy
    (root / "pyproject.toml").write_text("")
    (root / "requirements.lock").write_text("")
    (root / ".venv/bin").mkdir(parents=True)
    (root / ".venv/.installed").touch()  # newer than pyproject.toml and the lock: make installs nothing
    python = root / ".venv/bin/python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)

    def native(*variables: str, docker: bool = True, **env: str) -> str:
        result = make_keys(stack_copy, *variables, docker=docker, **env)
        assert result.returncode == 0, result.stderr
        assert result.stderr.count("\n") == 1 and "the native proxy's keys" in result.stderr
        return compose_calls(log)[-1]

    assert native("ADD=carol", "TPM=500") == "python -m proxy keys add carol --tokens-per-minute 500"  # no stack, loopback
    assert native("REMOVE=carol", docker=False) == "python -m proxy keys remove carol"
    assert native(FAKE_COMPOSE="") == "python -m proxy keys list"  # Docker without Compose
    assert native("KEYS_FOR=native", FAKE_PS="3f2a9c01", BIND_ADDR="0.0.0.0") == "python -m proxy keys list"
    forced = make_keys(stack_copy, "KEYS_FOR=compose", "ADD=dave")
    assert forced.returncode == 0 and compose_calls(log)[-1].startswith(f"{COMPOSE_KEYS} add dave ")
    (stack_copy[1] / "docker").unlink()
    result = make_keys(stack_copy, "KEYS_FOR=compose", docker=False)
    assert result.returncode == 2 and "Docker is not installed" in result.stderr


def test_make_keys_refuses_what_it_cannot_mean(stack_copy):
    _, _, log = stack_copy
    for variables, message in ((["ADD=a", "REMOVE=b"], "one at a time"),
                               (["TPM=100"], "give them with ADD=<name>"),
                               (["KEYS_FOR=podman"], "expected compose or native")):
        result = make_keys(stack_copy, *variables, FAKE_PS="3f2a9c01")
        assert result.returncode == 2 and "make keys: " in result.stderr and message in result.stderr, variables
    assert compose_calls(log) == []


def test_make_keys_adds_lists_and_removes_a_real_native_key(stack_copy, tmp_path):
    """The repository's own `make keys`, without Docker: the real `python -m proxy keys` on a
    keys file of this test's own."""
    _, bin_dir, _ = stack_copy
    keys_file = tmp_path / "data" / "keys.json"
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "API_KEYS_FILE": str(keys_file), "LLAMABRIDGE_ENV_FILE": os.devnull}

    def make(*variables: str) -> subprocess.CompletedProcess:
        return subprocess.run(["make", "--no-print-directory", "keys", *variables], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)

    added = make("ADD=alice", "CONCURRENT=2", "TPM=20000")
    assert added.returncode == 0, added.stderr
    assert "the native proxy's keys" in added.stderr
    key = added.stdout.splitlines()[-1]
    stored = keyfile.read(keys_file)
    assert [(k.name, k.limits) for k in stored] == [("alice", keyfile.Limits(concurrent=2, tokens_per_minute=20000))]
    assert stored[0].matches(key.encode()) and key not in keys_file.read_text()
    listed = make()
    assert listed.returncode == 0 and re.search(r"^alice\t.*concurrent 2, tokens per minute 20000$", listed.stdout, re.MULTILINE)
    removed = make("REMOVE=alice")
    assert removed.returncode == 0 and keyfile.read(keys_file) == []
    again = make("REMOVE=alice")
    assert again.returncode != 0 and "no key named 'alice'" in again.stderr


@pytest.mark.integration
def test_the_image_build_context_is_enough_to_run_both_services(llama, tmp_path):
    """What `docker build` would copy (the .dockerignore allow-list), run the way the image runs
    it: the proxy serves its API and dashboard, the collector scrapes, and the Dockerfile's
    healthcheck command passes. (No Docker engine here to build the image itself.)"""
    context = tmp_path / "app"
    context.mkdir()
    allowed = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    for name in allowed:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, context / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(source, context / name)
    env = dict(os.environ, PYTHONPATH=str(context), LLAMA_URL=llama.url, DB_PATH=str(tmp_path / "data" / "llamabridge.db"),
               PROXY_HOST="127.0.0.1", PROXY_PORT="0", COLLECTOR_HOST="127.0.0.1", COLLECTOR_PORT="0", COLLECT_INTERVAL="0.5")
    ready = r"Listening at: http://127\.0\.0\.1:(?P<port>\d+)"
    proxy = processes.Service("proxy", [sys.executable, "-m", "proxy"], ready, env=env, health_path="/healthz", cwd=context)
    collector = processes.Service("collector", [sys.executable, "-m", "collector"], ready, env=env, health_path="/healthz", cwd=context)
    with proxy, collector:
        assert str(context) in subprocess.run([sys.executable, "-c", "import proxy; print(proxy.__file__)"], env=env, cwd=context,
                                              capture_output=True, text=True, timeout=30).stdout  # not the checkout's copy
        page = requests.get(proxy.url + "/dashboard", timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower()
        reply = requests.post(proxy.url + "/v1/chat/completions", timeout=60,
                              json={"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        assert reply.status_code == 200
        healthcheck = re.search(r'CMD \["python", "-c", "(.*)"\]', (ROOT / "Dockerfile").read_text())[1]
        check = subprocess.run([sys.executable, "-c", healthcheck.replace("9090", str(proxy.port))], capture_output=True, timeout=30)
        assert check.returncode == 0, check.stderr
        wait_until(lambda: requests.get(collector.url + "/healthz", timeout=10).json()["upstream_up"], timeout=30,
                   what="the collector to read llama-server")
