"""Anthropic request -> llama-server chat-completions body: pure translation, on the recorded
Claude Code session and on hand-made requests for each rule in the reference."""

from __future__ import annotations

import copy
import json

import pytest

from proxy import translate
from proxy.translate import InvalidRequest, Options, anthropic_to_openai


def dumps(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


def minimal(**extra) -> dict:
    body = {"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    body.update(extra)
    return body


# -- the recorded session ---------------------------------------------------------------------


def test_every_captured_request_translates_deterministically(capture_messages):
    assert len(capture_messages) == 5
    for body in capture_messages:
        first = dumps(anthropic_to_openai(copy.deepcopy(body), Options(model="local")))
        second = dumps(anthropic_to_openai(copy.deepcopy(body), Options(model="local")))
        assert first == second


def test_translation_does_not_modify_the_request(capture_messages):
    body = capture_messages[2]
    before = dumps(body)
    anthropic_to_openai(body)
    assert dumps(body) == before


def test_billing_header_and_cache_control_never_reach_upstream(capture_messages):
    for body in capture_messages:
        translated = anthropic_to_openai(body)
        out = dumps(translated)
        assert b"x-anthropic-billing-header" not in out
        assert b"cache_control" not in out
        assert not {"context_management", "metadata", "thinking", "output_config", "system"} & set(translated)
        for tool in translated.get("tools", []):
            assert set(tool["function"]) <= {"name", "description", "parameters"}


def test_two_sessions_share_the_system_prompt_bytes(capture_messages):
    """The billing header differs per session (hash of the first message); nothing else may."""
    main = capture_messages[1]
    other = copy.deepcopy(main)
    other["system"][0]["text"] = "x-anthropic-billing-header: cc_version=2.1.328.abc; cc_entrypoint=cli;"
    a, b = anthropic_to_openai(main), anthropic_to_openai(other)
    assert a["messages"][0] == b["messages"][0]
    assert a["tools"] == b["tools"]


def test_system_blocks_are_joined_with_blank_lines(capture_messages):
    main = capture_messages[1]
    out = anthropic_to_openai(main)
    texts = [b["text"] for b in main["system"][1:]]
    assert out["messages"][0] == {"role": "system", "content": "\n\n".join(texts)}


def test_main_loop_request_maps_tools_and_thinking(capture_messages):
    main = capture_messages[1]
    out = anthropic_to_openai(main, Options(model="tiny.gguf"))
    assert out["model"] == "tiny.gguf"
    assert out["stream"] is True and out["stream_options"] == {"include_usage": True}
    assert [t["function"]["name"] for t in out["tools"]] == [t["name"] for t in main["tools"]]
    for tool, original in zip(out["tools"], main["tools"]):
        assert tool["type"] == "function"
        assert tool["function"]["parameters"] == original["input_schema"]
        assert set(tool["function"]) <= {"name", "description", "parameters"}
    assert out["chat_template_kwargs"] == {"enable_thinking": True}
    assert out["max_tokens"] == 32000


def test_title_request_asks_for_structured_output(capture_messages):
    title = capture_messages[0]
    out = anthropic_to_openai(title)
    assert out["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": title["output_config"]["format"]["schema"]}}
    assert out["chat_template_kwargs"] == {"enable_thinking": False}
    assert "tools" not in out
    assert out["temperature"] == title["temperature"]


def test_tool_round_trip_from_capture(capture_messages):
    """Request 5: assistant text + tool_use, then a tool_result followed by new user text."""
    out = anthropic_to_openai(capture_messages[4])
    roles = [m["role"] for m in out["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "user"]
    assistant, tool, user = out["messages"][2:]
    assert assistant["content"] == "Hello from fake."
    assert assistant["tool_calls"] == [
        {"id": "toolu_1", "type": "function", "function": {"name": "Bash", "arguments": json.dumps({"command": "ls", "description": "list"})}}
    ]
    assert tool["tool_call_id"] == "toolu_1" and tool["content"].startswith("a.py")
    assert user["content"] == "now tell me a joke"


# -- rules, one by one --------------------------------------------------------------------------


def test_tool_results_come_before_user_text_in_order():
    body = minimal(messages=[
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_a", "name": "Read", "input": {"p": 1}},
            {"type": "tool_use", "id": "toolu_b", "name": "Read", "input": {"p": 2}},
        ]},
        {"role": "user", "content": [
            {"type": "text", "text": "and also this"},
            {"type": "tool_result", "tool_use_id": "toolu_a", "content": "A"},
            {"type": "tool_result", "tool_use_id": "toolu_b", "content": [{"type": "text", "text": "B1"}, {"type": "text", "text": "B2"}]},
        ]},
    ])
    msgs = anthropic_to_openai(body)["messages"]
    assert msgs[2:] == [
        {"role": "tool", "tool_call_id": "toolu_a", "content": "A"},
        {"role": "tool", "tool_call_id": "toolu_b", "content": "B1\nB2"},
        {"role": "user", "content": "and also this"},
    ]


def test_tool_error_stays_visible():
    body = minimal(messages=[
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "no such file", "is_error": True}]},
    ])
    assert anthropic_to_openai(body)["messages"][0]["content"] == "[tool error] no such file"


