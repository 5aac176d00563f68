"""Token counts the way the model sees them, and fitting `max_tokens` into the context.

Exact counts render the translated request with llama-server's own chat template
(`/apply-template`) and tokenizer (`/tokenize`): no slot is used, so counting never waits
behind a generation. Results are cached by content (Claude Code's `/context` sends about 25
counts at once, mostly the same on every call), and identical counts asked at the same time are
computed once: sessions started together (or subagents) send the same tool definitions, and
each count costs two calls to llama-server. An upstream that cannot do either gets an estimate
(UTF-8 bytes / 4), and the caller says so in a response header.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from array import array
from collections import OrderedDict

from . import fastjson
from .errors import ApiError, Rejected
from .flights import Flights
from .upstream import Upstream

ESTIMATE_BYTES_PER_TOKEN = 4
# Exact counts computed at once. Each holds the rendered prompt and llama-server's token list
# (as Python ints) while it runs, megabytes for a long conversation, and sessions starting
# together ask for dozens at once. llama-server renders and tokenizes on the same few cores
# whatever the number asked at once, so a few at a time finish as soon, with a bounded peak.
EXACT_AT_ONCE = 4


class TokenCounter:
    def __init__(self, upstream: Upstream, max_entries: int = 4096):
        self.upstream = upstream
        self._counts: OrderedDict[bytes, int] = OrderedDict()
        self._pending = Flights()  # counts being computed, by key
        self._max = max_entries
        self._lock = threading.Lock()
        self._exact = threading.BoundedSemaphore(EXACT_AT_ONCE)

    @staticmethod
    def _key(render: dict, model: str) -> bytes:
        data = fastjson.dumps(render, sort_keys=True)
        return hashlib.sha256(model.encode() + b"\0" + data).digest()

    def render(self, render: dict) -> str | None:
        """The prompt text llama-server would build, or None if it cannot render templates."""
        try:
            rendered = self.upstream.json("POST", "/apply-template", render, timeout=60)
        except ApiError as exc:
            if exc.status in (404, 405, 501):
                return None
            raise
        prompt = rendered.get("prompt") if isinstance(rendered, dict) else None
        return prompt if isinstance(prompt, str) else None

    def tokenize(self, prompt: str) -> array:
        """Token ids for a rendered prompt, with the special tokens a completion adds (BOS)."""
        out = self.upstream.json("POST", "/tokenize", {"content": prompt, "add_special": True, "parse_special": True}, timeout=60)
        return array("i", out.get("tokens") or [])

    def tokens(self, render: dict) -> array | None:
        """Exact tokens of a request (and the count goes into the cache), or None if the
        upstream cannot render it."""
        with self._exact:
            prompt = self.render(render)
            if prompt is None:
                return None
            ids = self.tokenize(prompt)
            del prompt
        self._remember(self._key(render, self.upstream.info().model), len(ids))
        return ids

    def count(self, render: dict) -> tuple[int, bool]:
        """(count, exact) for a request rendered as `render` (an /apply-template body)."""
        key = self._key(render, self.upstream.info().model)
        with self._lock:
            if key in self._counts:
                self._counts.move_to_end(key)
                return self._counts[key], True
        flight, leader = self._pending.join(key)
        if not leader:
            flight.done.wait()
            if flight.result is not None:
                return flight.result
            # The first one failed (llama-server down?): try, and fail, in our own right.
            return self._compute(render)
        result = None
        try:
            result = self._compute(render)
            return result
        finally:
            self._pending.finish(key, flight, result)

    def _compute(self, render: dict) -> tuple[int, bool]:
        ids = self.tokens(render)
        if ids is None:
            return estimate(render), False
        return len(ids), True

    def _remember(self, key: bytes, n: int) -> None:
        with self._lock:
            self._counts[key] = n
            self._counts.move_to_end(key)
            while len(self._counts) > self._max:
                self._counts.popitem(last=False)


def estimate(render: dict) -> int:
    """A rough count for upstreams that cannot tokenize: about 4 bytes of text per token."""
    return math.ceil(len(json.dumps(render, ensure_ascii=False).encode()) / ESTIMATE_BYTES_PER_TOKEN)


def upper_bound(render: dict) -> int:
    """More tokens than the rendered prompt can have, computed without asking anyone.

    Every token is at least one byte of text, and `ensure_ascii` JSON is at least as long as
    any escaping a template applies; templates add role markers and a little boilerplate per
    message. Used to skip exact counting when a request obviously fits. If a template adds
    more than this allows, the only effect is an unclamped request, which llama-server ends
    with finish_reason "length" when the context is full.
    """
    messages = render.get("messages") or []
    return len(json.dumps(render, ensure_ascii=True).encode()) + 64 * (len(messages) + 1) + 1024


def fit_max_tokens(prompt_tokens: int, max_tokens: int, n_ctx: int, min_output: int) -> int:
    """`max_tokens` clamped so prompt + output fit the slot's context.

    - fits already: unchanged;
    - room for at least `min_output` tokens (or for what was asked, if less): clamped to the room;
    - the prompt alone does not fit: 400 "prompt is too long", which Claude Code shows and
      answers by compacting;
    - less room than that: 400 in the wording Claude Code retries with a smaller max_tokens.
    """
    if prompt_tokens + max_tokens <= n_ctx:
        return max_tokens
    room = n_ctx - prompt_tokens
    if room <= 0:
        raise Rejected(400, f"prompt is too long: {prompt_tokens} tokens > {n_ctx} maximum")
    if room >= min(min_output, max_tokens):
        return room
    raise Rejected(400, f"input length and `max_tokens` exceed context limit: {prompt_tokens} + {max_tokens} > {n_ctx}, "
                        f"decrease input length or `max_tokens` and try again")
