"""Anthropic Messages request -> the body llama-server's `/v1/chat/completions` takes.

Byte-deterministic: the same input gives the same output every time, so llama-server's prompt
cache sees the same prefix turn after turn. Bad input raises `InvalidRequest` with a message naming
the field (`messages.3.content.1.type`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .exceptions import InvalidRequest, json_type

# The system block Claude Code puts first (`x-anthropic-billing-header: cc_version=...; ...`)
# carries a hash of the first user message, so it differs between sessions while the long system
# prompt behind it does not (some versions also add a `cch=` value that changes on every request).
# It means nothing to a local model; forwarding it would make every new session miss
# llama-server's prompt cache a few tokens in. The line is removed wherever a system block or
# string starts with it.
BILLING_HEADER_PREFIX = "x-anthropic-billing-header:"

NO_VISION_NOTE = "[image omitted: the model behind this server does not accept images]"


@dataclass(frozen=True)
class Options:
    """What the translation needs to know about the upstream."""

    model: str = ""  # the model name llama-server is asked for; "" keeps the client's
    vision: bool = False  # the upstream accepts image inputs


# --------------------------------------------------------------------------------------------
# Small validators. Each names the JSON path of the offending value.


def _expect(value: Any, kind: type | tuple[type, ...], path: str, what: str) -> Any:
    # bool is an int in Python; a JSON `true` is never a valid number here.
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise InvalidRequest(f"{path}: expected {what}, got a boolean")
    if not isinstance(value, kind):
        raise InvalidRequest(f"{path}: expected {what}, got {json_type(value)}")
    return value


def _optional_number(body: dict, key: str, low: float, high: float) -> float | int | None:
    if body.get(key) is None:
        return None
    value = _expect(body[key], (int, float), key, "a number")
    if not low <= value <= high:
        raise InvalidRequest(f"{key}: expected a number from {low} to {high}, got {value}")
    return value


# --------------------------------------------------------------------------------------------
# Request: Anthropic -> OpenAI


def _without_billing_header(text: str) -> str:
    """`text` without a leading billing-header line (the whole text, if that is all it is)."""
    if not text.startswith(BILLING_HEADER_PREFIX):
        return text
    _, _, rest = text.partition("\n")
    return rest


def system_text(system: Any) -> str:
    """The system prompt as one string: blocks joined by a blank line, billing header removed."""
    if system is None:
        return ""
    if isinstance(system, str):
        return _without_billing_header(system)
    _expect(system, list, "system", "a string or an array of text blocks")
    parts = []
    for i, block in enumerate(system):
        _expect(block, dict, f"system.{i}", "a text block")
        if block.get("type") != "text":
            raise InvalidRequest(f"system.{i}.type: expected 'text', got {block.get('type')!r}")
        text = _without_billing_header(_expect(block.get("text"), str, f"system.{i}.text", "a string"))
        if text:
            parts.append(text)
    return "\n\n".join(parts)


def _image_url(block: dict, path: str) -> str:
    source = _expect(block.get("source"), dict, f"{path}.source", "an image source object")
    kind = source.get("type")
    if kind == "base64":
        media = _expect(source.get("media_type"), str, f"{path}.source.media_type", "a string")
        data = _expect(source.get("data"), str, f"{path}.source.data", "a base64 string")
        return f"data:{media};base64,{data}"
    if kind == "url":
        return _expect(source.get("url"), str, f"{path}.source.url", "a string")
    raise InvalidRequest(f"{path}.source.type: expected 'base64' or 'url', got {kind!r}")


def _document_text(block: dict, path: str) -> str:
    source = _expect(block.get("source"), dict, f"{path}.source", "a document source object")
    if source.get("type") == "text":
        return _expect(source.get("data"), str, f"{path}.source.data", "a string")
    if source.get("type") == "content" and isinstance(source.get("content"), (str, list)):
        return _tool_result_text(source["content"], f"{path}.source.content", [], vision=False)
    raise InvalidRequest(f"{path}.source.type: only text documents can be sent to a local model")


def _blocks(content: list, path: str) -> Iterator[tuple[str, Any, dict]]:
    """(JSON path, type, block) for each content block, checking each is an object."""
    for j, block in enumerate(content):
        bpath = f"{path}.{j}"
        _expect(block, dict, bpath, "a content block")
        yield bpath, block.get("type"), block


def _tool_result_text(content: Any, path: str, images: list[dict], vision: bool) -> str:
    """Flatten a tool_result's content to text; images go to `images` (or become a note)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    _expect(content, list, path, "a string or an array of content blocks")
    parts = []
    for bpath, kind, block in _blocks(content, path):
        if kind == "text":
            parts.append(_expect(block.get("text"), str, f"{bpath}.text", "a string"))
        elif kind == "image":
            url = _image_url(block, bpath)
            if vision:
                images.append({"type": "image_url", "image_url": {"url": url}})
                parts.append(f"[image {len(images)} is attached in the next user message]")
            else:
                parts.append(NO_VISION_NOTE)
        elif kind == "document":
            parts.append(_document_text(block, bpath))
        elif kind == "tool_reference":
            # Claude Code's ToolSearch answers with references to deferred tools. Every tool is
            # sent to the local model (deferral is dropped), so a note is all the model needs.
            parts.append(f"[tool available: {block.get('tool_name', '')}]")
        elif kind == "search_result":
            inner = block.get("content") if isinstance(block.get("content"), list) else []
            parts.append(_tool_result_text(inner, f"{bpath}.content", images, vision))
        else:
            raise InvalidRequest(f"{bpath}.type: unsupported content block type {kind!r} in a tool result")
    return "\n".join(parts)


