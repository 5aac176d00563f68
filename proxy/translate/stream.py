"""llama-server's streamed chat-completion chunks -> Anthropic stream events, and the
non-streamed Anthropic message folded from those same events, so both modes share one state
machine. All stream state lives in the generator's locals, never on an object shared between
requests.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from .exceptions import StreamProtocolError, UpstreamStreamError, json_type

# One Anthropic SSE frame: (event name, data).
Event = tuple[str, dict[str, Any]]


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def new_tool_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


def token_count(value: Any) -> int:
    """A token count from upstream; anything that is not a number counts as none."""
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else 0


def _check_chunk(chunk: dict) -> None:
    """Raise StreamProtocolError if a field the translation reads has a type no OpenAI-compatible
    server sends: the client's stream then ends with an error event rather than a crash."""

    def bad(where: str, value: Any, want: str) -> None:
        raise StreamProtocolError(f"upstream sent a stream chunk whose {where} is {json_type(value)}, not {want}: "
                                  f"{json.dumps(chunk, default=str)[:200]}")

    choices = chunk.get("choices")
    if not choices:
        return
    if not isinstance(choices, list):
        bad("choices", choices, "an array")
    for i, choice in enumerate(choices):
        if not isinstance(choice, dict):
            bad(f"choices.{i}", choice, "an object")
        if choice.get("finish_reason") and not isinstance(choice["finish_reason"], str):
            bad(f"choices.{i}.finish_reason", choice["finish_reason"], "a string")
        delta = choice.get("delta")
        if not delta:
            continue
        if not isinstance(delta, dict):
            bad(f"choices.{i}.delta", delta, "an object")
        for key in ("content", "reasoning_content"):
            if delta.get(key) and not isinstance(delta[key], str):
                bad(f"choices.{i}.delta.{key}", delta[key], "a string")
        calls = delta.get("tool_calls")
        if not calls:
            continue
        if not isinstance(calls, list):
            bad(f"choices.{i}.delta.tool_calls", calls, "an array")
        for j, call in enumerate(calls):
            where = f"choices.{i}.delta.tool_calls.{j}"
            if not isinstance(call, dict):
                bad(where, call, "an object")
            index = call.get("index", 0)
            if not isinstance(index, int) or isinstance(index, bool):
                bad(f"{where}.index", index, "a number")
            function = call.get("function")
            if function and not isinstance(function, dict):
                bad(f"{where}.function", function, "an object")
            for key in ("name", "arguments"):
                if function and function.get(key) and not isinstance(function[key], str):
                    bad(f"{where}.function.{key}", function[key], "a string")


def usage_from(chunk: dict) -> dict[str, int] | None:
    """Anthropic usage from an OpenAI chunk's `timings` (preferred) or `usage` (Chat
    Completions' names, or the Responses API's).

    llama-server's `timings.prompt_n` counts only the prompt tokens it evaluated; `cache_n`
    those it reused from the slot's cache. Anthropic's `input_tokens` is the uncached part and
    `cache_read_input_tokens` the cached part; Claude Code sums them for its context meter.
    """
    timings = chunk.get("timings")
    if isinstance(timings, dict) and "prompt_n" in timings:
        return {
            "input_tokens": token_count(timings.get("prompt_n")),
            "cache_read_input_tokens": token_count(timings.get("cache_n")),
            "output_tokens": token_count(timings.get("predicted_n")),
        }
    usage = chunk.get("usage")
    if not isinstance(usage, dict):
        return None
    # Chat Completions' names, or the Responses API's; either way the prompt count includes the
    # cached tokens.
    names = _RESPONSES_USAGE if "input_tokens" in usage else _CHAT_USAGE
    prompt = token_count(usage.get(names[0]))
    details = usage.get(names[1]) or {}
    cached = token_count(details.get("cached_tokens")) if isinstance(details, dict) else 0
    return {
        "input_tokens": max(prompt - cached, 0),
        "cache_read_input_tokens": cached,
        "output_tokens": token_count(usage.get(names[2])),
    }


_CHAT_USAGE = ("prompt_tokens", "prompt_tokens_details", "completion_tokens")
_RESPONSES_USAGE = ("input_tokens", "input_tokens_details", "output_tokens")


def _json_complete(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def message_start(model: str, message_id: str | None = None) -> Event:
    """The first event of every Anthropic stream; usage is only known at the end."""
    return "message_start", {
        "type": "message_start",
        "message": {
            "id": message_id or new_message_id(),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0, "output_tokens": 0},
        },
    }


