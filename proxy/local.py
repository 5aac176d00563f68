"""Answers made without the model, for requests whose answer does not need one.

A session title is a few words that name what the user asked; on a single-slot server, having
the model write it evicts the conversation's prompt cache (the next turn re-prefills ~20k
tokens) and makes the user's first turn wait behind it. A token-count probe (`max_tokens: 1`)
only wants `usage.input_tokens`, which llama-server's tokenizer gives without a slot.

Pure functions: the caller provides the token count.
"""

from __future__ import annotations

import json
import re
from typing import Any

from . import translate

TITLE_WORDS = 6
TITLE_CHARS = 60
_SESSION_BLOCK = re.compile(r"<session>\s*(.*?)\s*</session>", re.DOTALL)
_TAG = re.compile(r"<[^>]+>")


def _user_texts(body: dict) -> list[str]:
    texts = []
    for message in body.get("messages") or []:
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(b["text"] for b in content if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str))
    return texts


def title_from(body: dict) -> str:
    """A title from the user's first words.

    Claude Code quotes the conversation inside `<session>...</session>`; without that, the
    first user text that is not a `<system-reminder>` is used.
    """
    source = ""
    for text in _user_texts(body):
        found = _SESSION_BLOCK.search(text)
        if found:
            source = found.group(1)
            break
    if not source:
        for text in _user_texts(body):
            if not text.lstrip().startswith("<system-reminder>"):
                source = text
                break
    words = _TAG.sub(" ", source).split()
    title = " ".join(words[:TITLE_WORDS]).strip(" .,:;-")
    if len(title) > TITLE_CHARS:
        title = title[:TITLE_CHARS].rsplit(" ", 1)[0]
    title = title[:1].upper() + title[1:]
    return title or "New session"


# A title schema asks for a string or two; the client's schema is not validated, so a huge
# `minItems` or a deep nest must not build a huge answer or exhaust the stack.
MAX_ITEMS = 16
MAX_DEPTH = 32


def fill_schema(schema: Any, title: str, depth: int = 0) -> Any:
    """The smallest value valid under a JSON schema, with every string set to `title`.

    The schema comes from the client as it is: anything not shaped as JSON Schema says is
    ignored rather than trusted.
    """
    if not isinstance(schema, dict) or depth > MAX_DEPTH:
        return title
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        required = schema.get("required")
        wanted = [k for k in required if isinstance(k, str)] if isinstance(required, list) else []
        if "title" in properties:
            wanted.append("title")
        return {key: fill_schema(properties.get(key), title, depth + 1) for key in dict.fromkeys(wanted)}
    if kind == "array":
        count = schema.get("minItems")
        count = min(count, MAX_ITEMS) if isinstance(count, int) else 0
        return [fill_schema(schema.get("items"), title, depth + 1) for _ in range(count)]
    if kind in ("integer", "number"):
        minimum = schema.get("minimum")
        return minimum if isinstance(minimum, (int, float)) and not isinstance(minimum, bool) else 0
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    return title


def title_text(body: dict) -> str:
    """The reply text: JSON in the schema asked for, or the bare title."""
    title = title_from(body)
    fmt = translate.output_format(body)
    if fmt is not None:
        return json.dumps(fill_schema(fmt.get("schema"), title), ensure_ascii=False)
    return title


def events(body: dict, text: str, input_tokens: int, output_tokens: int, stop_reason: str) -> list[tuple[str, dict]]:
    """The Anthropic stream of a reply made here, in the same event order as the model's."""
    message_id = translate.new_message_id()
    out: list[tuple[str, dict]] = [("message_start", {"type": "message_start", "message": {
        "id": message_id, "type": "message", "role": "assistant", "model": body["model"], "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0, "output_tokens": 0}}})]
    out.append(("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}))
    if text:
        out.append(("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}))
    out.append(("content_block_stop", {"type": "content_block_stop", "index": 0}))
    out.append(("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                                  "usage": {"input_tokens": input_tokens, "cache_read_input_tokens": 0,
                                            "cache_creation_input_tokens": 0, "output_tokens": output_tokens}}))
    out.append(("message_stop", {"type": "message_stop"}))
    return out