def _user_blocks(content: Any, path: str, vision: bool) -> tuple[list[dict], list[dict]]:
    """Split a user message into (tool messages, other content parts), preserving order in each."""
    if isinstance(content, str):
        return [], [{"type": "text", "text": content}]
    _expect(content, list, path, "a string or an array of content blocks")
    tools: list[dict] = []
    parts: list[dict] = []
    hoisted: list[dict] = []
    for bpath, kind, block in _blocks(content, path):
        if kind == "text":
            parts.append({"type": "text", "text": _expect(block.get("text"), str, f"{bpath}.text", "a string")})
        elif kind == "image":
            url = _image_url(block, bpath)
            parts.append({"type": "image_url", "image_url": {"url": url}} if vision else {"type": "text", "text": NO_VISION_NOTE})
        elif kind == "document":
            parts.append({"type": "text", "text": _document_text(block, bpath)})
        elif kind == "tool_result":
            tool_id = _expect(block.get("tool_use_id"), str, f"{bpath}.tool_use_id", "a string")
            text = _tool_result_text(block.get("content"), f"{bpath}.content", hoisted, vision)
            if block.get("is_error") is True:
                # OpenAI tool messages have no error flag; keep the failure visible in the text.
                text = f"[tool error] {text}" if text else "[tool error]"
            tools.append({"role": "tool", "tool_call_id": tool_id, "content": text})
        elif kind in ("thinking", "redacted_thinking"):
            continue  # never meaningful in a user turn
        else:
            raise InvalidRequest(f"{bpath}.type: unsupported content block type {kind!r}")
    # Images from tool results follow the tool messages, ahead of the user's own words.
    return tools, hoisted + parts


def _assistant_message(content: Any, path: str) -> dict:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    _expect(content, list, path, "a string or an array of content blocks")
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[dict] = []
    for bpath, kind, block in _blocks(content, path):
        if kind == "text":
            texts.append(_expect(block.get("text"), str, f"{bpath}.text", "a string"))
        elif kind == "thinking":
            reasoning.append(_expect(block.get("thinking"), str, f"{bpath}.thinking", "a string"))
        elif kind == "redacted_thinking":
            continue
        elif kind in ("tool_use", "server_tool_use"):
            tool_id = _expect(block.get("id"), str, f"{bpath}.id", "a string")
            name = _expect(block.get("name"), str, f"{bpath}.name", "a string")
            arguments = block.get("input", {})
            _expect(arguments, dict, f"{bpath}.input", "an object")
            calls.append(
                {
                    "id": tool_id,
                    "type": "function",
                    "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
                }
            )
        else:
            raise InvalidRequest(f"{bpath}.type: unsupported content block type {kind!r} in an assistant message")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    return message


def _append_user(messages: list[dict], parts: list[dict]) -> None:
    """Add user content, merging into a directly preceding user message (some chat templates
    reject two user turns in a row, and a folded-in system block must not become its own turn)."""
    if not parts:
        return
    if messages and messages[-1]["role"] == "user":
        messages[-1]["content"].extend(parts)
    else:
        messages.append({"role": "user", "content": list(parts)})


def _simplify(message: dict) -> dict:
    """Text-only content lists become one string: the form every chat template renders."""
    content = message.get("content")
    if isinstance(content, list) and all(p.get("type") == "text" for p in content):
        message = dict(message, content="\n\n".join(p["text"] for p in content))
    return message


