"""UPSTREAM_API=anthropic (llama-server's native /v1/messages, with llamabridge's request fixes)
and UPSTREAM_API=auto, with the Anthropic SDK against the real llama-server; how `auto` decides,
also against servers the real one cannot stand in for (one still loading, one without /props)."""

from __future__ import annotations

import anthropic
import pytest
import requests

from proxy.app import ApiMode
from proxy.config import Settings
from proxy.errors import ApiError
from proxy.upstream import Upstream
from tests.support import processes
from tests.support.anthropic_sse import check_order, parse
from tests.support.local_http import LocalServer, QuietHandler

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def native_proxy(llama):
    with processes.proxy(llama.url, UPSTREAM_API="anthropic") as server:
        yield server


@pytest.fixture()
def client(native_proxy) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=native_proxy.url, api_key="k", max_retries=0, timeout=120)


def test_native_non_streamed_keeps_the_clients_model_name(client):
    msg = client.messages.create(model="claude-haiku-4-5", max_tokens=32, messages=[{"role": "user", "content": "hi"}])
    assert msg.model == "claude-haiku-4-5"
    assert msg.content[0].type == "text" and msg.stop_reason in ("end_turn", "max_tokens")


def test_native_stream_follows_the_event_order(native_proxy):
    body = {"model": "claude-sonnet-4-5", "max_tokens": 32, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    resp = requests.post(native_proxy.url + "/v1/messages?beta=true", json=body, timeout=60)
    assert resp.status_code == 200
    events = parse(resp.content)
    check_order(events)
    assert events[0][1]["message"]["model"] == "claude-sonnet-4-5"


def test_native_billing_header_does_not_count(client):
    """The per-session billing header is removed before llama-server sees the request."""
    messages = [{"role": "user", "content": "count me"}]
    plain = client.messages.count_tokens(model="m", system=[{"type": "text", "text": "You are terse."}], messages=messages)
    billed = client.messages.count_tokens(model="m", messages=messages, system=[
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.328.abc; cc_entrypoint=cli;"},
        {"type": "text", "text": "You are terse."}])
    assert plain.input_tokens == billed.input_tokens > 0


def test_native_context_overflow_is_prompt_too_long(client, llama):
    n_ctx = requests.get(llama.url + "/props", timeout=5).json()["default_generation_settings"]["n_ctx"]
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model="m", max_tokens=8, messages=[{"role": "user", "content": "hello " * (n_ctx + 500)}])
    assert err.value.body["error"]["message"].startswith("prompt is too long:")


def test_auto_mode_translates_for_llama_server(llama):
    with processes.proxy(llama.url, UPSTREAM_API="auto") as proxy:
        resp = requests.post(proxy.url + "/v1/messages", json={"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}, timeout=60)
        assert resp.status_code == 200
        assert resp.json()["id"].startswith("msg_")  # llamabridge's translation, not the native endpoint's chatcmpl- id
        assert "UPSTREAM_API=auto: using openai" in proxy.log_text()


def test_auto_mode_is_not_settled_while_llama_server_is_not_there(llama_server_bin, tiny_model):
    """Started before llama-server, the proxy answers a retryable error, then translates once
    llama-server is up: nothing was settled by the request that found no server."""
    port = processes.free_port()
    body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    with processes.proxy(f"http://127.0.0.1:{port}", UPSTREAM_API="auto") as proxy:
        early = requests.post(proxy.url + "/v1/messages", json=body, timeout=60)
        assert early.status_code == 529, early.text
        assert early.json()["error"]["type"] == "overloaded_error" and early.headers["Retry-After"] == "5"
        with processes.llama_server(llama_server_bin, tiny_model, port=port):
            resp = requests.post(proxy.url + "/v1/messages", json=body, timeout=60)
            assert resp.status_code == 200, resp.text
            assert resp.json()["id"].startswith("msg_")  # the translation's id, not the native endpoint's
        assert "UPSTREAM_API=auto: using openai" in proxy.log_text()


class LoadingThenReady(QuietHandler):
    """`/props` as a llama-server that is loading its model answers it (503), then as a ready one.
    A fake because the real one loads the tiny model too quickly to be asked while it loads."""

    asked = 0

    def do_GET(self) -> None:
        type(self).asked += 1
        if type(self).asked == 1:
            self.send_json(503, {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}})
        else:
            self.send_json(200, {"default_generation_settings": {"n_ctx": 4096}, "total_slots": 1})


def test_auto_mode_is_not_settled_by_a_llama_server_still_loading():
    with LocalServer(LoadingThenReady) as server:
        mode = ApiMode(Settings(llama_url=server.url, upstream_api="auto"), Upstream(Settings(llama_url=server.url)))
        with pytest.raises(ApiError) as err:
            mode.get()
        assert err.value.status == 529 and err.value.retry_after == 5 and "Loading model" in err.value.message
        assert mode.get() == "openai"
        assert mode.get() == "openai" and LoadingThenReady.asked == 2  # settled now: not asked again


class NoProps(QuietHandler):
    """A server with an Anthropic API and no `/props` (not llama-server): none to run here."""

    def do_GET(self) -> None:
        self.send_json(404, {"type": "error", "error": {"type": "not_found_error", "message": "no such route"}})


def test_auto_mode_passes_through_to_a_server_without_props():
    with LocalServer(NoProps) as server:
        mode = ApiMode(Settings(llama_url=server.url, upstream_api="auto"), Upstream(Settings(llama_url=server.url)))
        assert mode.get() == "anthropic"
