"""llama-server stream -> Anthropic SSE events: the state machine on recorded llama-server
streams (tests/fixtures/llama-stream-*.jsonl), on chunk sequences llama-server produces for
reasoning models and parallel tool calls, and on generated malformed ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sse import StreamProtocolError
from proxy.translate import (
    UpstreamStreamError,
    collect_message,
    stream_openai_to_anthropic,
)
from tests.support.anthropic_sse import check_order

FIXTURES = Path(__file__).parent / "fixtures"


def recorded(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines() if line.strip()]


def events_of(chunks, model="claude-sonnet-4-5"):
    return list(stream_openai_to_anthropic(iter(chunks), model))


def chunk(delta=None, finish=None, **extra):
    return {"choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}], **extra}


def test_recorded_text_stream_with_stop_sequence():
    chunks = recorded("llama-stream-text-stopword.jsonl")
    events = events_of(chunks)
    check_order(events)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    deltas = [d["delta"]["text"] for e, d in events if e == "content_block_delta"]
    # One text_delta per upstream content delta: nothing is merged or held back.
    assert len(deltas) == sum(1 for c in chunks if c.get("choices") and c["choices"][0]["delta"].get("content"))
    assert "".join(deltas) == text
    final = next(d for e, d in events if e == "message_delta")
    assert final["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "e"}
    timings = chunks[-1]["timings"]
    assert final["usage"]["input_tokens"] == timings["prompt_n"]
    assert final["usage"]["cache_read_input_tokens"] == timings["cache_n"]
    assert final["usage"]["output_tokens"] == timings["predicted_n"]


def test_recorded_tool_call_becomes_one_tool_use_block_with_valid_json():
    chunks = recorded("llama-stream-toolcall.jsonl")
    events = events_of(chunks)
    check_order(events)
    starts = [d["content_block"] for e, d in events if e == "content_block_start"]
    assert [s["type"] for s in starts] == ["tool_use"]
    assert starts[0]["id"].startswith("toolu_") and starts[0]["name"] == "get_weather" and starts[0]["input"] == {}
    partial = "".join(d["delta"]["partial_json"] for e, d in events if e == "content_block_delta")
    args = json.loads(partial)
    assert args["city"] in ("Lima", "Oslo") and 1 <= args["days"] <= 5
    assert next(d for e, d in events if e == "message_delta")["delta"]["stop_reason"] == "tool_use"


def test_recorded_length_stop_is_max_tokens():
    events = events_of(recorded("llama-stream-length.jsonl"))
    check_order(events)
    final = next(d for e, d in events if e == "message_delta")
    assert final["delta"]["stop_reason"] == "max_tokens"
    assert final["usage"]["output_tokens"] == 8


def test_reasoning_then_text_gives_a_signed_thinking_block_then_a_text_block():
    chunks = [
        chunk({"role": "assistant", "content": None}),
        chunk({"reasoning_content": "Let me "}),
        chunk({"reasoning_content": "think."}),
        chunk({"content": "Answer"}),
        chunk({}, "stop"),
        {"choices": [], "usage": {"prompt_tokens": 50, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 40}}},
    ]
    events = events_of(chunks)
    check_order(events)
    names = [(e, d.get("delta", {}).get("type") or d.get("content_block", {}).get("type")) for e, d in events]
    assert names == [
        ("message_start", None),
        ("content_block_start", "thinking"), ("content_block_delta", "thinking_delta"), ("content_block_delta", "thinking_delta"),
        ("content_block_delta", "signature_delta"), ("content_block_stop", None),
        ("content_block_start", "text"), ("content_block_delta", "text_delta"), ("content_block_stop", None),
        ("message_delta", None), ("message_stop", None),
    ]
    assert next(d for e, d in events if e == "message_delta")["usage"] == {
        "input_tokens": 10, "cache_read_input_tokens": 40, "output_tokens": 7, "cache_creation_input_tokens": 0}


def test_parallel_tool_calls_are_separate_blocks_each_closed_when_complete():
    chunks = [
        chunk({"content": "Reading both."}),
        chunk({"tool_calls": [{"index": 0, "id": "a", "type": "function", "function": {"name": "Read", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"path": '}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"a.py"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "b", "type": "function", "function": {"name": "Read", "arguments": '{"path": "b.py"}'}}]}),
        chunk({"tool_calls": [{"index": 2, "id": "c", "type": "function", "function": {"name": "Now", "arguments": ""}}]}),
        chunk({}, "tool_calls"),
    ]
    events = events_of(chunks)
    check_order(events)
    message = collect_message(iter(events))
    assert [b["type"] for b in message["content"]] == ["text", "tool_use", "tool_use", "tool_use"]
    assert [b["input"] for b in message["content"][1:]] == [{"path": "a.py"}, {"path": "b.py"}, {}]
    ids = [b["id"] for b in message["content"][1:]]
    assert len(set(ids)) == 3 and all(i.startswith("toolu_") for i in ids)
    # The first call's block closes as soon as its JSON is complete, before the second starts.
    order = [(e, d.get("index")) for e, d in events if e in ("content_block_stop", "content_block_start")]
    assert order[:4] == [("content_block_start", 0), ("content_block_stop", 0), ("content_block_start", 1), ("content_block_stop", 1)]
    assert message["stop_reason"] == "tool_use"


def test_collect_message_stops_at_message_stop_and_leaves_the_rest_to_its_caller():
    """The proxy sends a non-streamed answer as soon as it is whole, and only then lets the event
    source run its end (slot, request log): collect_message must not read past message_stop."""
    finished = []

    def source():
        yield from stream_openai_to_anthropic(iter([chunk({"content": "Hi"}), chunk({}, "stop")]), "m")
        finished.append(True)

    events = source()
    assert collect_message(events)["content"] == [{"type": "text", "text": "Hi"}]
    assert finished == []
    assert list(events) == [] and finished == [True]


def test_collect_message_equals_the_stream(capture_messages):
    chunks = recorded("llama-stream-text-stopword.jsonl")
    message = collect_message(stream_openai_to_anthropic(iter(chunks), "m"))
    assert message["type"] == "message" and message["role"] == "assistant" and message["model"] == "m"
    assert message["id"].startswith("msg_")
    assert message["content"][0]["type"] == "text"
    assert message["stop_reason"] == "stop_sequence" and message["stop_sequence"] == "e"


def test_empty_reply_still_ends_properly():
    events = events_of([chunk({"role": "assistant", "content": None}), chunk({}, "stop")])
    check_order(events)
    assert [e for e, _ in events] == ["message_start", "message_delta", "message_stop"]


def test_error_inside_the_stream_is_raised_after_what_was_sent():
    chunks = [chunk({"content": "partial"}), {"error": {"code": 500, "message": "boom", "type": "server_error"}}]
    gen = stream_openai_to_anthropic(iter(chunks), "m")
    seen = []
    with pytest.raises(UpstreamStreamError, match="boom"):
        for event in gen:
            seen.append(event[0])
    assert seen == ["message_start", "content_block_start", "content_block_delta"]


def test_streams_are_independent():
    """State lives in each generator: two interleaved streams do not mix."""
    a = stream_openai_to_anthropic(iter([chunk({"content": "A"}), chunk({}, "stop")]), "a")
    b = stream_openai_to_anthropic(iter([chunk({"reasoning_content": "B"}), chunk({}, "length")]), "b")
    ea, eb = [], []
    for x, y in zip(a, b):
        ea.append(x)
        eb.append(y)
    ea.extend(a)
    eb.extend(b)
    check_order(ea)
    check_order(eb)
    assert collect_message(iter(ea))["content"] == [{"type": "text", "text": "A"}]
    assert collect_message(iter(eb))["content"][0]["type"] == "thinking"


# Whatever an upstream streams (another OpenAI-compatible server, a future llama-server): chunks
# shaped like llama-server's, with any field replaced by other JSON.
_ANY = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats() | st.text(max_size=4)
    | st.sampled_from(["{", "}", "{}", '{"a": 1}', "stop", "length", "tool_calls"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["index", "function", "name", "arguments", "content"]), inner, max_size=3),
    max_leaves=6)
_CALL = st.fixed_dictionaries({"index": st.integers(0, 2) | _ANY}, optional={
    "id": _ANY, "function": st.fixed_dictionaries({}, optional={"name": st.text(max_size=3) | _ANY,
                                                               "arguments": st.sampled_from(["{", '"a": 1', "}", ""]) | _ANY}) | _ANY})
_DELTA = st.fixed_dictionaries({}, optional={"content": st.text(max_size=3) | _ANY, "reasoning_content": st.text(max_size=3) | _ANY,
                                             "tool_calls": st.lists(_CALL | _ANY, max_size=2) | _ANY})
_CHOICE = st.fixed_dictionaries({"delta": _DELTA | _ANY}, optional={"finish_reason": st.sampled_from([None, "stop", "length", "tool_calls"]) | _ANY})
_CHUNK = st.fixed_dictionaries({}, optional={
    "choices": st.lists(_CHOICE | _ANY, max_size=2) | _ANY, "usage": _ANY, "__verbose": _ANY, "prompt_progress": _ANY, "error": _ANY,
    "timings": st.fixed_dictionaries({"prompt_n": _ANY, "cache_n": _ANY, "predicted_n": _ANY}) | _ANY})


@settings(max_examples=1000)
@given(st.lists(_CHUNK, max_size=6))
def test_any_upstream_stream_gives_well_ordered_events_or_a_stream_error(chunks):
    """Never a crash mid-stream (a cut-off answer and a traceback): either events Claude Code
    accepts, which add up to a message, or the error the route turns into an `event: error`."""
    try:
        events = events_of(chunks)
    except (UpstreamStreamError, StreamProtocolError):
        return
    check_order(events)
    message = collect_message(events)
    assert all(isinstance(v, int) for v in message["usage"].values()), message["usage"]
