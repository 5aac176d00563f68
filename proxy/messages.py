"""The Anthropic routes: `/v1/messages` and `/v1/messages/count_tokens`.

Every request is classified by shape (classify.py) and handled by its class's policy: answered
here (`local`: local_reply.py), sent to a second llama-server (`route`), refused while it would
evict a conversation's cache (`shed`), or passed to llama-server through the admission gate.
Two ways to reach llama-server, chosen by `UPSTREAM_API`:
- `openai` (default): llamabridge's own translation to `/v1/chat/completions` (translated.py),
  which covers what llama-server's native Anthropic endpoint gets wrong (adaptive thinking,
  images in tool results, tool results after user text, named tool_choice, pings in prefill).
  A session's identical retry of a turn still running waits for it (followers.py).
- `anthropic`: llama-server's native `/v1/messages` (passthrough.py).
"""

from __future__ import annotations

import json

from flask import Response

from . import classify, followers, local_reply, passthrough, translate, translated
from .disconnect import ClientWatch
from .errors import ApiError
from .metrics import Call
from .services import Services

# --------------------------------------------------------------------------------------------
# POST /v1/messages


def create_message(body: dict, digest: str, services: Services, watch: ClientWatch, call: Call, native: bool) -> Response:
    call.klass = classify.classify(body, claude_code=call.session is not None)
    policy = services.settings.policy(call.klass)
    if policy == "local":
        return local_reply.reply(body, services, call)
    target = services.main
    if policy == "route":
        assert services.background is not None  # config.from_env guarantees it
        target = services.background
        call.handled = "background"
    info = target.info(services.settings.upstream_slots)
    if policy == "shed" and not target.gate.has_cold_free_slot():
        call.handled = "shed"
        raise ApiError(529, f"{call.klass} request not run: every llama-server slot holds a conversation's prompt cache "
                            f"(POLICY_{call.klass.upper()}=shed; set BACKGROUND_URL to run these on a second server)", retry_after=60)
    if native:
        return passthrough.run(body, target, services, watch, call)

    request, tokens = translated.prepare(body, target, info, services, call)
    key = (call.session, digest) if call.session else None
    flight, leader = services.flights.join(key) if key else (None, True)
    if not leader:
        assert flight is not None
        return followers.follow(body, flight, watch, call, services)
    return translated.lead(body, request, tokens, target, services, watch, call, flight, key)


# --------------------------------------------------------------------------------------------
# POST /v1/messages/count_tokens


def count_tokens(body: dict, services: Services, native: bool, call: Call) -> Response:
    """The exact number of prompt tokens `/v1/messages` would send for this request.

    Renders our translation with llama-server's own chat template and tokenizer: no slot is
    used, so this never waits behind a generation. `X-Llamabridge-Token-Count` says `exact`,
    or `estimate` when the upstream cannot render templates.
    """
    target = services.main
    info = target.upstream.info()
    if native:
        raw = target.upstream.json("POST", "/v1/messages/count_tokens", passthrough.native_body(body, info.model), timeout=60)
        count, exact = int(raw.get("input_tokens") or 0), True
    else:
        render = translate.count_tokens_request(body, translate.Options(vision=info.vision))
        count, exact = target.counted(lambda counter: counter.count(render))
    services.metrics.token_counts.labels("exact" if exact else "estimate").inc()
    call.klass, call.handled = "count_tokens", "local"
    call.usage({"input_tokens": count})
    services.metrics.record(call)
    resp = Response(json.dumps({"input_tokens": count}), mimetype="application/json")
    resp.headers["X-Llamabridge-Token-Count"] = "exact" if exact else "estimate"
    return resp
