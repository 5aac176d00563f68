"""Request classes by shape, on the recorded Claude Code session and on hand-made shapes."""

from __future__ import annotations

import pytest

from proxy.classify import BACKGROUND, MAIN, PROBE, SUBAGENT, TITLE, classify


def test_recorded_session_classes(capture_messages):
    assert [classify(b) for b in capture_messages] == [TITLE, MAIN, MAIN, TITLE, MAIN]


def test_model_name_does_not_matter(capture_messages):
    for body in capture_messages:
        for name in ("claude-3-5-haiku-latest", "claude-opus-4-1", "local"):
            assert classify(dict(body, model=name)) == classify(body)


TOOL = {"name": "Read", "input_schema": {"type": "object"}}


@pytest.mark.parametrize("body, expected", [
    ({"tools": [TOOL, {"name": "Agent", "input_schema": {}}], "max_tokens": 32000}, MAIN),
    ({"tools": [TOOL, {"name": "Task", "input_schema": {}}], "max_tokens": 32000}, MAIN),
    ({"tools": [TOOL], "max_tokens": 32000}, SUBAGENT),
    ({"max_tokens": 1, "messages": []}, PROBE),
    ({"max_tokens": 512, "thinking": {"type": "disabled"}}, BACKGROUND),
    ({"max_tokens": 512}, BACKGROUND),
    ({"max_tokens": 512, "thinking": {"type": "enabled", "budget_tokens": 256}}, MAIN),
    ({"max_tokens": 32000, "thinking": {"type": "disabled"}}, MAIN),
    ({"max_tokens": 32000, "system": "Generate a session title for this session."}, TITLE),
])
def test_shapes(body, expected):
    assert classify(body) == expected


def test_requests_without_claude_codes_session_are_interactive():
    for body in ({"max_tokens": 1}, {"max_tokens": 512}, {"max_tokens": 32000, "system": "Generate a session title"}):
        assert classify(body, claude_code=False) == MAIN
    assert classify({"tools": [TOOL], "max_tokens": 10}, claude_code=False) == SUBAGENT
