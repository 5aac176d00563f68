"""Several llama-servers behind one port (LLAMA_URL=a,b), with two real llama-servers on the tiny
model: sessions stay on the upstream that holds their cache (llama-server's own cached-token
count shows it), new sessions spread, a stopped upstream's sessions move and succeed, and a
restarted one rejoins."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.support import processes
from tests.support.anthropic_sse import parse
from tests.support.prom import metric
from tests.support.waiting import wait_until
from tests.test_kv_cache import first_turn, next_turn, rows, turn

pytestmark = pytest.mark.integration


@pytest.fixture
def pair(llama_server_bin, tiny_model):
    ports = [processes.free_port(), processes.free_port()]
    # Two slots each: four sessions keep a slot of their own.
    servers = [processes.llama_server(llama_server_bin, tiny_model, ctx=32768, parallel=2, port=port).start() for port in ports]
    proxy = processes.proxy(",".join(s.url for s in servers), UPSTREAM_HEALTH_INTERVAL="0.2").start()
    yield servers, proxy, ports
    proxy.stop()
    for server in servers:
        server.stop()


def health(proxy) -> dict:
    return requests.get(proxy.url + "/healthz", timeout=10).json()


def test_sessions_stick_to_their_upstream_and_new_ones_spread(pair):
    servers, proxy, _ = pair
    sessions = {name: first_turn(f"the {name} module") for name in ("a", "b", "c", "d")}
    for name, body in sessions.items():
        turn(proxy, body, name)
    for name, body in sessions.items():
        usage = turn(proxy, next_turn(body, "Read it.", "Go on."), name)["usage"]
        # Its cache was where it went: only the new messages were evaluated.
        assert usage["input_tokens"] < 0.05 * (usage["input_tokens"] + usage["cache_read_input_tokens"]), (name, usage)
    homes = {}
    for name in sessions:
        first, second = rows(proxy, name, 2)
        assert first["upstream"] == second["upstream"] in {s.url for s in servers}
        homes[name] = first["upstream"]
    assert set(homes.values()) == {s.url for s in servers}  # both upstreams used
    assert metric(proxy.url, "llamabridge_proxy_requests_total", {"upstream": servers[0].url}) >= 2
    assert metric(proxy.url, "llamabridge_proxy_requests_total", {"upstream": servers[1].url}) >= 2
    for server in servers:  # which server answers how fast
        assert metric(proxy.url, "llamabridge_proxy_time_to_first_token_seconds_count", {"upstream": server.url}) >= 2
    assert [u["ready"] for u in health(proxy)["upstreams"]] == [True, True]


def test_a_stopped_upstreams_sessions_move_and_a_restarted_one_rejoins(pair, llama_server_bin, tiny_model):
    servers, proxy, ports = pair
    a, b = first_turn("the parser"), first_turn("the scheduler")
    turn(proxy, a, "A")
    turn(proxy, b, "B")
    home = {name: rows(proxy, name, 1)[0]["upstream"] for name in "AB"}
    assert home["A"] != home["B"]
    # The first listed goes: the one the proxy also asks for token counts while it is up.
    gone = servers[0]
    on_it = "A" if home["A"] == gone.url else "B"
    gone.stop()
    # Right after the stop, before any health check has noticed: the request finds the port shut,
    # and goes to the other upstream rather than fail.
    usage = turn(proxy, next_turn(a if on_it == "A" else b, "Read it.", "Go on."), on_it)["usage"]
    assert usage["input_tokens"] > 0
    moved = rows(proxy, on_it, 2)[1]
    assert moved["status"] == 200 and moved["upstream"] != gone.url
    assert metric(proxy.url, "llamabridge_proxy_session_moves_total") >= 1
    state = health(proxy)
    assert state["status"] == "ok"
    assert {u["url"]: u["ready"] for u in state["upstreams"]}[gone.url] is False
    wait_until(lambda: [u["in_rotation"] for u in health(proxy)["upstreams"]].count(False) == 1, what="the stopped one out")
    # Back, on the same port: once its health check answers it takes new sessions again.
    back = processes.llama_server(llama_server_bin, tiny_model, ctx=32768, parallel=2, port=ports[servers.index(gone)]).start()
    servers[servers.index(gone)] = back
    wait_until(lambda: all(u["in_rotation"] for u in health(proxy)["upstreams"]), what="the restarted upstream back in the rotation")
    turn(proxy, first_turn("the release notes"), "C")
    assert rows(proxy, "C", 1)[0]["upstream"] == back.url  # the idle one


def test_llama_servers_with_different_models_are_refused_at_start(llama_server_bin, tiny_model, other_model, tmp_path):
    with processes.llama_server(llama_server_bin, tiny_model, ctx=4096) as one, \
            processes.llama_server(llama_server_bin, other_model, ctx=4096) as two:
        env = dict(os.environ, LLAMA_URL=f"{one.url},{two.url}", PROXY_PORT="0", DB_PATH=str(tmp_path / "x.db"))
        result = subprocess.run([sys.executable, "-m", "proxy"], env=env, capture_output=True, text=True, timeout=60,
                                cwd=processes.ROOT)
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("llamabridge proxy: LLAMA_URL lists llama-servers with different models") and two.url in line


def prefilling(server) -> bool:
    try:
        return any(s.get("is_processing") for s in requests.get(server.url + "/slots", timeout=2).json())
    except requests.RequestException:
        return False


def test_a_turn_whose_llama_server_dies_before_its_first_token_is_answered_by_the_other(pair):
    servers, proxy, _ = pair
    body = dict(first_turn("the crash"), stream=True)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(requests.post, proxy.url + "/v1/messages?beta=true", json=body, timeout=120,
                              headers={"X-Claude-Code-Session-Id": "K"})
        busy = wait_until(lambda: next((s for s in servers if prefilling(s)), None), what="a llama-server prefilling the turn")
        assert busy.proc is not None
        os.killpg(busy.proc.pid, signal.SIGKILL)  # a crash, in the middle of the prefill
        answer = pending.result()
    events = parse(answer.text)
    assert answer.status_code == 200 and events[-1][0] == "message_stop", answer.text[-1000:]
    assert [e for e, _ in events].count("message_start") == 1 and "error" not in [e for e, _ in events]
    (row,) = rows(proxy, "K", 1)
    assert row["status"] == 200 and row["upstream"] != busy.url


def test_an_openai_stream_whose_llama_server_dies_before_its_first_token_is_answered_by_the_other(pair):
    """The same for the OpenAI route, whose bytes the proxy relays as llama-server sends them:
    llama-server sends a stream's headers before the prefill, and dies before any byte of its
    body; the client had seen nothing yet, and gets the other llama-server's whole answer."""
    servers, proxy, _ = pair
    turn_ = first_turn("the OpenAI crash")
    body = {"model": "local", "stream": True, "max_tokens": 8,
            "messages": [{"role": "system", "content": turn_["system"][0]["text"]}, *turn_["messages"]]}
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(requests.post, proxy.url + "/v1/chat/completions", json=body, timeout=120)
        busy = wait_until(lambda: next((s for s in servers if prefilling(s)), None), what="a llama-server prefilling the request")
        assert busy.proc is not None
        os.killpg(busy.proc.pid, signal.SIGKILL)
        answer = pending.result()
    lines = [line for line in answer.text.splitlines() if line.startswith("data: ")]
    assert answer.status_code == 200 and lines and lines[-1] == "data: [DONE]", answer.text[-1000:]
    assert not any('"error"' in line for line in lines)
    logged = lambda: requests.get(proxy.url + "/api/requests", params={"limit": 1}, timeout=10).json()["requests"]
    (row,) = wait_until(logged, what="the request's row in the request log")
    assert (row["route"], row["status"]) == ("/v1/chat/completions", 200) and row["upstream"] != busy.url
