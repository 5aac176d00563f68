"""OpenAI routes, relayed to llama-server as they are and streamed without buffering.

Cline, Continue, Aider, Cursor and the OpenAI SDKs already speak llama-server's dialect; the
proxy adds one port for every agent, uniform errors when llama-server is down, and closing the
upstream request the moment the client leaves.
"""

from __future__ import annotations

import logging
from typing import Iterator

import requests
from flask import Response

from .disconnect import ClientDisconnected, ClientWatch
from .upstream import Upstream, relay_headers

log = logging.getLogger("llamabridge.relay")


def relay(method: str, path: str, raw_body: bytes | None, content_type: str | None, upstream: Upstream,
          watch: ClientWatch) -> Response:
    headers = {"Content-Type": content_type} if content_type else None
    resp = upstream.request(method, path, data=raw_body, headers=headers)

    def body() -> Iterator[bytes]:
        try:
            for chunk in resp.iter_content(chunk_size=None):
                watch.check()
                yield chunk
        except ClientDisconnected:
            log.info("client disconnected from %s; closed the upstream request", path)
        except requests.RequestException as exc:
            # Headers are sent; all we can do is end the body early and say why in the log.
            log.warning("upstream connection broke while relaying %s: %s", path, exc)
        finally:
            resp.close()

    return Response(body(), status=resp.status_code, headers=relay_headers(resp))
