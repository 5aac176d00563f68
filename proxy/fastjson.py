"""JSON for the proxy's large bodies, with orjson where it is safe to use.

A Claude Code turn is ~90 KB of JSON in, ~90 KB out to llama-server, and for exact token
counts another ~90 KB rendered prompt and a 23k-integer token list. The standard library's
C encoder and decoder hold the GIL for milliseconds on bodies that size, and every other
request in the process (a session title answered locally, a token count) waits behind them.
orjson does the same work several times faster. Where orjson refuses something the standard
library accepts (integers beyond 64 bits, NaN literals), the standard library does it, so
the results are the same as before, only sooner.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumps(obj: Any, *, sort_keys: bool = False) -> bytes:
    """Compact UTF-8 JSON (like json.dumps with ensure_ascii=False and no spaces)."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS if sort_keys else 0)
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), sort_keys=sort_keys).encode()


def loads(data: bytes | str) -> Any:
    """Parse llama-server's JSON; raises json.JSONDecodeError (with the standard library's line
    and column) if invalid. Not for client bodies: orjson reads an integer beyond 64 bits as a
    float where json.loads keeps it exact, and a client's body is checked field by field."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)
