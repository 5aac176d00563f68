"""Parse an Anthropic SSE stream and check it follows the event order Claude Code requires."""

from __future__ import annotations

import json
from collections.abc import Iterable


def parse(raw: bytes | str) -> list[tuple[str, dict]]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    events = []
    for frame in text.split("\n\n"):
        if not frame.strip():
            continue
        event, data = None, []
        for line in frame.split("\n"):
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())
        assert event is not None, f"frame without an event: line: {frame!r}"
        events.append((event, json.loads("\n".join(data))))
    return events


def check_order(events: Iterable[tuple[str, dict]]) -> None:
    """Raise AssertionError at the first event Claude Code would reject."""
    events = [e for e in events if e[0] != "ping"]
    assert events and events[0][0] == "message_start", events[:1]
    open_index = None
    next_index = 0
    kinds: dict[int, str] = {}
    seen_delta = False
    for event, data in events[1:]:
        assert event == data["type"], (event, data)
        if event == "content_block_start":
            assert open_index is None, f"block {data['index']} started while {open_index} is open"
            assert data["index"] == next_index, (data["index"], next_index)
            kinds[data["index"]] = data["content_block"]["type"]
            open_index = data["index"]
            next_index += 1
        elif event == "content_block_delta":
            assert data["index"] == open_index, f"delta for block {data['index']} which is not open"
            kind = {"text": "text_delta", "thinking": ("thinking_delta", "signature_delta"), "tool_use": "input_json_delta"}[kinds[open_index]]
            assert data["delta"]["type"] in (kind if isinstance(kind, tuple) else (kind,)), data
        elif event == "content_block_stop":
            assert data["index"] == open_index, data
            open_index = None
        elif event == "message_delta":
            assert open_index is None, "message_delta with a block open"
            assert data["delta"]["stop_reason"] in ("end_turn", "max_tokens", "stop_sequence", "tool_use", "model_context_window_exceeded")
            seen_delta = True
        elif event == "message_stop":
            assert seen_delta, "message_stop before message_delta"
        else:
            raise AssertionError(f"unexpected event {event}")
    assert events[-1][0] == "message_stop", events[-1]
