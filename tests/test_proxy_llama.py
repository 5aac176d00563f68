"""Through the real proxy (gunicorn) to the real llama-server on the tiny model, with the
official Anthropic and OpenAI SDKs: text, streaming, tool calls, stop sequences, context
overflow, client disconnects, token counts, and the OpenAI relay."""

from __future__ import annotations

import json
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anthropic
import openai
import pytest
import requests

from tests.support import processes
from tests.support.anthropic_sse import check_order, parse
from tests.support.hold import raw_post
from tests.support.prom import metric
from tests.support.waiting import wait_until
from tests.test_malformed_requests import PIXEL

pytestmark = pytest.mark.integration

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Weather forecast for a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Lima", "Oslo"]}, "days": {"type": "integer", "minimum": 1, "maximum": 5}},
        "required": ["city", "days"],
    },
}
# The tiny model's weights are random: an assistant prefill of "<tool_call>\n" makes llama-server's
# tool grammar produce a schema-valid call every time (see CONTRIBUTING.md's testing notes).
TOOL_PREFILL = [{"role": "user", "content": "What is the weather?"}, {"role": "assistant", "content": "<tool_call>\n"}]


@pytest.fixture()
def claude(proxy) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key="test-key", max_retries=0, timeout=120)


@pytest.fixture()
def oai(proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="test-key", max_retries=0, timeout=120)


def stream_then_hang_up(base_url: str, path: str, body: dict, marker: bytes, count: int, while_open=None) -> None:
    """Read a streamed answer until `marker` was seen `count` times, call `while_open`, hang up."""
    with raw_post(base_url, path, body) as sock:
        seen = b""
        while seen.count(marker) < count:
            data = sock.recv(65536)
            assert data, f"stream ended before {count} x {marker!r}: {seen[-500:]!r}"
            seen += data
        if while_open:
            while_open()


def wait_slots_idle(llama, timeout: float = 10.0) -> None:
    def slots() -> list[dict]:
        return requests.get(llama.url + "/slots", timeout=5).json()

    wait_until(lambda: not any(s["is_processing"] for s in slots()), timeout, what=lambda: f"llama-server's slots to be idle: {slots()}")


# -- Anthropic SDK --------------------------------------------------------------------------------


def test_anthropic_sdk_non_streamed(claude, llama):
    msg = claude.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": "Say hello"}])
    assert msg.type == "message" and msg.role == "assistant" and msg.model == "claude-sonnet-4-5"
    assert msg.id.startswith("msg_")
    assert msg.content and msg.content[0].type == "text" and msg.content[0].text
    assert msg.stop_reason in ("end_turn", "max_tokens")
    assert 1 <= msg.usage.output_tokens <= 64
    assert msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0) > 5


def test_anthropic_sdk_streamed_matches_final_message(claude):
    with claude.messages.stream(model="claude-opus-4-1", max_tokens=64, system=[{"type": "text", "text": "Be brief."}],
                                messages=[{"role": "user", "content": "Tell me something"}]) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) >= 1
    assert "".join(pieces) == final.content[0].text
    assert final.usage.output_tokens >= 1 and final.stop_reason in ("end_turn", "max_tokens")


def test_raw_stream_follows_the_event_order(proxy):
    body = {"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": True, "messages": [{"role": "user", "content": "Count"}]}
    resp = requests.post(proxy.url + "/v1/messages?beta=true", json=body, timeout=60)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    check_order(parse(resp.content))


def test_tool_call_comes_back_as_a_valid_tool_use_block(claude):
    msg = claude.messages.create(model="claude-sonnet-4-5", max_tokens=80, tools=[WEATHER_TOOL],
                                 tool_choice={"type": "any", "disable_parallel_tool_use": True}, messages=TOOL_PREFILL)
    calls = [b for b in msg.content if b.type == "tool_use"]
    assert len(calls) == 1, msg.content
    call = calls[0]
    assert call.name == "get_weather" and call.id.startswith("toolu_")
    assert call.input["city"] in ("Lima", "Oslo") and 1 <= call.input["days"] <= 5
    assert msg.stop_reason == "tool_use"


