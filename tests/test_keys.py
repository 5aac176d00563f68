"""API keys, one per person: `python -m proxy keys`, and the real proxy (in front of the real
llama-server) with keys, as each kind of client sends them: curl, both official SDKs, HTTP Basic
for the dashboard and Prometheus. Also: listening beyond loopback without keys is refused at
start, per-key limits answer 429, and one user's burst waits its turn behind another's request.
(Claude Code, Codex and Cline with keys: their own test files.)"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import anthropic
import openai
import pytest
import requests

from llamabridge import keys as keyfile
from tests.support import processes
from tests.support.hold import holding_the_slot
from tests.support.prom import metric, metric_in
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

CHAT = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
MESSAGE = {"model": "claude-sonnet-4-5", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}


def keys_cli(keys_file: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, API_KEYS_FILE=str(keys_file), LLAMABRIDGE_ENV_FILE=os.devnull)
    return subprocess.run([sys.executable, "-m", "proxy", "keys", *args], env=env, cwd=processes.ROOT,
                          capture_output=True, text=True, timeout=60)




def basic(key: str, user: str = "me") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()}


@pytest.fixture(scope="module")
def keyed(llama, tmp_path_factory):
    """A proxy with two keys, alice's and bob's."""
    keys_file = tmp_path_factory.mktemp("keys") / "keys.json"
    alice, bob = keyfile.add(keys_file, "alice"), keyfile.add(keys_file, "bob")
    with processes.proxy(llama.url, API_KEYS_FILE=str(keys_file)) as proxy:
        proxy.keys_file, proxy.alice, proxy.bob = keys_file, alice, bob
        yield proxy


# -- the keys file ---------------------------------------------------------------------------------


def test_keys_add_list_remove_store_only_a_salted_hash(tmp_path):
    keys_file = tmp_path / "sub" / "keys.json"
    added = keys_cli(keys_file, "add", "carol", "--concurrent", "2", "--tokens-per-minute", "5000")
    assert added.returncode == 0, added
    key = added.stdout.splitlines()[-1]
    assert key.startswith("llb-") and len(key) > 40 and added.stdout.count(key) == 1
    second = keyfile.add(keys_file, "dave")
    assert second != key
    stored = keys_file.read_text()
    assert key not in stored and second not in stored
    entries = json.loads(stored)["keys"]
    assert [e["name"] for e in entries] == ["carol", "dave"]
    assert entries[0]["salt"] != entries[1]["salt"] and len(entries[0]["sha256"]) == 64
    assert (entries[0]["concurrent"], entries[0]["tokens_per_minute"]) == (2, 5000)
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    listed = keys_cli(keys_file, "list")
    assert listed.returncode == 0 and "carol" in listed.stdout and "concurrent 2" in listed.stdout and key not in listed.stdout
    assert keys_cli(keys_file, "add", "carol").returncode == 2  # one key per name
    assert keys_cli(keys_file, "add", "bad name").returncode == 2
    assert keys_cli(keys_file, "remove", "carol").returncode == 0
    assert [e["name"] for e in json.loads(keys_file.read_text())["keys"]] == ["dave"]
    assert keys_cli(keys_file, "remove", "carol").returncode == 1
    keys_file.write_text("not json")
    broken = keys_cli(keys_file, "list")
    assert broken.returncode == 2 and "not a llamabridge keys file" in broken.stderr


# -- each client's way of sending a key ---------------------------------------------------------------


def curl(*args: str) -> tuple[int, dict]:
    result = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", *args], capture_output=True, text=True, timeout=120)
    body, _, status = result.stdout.rpartition("\n")
    return int(status), json.loads(body) if body.strip() else {}


def test_curl_with_the_right_a_wrong_and_no_key(keyed):
    url = keyed.url + "/v1/chat/completions"
    data = ["-H", "Content-Type: application/json", "-d", json.dumps(CHAT)]
    status, body = curl(url, *data, "-H", f"Authorization: Bearer {keyed.alice}")
    assert status == 200 and body["choices"], body
    status, body = curl(keyed.url + "/v1/messages", "-H", "Content-Type: application/json", "-d", json.dumps(MESSAGE),
                        "-H", f"x-api-key: {keyed.bob}")
    assert status == 200 and body["type"] == "message", body
    status, body = curl(url, *data, "-H", "Authorization: Bearer llb-wrong")
    assert status == 401 and body["error"]["code"] == "invalid_api_key" and "not valid" in body["error"]["message"]
    status, body = curl(url, *data)
    assert status == 401 and body["error"]["code"] == "invalid_api_key" and "needs an API key" in body["error"]["message"]
    status, body = curl(keyed.url + "/v1/messages", "-H", "Content-Type: application/json", "-d", json.dumps(MESSAGE))
    assert status == 401 and body == {"type": "error", "error": {"type": "authentication_error", "message": body["error"]["message"]}}


def test_both_sdks_with_the_right_a_wrong_and_no_key(keyed):
    claude = anthropic.Anthropic(base_url=keyed.url, api_key=keyed.alice, max_retries=0, timeout=120)
    assert claude.messages.create(**MESSAGE).content
    # Claude Code's ANTHROPIC_AUTH_TOKEN: the same key as a bearer token.
    bearer = anthropic.Anthropic(base_url=keyed.url, api_key=None, auth_token=keyed.bob, max_retries=0, timeout=120)
    assert bearer.messages.count_tokens(model="m", messages=MESSAGE["messages"]).input_tokens > 0
    oai = openai.OpenAI(base_url=keyed.url + "/v1", api_key=keyed.bob, max_retries=0, timeout=120)
    assert oai.chat.completions.create(**CHAT).choices
    assert oai.models.list().data
    for wrong in ("llb-not-a-key", keyed.alice + "x"):
        with pytest.raises(anthropic.AuthenticationError) as refused:
            anthropic.Anthropic(base_url=keyed.url, api_key=wrong, max_retries=0).messages.create(**MESSAGE)
        assert refused.value.body["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError) as refused:
            openai.OpenAI(base_url=keyed.url + "/v1", api_key=wrong, max_retries=0).chat.completions.create(**CHAT)
        assert refused.value.code == "invalid_api_key"
    # No key at all: each SDK sends none only when told to leave its header out.
    with pytest.raises(openai.AuthenticationError, match="needs an API key"):
        openai.OpenAI(base_url=keyed.url + "/v1", api_key="unused", max_retries=0).models.list(
            extra_headers={"Authorization": openai.Omit()})
    with pytest.raises(anthropic.AuthenticationError, match="needs an API key"):
        anthropic.Anthropic(base_url=keyed.url, api_key="unused", max_retries=0).models.list(
            extra_headers={"Authorization": anthropic.Omit()})
    assert keyed.alice not in keyed.log_text() and keyed.bob not in keyed.log_text() and "llb-not-a-key" not in keyed.log_text()


def test_dashboard_api_and_metrics_take_the_key_as_basic_auth(keyed):
    for path in ("/dashboard", "/api/totals", "/api/requests", "/metrics"):
        refused = requests.get(keyed.url + path, timeout=10)
        assert refused.status_code == 401, path
        assert refused.headers["WWW-Authenticate"].startswith("Basic "), path  # the browser asks for it
        assert requests.get(keyed.url + path, headers=basic("llb-wrong"), timeout=10).status_code == 401
        assert requests.get(keyed.url + path, headers=basic(keyed.alice), timeout=10).status_code == 200, path
    # curl -u KEY: (the key as the user name, no password) works too.
    assert curl(keyed.url + "/api/totals", "-u", f"{keyed.bob}:")[0] == 200
    # The generation routes do not ask a browser for a password.
    assert "WWW-Authenticate" not in requests.post(keyed.url + "/v1/messages", json=MESSAGE, timeout=10).headers


def test_liveness_needs_no_key_and_everything_else_does(keyed):
    assert requests.head(keyed.url + "/", timeout=10).status_code == 200
    assert requests.head(keyed.url + "/api/hello", timeout=10).status_code == 200
    assert requests.get(keyed.url + "/healthz", timeout=10).status_code == 200
    for method, path in (("GET", "/"), ("GET", "/api/hello"), ("GET", "/v1/models"), ("GET", "/v1/models/m"),
                         ("POST", "/v1/messages/count_tokens"), ("POST", "/v1/embeddings"), ("GET", "/api/sessions")):
        answer = requests.request(method, keyed.url + path, json={} if method == "POST" else None, timeout=10)
        assert answer.status_code == 401, (method, path, answer.status_code)


def test_a_removed_key_stops_working_without_a_restart_and_a_new_one_starts(keyed):
    temp = keyfile.add(keyed.keys_file, "temp")
    wait_until(lambda: requests.post(keyed.url + "/v1/chat/completions", json=CHAT, headers={"x-api-key": temp},
                                     timeout=60).status_code == 200, what="the new key to be taken")
    assert keys_cli(keyed.keys_file, "remove", "temp").returncode == 0
    wait_until(lambda: requests.post(keyed.url + "/v1/chat/completions", json=CHAT, headers={"x-api-key": temp},
                                     timeout=60).status_code == 401, what="the removed key to be refused")
    assert requests.post(keyed.url + "/v1/chat/completions", json=CHAT, headers={"x-api-key": keyed.alice}, timeout=60).status_code == 200


def test_each_request_names_its_user_in_the_log_the_api_and_the_metrics(keyed):
    requests.post(keyed.url + "/v1/messages", json=MESSAGE, headers={"x-api-key": keyed.bob}, timeout=60).raise_for_status()
    auth = basic(keyed.alice)
    wait_until(lambda: requests.get(keyed.url + "/api/requests?user=bob", headers=auth, timeout=10).json()["requests"],
               what="bob's request in the request log")
    rows = requests.get(keyed.url + "/api/requests?user=bob&limit=2000", headers=auth, timeout=10).json()["requests"]
    assert rows and {r["user"] for r in rows} == {"bob"}
    users = {u["user"]: u for u in requests.get(keyed.url + "/api/users", headers=auth, timeout=10).json()["users"]}
    assert users["bob"]["requests"] >= len(rows) and users["bob"]["generated_tokens"] >= sum(r["generated_tokens"] or 0 for r in rows)
    assert " user=bob " in keyed.log_text()
    page = requests.get(keyed.url + "/metrics", headers=auth, timeout=10).text
    assert metric_in(page, "llamabridge_proxy_requests_total", {"user": "bob", "route": "/v1/messages"}) >= 1
    assert metric_in(page, "llamabridge_proxy_tokens_total", {"user": "bob", "kind": "generated"}) >= 1


def test_repeated_wrong_keys_are_logged_without_the_key_and_slowed_down(llama, tmp_path):
    keys_file = tmp_path / "keys.json"
    right = keyfile.add(keys_file, "hana")
    wrong = "llb-guessing-0123456789"
    with processes.proxy(llama.url, API_KEYS_FILE=str(keys_file)) as proxy:
        times = []
        for _ in range(8):
            answer = requests.get(proxy.url + "/v1/models", headers={"x-api-key": wrong}, timeout=30)
            assert answer.status_code == 401
            times.append(answer.elapsed.total_seconds())
        assert min(times[-2:]) >= 1.0 > max(times[:3]), times  # the first few at once, then each held back
        # Someone with a right key from the same address is not held back.
        assert requests.get(proxy.url + "/v1/models", headers={"x-api-key": right}, timeout=30).elapsed.total_seconds() < 1.0
        assert metric(proxy.url, "llamabridge_proxy_refused_requests_total", {"reason": "key"}, headers=basic(right)) == 8
        log = proxy.log_text()
    # Logged when it starts and when the answers start being held back, never the key itself.
    assert wrong not in log and right not in log
    assert log.count("a wrong API key on GET /v1/models") == 2


def test_metrics_api_key_opens_metrics_and_nothing_else(llama, tmp_path):
    keys_file = tmp_path / "keys.json"
    keyfile.add(keys_file, "erin")
    with processes.proxy(llama.url, API_KEYS_FILE=str(keys_file), METRICS_API_KEY="scrape-secret") as proxy:
        assert requests.get(proxy.url + "/metrics", headers={"Authorization": "Bearer scrape-secret"}, timeout=10).status_code == 200
        assert requests.get(proxy.url + "/metrics", headers=basic("scrape-secret", "prometheus"), timeout=10).status_code == 200
        for method, path in (("GET", "/api/requests"), ("GET", "/dashboard"), ("POST", "/v1/chat/completions")):
            answer = requests.request(method, proxy.url + path, json=CHAT if method == "POST" else None,
                                      headers={"Authorization": "Bearer scrape-secret"}, timeout=10)
            assert answer.status_code == 401, path


# -- who may start, and where ----------------------------------------------------------------------------


def start(service: str, tmp_path: Path, **env: str) -> subprocess.Popen:
    full = dict(os.environ, LLAMABRIDGE_ENV_FILE=os.devnull, DB_PATH=str(tmp_path / "store.db"),
                API_KEYS_FILE=str(tmp_path / "keys.json"), PROXY_PORT="0", COLLECTOR_PORT="0", **env)
    return subprocess.Popen([sys.executable, "-m", service], env=full, cwd=processes.ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_listening_beyond_loopback_without_keys_is_refused_at_start(tmp_path):
    for service, variable in (("proxy", "PROXY_HOST"), ("collector", "COLLECTOR_HOST")):
        proc = start(service, tmp_path, **{variable: "0.0.0.0"})
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 2, out
        assert len(out.strip().splitlines()) == 1 and "API_KEYS_FILE" in out and f"{variable}=0.0.0.0" in out, out
    # In a container, where Docker publishes it is what counts (compose passes BIND_ADDR).
    proc = start("proxy", tmp_path, PROXY_HOST="0.0.0.0", PUBLISHED_ADDR="192.168.1.20")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "BIND_ADDR=192.168.1.20" in out, out


@pytest.mark.parametrize("setup", ["allow_unauthenticated", "keys", "published_on_loopback"])
def test_listening_beyond_loopback_starts_with_keys_or_when_told_to(tmp_path, setup):
    env = {"PROXY_HOST": "0.0.0.0", "LLAMA_URL": "http://127.0.0.1:9"}
    if setup == "allow_unauthenticated":
        env["ALLOW_UNAUTHENTICATED"] = "true"
    elif setup == "keys":
        keyfile.add(tmp_path / "keys.json", "frank")
    else:
        env["PUBLISHED_ADDR"] = "127.0.0.1"
    service = processes.Service("proxy", [sys.executable, "-m", "proxy"], r"Listening at: http://0\.0\.0\.0:(?P<port>\d+)",
                                env=dict(os.environ, LLAMABRIDGE_ENV_FILE=os.devnull, DB_PATH=str(tmp_path / "store.db"),
                                         API_KEYS_FILE=str(tmp_path / "keys.json"), PROXY_PORT="0", **env),
                                health_path="/", health_method="HEAD", cwd=processes.ROOT)
    with service:
        needs_key = requests.get(service.url + "/api/totals", timeout=10).status_code == 401
        assert needs_key is (setup != "allow_unauthenticated" and setup != "published_on_loopback")


def test_check_says_the_same_as_the_start(tmp_path):
    env = dict(os.environ, LLAMABRIDGE_ENV_FILE=os.devnull, DB_PATH=str(tmp_path / "store.db"),
               API_KEYS_FILE=str(tmp_path / "keys.json"), PROXY_HOST="0.0.0.0")
    refused = subprocess.run([sys.executable, "-m", "proxy", "check"], env=env, cwd=processes.ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "API_KEYS_FILE" in refused.stderr
    keyfile.add(tmp_path / "keys.json", "gina")
    assert subprocess.run([sys.executable, "-m", "proxy", "check"], env=env, cwd=processes.ROOT, timeout=60).returncode == 0


# -- limits and turns -------------------------------------------------------------------------------------


def test_per_key_limits_answer_429_with_retry_after(llama, tmp_path):
    keys_file = tmp_path / "keys.json"
    one_at_a_time = keyfile.add(keys_file, "solo", keyfile.Limits(concurrent=1))
    frugal = keyfile.add(keys_file, "frugal", keyfile.Limits(tokens_per_minute=20))
    with processes.proxy(llama.url, API_KEYS_FILE=str(keys_file)) as proxy:
        with holding_the_slot(proxy.url, {"x-api-key": one_at_a_time}):
            second = requests.post(proxy.url + "/v1/messages", json=MESSAGE, headers={"x-api-key": one_at_a_time}, timeout=30)
            assert second.status_code == 429 and int(second.headers["Retry-After"]) >= 1
            assert second.json()["error"]["type"] == "rate_limit_error" and "concurrent" in second.json()["error"]["message"]
            # A token count costs no slot: never limited.
            assert requests.post(proxy.url + "/v1/messages/count_tokens", json={"model": "m", "messages": MESSAGE["messages"]},
                                 headers={"x-api-key": one_at_a_time}, timeout=30).status_code == 200
        first = requests.post(proxy.url + "/v1/chat/completions", headers={"x-api-key": frugal}, timeout=60,
                              json={**CHAT, "messages": [{"role": "user", "content": "count " * 40}]})
        assert first.status_code == 200 and first.json()["usage"]["prompt_tokens"] > 20
        over = requests.post(proxy.url + "/v1/chat/completions", json=CHAT, headers={"x-api-key": frugal}, timeout=30)
        assert over.status_code == 429 and 1 <= int(over.headers["Retry-After"]) <= 60
        assert over.json()["error"]["code"] == "rate_limit_exceeded" and "tokens_per_minute" in over.json()["error"]["message"]


def test_users_take_turns_within_a_class(llama_server_bin, tiny_model, tmp_path):
    """On one slot, user A queues six requests, then user B one: B's is admitted before A's
    third (first come, first served would run all of A's first)."""
    keys_file = tmp_path / "keys.json"
    a, b = keyfile.add(keys_file, "ann"), keyfile.add(keys_file, "ben")
    with processes.llama_server(llama_server_bin, tiny_model) as llama, \
            processes.proxy(llama.url, API_KEYS_FILE=str(keys_file)) as proxy, \
            concurrent.futures.ThreadPoolExecutor(8) as pool:
        auth = basic(a)

        def depth() -> float:
            return metric(proxy.url, "llamabridge_proxy_queue_depth", headers=auth)

        def send(key: str, name: str):
            return pool.submit(requests.post, proxy.url + "/v1/chat/completions", json=CHAT, timeout=120,
                               headers={"x-api-key": key, "X-Session-Id": name})

        with holding_the_slot(proxy.url, {"x-api-key": a, "X-Session-Id": "ann-0"}):
            sent = []
            for i in range(1, 7):
                sent.append(send(a, f"ann-{i}"))
                wait_until(lambda i=i: depth() == i, what=f"ann's request {i} to queue")
            sent.append(send(b, "ben-1"))
            wait_until(lambda: depth() == 7, what="ben's request to queue")
        assert all(f.result(timeout=120).status_code == 200 for f in sent)
        wait_until(lambda: len(requests.get(proxy.url + "/api/requests", headers=auth, timeout=10).json()["requests"]) >= 8,
                   what="every request in the request log")
        rows = requests.get(proxy.url + "/api/requests?limit=50", headers=auth, timeout=10).json()["requests"]
    admitted = [r["session"] for r in sorted(rows, key=lambda r: r["ts"] + r["queue_wait"]) if r["session"] != "ann-0"]
    assert admitted.index("ben-1") < admitted.index("ann-3"), admitted
    assert {r["session"]: r["user"] for r in rows} == {**{f"ann-{i}": "ann" for i in range(7)}, "ben-1": "ben"}