def stream_openai_to_anthropic(chunks: Iterable[dict], model: str, message_id: str | None = None) -> Iterator[Event]:
    """Anthropic SSE events for a stream of OpenAI chat-completion chunks.

    Event order is the one Claude Code requires: message_start, then per block
    content_block_start / content_block_delta... / content_block_stop, then message_delta
    with the stop reason and cumulative usage, then message_stop. Every upstream delta is
    passed on as soon as it arrives. All state lives in this generator's locals.

    Each OpenAI `tool_calls[i].index` becomes its own `tool_use` block, closed as soon as its
    arguments form complete JSON (Claude Code may start the tool at content_block_stop).
    Keep-alives and prefill progress become `ping` events (allowed anywhere in the stream).
    """
    yield message_start(model, message_id)
    index = -1  # index of the last block started
    open_kind: str | None = None  # "text" | "thinking" | "tool_use" while a block is open
    thinking_text: list[str] = []
    tool_block: dict[int, int] = {}  # OpenAI tool index -> Anthropic block index
    tool_args: dict[int, str] = {}
    closed_tools: set[int] = set()
    open_tool: int | None = None
    used_tools = False
    finish: str | None = None
    stop_word: str | None = None
    usage: dict[str, int] | None = None

    def close() -> Iterator[Event]:
        nonlocal open_kind, open_tool
        if open_kind is None:
            return
        if open_kind == "thinking":
            # Clients keep the signature and send it back with the block; a local model checks
            # nothing, so any stable value will do: a digest of the thinking text.
            signature = hashlib.sha256("".join(thinking_text).encode()).hexdigest()
            yield "content_block_delta", {"type": "content_block_delta", "index": index, "delta": {"type": "signature_delta", "signature": signature}}
        if open_kind == "tool_use" and open_tool is not None:
            if not tool_args.get(open_tool):
                # A call without arguments still needs valid JSON input.
                yield "content_block_delta", {"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": "{}"}}
            closed_tools.add(open_tool)
            open_tool = None
        yield "content_block_stop", {"type": "content_block_stop", "index": index}
        open_kind = None

    def start(kind: str, block: dict) -> Iterator[Event]:
        nonlocal index, open_kind
        yield from close()
        index += 1
        open_kind = kind
        yield "content_block_start", {"type": "content_block_start", "index": index, "content_block": block}

    for chunk in chunks:
        if chunk.get("keepalive") or "prompt_progress" in chunk:
            # llama-server is still prefilling: let the client know we are alive.
            yield "ping", {"type": "ping"}
        if "error" in chunk and not chunk.get("choices"):
            error = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
            raise UpstreamStreamError(error)
        _check_chunk(chunk)
        usage = usage_from(chunk) or usage
        verbose = chunk.get("__verbose")
        if isinstance(verbose, dict) and verbose.get("stop_type") == "word" and isinstance(verbose.get("stopping_word"), str) \
                and verbose["stopping_word"]:
            stop_word = verbose["stopping_word"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content")
            if reasoning:
                if open_kind != "thinking":
                    thinking_text = []
                    yield from start("thinking", {"type": "thinking", "thinking": "", "signature": ""})
                thinking_text.append(reasoning)
                yield "content_block_delta", {"type": "content_block_delta", "index": index, "delta": {"type": "thinking_delta", "thinking": reasoning}}
            text = delta.get("content")
            if text:
                if open_kind != "text":
                    yield from start("text", {"type": "text", "text": ""})
                yield "content_block_delta", {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}
            for call in delta.get("tool_calls") or []:
                tool_index = call.get("index", 0)
                function = call.get("function") or {}
                if tool_index in closed_tools:
                    continue  # its JSON was already complete; nothing valid can follow
                if tool_index not in tool_block:
                    used_tools = True
                    yield from start(
                        "tool_use",
                        {"type": "tool_use", "id": new_tool_id(), "name": function.get("name") or "", "input": {}},
                    )
                    tool_block[tool_index] = index
                    tool_args[tool_index] = ""
                    open_tool = tool_index
                fragment = function.get("arguments")
                if fragment and open_tool == tool_index:
                    tool_args[tool_index] += fragment
                    yield "content_block_delta", {"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": fragment}}
                    # Only a fragment ending in "}" can complete an object: parse only then, so a
                    # long Write call streamed in thousands of pieces stays linear.
                    if fragment.rstrip().endswith("}") and _json_complete(tool_args[tool_index]):
                        yield from close()
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
    yield from close()

    if finish == "length":
        stop_reason = "max_tokens"
    elif finish == "tool_calls" or used_tools:
        stop_reason = "tool_use"
    elif stop_word is not None:
        stop_reason = "stop_sequence"
    else:
        stop_reason = "end_turn"
    final_usage = usage or {"input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 0}
    yield "message_delta", {
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": stop_word if stop_reason == "stop_sequence" else None},
        "usage": dict(final_usage, cache_creation_input_tokens=0),
    }
    yield "message_stop", {"type": "message_stop"}


def collect_message(events: Iterable[Event]) -> dict:
    """The non-streamed Anthropic message that a stream of events describes, read up to its
    message_stop (whatever the event source does after that is left to its caller)."""
    message: dict[str, Any] = {}
    blocks: list[dict] = []
    partial_json: dict[int, str] = {}
    for event, data in events:
        if event == "message_start":
            message = dict(data["message"])
        elif event == "content_block_start":
            blocks.append(dict(data["content_block"]))
        elif event == "content_block_delta":
            block = blocks[data["index"]]
            delta = data["delta"]
            kind = delta["type"]
            if kind == "text_delta":
                block["text"] += delta["text"]
            elif kind == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif kind == "signature_delta":
                block["signature"] = delta["signature"]
            elif kind == "input_json_delta":
                partial_json[data["index"]] = partial_json.get(data["index"], "") + delta["partial_json"]
        elif event == "content_block_stop":
            i = data["index"]
            if blocks[i]["type"] == "tool_use":
                try:
                    blocks[i]["input"] = json.loads(partial_json.get(i) or "{}")
                except ValueError:
                    blocks[i]["input"] = {}  # cut off by max_tokens mid-arguments
        elif event == "message_delta":
            message.update(data["delta"])
            message["usage"] = data["usage"]
        elif event == "message_stop":
            break
        # "ping" and anything else carry no content.
    message["content"] = blocks
    return message
