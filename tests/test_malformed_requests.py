"""Malformed requests, generated: whatever a client sends, the answer is a client error in the
route's own envelope, never a 500, and the proxy keeps serving.

test_proxy_errors.py covers the bad input we thought of. These tests take real requests (the
recorded Claude Code session's, an agent's conversation with images, thinking and tool calls,
and an OpenAI client's) and break them at random places with random JSON (hypothesis), to
find what we did not think of. They found a crash in request classification (a tool whose
name is a list), one in the locally answered session title (a schema whose `properties` is a
list), and llama-server's 500s for bad messages, tools and images (see
errors._MISFILED_INPUT_ERRORS).

The examples are derandomized (tests/conftest.py), so every run (and CI) tries the same ones; set FUZZ_EXAMPLES to
try more (`FUZZ_EXAMPLES=3000 make test` or pytest on this file).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import classify, translate
from proxy.errors import ANTHROPIC_TYPES, ApiError
from tests.support import anthropic_sse, processes

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "0")) or None
PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="

# Random JSON to put where a request had something else.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["type", "text", "content", "name", "input", "role", "source", "data", "schema",
                         "properties", "required", "id", "tool_use_id", "tool_calls", "function", "arguments"])
        | st.text(max_size=5), inner, max_size=3),
    max_leaves=5)


def _paths(node: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, prefix + (i,))


@st.composite
def broken(draw, bodies: list[dict]) -> dict:
    """One of `bodies` with one to three of its values replaced by random JSON, or removed."""
    body = copy.deepcopy(draw(st.sampled_from(bodies)))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_paths(body))))
        if not path:
            continue
        parent = body
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(JSON)
    return body


def agent_turn(tools: list[dict]) -> dict:
    """A small conversation with every block kind a coding agent sends."""
    return {
        "model": "claude-sonnet-4-5", "max_tokens": 16, "tools": tools,
        "system": [{"type": "text", "text": "You are a coding agent.", "cache_control": {"type": "ephemeral"}}],
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                         {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PIXEL}}]},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "Look first.", "signature": "sig"},
                                              {"type": "tool_use", "id": "toolu_1", "name": tools[0]["name"], "input": {"command": "ls"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "a.png"}]},
                                         {"type": "text", "text": "Go on."}]},
        ],
    }


@pytest.fixture(scope="module")
def anthropic_bodies(capture) -> list[tuple[str, dict, dict]]:
    """(path, body, headers): the session's title request as Claude Code sent it, and an agent's
    turn, streamed and not, with and without Claude Code's session header and an image, and
    counted."""
    title = next(r for r in capture if r["path"].startswith("/v1/messages?") and not r["body"].get("tools"))
    session = {k: v for k, v in title["headers"].items() if k.lower() in ("x-claude-code-session-id", "anthropic-version", "anthropic-beta")}
    main = next(r["body"] for r in capture if r["path"].startswith("/v1/messages?") and r["body"].get("tools"))
    turn = agent_turn([t for t in main["tools"] if t["name"] in ("Bash", "Agent")])
    # The tiny model has no vision: llama-server's native endpoint refuses any turn with an image.
    text_only = copy.deepcopy(turn)
    text_only["messages"][0]["content"] = text_only["messages"][0]["content"][:1]
    counted = {k: turn[k] for k in ("model", "messages", "system", "tools")}
    return [("/v1/messages?beta=true", title["body"], session), ("/v1/messages?beta=true", turn, session),
            ("/v1/messages", turn, {}), ("/v1/messages", dict(turn, stream=True), {}), ("/v1/messages", text_only, {}),
            ("/v1/messages/count_tokens?beta=true", counted, session)]


OPENAI_CHAT = {
    "model": "any", "max_tokens": 8, "temperature": 0.5,
    "tools": [{"type": "function", "function": {"name": "read_file", "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}],
    "messages": [
        {"role": "system", "content": "You are a coding agent."},
        {"role": "user", "content": [{"type": "text", "text": "Read it."}, {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "read_file", "arguments": "{\"path\": \"a\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "hello"},
    ],
}
OPENAI_BODIES = [("/v1/chat/completions", OPENAI_CHAT), ("/v1/chat/completions", dict(OPENAI_CHAT, stream=True)),
                 ("/v1/completions", {"model": "any", "prompt": "def f(", "max_tokens": 8}),
                 ("/v1/responses", {"model": "any", "instructions": "Be brief.", "max_output_tokens": 8, "input": [
                     {"role": "user", "content": [{"type": "input_text", "text": "Read it."}]},
                     {"type": "function_call", "call_id": "call_1", "name": "read_file", "arguments": "{\"path\": \"a\"}"},
                     {"type": "function_call_output", "call_id": "call_1", "output": "hello"}],
                  "tools": [{"type": "function", "name": "read_file", "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}]}),
                 ("/v1/responses", {"model": "any", "input": "hi", "max_output_tokens": 8, "stream": True}),
                 ("/completion", {"prompt": "def f(", "n_predict": 8, "stream": True})]


def bounded(path: str, body: Any) -> Any:
    """Keep generations short (the tiny model may not stop before its context is full): a large
    max_tokens (max_output_tokens, n_predict) becomes 64, and an OpenAI body that lost it gets it
    back; any other change to it stays, being what is tested."""
    if isinstance(body, dict):
        for limit in ("max_tokens", "max_output_tokens", "n_predict"):
            if isinstance(body.get(limit), int) and body[limit] > 64:
                body[limit] = 64
        if not path.startswith("/v1/messages") and not any(limit in body for limit in ("max_tokens", "max_output_tokens", "n_predict")):
            body["max_tokens"] = 64
    return body


# -- translation, no processes --------------------------------------------------------------


def test_translation_refuses_malformed_requests_only_with_client_errors(anthropic_bodies):
    """Everything the proxy does with an Anthropic body before llama-server sees it either works
    or raises the 400 the app renders (InvalidRequest, ApiError); anything else is a 500."""
    bodies = [body for _, body, _ in anthropic_bodies]

    @settings(max_examples=EXAMPLES or 1000)
    @given(broken(bodies))
    def check(body: dict) -> None:
        for step in (lambda: translate.anthropic_to_openai(body, translate.Options(model="m", vision=True)),
                     lambda: translate.anthropic_to_openai(body, translate.Options(model="m", vision=False)),
                     lambda: translate.count_tokens_request(body),
                     lambda: classify.classify(translate.validate_common(body, need_max_tokens=False))):
            try:
                step()
            except (translate.InvalidRequest, ApiError):
                pass

    check()


# -- the real proxy on the real llama-server ------------------------------------------------


@pytest.fixture(scope="module", params=["openai", "anthropic"])
def any_mode_proxy(request, llama):
    """A proxy of its own (its log is read at the end), translating (`openai`) or passing
    Anthropic requests to llama-server's native endpoint (`anthropic`)."""
    with processes.proxy(llama.url, UPSTREAM_API=request.param) as server:
        yield request.param, server


