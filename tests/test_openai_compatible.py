"""An upstream that speaks OpenAI's API but is not llama-server (no /props, /slots, /tokenize,
/apply-template): LiteLLM's proxy, for real, in front of the real llama-server. Translation works;
token counts are the documented estimate; the context size is unknown; cached tokens come from
what the server reports."""

from __future__ import annotations

import pytest
import requests

from tests.support import processes
from tests.support.anthropic_sse import parse
from tests.test_kv_cache import first_turn, next_turn, turn

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def litellm(litellm_bin, llama, tmp_path_factory):
    config = tmp_path_factory.mktemp("litellm") / "config.yaml"
    config.write_text("model_list:\n  - model_name: local\n    litellm_params:\n      model: openai/local\n"
                      f"      api_base: {llama.url}/v1\n      api_key: none\n")
    port = processes.free_port()
    service = processes.Service("litellm", [litellm_bin, "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
                                r"Uvicorn running on http://127\.0\.0\.1:(?P<port>\d+)", health_path="/health/liveliness",
                                timeout=120)
    with service:
        yield service


@pytest.fixture(scope="module")
def generic_proxy(litellm):
    with processes.proxy(litellm.url) as proxy:
        yield proxy


def test_a_claude_code_turn_through_an_openai_compatible_server(generic_proxy):
    body = first_turn("the parser, through LiteLLM")
    usage = turn(generic_proxy, body, "G")["usage"]
    # The session llama-server may have seen the shared system prompt already (other tests').
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] > 2000
    streamed = requests.post(generic_proxy.url + "/v1/messages?beta=true", json=dict(next_turn(body, "Read it.", "Go on."), stream=True),
                             headers={"X-Claude-Code-Session-Id": "G"}, timeout=120)
    events = parse(streamed.text)
    assert streamed.status_code == 200 and events[-1][0] == "message_stop"
    # The server's prompt cache still shows: what it reported as cached reached the client.
    (delta,) = [data for event, data in events if event == "message_delta"]
    assert delta["usage"]["cache_read_input_tokens"] > 2000
    assert "treating it as an OpenAI-compatible server that is not llama-server (model local" in generic_proxy.log_text()


def test_what_is_lost_without_llama_servers_own_routes(generic_proxy):
    counted = requests.post(generic_proxy.url + "/v1/messages/count_tokens", timeout=30,
                            json={"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "count these words please"}]})
    assert counted.status_code == 200 and counted.headers["X-Llamabridge-Token-Count"] == "estimate"
    (model,) = requests.get(generic_proxy.url + "/v1/models", timeout=30).json()["data"]
    assert model["id"] == "local" and model["context_window"] == 0
    relayed = requests.post(generic_proxy.url + "/v1/chat/completions", timeout=60,
                            json={"model": "local", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert relayed.status_code == 200 and relayed.json()["choices"]
