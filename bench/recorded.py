"""The recorded Claude Code session that the load and prompt-cache benchmarks replay."""

from __future__ import annotations

import json
from pathlib import Path

CAPTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "claude-code-2.1.328-session.jsonl"


def capture_messages() -> list[dict]:
    """The bodies of the session's `/v1/messages` requests, in the order it sent them: the first
    is its session-title request, the second its first main turn."""
    rows = [json.loads(line) for line in CAPTURE.read_text().splitlines() if line.strip()]
    return [r["body"] for r in rows if r["method"] == "POST" and r["path"].split("?")[0] == "/v1/messages"]
