"""What kind of request is this? Decided by its shape, never by its model name.

Claude Code sends every request with the main model's name, so the name says nothing; the
shape does (see the README's "Traffic shaping"):

- `main`: the interactive loop. Tools present, including the `Agent` (older: `Task`) tool
  that spawns subagents.
- `subagent`: tools present but no `Agent`/`Task` tool: subagents cannot spawn subagents.
- `title`: no tools, structured output asking for a `title`, or a system prompt about naming
  a session.
- `probe`: `max_tokens: 1`, sent to learn a request's token count from its usage.
- `background`: no tools, thinking disabled and a small output: summaries, suggestions and
  the like, which nobody waits for. A request without tools that is none of these (e.g. a
  long summary with thinking on) counts as `main`: it must never be shed.
- `openai`: anything on the OpenAI routes (Cline, Continue, ...): interactive.

Titles, probes and background work are Claude Code's side requests, and Claude Code marks
every request with its session header. A request without it (an Anthropic SDK script, another
agent) is somebody waiting at a prompt: `main` or `subagent` by its tools, never shed or
answered locally.

Lower priority numbers are admitted first.
"""

from __future__ import annotations

from typing import Any

MAIN = "main"
SUBAGENT = "subagent"
TITLE = "title"
PROBE = "probe"
BACKGROUND = "background"
OPENAI = "openai"

CLASSES = (MAIN, SUBAGENT, TITLE, PROBE, BACKGROUND, OPENAI)
PRIORITY = {MAIN: 0, OPENAI: 0, SUBAGENT: 1, TITLE: 2, PROBE: 2, BACKGROUND: 2}

SPAWNING_TOOLS = {"Agent", "Task"}
# A request without tools and with at most this much output is background work.
SMALL_OUTPUT = 4096


def _system_text(body: dict) -> str:
    system = body.get("system")
    if isinstance(system, str):
        return system
    if isinstance(system, list):
        return "\n".join(b.get("text", "") for b in system if isinstance(b, dict) and isinstance(b.get("text"), str))
    return ""


def _asks_for_title(body: dict) -> bool:
    fmt = None
    if isinstance(body.get("output_config"), dict):
        fmt = body["output_config"].get("format")
    fmt = fmt or body.get("output_format")
    if isinstance(fmt, dict) and isinstance(fmt.get("schema"), dict):
        properties = fmt["schema"].get("properties")
        if isinstance(properties, dict) and "title" in properties:
            return True
    text = _system_text(body).lower()
    return "naming a coding session" in text or "title for this session" in text or "session title" in text


def classify(body: dict[str, Any], claude_code: bool = True) -> str:
    """The class of an Anthropic Messages request (already validated); `claude_code` says
    whether it carries Claude Code's session header."""
    tools = body.get("tools") or []
    # Not validated yet (translation does that, with a 400 naming the field): never trust a shape.
    listed = tools if isinstance(tools, list) else []
    names = {t["name"] for t in listed if isinstance(t, dict) and isinstance(t.get("name"), str)}
    if tools:
        return MAIN if names & SPAWNING_TOOLS else SUBAGENT
    if not claude_code:
        return MAIN
    if body.get("max_tokens") == 1:
        return PROBE
    if _asks_for_title(body):
        return TITLE
    thinking = body.get("thinking")
    thinking_off = not isinstance(thinking, dict) or thinking.get("type") == "disabled"
    small = isinstance(body.get("max_tokens"), int) and body["max_tokens"] <= SMALL_OUTPUT
    if thinking_off and small:
        return BACKGROUND
    return MAIN