def convert_messages(body: dict, vision: bool) -> list[dict]:
    """System prompt and messages as OpenAI chat messages."""
    out: list[dict] = []
    system = system_text(body.get("system"))
    if system:
        out.append({"role": "system", "content": system})
    messages = _expect(body.get("messages"), list, "messages", "an array of messages")
    for i, message in enumerate(messages):
        path = f"messages.{i}"
        _expect(message, dict, path, "a message object")
        role = message.get("role")
        if "content" not in message:
            raise InvalidRequest(f"{path}.content: field required")
        content = message["content"]
        if role == "user":
            tools, parts = _user_blocks(content, f"{path}.content", vision)
            out.extend(tools)
            _append_user(out, parts)
        elif role == "assistant":
            out.append(_assistant_message(content, f"{path}.content"))
        elif role == "system":
            # Claude Code sends environment blocks as mid-conversation system messages; chat
            # templates only accept a system message first, so they join the user's turn.
            _, parts = _user_blocks(content, f"{path}.content", vision)
            _append_user(out, parts)
        else:
            raise InvalidRequest(f"{path}.role: expected 'user', 'assistant' or 'system', got {role!r}")
    return [_simplify(m) for m in out]


def convert_tools(tools: Any) -> list[dict]:
    if tools is None:
        return []
    _expect(tools, list, "tools", "an array of tools")
    out = []
    seen: dict[str, int] = {}
    for i, tool in enumerate(tools):
        path = f"tools.{i}"
        _expect(tool, dict, path, "a tool object")
        if tool.get("type") not in (None, "custom") and "input_schema" not in tool:
            continue  # Anthropic server tools (web_search_…) run on Anthropic's side; a local model has none
        name = _expect(tool.get("name"), str, f"{path}.name", "a string")
        if not name:
            raise InvalidRequest(f"{path}.name: must not be empty")
        if name in seen:
            # The model's call names the tool; with two of one name the client could not tell
            # which it meant (Anthropic's API refuses this too).
            raise InvalidRequest(f"{path}.name: tool names must be unique, {name!r} is also tools.{seen[name]}")
        seen[name] = i
        schema = tool.get("input_schema", {"type": "object", "properties": {}})
        _expect(schema, dict, f"{path}.input_schema", "a JSON schema object")
        function: dict[str, Any] = {"name": name}
        if tool.get("description") is not None:
            function["description"] = _expect(tool["description"], str, f"{path}.description", "a string")
        function["parameters"] = schema
        # `cache_control`, `defer_loading`, `strict`, `eager_input_streaming` mean nothing upstream.
        out.append({"type": "function", "function": function})
    return out


def _apply_tool_choice(body: dict, out: dict) -> None:
    choice = body.get("tool_choice")
    if choice is None:
        return
    _expect(choice, dict, "tool_choice", "an object")
    kind = choice.get("type")
    if kind == "auto":
        out["tool_choice"] = "auto"
    elif kind == "any":
        if not out.get("tools"):
            # Forcing a call with nothing to call: llama-server would quietly answer in text.
            raise InvalidRequest("tool_choice: type 'any' needs at least one tool the model can call in tools")
        out["tool_choice"] = "required"
    elif kind == "none":
        out["tool_choice"] = "none"
        return
    elif kind == "tool":
        name = _expect(choice.get("name"), str, "tool_choice.name", "a string")
        # llama-server rejects the object form of tool_choice, so a named tool is "required"
        # over a tool list holding only that tool.
        only = [t for t in out.get("tools", []) if t["function"]["name"] == name]
        if not only:
            raise InvalidRequest(f"tool_choice.name: no tool named {name!r} in tools")
        out["tools"] = only
        out["tool_choice"] = "required"
    else:
        raise InvalidRequest(f"tool_choice.type: expected 'auto', 'any', 'tool' or 'none', got {kind!r}")
    if "tools" in out and choice.get("disable_parallel_tool_use") is not None:
        out["parallel_tool_calls"] = not bool(choice["disable_parallel_tool_use"])


def output_format(body: dict) -> dict | None:
    """The structured-output spec (`output_config.format`, or the beta's `output_format`)."""
    fmt = None
    if isinstance(body.get("output_config"), dict):
        fmt = body["output_config"].get("format")
    if fmt is None:
        fmt = body.get("output_format")
    if fmt is None:
        return None
    _expect(fmt, dict, "output_config.format", "an object")
    if fmt.get("type") != "json_schema":
        raise InvalidRequest(f"output_config.format.type: expected 'json_schema', got {fmt.get('type')!r}")
    _expect(fmt.get("schema"), dict, "output_config.format.schema", "a JSON schema object")
    return fmt