def check_answer(path: str, body: Any, resp: requests.Response) -> None:
    anthropic = path.startswith("/v1/messages")
    # 529 is the proxy shedding a background request while the slot holds a conversation's cache.
    assert resp.status_code < 500 or (anthropic and resp.status_code == 529), (path, json.dumps(body)[:800], resp.text[:800])
    if resp.status_code >= 400:
        error = resp.json()
        if anthropic:
            assert error["type"] == "error" and error["error"]["type"] in ANTHROPIC_TYPES.values(), error
        assert isinstance(error["error"]["message"], str) and error["error"]["message"], error
        assert isinstance(error["error"]["type"], str) and error["error"]["type"], error
    elif anthropic and "count_tokens" not in path:
        if resp.headers["Content-Type"].startswith("text/event-stream"):
            events = anthropic_sse.parse(resp.content)
            if events[-1][0] == "error":  # a failure after the stream started: said in-stream
                assert events[-1][1]["error"]["type"] in ANTHROPIC_TYPES.values() and events[-1][1]["error"]["message"]
            else:
                anthropic_sse.check_order(events)
        else:
            message = resp.json()
            assert message["type"] == "message" and isinstance(message["content"], list) and message["stop_reason"], message


@pytest.mark.integration
def test_malformed_requests_get_client_errors_in_their_api_envelope(any_mode_proxy, anthropic_bodies, llama):
    mode, proxy = any_mode_proxy
    cases = [(path, body, headers) for path, body, headers in anthropic_bodies]
    if mode == "openai":  # the OpenAI routes do not depend on the mode
        cases += [(path, body, {}) for path, body in OPENAI_BODIES]

    @settings(max_examples=EXAMPLES or 300)
    @given(st.sampled_from(cases).flatmap(lambda case: st.tuples(st.just(case), broken([case[1]]))))
    def check(drawn: tuple[tuple[str, dict, dict], dict]) -> None:
        (path, _, headers), body = drawn
        body = bounded(path, body)
        resp = requests.post(proxy.url + path, data=json.dumps(body), timeout=120,
                             headers={**headers, "Content-Type": "application/json"})
        check_answer(path, body, resp)

    check()
    # The same worker still serves, nothing it logged was a crash, llama-server's slot is free.
    good = requests.post(proxy.url + "/v1/messages", json={"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}, timeout=60)
    assert good.status_code == 200 and good.json()["type"] == "message"
    log = proxy.log_text()
    assert log.count("Booting worker") == 1 and "Traceback" not in log and "unhandled error" not in log, log[-4000:]
    assert not any(slot["is_processing"] for slot in requests.get(llama.url + "/slots", timeout=10).json())
