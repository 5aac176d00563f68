"""The error map (llama-server errors -> what clients see), SSE decoding, and settings validation."""

from __future__ import annotations

import json

import pytest

from llamabridge.settings import ConfigError
from proxy import sse
from proxy.config import from_env
from proxy.errors import from_upstream


def test_context_overflow_becomes_prompt_is_too_long():
    body = {"error": {"code": 400, "message": "request (10033 tokens) exceeds the available context size (8192 tokens), try increasing it",
                      "type": "exceed_context_size_error", "n_prompt_tokens": 10033, "n_ctx": 8192}}
    err = from_upstream(400, json.dumps(body))
    assert (err.status, err.message) == (400, "prompt is too long: 10033 tokens > 8192 maximum")


def test_context_overflow_numbers_are_read_from_the_message_when_fields_are_missing():
    body = {"error": {"code": 400, "message": "request (900 tokens) exceeds the available context size (512 tokens)", "type": "exceed_context_size_error"}}
    assert from_upstream(400, json.dumps(body)).message == "prompt is too long: 900 tokens > 512 maximum"


def test_loading_model_is_overloaded_with_retry_after():
    err = from_upstream(503, b'{"error":{"message":"Loading model","type":"unavailable_error","code":503}}')
    assert err.status == 529 and err.retry_after and "Loading model" in err.message


def test_upstream_garbage_is_a_bad_gateway_with_the_text():
    err = from_upstream(500, b"<html>oops</html>")
    assert err.status == 502 and "oops" in err.message


def test_llama_servers_500_for_a_bad_request_is_the_clients_400():
    # Verbatim from llama-server b11434 (an image for a model without a projector; a message without a role).
    for message in ("image input is not supported - hint: if this is unexpected, you may need to provide the mmproj",
                    "Failed to parse messages: Missing 'role' in message: {\"content\":\"s\"}"):
        err = from_upstream(500, json.dumps({"error": {"code": 500, "message": message, "type": "server_error"}}))
        assert (err.status, err.message) == (400, f"llama-server: {message}")
    # A 500 for anything else is still llama-server's failure.
    assert from_upstream(500, b'{"error":{"code":500,"message":"Failed to tokenize prompt","type":"server_error"}}').status == 502


def test_decode_openai_skips_comments_and_stops_at_done():
    lines = [b": ping", b"", b'data: {"a": 1}', b"", b"event: x", b'data: {"b":', b'data: 2}', b"", b"data: [DONE]", b"", b'data: {"c": 3}', b""]
    assert list(sse.decode_openai(lines)) == [{"a": 1}, {"b": 2}]


def test_decode_openai_rejects_non_json_frames():
    with pytest.raises(sse.StreamProtocolError):
        list(sse.decode_openai([b"data: nope", b""]))


def test_encode_has_event_line():
    assert sse.encode("ping", {"type": "ping"}) == b'event: ping\ndata: {"type":"ping"}\n\n'


def test_settings_defaults_bind_loopback():
    s = from_env({})
    assert (s.host, s.port, s.llama_url, s.upstream_api) == ("127.0.0.1", 9090, "http://127.0.0.1:8080", "openai")


def test_gunicorn_access_log_is_opt_in():
    assert from_env({}).access_log is False
    assert from_env({"ACCESS_LOG": "true"}).access_log is True and from_env({"ACCESS_LOG": "0"}).access_log is False


@pytest.mark.parametrize("env, name", [
    ({"PROXY_PORT": "http"}, "PROXY_PORT"),
    ({"PROXY_PORT": "70000"}, "PROXY_PORT"),
    ({"UPSTREAM_API": "grpc"}, "UPSTREAM_API"),
    ({"LLAMA_URL": "localhost:8080"}, "LLAMA_URL"),
    ({"MAX_REQUEST_BYTES": "-1"}, "MAX_REQUEST_BYTES"),
    ({"ACCESS_LOG": "maybe"}, "ACCESS_LOG"),
])
def test_bad_settings_name_the_variable(env, name):
    with pytest.raises(ConfigError, match=name):
        from_env(env)
