"""The `local` policy: a session title or a token-count probe answered by the proxy itself,
without the model (what it says is made in local.py)."""

from __future__ import annotations

from flask import Response

from . import classify, local, translate
from .metrics import Call
from .reply import respond
from .services import Services
from .tokens import estimate


def reply(body: dict, services: Services, call: Call) -> Response:
    """A title or a token-count probe, answered without the model.

    A probe exists to learn the request's token count, so it gets the exact one (tokenizing
    uses no slot). A title's usage matters to nobody: it gets the estimate, and no call to
    llama-server at all, so it comes back at once even when llama-server is busy or down.
    """
    call.handled = "local"
    render = translate.count_tokens_request(body)
    if call.klass == classify.PROBE:
        count, _ = services.main.counted(lambda counter: counter.count(render))
        text, output_tokens, stop = "", 1, "max_tokens"
    else:
        count = estimate(render)
        text = local.title_text(body)
        output_tokens, stop = max(1, len(text) // 4), "end_turn"
    call.usage({"input_tokens": count, "output_tokens": output_tokens})
    services.metrics.record(call)
    return respond(body, iter(local.events(body, text, count, output_tokens, stop)))
