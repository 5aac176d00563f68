"""OpenAI routes, relayed to llama-server as they are and streamed without buffering.

Cline, Continue, Aider, Cursor and the OpenAI SDKs already speak llama-server's dialect; the
proxy adds one port for every agent, uniform errors when llama-server is down, and closing the
upstream request the moment the client leaves.
"""

from __future__ import annotations

import logging
from typing import Iterator

from flask import Response
from urllib3.exceptions import HTTPError as Urllib3Error

from .disconnect import ClientDisconnected, ClientWatch
from .upstream import Upstream, relay_headers, stream_chunks

log = logging.getLogger("llamabridge.relay")


def relay(method: str, path: str, raw_body: bytes | None, content_type: str | None, upstream: Upstream,
          watch: ClientWatch) -> Response:
    resp = upstream.open(method, path, raw_body, watch, content_type=content_type)

    def body() -> Iterator[bytes]:
        try:
            yield from stream_chunks(resp, watch)
        except ClientDisconnected:
            log.info("client disconnected from %s; closed the upstream request", path)
        except (OSError, Urllib3Error) as exc:
            # Headers are sent; all we can do is end the body early and say why in the log.
            log.warning("upstream connection broke while relaying %s: %s", path, exc)
        finally:
            resp.close()

    return Response(body(), status=resp.status, headers=relay_headers(resp))
