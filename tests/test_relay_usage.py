"""The usage the request log keeps for a relayed answer, read from the answer's tail: every shape
llama-server ends an answer with (chat, native completion, Responses; streamed or not), and
answers far larger than the tail the relay keeps."""

from __future__ import annotations

import json

from proxy.metrics import Call
from proxy.relay import _noting_usage

TIMINGS = {"cache_n": 32, "prompt_n": 5, "prompt_ms": 1.0, "predicted_n": 7, "predicted_ms": 2.0}


def relayed(chunks: list[bytes]) -> Call:
    """Relay `chunks` as the proxy does; the bytes must come out untouched."""
    call = Call(route="/v1/test", client="test", session=None)
    assert b"".join(_noting_usage(iter(chunks), call)) == b"".join(chunks)
    return call


def counts(call: Call) -> tuple[int, int, int]:
    return call.prompt_tokens, call.cached_tokens, call.generated_tokens


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def test_chat_answers_prefer_timings_over_usage():
    body = {"choices": [{"message": {"content": "hi"}}], "usage": {"prompt_tokens": 99, "completion_tokens": 99}, "timings": TIMINGS}
    assert counts(relayed([json.dumps(body).encode()])) == (5, 32, 7)
    stream = [b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n',
              b'data: ' + json.dumps({"choices": [], "usage": {"prompt_tokens": 37, "completion_tokens": 7}, "timings": TIMINGS}).encode()
              + b"\n\n", b"data: [DONE]\n\n"]
    assert counts(relayed(stream)) == (5, 32, 7)


def test_a_non_streamed_responses_answer_has_only_usage():
    """The Responses API counts cached tokens inside input_tokens."""
    body = {"object": "response", "output": [{"type": "message", "content": [{"type": "output_text", "text": "hi"}]}],
            "usage": {"input_tokens": 33, "output_tokens": 4, "total_tokens": 37, "input_tokens_details": {"cached_tokens": 32}}}
    assert counts(relayed([json.dumps(body).encode()])) == (1, 32, 4)


def test_a_last_event_larger_than_the_tail_kept_still_gives_its_usage():
    """A streamed Responses answer ends with an event that repeats the whole reply: at 100 kB it
    arrives in many reads, and the relay keeps only the last 16 kB of them."""
    text = "token \\\"timings\\\": {quoted} " * 4000  # the key inside a string is escaped, so never a match
    completed = {"type": "response.completed", "response": {"output": [{"type": "message", "content": [{"type": "output_text", "text": text}]}],
                                                            "usage": {"input_tokens": 40, "output_tokens": 9}}, "timings": TIMINGS}
    stream = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"token"}\n\n' \
        + b"event: response.completed\ndata: " + json.dumps(completed).encode() + b"\n\n"
    assert len(stream) > 100_000
    assert counts(relayed(split(stream, 4096))) == (5, 32, 7)
    completed.pop("timings")
    stream = b"event: response.completed\ndata: " + json.dumps(completed).encode() + b"\n\n"
    assert counts(relayed(split(stream, 4096))) == (40, 0, 9)


def test_an_answer_without_usage_records_none():
    call = relayed([b'{"error":{"code":501,"message":"not supported","type":"not_supported_error"}}'])
    assert counts(call) == (0, 0, 0)
    call = relayed([b'data: {"choices":[],"usage":null}\n\n', b'data: {"timings": "broken"}\n\n'])
    assert counts(call) == (0, 0, 0)
