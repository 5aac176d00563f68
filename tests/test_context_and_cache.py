"""Cache-stable prompts and context-window truth, measured on the real llama-server: exact
token counts, prompt-cache reuse across Claude Code sessions (llama-server's own cache_n),
re-prefill detection, max_tokens clamping, session-to-slot affinity, prefill pings, and the
context window reported to clients."""

from __future__ import annotations

import copy
import itertools
import os
import subprocess
import sys
import time

import pytest
import requests

from proxy import translate
from tests.support import processes
from tests.support.anthropic_sse import parse
from tests.test_traffic import AGENT_TOOLS, main_body, post, proxy_metric, wait_recorded

pytestmark = pytest.mark.integration


def tokens_of(llama, body: dict) -> list[int]:
    """The tokens llama-server sees for an Anthropic body, as the proxy translates it."""
    render = translate.count_tokens_request(body)
    prompt = requests.post(llama.url + "/apply-template", json=render, timeout=60).json()["prompt"]
    return requests.post(llama.url + "/tokenize", json={"content": prompt, "add_special": True}, timeout=60).json()["tokens"]


def common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def new_session(body: dict, first_words: str, billing: str) -> dict:
    """The same project's prompt in another session: another first message, another billing hash."""
    other = copy.deepcopy(body)
    other["system"][0]["text"] = f"x-anthropic-billing-header: cc_version=2.1.328.{billing}; cc_entrypoint=cli;"
    last = other["messages"][0]["content"][-1]
    last["text"] = first_words
    return other


def test_count_tokens_equals_what_llama_server_counts_for_the_recorded_session(proxy, llama, capture_messages):
    for body in capture_messages:
        counted = requests.post(proxy.url + "/v1/messages/count_tokens?beta=true", timeout=60,
                                json={k: body[k] for k in ("model", "messages", "system", "tools") if k in body})
        assert counted.status_code == 200 and counted.headers["X-Llamabridge-Token-Count"] == "exact"
        direct = translate.anthropic_to_openai(dict(body, max_tokens=1), translate.Options(model="m"))
        direct["stream"] = False
        direct.pop("stream_options")
        ran = requests.post(llama.url + "/v1/chat/completions", json=direct, timeout=120).json()
        assert counted.json()["input_tokens"] == ran["timings"]["prompt_n"] + ran["timings"]["cache_n"]


def test_count_tokens_is_cached_by_content(proxy):
    body = {"model": "m", "tools": AGENT_TOOLS, "messages": [{"role": "user", "content": "cache me"}]}
    first = requests.post(proxy.url + "/v1/messages/count_tokens", json=body, timeout=30).json()
    hits_before = proxy_metric(proxy, "llamabridge_proxy_token_counts_total")
    for _ in range(5):
        assert requests.post(proxy.url + "/v1/messages/count_tokens", json=body, timeout=30).json() == first
    assert proxy_metric(proxy, "llamabridge_proxy_token_counts_total") == hits_before + 5


def test_count_tokens_falls_back_to_a_labelled_estimate(tmp_path):
    """An upstream without llama-server's /apply-template cannot count exactly: say so."""
    from tests.support.scripted_upstream import ScriptedUpstream

    with ScriptedUpstream(can_render=False) as upstream, processes.proxy(upstream.url) as proxy:
        body = {"model": "m", "messages": [{"role": "user", "content": "x" * 400}]}
        resp = requests.post(proxy.url + "/v1/messages/count_tokens", json=body, timeout=30)
        assert resp.status_code == 200 and resp.headers["X-Llamabridge-Token-Count"] == "estimate"
        assert 100 <= resp.json()["input_tokens"] <= 200  # about 4 bytes of text per token
        assert "class=count_tokens" in proxy.log_text()


