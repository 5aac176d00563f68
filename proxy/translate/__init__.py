"""Anthropic Messages <-> OpenAI Chat Completions, as llama-server speaks them.

Pure data-in/data-out: no I/O, no Flask, no module state, no import from the rest of the proxy
(proxy/sse.py imports `StreamProtocolError` from here, not the other way round). Callers use
`from proxy import translate` and the names below; the modules are:

- `request.py`: a validated Anthropic request becomes the body for llama-server's
  `/v1/chat/completions` (`anthropic_to_openai`), or the `/apply-template` body that counts its
  tokens (`count_tokens_request`); the validators behind them.
- `stream.py`: `stream_openai_to_anthropic(chunks, model)`, the generator turning llama-server's
  streamed chunks into Anthropic SSE events `(event, data)`, one per upstream delta, nothing held
  back; `collect_message(events)`, the non-streamed response built from those same events; and the
  usage and token-count readers they use.
- `exceptions.py`: what the two raise (`InvalidRequest`, `StreamProtocolError`,
  `UpstreamStreamError`).
"""

from .exceptions import InvalidRequest, StreamProtocolError, UpstreamStreamError
from .request import (
    BILLING_HEADER_PREFIX,
    NO_VISION_NOTE,
    Options,
    anthropic_to_openai,
    count_tokens_request,
    output_format,
    render_request,
    system_text,
    validate_common,
)
from .stream import (
    Event,
    collect_message,
    message_start,
    new_message_id,
    stream_openai_to_anthropic,
    token_count,
    usage_from,
)

__all__ = [
    "BILLING_HEADER_PREFIX",
    "NO_VISION_NOTE",
    "Event",
    "InvalidRequest",
    "Options",
    "StreamProtocolError",
    "UpstreamStreamError",
    "anthropic_to_openai",
    "collect_message",
    "count_tokens_request",
    "message_start",
    "new_message_id",
    "output_format",
    "render_request",
    "stream_openai_to_anthropic",
    "system_text",
    "token_count",
    "usage_from",
    "validate_common",
]
