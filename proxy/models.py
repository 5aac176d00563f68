"""`/v1/models` for both APIs: llama-server's model list, with the context window a request
really gets, in the shape the asking client's SDK reads.

Both APIs use the same path. Anthropic's clients (its SDKs, Claude Code) always send an
`anthropic-version` header and OpenAI's never do, so that header picks the shape: Anthropic's
`ModelInfo` page (`max_input_tokens` is the window, paginated by `after_id`/`before_id`/`limit`)
or llama-server's own OpenAI list. llama-server has no `/v1/models/{id}`; the proxy answers it
from the list, so `models.retrieve(id)` works in both SDKs.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from werkzeug.datastructures import Headers

from .errors import ApiError, Rejected

ANTHROPIC_DEFAULT_LIMIT = 20  # as Anthropic's API
ANTHROPIC_MAX_LIMIT = 1000


def wants_anthropic(headers: Mapping[str, str] | Headers) -> bool:
    return "anthropic-version" in headers


def openai_entries(listing: Any, n_ctx: int, slots: int) -> list[dict]:
    """llama-server's entries (OpenAI's shape, with its `meta`), each told the per-slot window
    in place, so `listing` carries it too."""
    entries = [m for m in (listing.get("data") if isinstance(listing, dict) else None) or []
               if isinstance(m, dict) and isinstance(m.get("id"), str)]
    for model in entries:
        model["context_window"] = n_ctx
        model["slots"] = slots
    return entries


def anthropic_entry(model: dict) -> dict:
    """One model as Anthropic's `ModelInfo`."""
    created = model.get("created")
    # "May be set to an epoch value if the release date is unknown" (the API's own words);
    # llama-server puts the time it loaded the model here.
    stamp = created if isinstance(created, (int, float)) and not isinstance(created, bool) and 0 <= created < 1e11 else 0
    return {
        "type": "model",
        "id": model["id"],
        "display_name": model["id"],
        "created_at": datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "lifecycle": "active",
        "deprecated_at": None,
        "retires_at": None,
        # One request gets one slot's context: what it can send, and at most what it can ask back.
        "max_input_tokens": model["context_window"],
        "max_tokens": model["context_window"],
        "slots": model["slots"],
    }


def anthropic_page(entries: list[dict], args: Mapping[str, str]) -> dict:
    """Anthropic's page of `ModelInfo`: `limit` of them after `after_id` or before `before_id`."""
    raw_limit = args.get("limit", str(ANTHROPIC_DEFAULT_LIMIT))
    try:
        limit = int(raw_limit)
    except ValueError:
        raise Rejected(400, f"limit: expected a whole number, got {raw_limit!r}") from None
    if not 1 <= limit <= ANTHROPIC_MAX_LIMIT:
        raise Rejected(400, f"limit: must be between 1 and {ANTHROPIC_MAX_LIMIT}, got {limit}")
    models = [anthropic_entry(m) for m in entries]
    ids = [m["id"] for m in models]
    after, before = args.get("after_id"), args.get("before_id")
    if after is not None and before is not None:
        raise Rejected(400, "after_id and before_id cannot be used together")
    if after is not None:
        start = _index(ids, after, "after_id") + 1
        page, more = models[start:start + limit], start + limit < len(models)
    elif before is not None:
        end = _index(ids, before, "before_id")
        page, more = models[max(0, end - limit):end], end - limit > 0
    else:
        page, more = models[:limit], limit < len(models)
    return {"data": page, "has_more": more,
            "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None}


def find(entries: list[dict], model_id: str) -> dict:
    for model in entries:
        if _slashless(model["id"]) == _slashless(model_id):
            return model
    names = ", ".join(repr(m["id"]) for m in entries) or "none"
    raise ApiError(404, f"model {model_id!r} not found; llama-server serves {names}")


def _index(ids: list[str], model_id: str, field: str) -> int:
    try:
        return ids.index(model_id)
    except ValueError:
        raise Rejected(400, f"{field}: no model {model_id!r} in the list") from None


def _slashless(model_id: str) -> str:
    # llama-server names a model by its file path unless given --alias, and the path's slashes
    # do not survive the URL intact: the SDKs escape them, the WSGI server unescapes them, and
    # the router merges the `//` in `/v1/models//models/x.gguf`.
    return "/".join(part for part in model_id.split("/") if part)
