"""Answers made without the model: session titles in the schema asked for, probe replies."""

from __future__ import annotations

import json

from proxy import local
from tests.support.anthropic_sse import check_order


def test_title_from_the_recorded_title_requests(capture_messages):
    first, second = capture_messages[0], capture_messages[3]
    assert local.title_from(first) == "List the files here"
    assert local.title_from(second) == "Now tell me a joke"
    assert json.loads(local.title_text(first)) == {"title": "List the files here"}


def test_title_is_short_and_ignores_markup():
    body = {"messages": [{"role": "user", "content": "<system-reminder>x</system-reminder>"},
                         {"role": "user", "content": "please refactor <b>the</b> parser module so that it streams tokens"}]}
    title = local.title_from(body)
    assert title == "Please refactor the parser module so"
    assert local.title_from({"messages": [{"role": "user", "content": ""}]}) == "New session"


def test_fill_schema_satisfies_required_fields():
    schema = {"type": "object", "required": ["title", "n", "ok", "tags", "kind"],
              "properties": {"title": {"type": "string"}, "n": {"type": "integer", "minimum": 3}, "ok": {"type": "boolean"},
                             "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1}, "kind": {"enum": ["a", "b"]}}}
    assert local.fill_schema(schema, "T") == {"title": "T", "n": 3, "ok": False, "tags": ["T"], "kind": "a"}


def test_fill_schema_survives_any_schema_a_client_sends():
    """The schema is the client's, unvalidated: shapes JSON Schema does not allow are ignored,
    and nothing it asks for makes a huge answer or a deep recursion."""
    assert local.fill_schema({"type": "object", "properties": ["title"], "required": "title"}, "T") == {}
    assert local.fill_schema({"properties": {"title": {}}, "required": [["x"], "title"]}, "T") == {"title": "T"}
    assert local.fill_schema({"type": "array", "items": {"type": "string"}, "minItems": 10**12}, "T") == ["T"] * local.MAX_ITEMS
    assert local.fill_schema({"type": "array", "minItems": "3"}, "T") == []
    assert local.fill_schema({"type": {"a": 1}, "enum": "ab"}, "T") == "T"
    assert local.fill_schema({"type": "number", "minimum": "zero"}, "T") == 0
    deep: dict = {"type": "string"}
    for _ in range(5000):
        deep = {"type": "object", "required": ["title"], "properties": {"title": deep}}
    filled = local.fill_schema(deep, "T")
    for _ in range(local.MAX_DEPTH + 1):
        filled = filled["title"]
    assert filled == "T"


def test_local_events_follow_the_stream_order():
    events = local.events({"model": "m"}, '{"title": "x"}', 12, 5, "end_turn")
    check_order(events)
    assert events[-2][1]["usage"]["input_tokens"] == 12