def test_streamed_tool_call_and_its_result_round_trip(claude):
    with claude.messages.stream(model="claude-sonnet-4-5", max_tokens=80, tools=[WEATHER_TOOL], tool_choice={"type": "any"},
                                messages=TOOL_PREFILL) as stream:
        first = stream.get_final_message()
    call = next(b for b in first.content if b.type == "tool_use")
    assert set(call.input) == {"city", "days"}
    follow_up = claude.messages.create(model="claude-sonnet-4-5", max_tokens=32, tools=[WEATHER_TOOL], messages=[
        {"role": "user", "content": "What is the weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": call.name, "input": call.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 24C"},
                                     {"type": "text", "text": "Summarise."}]},
    ])
    assert follow_up.content and follow_up.stop_reason in ("end_turn", "max_tokens", "tool_use")


def test_stop_sequence_is_reported(claude):
    # Structured output forces an array of digits, so "," is certain to come up.
    digits = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 5}
    msg = claude.messages.create(model="claude-sonnet-4-5", max_tokens=100, stop_sequences=[",", "never-generated"],
                                 extra_body={"output_config": {"format": {"type": "json_schema", "schema": digits}}},
                                 messages=[{"role": "user", "content": "Five digits please."}])
    assert msg.stop_reason == "stop_sequence"
    assert msg.stop_sequence == ","
    assert "," not in msg.content[0].text


def test_prompt_over_the_context_is_prompt_too_long(claude, llama):
    n_ctx = requests.get(llama.url + "/props", timeout=5).json()["default_generation_settings"]["n_ctx"]
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.create(model="claude-sonnet-4-5", max_tokens=16, messages=[{"role": "user", "content": "hello " * (n_ctx + 500)}])
    assert err.value.status_code == 400
    body = err.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    message = body["error"]["message"]
    assert message.startswith("prompt is too long: ") and message.endswith(f" tokens > {n_ctx} maximum")
    assert int(message.split()[4]) > n_ctx


def test_count_tokens_equals_what_the_request_costs(claude, llama):
    wait_slots_idle(llama)
    kwargs = {"model": "claude-sonnet-4-5", "system": "You are terse.", "tools": [WEATHER_TOOL],
              "messages": [{"role": "user", "content": "How many tokens is this exactly? " + "x" * 37}]}
    counted = claude.messages.count_tokens(**kwargs).input_tokens
    msg = claude.messages.create(max_tokens=4, **kwargs)
    assert counted == msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0)


def test_stream_is_incremental_and_disconnect_frees_the_slot(proxy, llama):
    """Tokens reach the client while generation goes on; a client that goes away mid-stream
    does not leave llama-server generating."""
    wait_slots_idle(llama)
    before = metric(llama.url, "llamacpp:tokens_predicted_total")
    # A grammar that forces ~4000 tokens (about 20 s here): far longer than the test waits.
    body = {"model": "claude-sonnet-4-5", "max_tokens": 8000, "stream": True, "messages": [{"role": "user", "content": "digits"}],
            "output_config": {"format": {"type": "json_schema", "schema": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2000}}}}

    def still_generating() -> None:
        # The client already holds 5 deltas while llama-server is still generating: the proxy
        # streams tokens as they come instead of buffering the reply.
        assert requests.get(llama.url + "/slots", timeout=5).json()[0]["is_processing"]

    stream_then_hang_up(proxy.url, "/v1/messages", body, b"event: content_block_delta", 5, while_open=still_generating)
    wait_slots_idle(llama)
    generated = metric(llama.url, "llamacpp:tokens_predicted_total") - before
    assert generated < 1000, f"llama-server kept generating after the client left ({generated} tokens)"


# -- OpenAI routes ----------------------------------------------------------------------------------