def test_second_session_reuses_the_cached_system_prompt_and_tools(proxy, llama, capture_messages):
    """Claude Code's billing header changes with every session; through the proxy the second
    session's first turn still takes the shared system prompt and tools from the cache."""
    first = dict(capture_messages[1], max_tokens=8)
    second = dict(new_session(capture_messages[1], "explain what this repository does", "9e1"), max_tokens=8)
    shared = common(tokens_of(llama, first), tokens_of(llama, second))
    assert shared > 10_000  # the system prompt and the tools

    assert post(proxy.url, first, "session-one").status_code == 200
    resp = post(proxy.url, second, "session-two")
    assert resp.status_code == 200
    usage = next(d["usage"] for e, d in parse(resp.content) if e == "message_delta")
    assert usage["cache_read_input_tokens"] >= 0.9 * shared, (usage, shared)

    # The same two requests straight to llama-server's native endpoint miss from the header on.
    native = []
    for body in (first, second):
        native.append(requests.post(llama.url + "/v1/messages", json=dict(body, stream=False), timeout=300).json()["usage"])
    assert native[1].get("cache_read_input_tokens", 0) < 0.1 * shared, native


def test_a_turn_that_reprefills_is_logged_with_where_and_why(llama):
    with processes.proxy(llama.url) as proxy:
        body = main_body("step one " * 200, max_tokens=4)
        body["system"] = "You are a careful engineer. " * 40
        assert post(proxy.url, body, "s-drift").status_code == 200
        turn_two = copy.deepcopy(body)
        turn_two["system"] = "You are a careless engineer. " + body["system"]  # changed near the start
        turn_two["messages"] += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "step two"}]
        assert post(proxy.url, turn_two, "s-drift").status_code == 200
        wait_recorded(proxy, 2)
        assert proxy_metric(proxy, "llamabridge_proxy_reprefills_total") == 1
        log = proxy.log_text()
        assert "session s-drift re-prefilled" in log and "the prompt changed at token" in log

        # Another session takes the only slot. llama-server may restore the first session's
        # prompt from its host-memory cache (--cache-ram); only if it does not is a turn reported.
        assert post(proxy.url, main_body("something else entirely " * 100, max_tokens=4), "s-other").status_code == 200
        turn_three = copy.deepcopy(turn_two)
        turn_three["messages"] += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "step three"}]
        resp = post(proxy.url, turn_three, "s-drift")
        assert resp.status_code == 200
        reused = resp.json()["usage"]["cache_read_input_tokens"]
        previous = len(tokens_of(llama, turn_two))
        wait_recorded(proxy, 4)
        if reused + 16 >= previous:
            assert proxy_metric(proxy, "llamabridge_proxy_reprefills_total") == 1
        else:
            assert proxy_metric(proxy, "llamabridge_proxy_reprefills_total") == 2
            assert "cache was used by another request" in proxy.log_text()


@pytest.fixture(scope="module")
def small_llama(llama_server_bin, tiny_model):
    with processes.llama_server(llama_server_bin, tiny_model, ctx=4096) as server:
        yield server


def test_max_tokens_is_clamped_to_the_context_or_refused_in_claude_codes_words(small_llama):
    with processes.proxy(small_llama.url, CONTEXT_MIN_OUTPUT="512") as proxy:
        n_ctx = 4096

        def body_with_prompt(target_tokens: int, max_tokens: int) -> tuple[dict, int]:
            body = main_body("hello " * target_tokens, max_tokens=max_tokens)  # a main-loop turn, tools and all
            count = requests.post(proxy.url + "/v1/messages/count_tokens", json=body, timeout=30).json()["input_tokens"]
            return body, count

        body, prompt = body_with_prompt(3000, 32000)
        resp = post(proxy.url, body, "s-clamp")
        assert resp.status_code == 200, resp.text
        assert prompt + resp.json()["usage"]["output_tokens"] <= n_ctx

        body, prompt = body_with_prompt(3800, 32000)
        resp = post(proxy.url, body, "s-clamp")
        assert resp.status_code == 400
        assert resp.json()["error"]["message"].startswith(f"input length and `max_tokens` exceed context limit: {prompt} + 32000 > {n_ctx}")
        # What Claude Code does next: retry with what fits. That passes untouched.
        retry = post(proxy.url, dict(body, max_tokens=n_ctx - prompt), "s-clamp")
        assert retry.status_code == 200, retry.text