def _response_format(body: dict) -> dict | None:
    fmt = output_format(body)
    if fmt is None:
        return None
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}


def _thinking_switch(body: dict) -> bool | None:
    thinking = body.get("thinking")
    if thinking is None:
        return None  # not asked either way: the server's own default stands
    _expect(thinking, dict, "thinking", "an object")
    kind = thinking.get("type")
    if kind in ("enabled", "adaptive"):
        return True
    if kind == "disabled":
        return False
    raise InvalidRequest(f"thinking.type: expected 'enabled', 'adaptive' or 'disabled', got {kind!r}")


def validate_common(body: Any, *, need_max_tokens: bool) -> dict:
    """Checks shared by /v1/messages and /v1/messages/count_tokens."""
    _expect(body, dict, "body", "a JSON object")
    _expect(body.get("model"), str, "model", "a string")
    messages = _expect(body.get("messages"), list, "messages", "an array of messages")
    if not messages:
        raise InvalidRequest("messages: at least one message is required")
    if body.get("stream") is not None:
        _expect(body["stream"], bool, "stream", "true or false")
    if need_max_tokens:
        if "max_tokens" not in body:
            raise InvalidRequest("max_tokens: field required")
        max_tokens = _expect(body["max_tokens"], int, "max_tokens", "a whole number")
        if max_tokens < 1:
            raise InvalidRequest(f"max_tokens: must be at least 1, got {max_tokens}")
    return body


def anthropic_to_openai(body: Any, options: Options = Options()) -> dict:
    """The llama-server `/v1/chat/completions` body for an Anthropic Messages request.

    Always streamed upstream (the non-streamed Anthropic response is assembled from the
    stream) with usage and timings, so both modes share one code path.
    """
    body = validate_common(body, need_max_tokens=True)
    out: dict[str, Any] = {
        "model": options.model or body["model"],
        "messages": convert_messages(body, options.vision),
        "max_tokens": body["max_tokens"],
        "stream": True,
        "stream_options": {"include_usage": True},
        "cache_prompt": True,
        # Progress chunks while llama-server prefills a long prompt: they become pings.
        "return_progress": True,
    }
    tools = convert_tools(body.get("tools"))
    if tools:
        out["tools"] = tools
    _apply_tool_choice(body, out)
    if out.get("tool_choice") == "none":
        out.pop("tools", None)
        out.pop("tool_choice")
    stops = body.get("stop_sequences")
    if stops is not None:
        _expect(stops, list, "stop_sequences", "an array of strings")
        for i, stop in enumerate(stops):
            _expect(stop, str, f"stop_sequences.{i}", "a string")
            if not stop:
                # An empty stop sequence matches before the first token: a 200 with no reply.
                raise InvalidRequest(f"stop_sequences.{i}: each stop sequence must be non-empty")
        if stops:
            out["stop"] = list(stops)
            # OpenAI's finish_reason "stop" does not say which sequence (or end-of-turn) ended
            # the reply; llama-server reports it in its debug fields, which we ask for narrowly.
            out["verbose"] = True
            out["response_fields"] = ["stop_type", "stopping_word"]
    for key, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0), ("top_k", 0, 1_000_000)):
        value = _optional_number(body, key, low, high)
        if value is not None:
            out[key] = value
    response_format = _response_format(body)
    if response_format:
        out["response_format"] = response_format
    thinking = _thinking_switch(body)
    if thinking is not None:
        out["chat_template_kwargs"] = {"enable_thinking": thinking}
    # `metadata`, `context_management`, `safeguards`, `betas`, `service_tier`, `container`,
    # `mcp_servers` are Anthropic platform features with no meaning upstream: not copied.
    return out


def render_request(request: dict) -> dict:
    """The `/apply-template` body that renders exactly the prompt of a chat-completions request."""
    return {key: request[key] for key in ("messages", "tools", "chat_template_kwargs") if key in request}


def count_tokens_request(body: Any, options: Options = Options()) -> dict:
    """The `/apply-template` body rendering what `/v1/messages` would send for this request."""
    body = validate_common(body, need_max_tokens=False)
    return render_request(anthropic_to_openai(dict(body, max_tokens=1), options))
