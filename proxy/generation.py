"""One generation on its way through the gate to llama-server and back.

`Generation` owns the lifecycle that every route shares: wait for a slot, send the request
with that slot's `id_slot`, read the answer, and at the end give the slot back (after a
disconnect, only once llama-server shows it idle), record the request and check the prompt
cache against the session's previous turn.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from . import classify, fastjson, sse, translate
from .disconnect import ClientDisconnected, ClientWatch, client_leaving
from .errors import ApiError, from_upstream
from .gate import Ticket, Waiter
from .http1 import BROKEN_CONNECTION, Answer, read_all, stream_lines
from .metrics import Call
from .services import Services, Target
from .upstream import Unanswered

log = logging.getLogger("llamabridge.proxy")

# Ask llama-server for an SSE comment every second while it has nothing else to send
# (prefill of a long prompt): each one lets us notice a vanished client and ping a waiting one.
UPSTREAM_PING_SECONDS = 1

# What a broken upstream connection looks like while reading it.
BROKEN = (*BROKEN_CONNECTION, sse.StreamProtocolError)


class Generation:
    def __init__(self, services: Services, target: Target, call: Call, watch: ClientWatch, path: str, payload: dict | None,
                 tokens: array | None = None):
        self.services = services
        self.target = target
        self.call = call
        self.watch = watch
        self.path = path
        self.payload = payload
        self.tokens = tokens  # exact prompt tokens, when they were counted
        self.waiter: Waiter | None = None
        self.ticket: Ticket | None = None
        self.answer: Answer | None = None
        self.client_left = False
        self.completed = False
        self._closed = False
        self._counted_user: str | None = None  # whose limits it counts against (quotas.py), if any

    # -- the slot ------------------------------------------------------------------------------

    def enqueue(self) -> None:
        """Join the gate's queue, if the key's limits allow (raises Rejected(429) if not)."""
        call = self.call
        if self.services.quotas.acquire(call.user, call.limits):
            self._counted_user = call.user
        self.waiter = self.target.gate.enqueue(call.klass, classify.PRIORITY.get(call.klass, 0), call.session, call.user)

    def wait(self, seconds: float) -> bool:
        """True once admitted; False if still queued after `seconds` (raises QueueTimeout)."""
        assert self.waiter is not None
        ticket = self.target.gate.wait(self.waiter, seconds)
        if ticket is None:
            return False
        self.ticket = ticket
        self.call.slot = ticket.slot
        self.call.upstream = self.target.upstream_of(ticket).base
        self.call.queue_wait = ticket.waited
        return True

    def wait_until_admitted(self, step: float = 0.25) -> None:
        while not self.wait(step):
            self.watch.check()

    # -- llama-server ---------------------------------------------------------------------------

    def open(self, raw: bytes | None = None, any_status: bool = False) -> Answer:
        """Send the request on the admitted slot: the client's own bytes `raw` as they are where
        nothing needs adding (the relay), else the payload. An error status raises the client's
        ApiError, unless `any_status` (the relay passes llama-server's on). An upstream that will
        not answer hands the request to another, if there is one in the rotation."""
        while True:
            try:
                return self._open_once(raw, any_status)
            except Unanswered as exc:
                if not self.elsewhere(exc):
                    raise

    def elsewhere(self, exc: Unanswered) -> bool:
        """Take the ticket's upstream out of the rotation and wait for a slot on another. False
        when there is no other: the request fails as it would with one llama-server."""
        assert self.ticket is not None and self.waiter is not None
        if not self.target.drop(self.ticket.upstream, exc.message):
            return False
        call = self.call
        self.target.gate.release(self.ticket)
        self.ticket = None
        self.waiter = self.target.gate.enqueue(call.klass, classify.PRIORITY.get(call.klass, 0), call.session, call.user)
        self.wait_until_admitted()
        return True

    def start_over(self, exc: BaseException) -> bool:
        """The answer broke before its first token: send the request again on another upstream,
        if there is one in the rotation (the one that broke leaves it). False: it fails as today."""
        if self.answer is None or self.ticket is None or len(self.target.upstreams) < 2:
            return False
        upstream = self.target.upstream_of(self.ticket)
        self.answer.close()
        self.answer = None
        if not self.elsewhere(Unanswered(529, f"{upstream.base} broke the answer before its first token ({type(exc).__name__})")):
            return False
        self.open()
        return True

    def _open_once(self, raw: bytes | None, any_status: bool) -> Answer:
        assert self.ticket is not None
        assert self.payload is not None
        if self.tokens is not None and self.target is self.services.main:
            self.services.kv.before_turn(self.target, self.ticket, self.call, self.tokens)
        body = raw
        if self.target.gate.slots_of(self.ticket.upstream) > 1:
            self.payload["id_slot"] = self.ticket.slot  # the slot the gate chose, on a server with several
            body = None
        answer = self.target.upstream_of(self.ticket).open("POST", self.path, body or fastjson.dumps(self.payload), self.watch)
        if answer.status >= 400 and not any_status:
            try:
                raw = read_all(answer, self.watch)
            finally:
                answer.close()
            raise from_upstream(answer.status, raw)
        self.answer = answer
        return answer

    def anthropic_events(self, model: str, skip_start: bool = False) -> Iterator[tuple[str, dict]]:
        """The translated answer as Anthropic events; records first token and usage on the way."""
        assert self.answer is not None
        chunks = sse.decode_openai(stream_lines(self.answer, self.watch), keepalive=True)
        for event, data in translate.stream_openai_to_anthropic(chunks, model):
            if event == "message_start" and skip_start:
                continue
            if event == "content_block_delta":
                self.call.first_token()
            elif event == "message_delta":
                self.call.usage(data.get("usage"))
            elif event == "message_stop":
                self.completed = True
            yield event, data

    def relay(self, chunks: Iterator[bytes], on_broken: Callable[[BaseException], Iterator[bytes]]) -> Iterator[bytes]:
        """Pass the answer's bytes on as they come, and close the generation however it ends."""
        try:
            with client_leaving(self.client_gone):
                for chunk in chunks:
                    self.call.first_token()
                    yield chunk
                self.completed = True
        except ApiError as exc:  # llama-server stopped working on it (upstream.StallWatch)
            self.fail(exc)
            yield from on_broken(exc)
        except BROKEN as exc:
            yield from on_broken(exc)
        finally:
            self.close()

    # -- the end --------------------------------------------------------------------------------

    @contextmanager
    def starting(self) -> Iterator[None]:
        """Around everything before the answer starts: a failure closes the generation, with the
        status the client will see, and propagates."""
        try:
            yield
        except ClientDisconnected:
            self.client_gone()
            self.close()
            raise
        except BaseException as exc:
            self.fail(exc)
            self.close()
            raise

    def client_gone(self) -> None:
        """The client went away: close() records 499 and frees the slot once llama-server lets it go."""
        self.client_left = True

    def fail(self, exc: BaseException) -> None:
        if isinstance(exc, ApiError):
            self.call.status, self.call.error = exc.status, exc.message
        else:
            self.call.status, self.call.error = 500, type(exc).__name__

    def close(self) -> None:
        """Hang up on llama-server, give the slot back, record the request. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self.answer is not None:
            self.answer.close()
        if self.ticket is not None:
            self.services.release(self.target, self.ticket, self.client_left)
        elif self.waiter is not None:
            self.target.gate.cancel(self.waiter)
        if self.client_left:
            self.call.status = 499
            self.call.error = self.call.error or "client disconnected"
        if self._counted_user is not None:
            self.services.quotas.release(self._counted_user, self.call.prompt_tokens + self.call.generated_tokens)
        self._check_prefix()
        if self.completed and self.ticket is not None and not self.client_left and self.target is self.services.main:
            self.services.kv.turn_ended(self.target, self.ticket, self.call, self.tokens)
        self.services.metrics.record(self.call)

    def _check_prefix(self) -> None:
        call, ticket = self.call, self.ticket
        if self.tokens is None or ticket is None or call.session is None or not self.completed:
            return
        taken = ticket.previous is not None and ticket.previous != call.session
        finding = self.services.tracker.observe(call.session, self.tokens, ticket.slot, call.cached_tokens, taken)
        if finding is None:
            return
        self.services.metrics.reprefills.inc()
        self.services.metrics.reprefilled_tokens.inc(finding.reprefilled)
        log.warning("session %s re-prefilled %d tokens: llama-server reused %d of the %d expected from the previous turn; "
                    "first differing token %d; reason: %s", finding.session, finding.reprefilled, finding.cached,
                    finding.expected, finding.first_difference, finding.reason)