def test_sessions_keep_their_slot_when_llama_server_has_several(llama_server_bin, tiny_model):
    with processes.llama_server(llama_server_bin, tiny_model, ctx=16384, parallel=2) as server, processes.proxy(server.url) as proxy:
        a1 = main_body("alpha " * 1500, max_tokens=4)
        b1 = main_body("bravo " * 1500, max_tokens=4)
        for body, session in ((a1, "s-alpha"), (b1, "s-bravo")):
            assert post(proxy.url, body, session).status_code == 200
        a2 = copy.deepcopy(a1)
        a2["messages"] += [{"role": "assistant", "content": "noted"}, {"role": "user", "content": "and then?"}]
        resp = post(proxy.url, a2, "s-alpha")
        assert resp.status_code == 200
        assert resp.json()["usage"]["cache_read_input_tokens"] >= 1500  # alpha's slot still holds alpha
        wait_recorded(proxy, 3)
        slots = [line.split("slot=")[1].split()[0] for line in proxy.log_text().splitlines() if "session=s-alpha" in line]
        assert len(slots) == 2 and slots[0] == slots[1]
        assert any("session=s-bravo" in line and f"slot={slots[0]}" not in line for line in proxy.log_text().splitlines()
                   if "session=s-bravo" in line)


def test_a_long_prefill_is_kept_alive_with_pings(proxy, capture_messages):
    body = copy.deepcopy(capture_messages[1])
    body["system"][1]["text"] = f"Run {time.time_ns()}. " + body["system"][1]["text"]  # nothing of it is cached
    body.update(max_tokens=4, stream=True)
    events, times = [], []
    with requests.post(proxy.url + "/v1/messages?beta=true", json=body, stream=True, timeout=300,
                       headers={"X-Claude-Code-Session-Id": f"s-cold-{time.time_ns()}"}) as resp:
        for line in resp.iter_lines():
            if line.startswith(b"event: "):
                events.append(line[7:].decode())
                times.append(time.monotonic())
    content = next(i for i, e in enumerate(events) if e in ("content_block_start", "message_delta"))
    if times[content] - times[0] > 6:  # a prefill long enough to need them
        assert "ping" in events[:content]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) < 10, gaps
    assert events[-1] == "message_stop"


def test_models_and_env_report_the_real_context_window(proxy, llama):
    n_ctx = requests.get(llama.url + "/props", timeout=5).json()["default_generation_settings"]["n_ctx"]
    listing = requests.get(proxy.url + "/v1/models", timeout=10).json()
    assert listing["data"][0]["context_window"] == n_ctx
    env = dict(os.environ, LLAMA_URL=llama.url, PROXY_PORT="9191")
    out = subprocess.run([sys.executable, "-m", "proxy", "env"], env=env, capture_output=True, text=True, timeout=60,
                         cwd=processes.ROOT).stdout
    assert f"export CLAUDE_CODE_MAX_CONTEXT_TOKENS={n_ctx}" in out
    assert "export ANTHROPIC_BASE_URL=http://127.0.0.1:9191" in out


def test_env_asks_the_running_proxy_when_llama_server_is_out_of_reach(proxy, llama):
    """As with the compose stack, where llama-server is only reachable inside Docker's network."""
    n_ctx = requests.get(llama.url + "/props", timeout=5).json()["default_generation_settings"]["n_ctx"]
    env = dict(os.environ, LLAMA_URL=f"http://127.0.0.1:{processes.free_port()}", PROXY_PORT=str(proxy.port))
    out = subprocess.run([sys.executable, "-m", "proxy", "env"], env=env, capture_output=True, text=True, timeout=60,
                         cwd=processes.ROOT).stdout
    assert f"export CLAUDE_CODE_MAX_CONTEXT_TOKENS={n_ctx}" in out
    assert f"Base URL: http://127.0.0.1:{proxy.port}/v1" in out and f"Context Window Size: {n_ctx}" in out