def test_mid_conversation_system_message_is_folded_into_the_user_turn():
    body = minimal(system="S", messages=[
        {"role": "system", "content": "env: linux"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "system", "content": [{"type": "text", "text": "reminder"}]},
    ])
    msgs = anthropic_to_openai(body)["messages"]
    assert msgs == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "env: linux\n\nhi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "reminder"},
    ]


IMG = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}


def test_images_become_image_url_parts_when_the_model_has_vision():
    body = minimal(messages=[{"role": "user", "content": [{"type": "text", "text": "what is this"}, IMG]}])
    content = anthropic_to_openai(body, Options(vision=True))["messages"][0]["content"]
    assert content == [{"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]


def test_images_in_tool_results_are_hoisted_after_the_tool_message():
    body = minimal(messages=[{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": "screenshot:"}, IMG]},
        {"type": "text", "text": "look"},
    ]}])
    msgs = anthropic_to_openai(body, Options(vision=True))["messages"]
    assert msgs[0]["role"] == "tool" and "attached in the next user message" in msgs[0]["content"]
    assert msgs[1]["role"] == "user"
    assert msgs[1]["content"][0]["type"] == "image_url" and msgs[1]["content"][1] == {"type": "text", "text": "look"}


def test_images_become_a_note_without_vision():
    body = minimal(messages=[{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": [IMG]}, IMG]}])
    msgs = anthropic_to_openai(body, Options(vision=False))["messages"]
    assert msgs[0]["content"] == translate.NO_VISION_NOTE
    assert msgs[1]["content"] == translate.NO_VISION_NOTE


@pytest.mark.parametrize("thinking, expected", [
    ({"type": "enabled", "budget_tokens": 1024}, True),
    ({"type": "adaptive"}, True),
    ({"type": "disabled"}, False),
])
def test_thinking_maps_to_the_template_switch(thinking, expected):
    assert anthropic_to_openai(minimal(thinking=thinking))["chat_template_kwargs"] == {"enable_thinking": expected}


def test_no_thinking_field_leaves_the_server_default():
    assert "chat_template_kwargs" not in anthropic_to_openai(minimal())


TOOLS = [{"name": "Bash", "input_schema": {"type": "object"}, "defer_loading": True, "strict": True},
         {"name": "Read", "description": "read", "input_schema": {"type": "object"}, "eager_input_streaming": True}]


@pytest.mark.parametrize("choice, expected", [
    ({"type": "auto"}, {"tool_choice": "auto"}),
    ({"type": "any"}, {"tool_choice": "required"}),
    ({"type": "auto", "disable_parallel_tool_use": True}, {"tool_choice": "auto", "parallel_tool_calls": False}),
    ({"type": "any", "disable_parallel_tool_use": False}, {"tool_choice": "required", "parallel_tool_calls": True}),
])
def test_tool_choice(choice, expected):
    out = anthropic_to_openai(minimal(tools=TOOLS, tool_choice=choice))
    assert {k: out[k] for k in expected} == expected
    assert len(out["tools"]) == 2


def test_named_tool_choice_keeps_only_that_tool():
    out = anthropic_to_openai(minimal(tools=TOOLS, tool_choice={"type": "tool", "name": "Read"}))
    assert out["tool_choice"] == "required"
    assert [t["function"]["name"] for t in out["tools"]] == ["Read"]


def test_tool_choice_none_sends_no_tools():
    out = anthropic_to_openai(minimal(tools=TOOLS, tool_choice={"type": "none"}))
    assert "tools" not in out and "tool_choice" not in out


def test_sampling_and_stop_sequences():
    out = anthropic_to_openai(minimal(temperature=0.2, top_p=0.9, top_k=40, stop_sequences=["END", "###"]))
    assert (out["temperature"], out["top_p"], out["top_k"]) == (0.2, 0.9, 40)
    assert out["stop"] == ["END", "###"]
    assert out["verbose"] is True and out["response_fields"] == ["stop_type", "stopping_word"]


def test_platform_fields_are_dropped_without_error():
    out = anthropic_to_openai(minimal(
        context_management={"edits": []}, safeguards={"x": 1}, metadata={"user_id": "{}"}, betas=["b"],
        output_config={"effort": "high"}, service_tier="auto",
    ))
    assert set(out) == {"model", "messages", "max_tokens", "stream", "stream_options", "cache_prompt", "return_progress"}


def test_any_model_name_is_served_by_the_upstream_model():
    for name in ("claude-opus-4-1", "claude-3-5-haiku-latest", "gpt-4o", "whatever"):
        assert anthropic_to_openai(minimal(model=name), Options(model="qwen.gguf"))["model"] == "qwen.gguf"


def test_assistant_thinking_blocks_become_reasoning_content():
    body = minimal(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "hmm", "signature": "sig"}, {"type": "text", "text": "a"}]}, {"role": "user", "content": "more"}])
    assistant = anthropic_to_openai(body)["messages"][1]
    assert assistant == {"role": "assistant", "content": "a", "reasoning_content": "hmm"}


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("body, where", [
    ([], "body"),
    ({"max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}, "model"),
    (minimal(messages="hi"), "messages"),
    (minimal(messages=[]), "messages"),
    (minimal(max_tokens="10"), "max_tokens"),
    (minimal(max_tokens=0), "max_tokens"),
    (minimal(max_tokens=True), "max_tokens"),
    (minimal(stream="yes"), "stream"),
    (minimal(messages=[{"role": "robot", "content": "x"}]), "messages.0.role"),
    (minimal(messages=[{"role": "user"}]), "messages.0.content"),
    (minimal(messages=[{"role": "user", "content": [{"type": "hologram"}]}]), "messages.0.content.0.type"),
    (minimal(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]), "messages.0.content.0.text"),
    (minimal(messages=[{"role": "user", "content": [{"type": "tool_result"}]}]), "messages.0.content.0.tool_use_id"),
    (minimal(system=[{"type": "image"}]), "system.0.type"),
    (minimal(tools=[{"description": "no name"}]), "tools.0.name"),
    (minimal(tool_choice={"type": "sometimes"}), "tool_choice.type"),
    (minimal(tools=TOOLS, tool_choice={"type": "tool", "name": "Nope"}), "tool_choice.name"),
    (minimal(thinking={"type": "deep"}), "thinking.type"),
    (minimal(temperature=7), "temperature"),
    (minimal(stop_sequences="END"), "stop_sequences"),
    (minimal(stop_sequences=["END", ""]), "stop_sequences.1"),
    (minimal(tools=[{"name": ""}]), "tools.0.name"),
    (minimal(tools=TOOLS + TOOLS[:1]), f"tools.{len(TOOLS)}.name"),
    (minimal(tool_choice={"type": "any"}), "tool_choice"),
    (minimal(tools=[{"type": "web_search_20250305", "name": "web_search"}], tool_choice={"type": "any"}), "tool_choice"),
    (minimal(output_config={"format": {"type": "regex"}}), "output_config.format.type"),
])
def test_bad_requests_name_the_field(body, where):
    with pytest.raises(InvalidRequest) as err:
        anthropic_to_openai(body)
    assert str(err.value).startswith(where)


def test_billing_header_line_is_removed_but_text_after_it_kept():
    header = "x-anthropic-billing-header: cc_version=2.1.100.abc; cch=1f2e3; cc_entrypoint=cli;"
    assert translate.system_text(header) == ""
    assert translate.system_text(header + "\nYou are helpful.") == "You are helpful."
    assert translate.system_text([{"type": "text", "text": header + "\nA"}, {"type": "text", "text": "B"}]) == "A\n\nB"