def test_openai_sdk_chat_non_streamed(oai):
    out = oai.chat.completions.create(model="anything", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
    assert out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens >= 1


def test_openai_sdk_chat_streamed(oai):
    stream = oai.chat.completions.create(model="anything", max_tokens=16, stream=True, stream_options={"include_usage": True},
                                         messages=[{"role": "user", "content": "hi"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage.completion_tokens >= 1


def test_openai_legacy_completions_and_models(oai, llama):
    out = oai.completions.create(model="anything", prompt="Once upon a time", max_tokens=8)
    assert out.choices[0].text is not None
    models = oai.models.list()
    assert models.data and models.data[0].id
    raw = requests.get(llama.url + "/v1/models", timeout=5).json()
    assert raw["data"][0]["meta"]["n_ctx"] > 0


def generated_tokens(proxy) -> float:
    return metric(proxy.url, "llamabridge_proxy_tokens_total", {"kind": "generated"})


def test_openai_sdk_responses_streamed_and_not_with_their_usage_recorded(oai, proxy):
    """The Responses API (the OpenAI SDK's responses.create, Codex CLI) goes through the gate
    like a chat completion, and its usage reaches the proxy's metrics and request log."""
    before = generated_tokens(proxy)
    session = f"codex-{time.time_ns()}"  # Codex CLI names its session in this header
    out = oai.responses.create(model="anything", input="hi", instructions="Be brief.", max_output_tokens=8,
                               extra_headers={"session-id": session})
    assert out.status == "completed" and isinstance(out.output_text, str)
    wait_until(lambda: generated_tokens(proxy) - before == out.usage.output_tokens >= 1, what="the usage to be recorded")
    wait_until(lambda: f"/v1/responses class=openai status=200 handled=upstream session={session} " in proxy.log_text(),
               what="the request log line naming the session")

    before = generated_tokens(proxy)
    events = list(oai.responses.create(model="anything", input=[{"role": "user", "content": "hi"}], max_output_tokens=8, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed" and "response.output_text.delta" in kinds
    done = events[-1].response
    assert done.output_text == "".join(e.delta for e in events if e.type == "response.output_text.delta")
    wait_until(lambda: generated_tokens(proxy) - before == done.usage.output_tokens >= 1, what="the usage to be recorded")
    assert metric(proxy.url, "llamabridge_proxy_requests_total", {"route": "/v1/responses", "class": "openai", "status": "200"}) >= 2

    with pytest.raises(openai.BadRequestError, match="previous_response_id"):  # llama-server's own refusal, relayed
        oai.responses.create(model="anything", input="hi", previous_response_id="resp_1")


def test_native_completion_and_infill_are_relayed(proxy, llama):
    """llama-server's own routes that editors use: /completion (Continue's llama.cpp provider)
    and /infill (llama.vscode's code completion)."""
    before = generated_tokens(proxy)
    chunks = []
    with requests.post(proxy.url + "/completion", json={"prompt": "def f(", "n_predict": 6, "stream": True}, stream=True, timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        chunks = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith(b"data: ")]
    assert chunks[-1]["stop"] is True and chunks[-1]["timings"]["predicted_n"] >= 1
    wait_until(lambda: generated_tokens(proxy) - before == chunks[-1]["timings"]["predicted_n"], what="the usage to be recorded")
    # The tiny model has no fill-in-the-middle tokens, so llama-server refuses: its answer, not a 404 of the proxy's.
    infill = requests.post(proxy.url + "/infill", json={"input_prefix": "def f(", "input_suffix": ")", "n_predict": 4}, timeout=60)
    direct = requests.post(llama.url + "/infill", json={"input_prefix": "def f(", "input_suffix": ")", "n_predict": 4}, timeout=60)
    assert (infill.status_code, infill.json()) == (direct.status_code, direct.json())
    assert infill.json()["error"]["type"] == "not_supported_error"


def test_both_sdks_list_and_retrieve_the_model_with_its_real_window(claude, oai, llama):
    """One path, two shapes: the Anthropic SDK reads ModelInfo pages, the OpenAI SDK its list."""
    n_ctx = requests.get(llama.url + "/props", timeout=5).json()["default_generation_settings"]["n_ctx"]
    served = requests.get(llama.url + "/v1/models", timeout=5).json()["data"][0]["id"]
    page = claude.models.list()
    assert [m.id for m in page.data] == [served] and page.has_more is False and page.first_id == served
    info = page.data[0]
    assert info.type == "model" and info.max_input_tokens == n_ctx and info.created_at.year >= 2025
    assert claude.models.retrieve(served).max_input_tokens == n_ctx
    assert oai.models.retrieve(served).id == served
    with pytest.raises(anthropic.NotFoundError) as err:
        claude.models.retrieve("claude-sonnet-4-5")
    assert err.value.body["error"]["type"] == "not_found_error" and served in err.value.message
    with pytest.raises(openai.NotFoundError) as err2:
        oai.models.retrieve("gpt-4o")
    assert served in err2.value.body["message"]
    with pytest.raises(anthropic.BadRequestError, match="limit"):
        claude.models.list(limit=0)


def test_openai_disconnect_frees_the_slot(proxy, llama):
    wait_slots_idle(llama)
    before = metric(llama.url, "llamacpp:tokens_predicted_total")
    body = {"model": "x", "max_tokens": 6000, "ignore_eos": True, "stream": True, "messages": [{"role": "user", "content": "go"}]}
    stream_then_hang_up(proxy.url, "/v1/chat/completions", body, b"data: ", 10)
    wait_slots_idle(llama)
    assert metric(llama.url, "llamacpp:tokens_predicted_total") - before < 3000


LONG_ANTHROPIC = {"model": "claude-sonnet-4-5", "max_tokens": 8000, "messages": [{"role": "user", "content": "digits"}],
                  "output_config": {"format": {"type": "json_schema", "schema": {
                      "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2000}}}}


def post_then_hang_up_when_busy(proxy, llama, path: str, body: dict) -> None:
    """Send a non-streamed request and hang up once llama-server is working on it."""
    with raw_post(proxy.url, path, body):
        wait_until(lambda: requests.get(llama.url + "/slots", timeout=5).json()[0]["is_processing"], 30, what="llama-server to start the request")


def test_disconnect_during_a_non_streamed_anthropic_request_frees_the_slot(proxy, llama):
    """Nothing is written to a non-streamed client until the end, so the proxy notices the hang-up
    by watching the client's socket; it streams from llama-server, which stops when we hang up."""
    wait_slots_idle(llama)
    before = metric(llama.url, "llamacpp:tokens_predicted_total")
    post_then_hang_up_when_busy(proxy, llama, "/v1/messages", LONG_ANTHROPIC)
    wait_slots_idle(llama)
    generated = metric(llama.url, "llamacpp:tokens_predicted_total") - before
    assert generated < 2000, f"llama-server kept generating after the client left ({generated} tokens)"


def test_disconnect_during_a_non_streamed_openai_request_closes_the_upstream_request(proxy, llama):
    """The proxy hangs up on llama-server as soon as the client does. (llama-server itself finishes
    a non-streamed completion whose client has gone, even without the proxy: see the README.)"""
    wait_slots_idle(llama)
    body = {"model": "x", "max_tokens": 3000, "ignore_eos": True, "messages": [{"role": "user", "content": "go"}]}
    post_then_hang_up_when_busy(proxy, llama, "/v1/chat/completions", body)
    wait_until(lambda: re.search(r"llamabridge\.request: /v1/chat/completions class=\S+ status=499", proxy.log_text()), 10,
               what=lambda: "the request to be logged as 499: " + proxy.log_text()[-2000:])
    wait_slots_idle(llama, timeout=60)


def test_clients_hanging_up_at_any_moment_leave_nothing_holding_the_slot(llama):
    """Twelve clients for 20 s send Claude Code turns (some the same session's identical retry,
    which the proxy runs once), OpenAI requests and token counts, and hang up at a random moment:
    while queued, while llama-server prefills, mid-stream, or not at all. Afterwards nothing
    holds or waits for the slot (one leaked admission would queue every later request forever),
    and the one worker still serves."""
    agent = [{"name": "Agent", "input_schema": {"type": "object"}}]
    sessions = [f"storm-{i}" for i in range(4)]

    def request(rnd: random.Random) -> tuple[str, dict, dict]:
        session = {"X-Claude-Code-Session-Id": rnd.choice(sessions)}
        kind = rnd.random()
        if kind < 0.4:
            return "/v1/messages", {"model": "m", "max_tokens": rnd.choice([16, 200, 2000]), "stream": rnd.random() < 0.7,
                                    "tools": agent, "messages": [{"role": "user", "content": "go " * rnd.randint(1, 400)}]}, session
        if kind < 0.7:
            return "/v1/chat/completions", {"model": "m", "max_tokens": rnd.choice([8, 500]), "stream": rnd.random() < 0.5,
                                            "messages": [{"role": "user", "content": "on " * rnd.randint(1, 300)}]}, {}
        if kind < 0.85:
            return "/v1/messages/count_tokens", {"model": "m", "tools": agent, "messages": [{"role": "user", "content": "c " * rnd.randint(1, 50)}]}, session
        return "/v1/messages", {"model": "m", "max_tokens": 300, "stream": True, "tools": agent,
                                "messages": [{"role": "user", "content": "the same turn again"}]}, session

    def client(seed: int, until: float, proxy_url: str) -> None:
        rnd = random.Random(seed)
        while time.monotonic() < until:
            path, body, headers = request(rnd)
            with raw_post(proxy_url, path, body, headers) as sock:
                hang_up = time.monotonic() + rnd.choice([0.0, 0.01, 0.05, 0.2, 1.0, 5.0])
                while (left := hang_up - time.monotonic()) > 0:
                    sock.settimeout(left)
                    try:
                        if not sock.recv(65536):
                            break  # answered in full before the client meant to leave
                    except TimeoutError:
                        break

    with processes.proxy(llama.url, QUEUE_MAX="64") as proxy:
        until = time.monotonic() + 20
        clients = [threading.Thread(target=client, args=(seed, until, proxy.url)) for seed in range(12)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        wait_until(lambda: metric(proxy.url, "llamabridge_proxy_queue_depth") == 0
                   and metric(proxy.url, "llamabridge_proxy_in_flight") == 0, timeout=60, what="the gate to empty")
        wait_slots_idle(llama, timeout=60)
        good = requests.post(proxy.url + "/v1/messages", json={"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
        assert good.status_code == 200 and good.json()["content"]
        log = proxy.log_text()
        assert log.count("Booting worker") == 1 and "Traceback" not in log, log[-4000:]
        assert log.count("status=499") > 10  # the clients did leave mid-request


def test_short_requests_share_one_upstream_connection(proxy, llama):
    """A non-streamed answer read to the end leaves its connection to llama-server for the next
    request: a new TCP connection per request is a measurable part of what the proxy adds."""
    body = {"model": "x", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    assert requests.post(proxy.url + "/v1/chat/completions", json=body, timeout=30).status_code == 200
    before = metric(proxy.url, "llamabridge_proxy_upstream_connections_total")
    for _ in range(6):
        answer = requests.post(proxy.url + "/v1/chat/completions", json=body, timeout=30)
        assert answer.status_code == 200 and answer.json()["choices"]
    # At most one new connection (llama-server may end a kept-alive one after its request limit).
    assert metric(proxy.url, "llamabridge_proxy_upstream_connections_total") - before <= 1


def test_after_a_stream_the_next_request_finds_a_connection_open(llama):
    """llama-server closes its connection after every streamed answer (Claude Code's every
    request); once the stream has gone to the client, the proxy opens the next connection, so
    the next request does not wait for llama-server to accept one."""
    short = {"model": "x", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    with processes.proxy(llama.url) as proxy:  # its own: a pool no other test has touched
        opened = lambda: metric(proxy.url, "llamabridge_proxy_upstream_connections_total")
        assert requests.post(proxy.url + "/v1/chat/completions", json=short, timeout=30).status_code == 200
        assert opened() == 1  # kept for the next request
        with requests.post(proxy.url + "/v1/chat/completions", json={**short, "stream": True}, stream=True, timeout=30) as stream:
            assert stream.status_code == 200 and b"[DONE]" in stream.content
        wait_until(lambda: opened() == 2, timeout=10, what="the proxy to open a connection after the stream")
        answer = requests.post(proxy.url + "/v1/chat/completions", json=short, timeout=30)
        assert answer.status_code == 200 and answer.json()["choices"]
        assert opened() == 2  # the request went out on the connection opened ahead of it


def test_token_counts_leave_no_connection_to_llama_server_open(llama):
    """llama-server gives every open connection a thread of its own until it closes or has been
    idle for 5 s, and when many connections arrive at once it can leave one waiting for a thread
    to free: with a kept-alive connection left behind by every proxy thread that counted tokens,
    a count_tokens burst stalled for up to 5 s (proxy/upstream.py). The small calls behind a
    count close their connection once answered."""
    with processes.proxy(llama.url) as proxy:  # its own: no generation has left a connection in its pool
        def count(i: int) -> int:
            body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": f"count number {i} " * (i + 1)}]}
            answer = requests.post(proxy.url + "/v1/messages/count_tokens", json=body, timeout=60)
            assert answer.status_code == 200, answer.text
            return answer.json()["input_tokens"]

        with ThreadPoolExecutor(8) as pool:  # several of the proxy's threads, each counting afresh
            counts = list(pool.map(count, range(8)))
        assert counts == sorted(counts) and len(set(counts)) == 8  # each one really was counted
        assert proxy.connections_to(llama.url) == []


def test_openai_context_overflow_keeps_llama_server_error(oai, llama):
    n_ctx = requests.get(llama.url + "/props", timeout=5).json()["default_generation_settings"]["n_ctx"]
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model="x", max_tokens=4, messages=[{"role": "user", "content": "hello " * (n_ctx + 500)}])
    assert err.value.body["type"] == "exceed_context_size_error"


def test_openai_image_for_a_model_without_vision_is_a_bad_request(oai):
    """llama-server answers this with 500 "server_error", which the SDK retries and reports as an
    internal error; the proxy says what it is: a request this model cannot serve."""
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model="x", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}}]}])
    assert "image input is not supported" in err.value.message


# -- the small routes ---------------------------------------------------------------------------------


def test_hello_root_and_health(proxy):
    assert requests.head(proxy.url + "/api/hello", timeout=5).status_code == 200
    assert requests.head(proxy.url + "/", timeout=5).status_code == 200
    health = requests.get(proxy.url + "/healthz", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "ok"


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/messages?beta=true", {"model": "claude-sonnet-4-5", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}),
])
def test_a_chunked_upload_is_answered_as_one_with_a_length(proxy, path, body):
    """A body with a Content-Length takes the fast path (proxy/fastpath.py); one sent chunked,
    without a length, goes through the route's Flask view. Both reach llama-server and come back
    in the same shape."""
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    fast = requests.post(proxy.url + path, data=data, headers=headers, timeout=60)
    chunked = requests.post(proxy.url + path, data=iter([data[:7], data[7:]]), headers=headers, timeout=60)
    assert fast.status_code == chunked.status_code == 200, (fast.text, chunked.text)
    assert fast.headers["Content-Type"] == chunked.headers["Content-Type"]
    assert set(fast.json()) == set(chunked.json()) and set(fast.json()) >= {"id", "model", "usage"}


def test_query_string_is_ignored(proxy):
    resp = requests.post(proxy.url + "/v1/messages/count_tokens?beta=true", timeout=30,
                         json={"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "foo"}]})
    assert resp.status_code == 200 and resp.json()["input_tokens"] > 0


def test_capture_requests_are_served(proxy, capture_messages):
    """Every /v1/messages request Claude Code sent in the recorded session gets a valid stream."""
    for body in capture_messages:
        body = dict(body, max_tokens=16)
        resp = requests.post(proxy.url + "/v1/messages?beta=true", json=body, timeout=120)
        assert resp.status_code == 200, resp.text
        check_order(parse(resp.content))
